"""On-policy distillation of causal LMs: GKD's mixed on/off-policy batches
and DistiLLM's adaptive off-policy replay, around the token-level LM step.

Off-policy KD trains the student on text it will never produce itself. The
on-policy methods have the student generate and the teacher score what it
generated:

* **GKD** (Agarwal et al., "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes", ICLR 2024). With probability
  ``fraction`` (their λ) a batch's completions are sampled from the
  *current* student given the batch's prompts (no gradient through the
  sampling); otherwise they are the data's. The teacher scores the
  sequence and the loss is any registered logit loss on completion tokens
  only (GKD's generalised JSD(β) is ``loss="jsd"``/``"generalized_jsd"``).
  ``fraction=0`` is plain off-policy (supervised) KD on completions.
* **DistiLLM** (Ko et al., "DistiLLM: Towards Streamlined Distillation for
  Large Language Models", ICML 2024): skew KL (``loss="skew_kl"``,
  ``alpha=0.1``) and *adaptive off-policy* student-generated outputs. A
  replay buffer of generated sequences (capacity ``capacity``, the oldest
  evicted first) is reused across steps; a threshold θ (``init_threshold``,
  0 in their scripts) sets how often student outputs are used, and rises by
  0.1 (to at most 1) whenever the validation loss rose by at least
  ``loss_eps`` since the last rise (`update_threshold`, called after each
  evaluation). Per step, with ``r ~ U(0, 1)`` and ``s = θ·(1 − step/total)``
  (``replay_ratio="decreasing"``; ``"constant"``: ``θ/2``, ``"increasing"``:
  ``θ·step/total``): generate and push to the buffer if ``r < s`` or (``r <
  θ`` and the buffer is not full); else train on a uniform draw from the
  buffer if ``r < θ``; else on the data. This follows ``finetune.py`` of
  github.com/jongwooko/distillm at 17c0f98, with one stated difference:
  their student starts from an SFT checkpoint and the first reference loss
  is the one before training; ours may start from random weights, so the
  reference is the first evaluation's.

Prompts. A batch's prompt is its first ``prompt_len`` tokens (``x[:, :P]``);
its completion is the rest of the window. Every loss term counts only
targets ``y[:, t]`` with ``t >= P - 1`` (the tokens after the prompt); the
data's own ``token_mask`` and example ``mask`` still apply. A generated
batch has ``P + (T + 1 - P)`` tokens from `jdistill.generate.generate`,
``x = full[:, :T]``, ``y = full[:, 1:]``, and its ``token_mask`` marks the
generated targets up to and including the first EOS; it is one sequence
(``segment_ids`` all 1, ``positions`` ``0..T-1``) even where the data
window packed several documents.

Determinism: the step's randomness (the branch, the samples, the replay
draw) comes from ``fold_in(key(seed), state.step)``, so a resumed run takes
the same branches and draws the same tokens (bit-exact resume); the replay
buffer and θ live in ``state.loss_state`` and are checkpointed with it.

Everything runs inside the jitted step: the branch is a ``lax.switch`` on a
device scalar, so only the branch taken runs (no generation on data steps).
The inner step is `jdistill.train.lm.make_lm_distill_step`, so the fused
loss, gradient accumulation, bf16 and sharding compose unchanged; a teacher
cache cannot score generated text, so on-policy batches need the online
teacher (``source="online"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jdistill import generate as gen_lib
from jdistill.train import lm as lm_lib
from jdistill.train.precision import DynamicLossScale
from jdistill.train.state import FunctionalModel, TrainState

Batch = dict[str, jax.Array]

SCHEDULES = ("fixed", "distillm")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
# Branches of the step's lax.switch.
DATA, GENERATED, REPLAY = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """How a step mixes data, student samples and replayed samples.

  Attributes:
    fraction: GKD's λ, the probability that a batch's completions come from
      the student (``schedule="fixed"``), in ``[0, 1]``.
    prompt_len: ``P``, prompt tokens at the start of every window (>= 1).
    temperature, top_k, top_p: the student's sampling (GKD samples at
      temperature 1); ``temperature=0`` is greedy.
    eos_id: a generated EOS ends the completion (its later targets do not
      count); ``None``: completions run to the window's end.
    seed: the run's seed; the step's key is ``fold_in(key(seed + 104729),
      step)``.
    schedule: ``"fixed"`` (GKD) or ``"distillm"`` (adaptive, with replay).
    capacity: sequences the DistiLLM replay buffer holds.
    init_threshold: DistiLLM's initial θ.
    loss_eps: the validation-loss rise that raises θ.
    threshold_step: how much θ rises (0.1 in DistiLLM).
    replay_ratio: ``"decreasing"``, ``"constant"`` or ``"increasing"``.
    num_steps: the run's total steps (for the replay ratio).
  """

  fraction: float = 0.0
  prompt_len: int = 1
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  eos_id: int | None = None
  seed: int = 0
  schedule: str = "fixed"
  capacity: int = 1000
  init_threshold: float = 0.0
  loss_eps: float = 0.1
  threshold_step: float = 0.1
  replay_ratio: str = "decreasing"
  num_steps: int = 1

  def __post_init__(self):
    if not 0.0 <= float(self.fraction) <= 1.0:
      raise ValueError(f"--on_policy_fraction={self.fraction}: expected a "
                       "probability in [0, 1]")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"--on_policy_schedule={self.schedule!r}: expected "
                       f"one of {', '.join(SCHEDULES)}")
    if self.replay_ratio not in REPLAY_RATIOS:
      raise ValueError(f"--replay_ratio={self.replay_ratio!r}: expected one "
                       f"of {', '.join(REPLAY_RATIOS)}")
    if int(self.prompt_len) < 1:
      raise ValueError(f"--lm_prompt_len={self.prompt_len}: expected >= 1 "
                       "prompt token")
    gen_lib.check_sampling(self.temperature, self.top_k, self.top_p,
                           names=("--gen_temperature", "--gen_top_k",
                                  "--gen_top_p"), where="on-policy sampling")
    if not 0.0 <= float(self.init_threshold) <= 1.0:
      raise ValueError(f"--distillm_init_threshold={self.init_threshold}: "
                       "expected a probability in [0, 1]")
    if int(self.capacity) < 1:
      raise ValueError(f"--replay_capacity={self.capacity}: expected >= 1")

  @property
  def active(self) -> bool:
    """Whether any batch can come from the student."""
    return self.schedule == "distillm" or self.fraction > 0

  def max_new_tokens(self, seq_len: int) -> int:
    """New tokens per generated window: ``T + 1 - P``."""
    if self.prompt_len >= seq_len:
      raise ValueError(f"--lm_prompt_len={self.prompt_len}: the prompt must "
                       f"be shorter than --seq_len={seq_len}, so that the "
                       "window has completion tokens")
    return seq_len + 1 - self.prompt_len


def completion_targets(batch: Batch, prompt_len: int) -> Batch:
  """``batch`` with ``token_mask`` False at the prompt's targets (``t <
  prompt_len - 1``); the other fields unchanged."""
  t = batch["y"].shape[1]
  keep = jnp.arange(t) >= prompt_len - 1
  mask = jnp.broadcast_to(keep, batch["y"].shape)
  if batch.get("token_mask") is not None:
    mask = mask & batch["token_mask"]
  return {**batch, "token_mask": mask}


def _like(batch: Batch, x, y, token_mask) -> Batch:
  """A batch with the structure and dtypes of ``batch`` holding one
  sequence per row (``x``, ``y``, ``token_mask``); the example mask and any
  other field are kept."""
  b, t = x.shape
  out = dict(batch)
  out["x"] = x.astype(batch["x"].dtype)
  out["y"] = y.astype(batch["y"].dtype)
  out["token_mask"] = token_mask
  if "segment_ids" in batch:
    out["segment_ids"] = jnp.ones((b, t), batch["segment_ids"].dtype)
  if "positions" in batch:
    out["positions"] = jnp.broadcast_to(
        jnp.arange(t, dtype=batch["positions"].dtype), (b, t))
  return out


def student_batch(student: FunctionalModel, params, model_state,
                  batch: Batch, key: jax.Array, on_policy: OnPolicy
                  ) -> Batch:
  """The batch with completions sampled from the student (see the module
  docstring); no gradient flows through the sampling."""
  seq_len = batch["x"].shape[1]
  new = on_policy.max_new_tokens(seq_len)
  variables = jax.lax.stop_gradient({"params": params,
                                     "model_state": model_state})
  prompts = batch["x"][:, :on_policy.prompt_len].astype(jnp.int32)
  full = gen_lib.generate(
      student, variables, prompts, max_new_tokens=new,
      temperature=on_policy.temperature, top_k=on_policy.top_k,
      top_p=on_policy.top_p, eos_id=on_policy.eos_id,
      key=key if on_policy.temperature > 0 else None)
  generated = gen_lib.completion_mask(full, None, new, on_policy.eos_id)
  return _like(batch, full[:, :-1], full[:, 1:], generated[:, 1:])


def init_replay(seq_len: int, on_policy: OnPolicy) -> dict[str, Any]:
  """The ``loss_state`` of a DistiLLM run: an empty replay buffer of
  ``capacity`` windows, θ and the reference validation loss (NaN: none
  yet); ``{}`` for the fixed schedule."""
  if on_policy.schedule != "distillm":
    return {}
  c = int(on_policy.capacity)
  return {"replay_x": jnp.zeros((c, seq_len), jnp.int32),
          "replay_y": jnp.zeros((c, seq_len), jnp.int32),
          "replay_mask": jnp.zeros((c, seq_len), bool),
          "replay_size": jnp.zeros((), jnp.int32),
          "replay_next": jnp.zeros((), jnp.int32),
          "threshold": jnp.asarray(on_policy.init_threshold, jnp.float32),
          "reference_loss": jnp.asarray(jnp.nan, jnp.float32)}


def _push(loss_state, batch: Batch) -> dict[str, Any]:
  """Appends the batch's rows to the ring buffer (oldest evicted)."""
  cap = loss_state["replay_x"].shape[0]
  b = batch["x"].shape[0]
  rows = (loss_state["replay_next"] + jnp.arange(b)) % cap
  mask = batch["token_mask"]
  if batch.get("mask") is not None:
    mask = mask & batch["mask"][:, None]
  out = dict(loss_state)
  out["replay_x"] = loss_state["replay_x"].at[rows].set(
      batch["x"].astype(jnp.int32))
  out["replay_y"] = loss_state["replay_y"].at[rows].set(
      batch["y"].astype(jnp.int32))
  out["replay_mask"] = loss_state["replay_mask"].at[rows].set(mask)
  out["replay_size"] = jnp.minimum(loss_state["replay_size"] + b, cap)
  out["replay_next"] = (loss_state["replay_next"] + b) % cap
  return out


