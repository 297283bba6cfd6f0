"""Distillation losses: pure, jittable functions of arrays (no Flax, no I/O).

Logit losses (``jdistill.losses.logit``):

* Registered in ``LOGIT_LOSSES`` / :func:`get_logit_loss`, all with the
  signature ``loss(student_logits, teacher_logits, *, temperature, axis,
  where, **hp)`` and per-example outputs (``axis`` reduced):
  ``kd``, ``reverse_kl``, ``jsd``, ``generalized_jsd`` (TRL's GKD
  convention: KL endpoints, no ``T**2``), ``skew_kl``, ``skew_reverse_kl``,
  ``total_variation``, ``mse_logits``.
* Not registered, because they do not fit that signature, so a train step
  must call them explicitly:

  - ``dkd(student_logits, teacher_logits, labels, *, alpha, beta,
    temperature, axis, where)`` needs the ground-truth ``labels`` and returns
    per-example values (its batch mean equals mdistiller's ``dkd_loss``);
  - ``dist(student_logits, teacher_logits, *, beta, gamma, temperature)`` is
    relational (correlates across the batch) and returns a scalar.

* ``bdkd`` (BD-KD, per-sample entropy-balanced forward + reverse KL) is
  registered too. ``taid`` (TAID) is not: its interpolation coefficient
  ``t`` comes from an adaptive schedule kept in the train state
  (``taid_init`` / ``taid_update`` / ``TAIDState``).
* ``pld`` (Plackett-Luce distillation) needs ``labels`` and returns
  per-example values; ``sinkhorn`` (SinKD) and ``mlkd`` (multi-level logit
  distillation) are relational over the batch and return scalars; they take
  an ``example_mask`` of the rows that take part.
* ``ofa`` (OFA's target-enhanced KD) needs ``labels`` and returns
  per-example values; with ``--projector=ofa`` it also distills
  intermediate features mapped into logit space.
* ``standardize_logits`` is a pre-transform (logit standardization) that can
  be applied to both logits before any of the losses above.

Feature losses (``jdistill.losses.feature``), per-example outputs, inputs
channels-last and already projected to equal shapes where needed:
``hint`` (FitNets; ``kind`` mse, smooth_l1 or cosine), ``attention_transfer``
(AT), ``nd`` (norm and direction, with ``class_means``), ``vkd`` (V_kD, with
``orthogonal_projection``), ``attention_map`` (MiniLM attention KL) and
``token_relation`` (MiniLMv2 relations).

Relational losses (``jdistill.losses.relational``), scalars over the batch
with an ``example_mask``: ``rkd_distance``, ``rkd_angle`` (RKD),
``similarity_preserving`` (SP), ``pkt`` (PKT), ``cka`` / ``cka_loss`` (linear
CKA), ``contrastive`` (InfoNCE with in-batch and memory-bank negatives;
``memory_bank_init`` / ``memory_bank_update``).

Sequence (LLM) distillation:

* ``jdistill.losses.sequence``: ``sequence_kd`` applies any registered logit
  loss to ``[batch, time, vocab]`` logits with a ``token_mask`` and a
  ``reduction`` (per token, per sequence, token-weighted batch mean, or mean
  of sequence means); ``reduce_tokens`` / ``reduction_weights`` expose the
  reductions.
* ``jdistill.losses.sparse``: offline teacher targets and their losses:
  ``dense_teacher_targets`` / ``dense_kd``, ``topk_teacher_targets`` /
  ``topk_kd`` (renormalized, raw or tail; biased, ``topk_bias`` measures
  it), and Random-Sampling KD (``sample_teacher_tokens`` / ``sampled_kd``,
  unbiased in expectation; ``sampled_gradient_rmse`` its noise). Their
  ``where`` is a token mask, not a vocabulary mask.
* ``jdistill.losses.uld``: ``uld_loss`` (ULD, Universal Logit Distillation)
  compares a student and a teacher with different vocabularies (sorted
  probabilities, L1); ``gather_aligned`` picks the teacher position aligned
  to each student position. Not registered: the vocabularies differ.
* ``jdistill.losses.fused``: ``fused_linear_kd`` computes any of the
  divergences from the final hidden states and unembeddings in token
  chunks, never forming the ``[N, V]`` logits (optionally vocab-sharded).
"""

from jdistill.losses.logit import (
    LOGIT_LOSSES,
    dist,
    dkd,
    generalized_jsd,
    get_logit_loss,
    jsd,
    kd,
    mse_logits,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    standardize_logits,
    total_variation,
)
from jdistill.losses.bdkd import bdkd
from jdistill.losses.feature import (
    attention_map,
    attention_transfer,
    class_means,
    hint,
    nd,
    orthogonal_projection,
    token_relation,
    vkd,
)
from jdistill.losses.relational import (
    cka,
    cka_loss,
    contrastive,
    memory_bank_init,
    memory_bank_update,
    pkt,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from jdistill.losses.multilevel import mlkd, mlkd_confidence_mask
from jdistill.losses.ofa import ofa
from jdistill.losses.ranking import pld
from jdistill.losses.taid import TAIDState, taid, taid_init, taid_update
from jdistill.losses.transport import sinkhorn
from jdistill.losses.sequence import (reduce_tokens, reduction_weights,
                                      sequence_kd)
from jdistill.losses.fused import FUSED_KD_LOSSES, fused_linear_kd
from jdistill.losses.uld import gather_aligned, uld_loss
from jdistill.losses.sparse import (TOPK_VARIANTS, dense_kd,
                                    dense_teacher_targets,
                                    sample_teacher_tokens,
                                    sampled_gradient_rmse, sampled_kd,
                                    scatter_to_vocab, teacher_entropy,
                                    topk_bias, topk_kd, topk_teacher_targets)

LOGIT_LOSSES["bdkd"] = bdkd  # Same signature as the registry's other losses.

__all__ = [
    "FUSED_KD_LOSSES",
    "LOGIT_LOSSES",
    "TOPK_VARIANTS",
    "dense_kd",
    "dense_teacher_targets",
    "sample_teacher_tokens",
    "sampled_gradient_rmse",
    "sampled_kd",
    "scatter_to_vocab",
    "teacher_entropy",
    "topk_bias",
    "topk_kd",
    "topk_teacher_targets",
    "TAIDState",
    "attention_map",
    "attention_transfer",
    "bdkd",
    "cka",
    "cka_loss",
    "class_means",
    "contrastive",
    "dist",
    "dkd",
    "fused_linear_kd",
    "gather_aligned",
    "generalized_jsd",
    "get_logit_loss",
    "hint",
    "jsd",
    "kd",
    "memory_bank_init",
    "memory_bank_update",
    "mlkd",
    "mlkd_confidence_mask",
    "mse_logits",
    "nd",
    "ofa",
    "orthogonal_projection",
    "pkt",
    "pld",
    "reduce_tokens",
    "reduction_weights",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_kl",
    "sequence_kd",
    "sinkhorn",
    "skew_reverse_kl",
    "standardize_logits",
    "taid",
    "taid_init",
    "taid_update",
    "token_relation",
    "total_variation",
    "uld_loss",
    "vkd",
]
