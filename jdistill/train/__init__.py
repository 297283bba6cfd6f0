"""Steps and state: functional NNX models, train/distill/eval steps, mesh,
checkpoints and the training loop."""

from jdistill.train.checkpoint import (CheckpointError, Checkpointer,
                                       load_model_variables, read_model_spec,
                                       state_digest, write_model_spec)
from jdistill.train.loop import (MetricsWriter, Preempted, StopSignals,
                                 evaluate, predict_logits, sum_over_source,
                                 train_loop)
from jdistill.train.mesh import (DATA_AXIS, FSDP_AXIS, TEACHER_AXIS,
                                 TENSOR_AXIS, batch_sharding, batch_shards,
                                 batch_spec, compile_step, format_mesh,
                                 local_batch_slice, make_data_mesh,
                                 make_data_teacher_mesh, put_batch, replicate,
                                 replicated)
from jdistill.train.precision import (POLICIES, DynamicLossScale, Policy,
                                      float16_supported, get_policy)
from jdistill.train.sharding import (ShardingRules, make_mesh, parse_mesh,
                                     parse_rules, state_specs)
from jdistill.train.multi_teacher import (COMBINERS, MultiTeacherObjective,
                                          make_ensemble_eval_step,
                                          make_multi_teacher_distill_step,
                                          per_teacher_shapes, teacher_tap)
from jdistill.train.objective import (FEATURE_LOSSES, DistillObjective,
                                      FeatureLossSpec, FeatureTerm, cross_entropy,
                                      distill_loss_names,
                                      feature_loss_hyperparameters,
                                      loss_hyperparameters, masked_mean)
from jdistill.train.optim import make_optimizer, make_schedule
from jdistill.train.projectors import (PROJECTOR_KINDS, FeatureProjectors,
                                       FunctionalProjectors, build_projectors,
                                       check_projectable, feature_shapes)
from jdistill.train.state import FunctionalModel, TrainState
from jdistill.train.ensemble import (STACKINGS, TeacherEnsemble,
                                     shard_teachers)
from jdistill.train.step import (AUGMENT_VIEWS, NONFINITE_MODES,
                                 accumulate_gradients, augment_key,
                                 ema_decay_at, ema_update, guard_nonfinite,
                                 make_class_sums_step, make_distill_step,
                                 make_ema_self_distill_step, make_eval_step,
                                 make_train_step)

__all__ = [
    "FSDP_AXIS", "TENSOR_AXIS", "batch_shards", "batch_spec", "format_mesh",
    "local_batch_slice", "ShardingRules", "make_mesh", "parse_mesh",
    "parse_rules", "state_specs", "POLICIES", "DynamicLossScale", "Policy",
    "get_policy", "float16_supported", "accumulate_gradients",
    "AUGMENT_VIEWS", "augment_key",
    "ema_decay_at", "ema_update", "make_ema_self_distill_step",
    "batch_sharding", "build_projectors", "COMBINERS", "CheckpointError",
    "guard_nonfinite", "NONFINITE_MODES", "Preempted", "state_digest",
    "StopSignals",
    "make_data_teacher_mesh", "make_ensemble_eval_step",
    "make_multi_teacher_distill_step", "MultiTeacherObjective",
    "per_teacher_shapes", "TEACHER_AXIS", "teacher_tap", "check_projectable", "Checkpointer",
    "compile_step", "cross_entropy", "DATA_AXIS", "distill_loss_names",
    "DistillObjective", "evaluate", "feature_loss_hyperparameters",
    "FEATURE_LOSSES", "feature_shapes", "FeatureLossSpec", "FeatureProjectors",
    "FeatureTerm", "FunctionalModel", "FunctionalProjectors",
    "load_model_variables", "loss_hyperparameters", "make_class_sums_step",
    "make_data_mesh", "make_distill_step", "make_eval_step", "make_optimizer",
    "make_schedule", "make_train_step", "masked_mean", "MetricsWriter",
    "PROJECTOR_KINDS", "put_batch", "read_model_spec", "replicate",
    "replicated", "shard_teachers", "STACKINGS", "sum_over_source", "predict_logits",
    "TeacherEnsemble", "train_loop", "TrainState", "write_model_spec",
]