def _replayed(loss_state, batch: Batch, key: jax.Array) -> Batch:
  """``B`` rows drawn uniformly without replacement from the buffer's
  filled rows (DistiLLM's ``random.sample``)."""
  cap = loss_state["replay_x"].shape[0]
  b = batch["x"].shape[0]
  u = jax.random.uniform(key, (cap,))
  u = jnp.where(jnp.arange(cap) < loss_state["replay_size"], u, 2.0)
  rows = jnp.argsort(u)[:b]
  out = _like(batch, loss_state["replay_x"][rows],
              loss_state["replay_y"][rows], loss_state["replay_mask"][rows])
  if batch.get("mask") is not None:
    out["mask"] = jnp.ones_like(batch["mask"])
  return out


def _distillm_branch(loss_state, r, step, on_policy: OnPolicy, batch_size):
  theta = loss_state["threshold"]
  frac = step.astype(jnp.float32) / max(int(on_policy.num_steps), 1)
  s = {"decreasing": theta * (1.0 - frac), "constant": theta * 0.5,
       "increasing": theta * frac}[on_policy.replay_ratio]
  size = loss_state["replay_size"]
  cap = loss_state["replay_x"].shape[0]
  generate = (r < s) | ((r < theta) & (size < cap))
  replay = (r < theta) & (size >= batch_size)
  return jnp.where(generate, GENERATED, jnp.where(replay, REPLAY, DATA))


def update_threshold(loss_state, validation_loss: float, on_policy: OnPolicy
                     ) -> dict[str, Any]:
  """DistiLLM's adaptive θ after an evaluation: ``θ += threshold_step`` (at
  most 1) and the reference loss moves to ``validation_loss`` when it rose
  by at least ``loss_eps`` above the reference; the first evaluation sets
  the reference. ``loss_state`` unchanged for other schedules."""
  if on_policy.schedule != "distillm":
    return loss_state
  ref = loss_state["reference_loss"]
  loss = jnp.asarray(validation_loss, jnp.float32)
  first = jnp.isnan(ref)
  rose = (~first) & (loss >= ref + on_policy.loss_eps)
  theta = jnp.where(rose, jnp.minimum(
      loss_state["threshold"] + on_policy.threshold_step, 1.0),
                    loss_state["threshold"])
  return {**loss_state, "threshold": theta,
          "reference_loss": jnp.where(first | rose, loss, ref)}


def make_on_policy_distill_step(
    student: FunctionalModel, tx: optax.GradientTransformation,
    objective: lm_lib.LMDistillObjective, teacher: FunctionalModel,
    on_policy: OnPolicy, *, grad_accum_steps: int = 1,
    loss_scale: DynamicLossScale | None = None
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
  """GKD / DistiLLM distillation (module docstring).

  Args:
    student, tx, objective, teacher, grad_accum_steps, loss_scale: as
      `jdistill.train.lm.make_lm_distill_step` (``objective.source`` must
      be ``"online"`` when any batch can be generated).
    on_policy: the mixing.

  Returns:
    ``step(state, teacher_variables, batch) -> (state, metrics)`` with the
    LM step's metrics plus ``on_policy`` (1 when the batch was generated)
    and, for DistiLLM, ``replay`` (1 when replayed), ``threshold`` and
    ``replay_size``. The state's ``loss_state`` must come from
    `init_replay`.
  """
  if on_policy.active and objective.source != "online":
    raise ValueError(f"--on_policy_fraction/--on_policy_schedule: student "
                     f"samples need the online teacher to score them, not "
                     f"--lm_teacher_source={objective.source}")
  inner = lm_lib.make_lm_distill_step(student, tx, objective, teacher,
                                      grad_accum_steps=grad_accum_steps,
                                      loss_scale=loss_scale)
  p = int(on_policy.prompt_len)

  def step(state: TrainState, teacher_variables, batch: Batch):
    batch = completion_targets(batch, p)
    if not on_policy.active:  # λ = 0: plain KD on completions.
      return inner(state, teacher_variables, batch)
    key = jax.random.fold_in(jax.random.key(on_policy.seed + 104729),
                             state.step)
    k_branch, k_gen, k_replay = jax.random.split(key, 3)
    r = jax.random.uniform(k_branch)
    loss_state = state.loss_state

    def data(loss_state):
      return batch, loss_state

    def generated(loss_state):
      new = student_batch(student, state.params, state.model_state, batch,
                          k_gen, on_policy)
      if on_policy.schedule == "distillm":
        loss_state = _push(loss_state, new)
      return new, loss_state

    def replayed(loss_state):
      return _replayed(loss_state, batch, k_replay), loss_state

    if on_policy.schedule == "fixed":
      if on_policy.fraction >= 1.0:
        branch = jnp.asarray(GENERATED, jnp.int32)
        batch, loss_state = generated(loss_state)
      else:
        branch = jnp.where(r < on_policy.fraction, GENERATED, DATA)
        batch, loss_state = jax.lax.cond(branch == GENERATED, generated,
                                         data, loss_state)
    else:
      branch = _distillm_branch(loss_state, r, state.step, on_policy,
                                batch["x"].shape[0])
      batch, loss_state = jax.lax.switch(branch, [data, generated, replayed],
                                         loss_state)
    state, metrics = inner(state.replace(loss_state=loss_state),
                           teacher_variables, batch)
    metrics = dict(metrics, on_policy=(branch == GENERATED).astype(
        jnp.float32))
    if on_policy.schedule == "distillm":
      metrics.update(replay=(branch == REPLAY).astype(jnp.float32),
                     threshold=loss_state["threshold"],
                     replay_size=loss_state["replay_size"].astype(
                         jnp.float32))
    return state, metrics

  return step


def make_sample_scorer(student: FunctionalModel, teacher: FunctionalModel, *,
                       prompt_len: int, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, eos_id: int | None = None
                       ) -> Callable[..., dict[str, jax.Array]]:
  """The quality of the student's own generations: the teacher's NLL of
  student samples (what on-policy methods improve and validation
  perplexity misses).

  Returns:
    ``score(student_variables, teacher_variables, batch, key) ->
    {"teacher_nll_sum", "student_nll_sum", "count", "eos_count"}``: sums
    over the generated tokens (up to and including the first EOS) of the
    teacher's and the student's next-token NLL (nats), given the first
    ``prompt_len`` tokens of each row of ``batch["x"]`` as the prompt.
    Rows with ``batch["mask"]`` False do not count.
  """

  def nll(model, variables, tokens):
    logits, _, _ = model.apply(variables["params"], variables["model_state"],
                               tokens[:, :-1], train=False)
    return lm_lib.next_token_nll(logits, tokens[:, 1:])

  def score(student_variables, teacher_variables, batch: Batch, key):
    prompts = batch["x"][:, :prompt_len].astype(jnp.int32)
    full = gen_lib.generate(
        student, student_variables, prompts, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        key=key if temperature > 0 else None)
    mask = gen_lib.completion_mask(full, None, max_new_tokens, eos_id)[:, 1:]
    if batch.get("mask") is not None:
      mask = mask & batch["mask"][:, None]
    t_nll = nll(teacher, teacher_variables, full)
    s_nll = nll(student, student_variables, full)
    eos = (jnp.zeros((), jnp.int32) if eos_id is None else
           jnp.sum(mask & (full[:, 1:] == eos_id)))
    return {"teacher_nll_sum": jnp.sum(jnp.where(mask, t_nll, 0.0)),
            "student_nll_sum": jnp.sum(jnp.where(mask, s_nll, 0.0)),
            "count": jnp.sum(mask), "eos_count": eos}

  return score
