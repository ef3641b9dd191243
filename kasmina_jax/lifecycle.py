"""The 11-stage seed lifecycle as pure functions over an immutable `SeedState` pytree.

Every transition happens by command at epoch end, only when it is legal (`LEGAL_TRANSITIONS`)
and its gate has passed (`ready` for success-path advances, the embargo for germination, ...).
A rejected command leaves the seed bit-for-bit unchanged and is reported as not accepted.
Per-step quantities (alpha, steps in stage, objective averages) change in the train step, see
`tick_step` and `kasmina_jax.grafting`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from kasmina_jax import _struct as struct

from kasmina_jax import _checks
from kasmina_jax import tolerance


class Stage(enum.IntEnum):
  """The design's 11 stages, in its order (docs/design.md, "Stages")."""

  DORMANT = 0
  GERMINATED = 1
  TRAINING = 2
  GRAFTING = 3
  STABILIZATION = 4
  EVALUATING = 5
  FINE_TUNING = 6
  FOSSILIZED = 7
  CULLED = 8
  CANCELLED = 9
  ROLLED_BACK = 10


NUM_STAGES = len(Stage)

# The design's state diagram, [from, to] (docs/design.md, "Stages"). FOSSILIZED and ROLLED_BACK
# are terminal: the diagram's
# FOSSILIZED -> DORMANT edge is not taken (the design's stage table calls FOSSILIZED terminal).
_EDGES = (
    (Stage.DORMANT, Stage.GERMINATED),
    (Stage.GERMINATED, Stage.TRAINING),
    (Stage.GERMINATED, Stage.CANCELLED),
    (Stage.TRAINING, Stage.GRAFTING),
    (Stage.TRAINING, Stage.CULLED),
    (Stage.TRAINING, Stage.CANCELLED),
    (Stage.GRAFTING, Stage.STABILIZATION),
    (Stage.STABILIZATION, Stage.EVALUATING),
    (Stage.EVALUATING, Stage.FINE_TUNING),
    (Stage.EVALUATING, Stage.CULLED),
    (Stage.FINE_TUNING, Stage.FOSSILIZED),
    (Stage.FINE_TUNING, Stage.CULLED),
    (Stage.CULLED, Stage.DORMANT),
    (Stage.CANCELLED, Stage.DORMANT),
    (Stage.TRAINING, Stage.ROLLED_BACK),
    (Stage.GRAFTING, Stage.ROLLED_BACK),
    (Stage.STABILIZATION, Stage.ROLLED_BACK),
    (Stage.EVALUATING, Stage.ROLLED_BACK),
    (Stage.FINE_TUNING, Stage.ROLLED_BACK),
)


def _legal_table() -> np.ndarray:
  table = np.zeros((NUM_STAGES, NUM_STAGES), dtype=bool)
  for src, dst in _EDGES:
    table[src, dst] = True
  table.setflags(write=False)
  return table


LEGAL_TRANSITIONS: np.ndarray = _legal_table()

# Next stage on the success path; -1 where there is none (terminal stages).
SUCCESS_NEXT: np.ndarray = np.array(
    [
        Stage.GERMINATED,  # DORMANT
        Stage.TRAINING,  # GERMINATED
        Stage.GRAFTING,  # TRAINING
        Stage.STABILIZATION,  # GRAFTING
        Stage.EVALUATING,  # STABILIZATION
        Stage.FINE_TUNING,  # EVALUATING
        Stage.FOSSILIZED,  # FINE_TUNING
        -1,  # FOSSILIZED
        Stage.DORMANT,  # CULLED
        Stage.DORMANT,  # CANCELLED
        -1,  # ROLLED_BACK
    ],
    dtype=np.int32,
)

# Stages whose child is alive (has parameters that matter).
ACTIVE_STAGES = (
    Stage.TRAINING,
    Stage.GRAFTING,
    Stage.STABILIZATION,
    Stage.EVALUATING,
    Stage.FINE_TUNING,
    Stage.FOSSILIZED,
)
# Stages whose child's output is (partly or wholly) in the model's output.
BLENDING_STAGES = (
    Stage.GRAFTING,
    Stage.STABILIZATION,
    Stage.EVALUATING,
    Stage.FINE_TUNING,
    Stage.FOSSILIZED,
)
# Stages whose child parameters learn (see docs/design.md, "Stage table"); with
# `LifecycleConfig.fossil == "integrated"` (the default) FOSSILIZED children learn too.
LEARNING_STAGES = (Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING)
# What a FOSSILIZED child does after it leaves the lifecycle (docs/design.md, "Fossils").
FOSSIL_MODES = ("integrated", "frozen")


def learning_stages(fossil: str = "integrated") -> tuple:
  """The stages whose child parameters learn: `LEARNING_STAGES`, plus FOSSILIZED when
  `fossil == "integrated"` (a fossil is part of the host and keeps training with it)."""
  if fossil not in FOSSIL_MODES:
    raise ValueError(f"fossil: expected one of {FOSSIL_MODES}, got {fossil!r}")
  return LEARNING_STAGES + ((Stage.FOSSILIZED,) if fossil == "integrated" else ())
# Stages that count as "in flight" for emergency rollback.
ROLLBACK_STAGES = (
    Stage.TRAINING,
    Stage.GRAFTING,
    Stage.STABILIZATION,
    Stage.EVALUATING,
    Stage.FINE_TUNING,
)


def stage_in(stage: jax.Array, stages) -> jax.Array:
  """Boolean mask: `stage` is one of `stages` (works on traced int arrays)."""
  lut = np.zeros((NUM_STAGES,), dtype=bool)
  for s in stages:
    lut[int(s)] = True
  return jnp.asarray(lut)[jnp.clip(stage, 0, NUM_STAGES - 1)]


class Op(enum.IntEnum):
  """Command opcodes. NONE leaves a seed alone."""

  NONE = 0
  GERMINATE = 1
  ADVANCE = 2
  CANCEL = 3
  CULL = 4
  ROLLBACK = 5


@dataclasses.dataclass(frozen=True)
class LifecycleConfig:
  """Gate thresholds; counts are in steps and checked at epoch end (docs/design.md,
  "Lifecycle thresholds")."""

  min_training_steps: int = 100
  recon_tolerance: float = 1e-2
  improvement_margin: float = 0.0
  # The TRAINING -> GRAFTING gate's margin for residual / parallel children (None: the
  # `improvement_margin`). TRAINING buys a safe gate, not accuracy (docs/design.md, "TRAINING
  # objective"): a negative margin grafts a child whose isolated trust-region step does not
  # hurt by more than it. Measured on the char LM: head and block children's isolated Δ stays
  # within float noise of 0 (the trust-region step is tiny there), so a strict gate culls
  # every one of them at `max_training_steps` without ever letting the task gradient reach it.
  training_margin: float | None = None
  max_training_steps: int = 2000
  stabilization_steps: int = 100
  fine_tuning_steps: int = 500
  fine_tuning_patience: int = 2
  embargo_epochs: int = 5
  # "integrated": a fossilized child keeps training with the host (it is host capacity now);
  # "frozen": the design's literal reading, frozen forever (docs/design.md, "Fossils"). Either
  # way it has left the
  # lifecycle: no gate, cull or per-seed rollback touches it.
  fossil: str = "integrated"

  def __post_init__(self):
    if self.fossil not in FOSSIL_MODES:
      raise ValueError(f"fossil: expected one of {FOSSIL_MODES}, got {self.fossil!r}")
    for name in ("min_training_steps", "max_training_steps", "stabilization_steps",
                 "fine_tuning_steps", "fine_tuning_patience", "embargo_epochs"):
      _checks.non_negative_int(name, getattr(self, name))
    _checks.finite_float("recon_tolerance", self.recon_tolerance, min_value=0.0)
    _checks.finite_float("improvement_margin", self.improvement_margin)
    if self.training_margin is not None:
      _checks.finite_float("training_margin", self.training_margin)


@struct.dataclass
class SeedState:
  """All seeds of one layer; every leaf has leading axis `num_seeds`.

  Stack several layers' states along a new leading axis (`jax.tree.map(jnp.stack, ...)`) and
  `jax.vmap` the functions of this module over it.
  """

  stage: jax.Array  # int32: a `Stage`
  blueprint: jax.Array  # int32: index into the layer's blueprint tuple, -1 when none
  strategy: jax.Array  # int32: index into the layer's grafting strategies, -1 when none
  alpha: jax.Array  # float32 in [0, 1]: blend weight while GRAFTING
  steps_in_stage: jax.Array  # int32
  epochs_in_stage: jax.Array  # int32
  embargo_left: jax.Array  # int32: epoch ends left before a CULLED slot may be reused
  ready: jax.Array  # bool: the gate of the success-path advance passed
  objective: jax.Array  # float32: running mean of the child's own objective this window
  objective_count: jax.Array  # int32: steps in that mean
  objective_window_start: jax.Array  # float32: objective at the start of the current window
  objective_rate: jax.Array  # float32: relative fall of the objective over the last window
  objective_rate_ref: jax.Array  # float32: that rate when GRAFTING began (performance-linked)
  pause_steps: jax.Array  # int32: consecutive steps the alpha ramp has been paused
  delta: jax.Array  # float32: last validation counterfactual val_loss(off) - val_loss(on)
  recon_ratio: jax.Array  # float32: last ||g(x)-x||^2 / ||x||^2 (replacement children)
  bad_epochs: jax.Array  # int32: consecutive epoch ends with delta <= margin (FINE_TUNING)
  # bool: the last `update_readiness` had no counterfactual for a seed whose gate needs one
  # (left out by `max_judged`): it is neither advanced nor culled on that missing delta.
  unjudged: jax.Array
  nonfinite: jax.Array  # bool: the child produced a non-finite output since the last epoch end
  stage_epochs: jax.Array  # int32 (num_seeds, 11): epochs spent in each stage this lifecycle
  germinated_epoch: jax.Array  # int32: epoch of the last germination, -1 when none
  # int32: training steps with a live child since the last germination (`tick_step`); the
  # field reports' latency in steps (a wall-clock figure cannot be measured inside `jit`).
  lifecycle_steps: jax.Array

  @property
  def num_seeds(self) -> int:
    return self.stage.shape[-1]


def init_seed_state(num_seeds: int) -> SeedState:
  """All seeds DORMANT, no blueprint, no embargo."""
  _checks.positive_int("num_seeds", num_seeds)
  k = num_seeds
  zi = jnp.zeros((k,), jnp.int32)
  zf = jnp.zeros((k,), jnp.float32)
  return SeedState(
      stage=zi,
      blueprint=jnp.full((k,), -1, jnp.int32),
      strategy=jnp.full((k,), -1, jnp.int32),
      alpha=zf,
      steps_in_stage=zi,
      epochs_in_stage=zi,
      embargo_left=zi,
      ready=jnp.zeros((k,), bool),
      objective=zf,
      objective_count=zi,
      objective_window_start=zf,
      objective_rate=zf,
      objective_rate_ref=zf,
      pause_steps=zi,
      delta=zf,
      recon_ratio=jnp.full((k,), jnp.inf, jnp.float32),
      bad_epochs=zi,
      unjudged=jnp.zeros((k,), bool),
      nonfinite=jnp.zeros((k,), bool),
      stage_epochs=jnp.zeros((k, NUM_STAGES), jnp.int32),
      germinated_epoch=jnp.full((k,), -1, jnp.int32),
      lifecycle_steps=zi,
  )


@struct.dataclass
class Commands:
  """One command per seed. `target` is used by ADVANCE only (-1: the success-path stage);
  `blueprint` and `strategy` by GERMINATE only."""

  op: jax.Array  # int32 `Op`
  target: jax.Array  # int32 `Stage` or -1
  blueprint: jax.Array  # int32
  strategy: jax.Array  # int32


def no_commands(num_seeds: int) -> Commands:
  """A `Commands` pytree that does nothing."""
  _checks.positive_int("num_seeds", num_seeds)
  zi = jnp.zeros((num_seeds,), jnp.int32)
  return Commands(op=zi, target=zi - 1, blueprint=zi - 1, strategy=zi - 1)


# What the int-only arguments of this module's public functions take (for their TypeErrors).
_INT_ARGUMENTS = {
    "op": "an int lifecycle.Op or an int array of them",
    "target": "an int lifecycle.Stage (-1: the success-path stage) or an int array of them",
    "blueprint": ("an int blueprint id or an int array of ids: the blueprint's index in the "
                  "layer's catalog (e.g. spec.catalog.names.index(name)), not its name"),
    "strategy": "an int grafting strategy id (grafting.GraftingStrategy) or an int array of them",
    "seeds": "a seed index, an int array of indices or a bool mask of shape (num_seeds,)",
    "epoch": "an int epoch (or an int scalar array)",
}


def _check_id_range(name: str, arr, low: int, high: int, what: str) -> None:
  """Raises a ValueError naming `name`, the first bad value and its seed when a concrete
  `arr` holds a value outside `[low, high)`. Traced values are left to the gates (a command
  with an unknown id is rejected there, so a policy under `jit` cannot break the lifecycle);
  concrete ones are the caller's mistake, and a silent rejection would hide it."""
  if isinstance(arr, jax.core.Tracer):
    return
  values = np.asarray(arr)
  flat = values.reshape(-1)
  bad = np.nonzero((flat < low) | (flat >= high))[0]
  if bad.size:
    value = int(flat[bad[0]])
    at = f" (seed {int(bad[0])})" if values.ndim == 1 else ""
    raise ValueError(f"{name}: expected {what} in [{low}, {high}), got {value}{at}")


def make_commands(num_seeds: int, *, op=None, target=None, blueprint=None,
                  strategy=None, num_blueprints: int | None = None,
                  num_strategies: int | None = None) -> Commands:
  """Build `Commands` from (possibly scalar) values, broadcast to `num_seeds`.

  Concrete values are checked here, before anything is traced: `op` must be an `Op`,
  `target` a `Stage` or -1, `blueprint` and `strategy` -1 (none) or, when the catalog sizes
  `num_blueprints` / `num_strategies` are given, an index below them (a ValueError names the
  argument and the value). Traced values are not checked: `apply_commands` rejects a command
  with an unknown id at its gate, which is what a policy under `jit` relies on.
  """
  if num_blueprints is not None:
    _checks.positive_int("num_blueprints", num_blueprints)
  if num_strategies is not None:
    _checks.positive_int("num_strategies", num_strategies)
  ranges = {
      "op": (0, len(Op), "lifecycle.Op ids"),
      "target": (-1, NUM_STAGES, "lifecycle.Stage ids (-1: the success-path stage)"),
      "blueprint": (-1, num_blueprints if num_blueprints is not None else np.iinfo(np.int32).max,
                    "blueprint ids (-1: none)"),
      "strategy": (-1, num_strategies if num_strategies is not None else np.iinfo(np.int32).max,
                   "grafting strategy ids (-1: none)"),
  }
  base = no_commands(num_seeds)
  fields = {}
  for name, value in (("op", op), ("target", target), ("blueprint", blueprint),
                      ("strategy", strategy)):
    if value is None:
      fields[name] = getattr(base, name)
    else:
      _checks.int_like(name, value, _INT_ARGUMENTS[name])
      arr = jnp.asarray(value)
      _checks.integer_array(name, arr)
      _check_id_range(name, arr, *ranges[name])
      fields[name] = _broadcast_seeds(name, arr.astype(jnp.int32), num_seeds)
  return Commands(**fields)


def _command_target(state: SeedState, commands: Commands) -> jax.Array:
  """The stage each command asks for, -1 for none."""
  op = commands.op
  success = jnp.asarray(SUCCESS_NEXT)[jnp.clip(state.stage, 0, NUM_STAGES - 1)]
  advance_to = jnp.where(commands.target >= 0, commands.target, success)
  return jnp.select(
      [op == Op.GERMINATE, op == Op.ADVANCE, op == Op.CANCEL, op == Op.CULL,
       op == Op.ROLLBACK],
      [jnp.full_like(op, Stage.GERMINATED), advance_to, jnp.full_like(op, Stage.CANCELLED),
       jnp.full_like(op, Stage.CULLED), jnp.full_like(op, Stage.ROLLED_BACK)],
      default=jnp.full_like(op, -1),
  )


def command_accepted(state: SeedState, commands: Commands, *, num_blueprints: int,
                     num_strategies: int) -> jax.Array:
  """Per seed: the command is legal and its gate passed (pure, jittable)."""
  src = jnp.clip(state.stage, 0, NUM_STAGES - 1)
  dst = _command_target(state, commands)
  valid_dst = (dst >= 0) & (dst < NUM_STAGES)
  legal = valid_dst & jnp.asarray(LEGAL_TRANSITIONS)[src, jnp.clip(dst, 0, NUM_STAGES - 1)]
  success = jnp.asarray(SUCCESS_NEXT)[src]
  on_success_path = dst == success
  # The gate of each kind of edge.
  germinate_gate = ((state.embargo_left <= 0)
                    & (commands.blueprint >= 0) & (commands.blueprint < num_blueprints)
                    & (commands.strategy >= 0) & (commands.strategy < num_strategies))
  # Germination is only by GERMINATE (it needs a blueprint and a strategy).
  gate = jnp.where(
      dst == Stage.GERMINATED,
      (commands.op == Op.GERMINATE) & germinate_gate,
      # Success-path advances need the seed's `ready` flag; cull / cancel / rollback edges
      # are Tamiyo's decision and need no readiness.
      jnp.where(on_success_path, state.ready, True),
  )
  return legal & gate & (commands.op != Op.NONE)


def _enter_stage(state: SeedState, mask: jax.Array, new_stage: jax.Array,
                 commands: Commands, config: LifecycleConfig,
                 epoch: jax.Array) -> SeedState:
  """State of every masked seed after entering `new_stage` (unmasked seeds unchanged)."""

  def pick(new, old):
    m = mask.reshape(mask.shape + (1,) * (old.ndim - mask.ndim))
    return jnp.where(m, jnp.asarray(new, old.dtype), old)

  entering = lambda s: mask & (new_stage == s)
  to_dormant = entering(Stage.DORMANT)
  germ = entering(Stage.GERMINATED)
  grafting = entering(Stage.GRAFTING)
  zeros_i = jnp.zeros_like(state.steps_in_stage)
  new = state.replace(
      stage=pick(new_stage, state.stage),
      steps_in_stage=pick(zeros_i, state.steps_in_stage),
      epochs_in_stage=pick(zeros_i, state.epochs_in_stage),
      ready=pick(False, state.ready),
      pause_steps=pick(zeros_i, state.pause_steps),
      bad_epochs=pick(zeros_i, state.bad_epochs),
  )
  new = new.replace(
      blueprint=jnp.where(germ, commands.blueprint,
                          jnp.where(to_dormant, -1, new.blueprint)),
      strategy=jnp.where(germ, commands.strategy,
                         jnp.where(to_dormant, -1, new.strategy)),
      # alpha: 0 until GRAFTING ramps it; 1 from STABILIZATION on.
      alpha=jnp.where(mask, stage_in(new_stage, BLENDING_STAGES[1:]).astype(jnp.float32),
                      new.alpha),
      embargo_left=jnp.where(entering(Stage.CULLED), config.embargo_epochs,
                             new.embargo_left),
      objective_rate_ref=jnp.where(grafting, new.objective_rate, new.objective_rate_ref),
      stage_epochs=jnp.where(germ[:, None], 0, new.stage_epochs),
      germinated_epoch=jnp.where(germ, epoch, jnp.where(to_dormant, -1, new.germinated_epoch)),
      lifecycle_steps=jnp.where(germ | to_dormant, 0, new.lifecycle_steps),
      nonfinite=jnp.where(germ | to_dormant, False, new.nonfinite),
      delta=jnp.where(germ | to_dormant, 0.0, new.delta),
      recon_ratio=jnp.where(germ | to_dormant, jnp.inf, new.recon_ratio),
  )
  reset_objective = germ | to_dormant
  return new.replace(
      objective=jnp.where(reset_objective, 0.0, new.objective),
      objective_count=jnp.where(reset_objective, 0, new.objective_count),
      objective_window_start=jnp.where(reset_objective, 0.0, new.objective_window_start),
      objective_rate=jnp.where(reset_objective, 0.0, new.objective_rate),
      objective_rate_ref=jnp.where(reset_objective, 0.0, new.objective_rate_ref),
  )


def apply_commands(state: SeedState, commands: Commands,
                   config: LifecycleConfig = LifecycleConfig(), *,
                   num_blueprints: int, num_strategies: int,
                   epoch: Any = -1) -> tuple[SeedState, jax.Array]:
  """Apply one command per seed. Returns `(new_state, accepted)`.

  A command is accepted iff its transition is in `LEGAL_TRANSITIONS` and its gate passed:
  GERMINATE needs DORMANT, no embargo and known blueprint / strategy ids; ADVANCE to the
  success-path stage needs `ready`; CANCEL, CULL and ROLLBACK need only legality (as does
  ADVANCE with an explicit `target` off the success path, e.g. TRAINING -> CULLED). Rejected
  seeds are returned bit-for-bit unchanged. `epoch` (optional) is recorded at germination.
  """
  _check_state(state)
  _check_commands(commands, state.num_seeds)
  _checks.positive_int("num_blueprints", num_blueprints)
  _checks.positive_int("num_strategies", num_strategies)
  _checks.int_like("epoch", epoch, _INT_ARGUMENTS["epoch"])
  accepted = command_accepted(state, commands, num_blueprints=num_blueprints,
                              num_strategies=num_strategies)
  dst = _command_target(state, commands)
  new = _enter_stage(state, accepted, dst, commands, config, jnp.asarray(epoch, jnp.int32))
  return new, accepted


def _as_mask(seeds, num_seeds: int) -> jax.Array:
  """An index, an index array or a boolean mask -> boolean mask of shape (num_seeds,)."""
  _checks.int_like("seeds", seeds, _INT_ARGUMENTS["seeds"])
  arr = jnp.asarray(seeds)
  if arr.dtype == jnp.bool_:
    if arr.shape != (num_seeds,):
      raise ValueError(f"seeds: boolean mask must have shape ({num_seeds},), got {arr.shape}")
    return arr
  _checks.integer_array("seeds", arr)
  if arr.ndim > 1:
    raise ValueError(f"seeds: index array must be 0- or 1-D, got shape {arr.shape}")
  if not isinstance(arr, jax.core.Tracer):
    bad = np.asarray(arr)
    if bad.size and (bad.min() < 0 or bad.max() >= num_seeds):
      raise ValueError(f"seeds: indices must lie in [0, {num_seeds}), got {bad.tolist()}")
  idx = jnp.atleast_1d(arr)
  return jnp.zeros((num_seeds,), bool).at[idx].set(True, mode="drop")


def request_germination(state: SeedState, seeds, blueprint, strategy, *,
                        num_blueprints: int, num_strategies: int,
                        config: LifecycleConfig = LifecycleConfig(),
                        epoch: Any = -1) -> tuple[SeedState, jax.Array]:
  """The design's `request_germination` (docs/design.md, "Stages"): DORMANT -> GERMINATED for
  `seeds`.

  Returns `(state, accepted)`, `accepted` of shape (num_seeds,) (False where not asked).
  Concrete seed indices, `blueprint` and `strategy` ids out of range raise a ValueError
  naming them; traced ones are rejected by the gate (accepted False, state unchanged).
  """
  _check_state(state)
  # Checked before anything is traced, in the order of the arguments.
  _checks.int_like("blueprint", blueprint, _INT_ARGUMENTS["blueprint"])
  _checks.int_like("strategy", strategy, _INT_ARGUMENTS["strategy"])
  _checks.int_like("epoch", epoch, _INT_ARGUMENTS["epoch"])
  num_blueprints = _checks.positive_int("num_blueprints", num_blueprints)
  num_strategies = _checks.positive_int("num_strategies", num_strategies)
  _check_id_range("blueprint", jnp.asarray(blueprint), 0, num_blueprints,
                  "blueprint ids (indices into the layer's catalog)")
  _check_id_range("strategy", jnp.asarray(strategy), 0, num_strategies,
                  "grafting strategy ids")
  mask = _as_mask(seeds, state.num_seeds)
  cmds = make_commands(state.num_seeds, op=jnp.where(mask, Op.GERMINATE, Op.NONE),
                       blueprint=blueprint, strategy=strategy)
  return apply_commands(state, cmds, config, num_blueprints=num_blueprints,
                        num_strategies=num_strategies, epoch=epoch)


def cancel_germination(state: SeedState, seeds,
                       config: LifecycleConfig = LifecycleConfig()) -> tuple[SeedState, jax.Array]:
  """The design's `cancel_germination` (docs/design.md, "Stages"): GERMINATED or TRAINING ->
  CANCELLED for `seeds`."""
  _check_state(state)
  mask = _as_mask(seeds, state.num_seeds)
  cmds = make_commands(state.num_seeds, op=jnp.where(mask, Op.CANCEL, Op.NONE))
  return apply_commands(state, cmds, config, num_blueprints=1, num_strategies=1)


def tick_epoch(state: SeedState) -> SeedState:
  """End-of-epoch bookkeeping: count epochs in stage, run embargo clocks down.

  Call once per epoch end, before `update_readiness`. Stage changes stay with commands:
  CANCELLED and CULLED (embargo over) become `ready` to return to DORMANT.
  """
  one_hot = jax.nn.one_hot(state.stage, NUM_STAGES, dtype=jnp.int32)
  culled = state.stage == Stage.CULLED
  return state.replace(
      epochs_in_stage=state.epochs_in_stage + 1,
      stage_epochs=state.stage_epochs + one_hot,
      embargo_left=jnp.where(culled, jnp.maximum(state.embargo_left - 1, 0),
                             state.embargo_left),
  )


def tick_step(state: SeedState) -> SeedState:
  """Per training step: steps in stage (and in the lifecycle) count up for every seed with a
  live child."""
  live = stage_in(state.stage, ROLLBACK_STAGES + (Stage.GERMINATED,)).astype(jnp.int32)
  return state.replace(steps_in_stage=state.steps_in_stage + live,
                       lifecycle_steps=state.lifecycle_steps + live)


def update_readiness(state: SeedState, *, delta: jax.Array | None = None,
                     recon_ratio: jax.Array | None = None,
                     is_replacement: jax.Array | None = None,
                     config: LifecycleConfig = LifecycleConfig()) -> SeedState:
  """Epoch end: set each seed's `ready` flag from its stage's gate (docs/design.md, "Lifecycle
  thresholds").

  `delta` is the validation counterfactual per seed (`val_loss(off) - val_loss(on)`; NaN: not
  measured this epoch; absent: the stored last one is used); `recon_ratio` the last
  `||g(x)-x||^2/||x||^2`; `is_replacement` per seed whether its blueprint is a replacement
  (reconstruction-gated) child. Non-finite measurements never enter the state.

  A seed whose gate needs the delta (TRAINING with a residual / parallel child, EVALUATING,
  FINE_TUNING) and has none this epoch (the loop judges at most `max_judged` seeds) is marked
  `unjudged`: its gate stays shut, its `bad_epochs` are unchanged, and Tamiyo neither advances
  nor culls it this epoch (a missing measurement is no verdict).
  """
  _check_state(state)
  k = state.num_seeds
  delta = (state.delta if delta is None
           else _broadcast_seeds("delta", jnp.asarray(delta, jnp.float32), k))
  recon = (state.recon_ratio if recon_ratio is None
           else _broadcast_seeds("recon_ratio", jnp.asarray(recon_ratio, jnp.float32), k))
  repl = (jnp.zeros((k,), bool) if is_replacement is None
          else _broadcast_seeds("is_replacement", jnp.asarray(is_replacement, bool), k))
  delta_ok = jnp.isfinite(delta)
  # Within float noise of its threshold a measurement counts on one fixed side (`tolerance`):
  # a delta at the margin does not improve, a ratio at the tolerance passes.
  improves = delta_ok & tolerance.greater(delta, config.improvement_margin)
  training_margin = (config.improvement_margin if config.training_margin is None
                     else config.training_margin)
  training_safe = delta_ok & tolerance.greater(delta, training_margin)
  recon_ok = jnp.isfinite(recon) & tolerance.at_most(recon, config.recon_tolerance)
  s = state.stage
  steps = state.steps_in_stage
  training_ready = (steps >= config.min_training_steps) & jnp.where(repl, recon_ok,
                                                                      training_safe)
  ready = jnp.select(
      [s == Stage.GERMINATED, s == Stage.CANCELLED, s == Stage.TRAINING,
       s == Stage.GRAFTING, s == Stage.STABILIZATION, s == Stage.EVALUATING,
       s == Stage.FINE_TUNING, s == Stage.CULLED],
      [jnp.ones_like(steps, bool), jnp.ones_like(steps, bool), training_ready,
       state.alpha >= 1.0, steps >= config.stabilization_steps,
       (state.epochs_in_stage >= 1) & improves,
       (steps >= config.fine_tuning_steps) & improves,
       state.embargo_left <= 0],
      default=jnp.zeros_like(steps, bool),
  )
  needs_delta = (((s == Stage.TRAINING) & ~repl) | (s == Stage.EVALUATING)
                 | (s == Stage.FINE_TUNING))
  fine = s == Stage.FINE_TUNING
  bad_epochs = jnp.where(fine & delta_ok & ~improves, state.bad_epochs + 1,
                         jnp.where(fine & improves, 0, state.bad_epochs))
  return state.replace(
      ready=ready,
      delta=jnp.where(delta_ok, delta, state.delta),
      recon_ratio=jnp.where(jnp.isfinite(recon), recon, state.recon_ratio),
      bad_epochs=bad_epochs,
      unjudged=needs_delta & ~delta_ok,
  )


def is_reachable(stage: int) -> bool:
  """Whether `stage` can be reached from DORMANT through legal transitions."""
  seen, frontier = {int(Stage.DORMANT)}, [int(Stage.DORMANT)]
  while frontier:
    s = frontier.pop()
    for t in np.nonzero(LEGAL_TRANSITIONS[s])[0]:
      if int(t) not in seen:
        seen.add(int(t))
        frontier.append(int(t))
  return int(stage) in seen


def _broadcast_seeds(name: str, arr: jax.Array, num_seeds: int) -> jax.Array:
  """`arr` broadcast to (num_seeds,); a shape that does not fit raises naming `name`."""
  if jnp.shape(arr) not in ((), (1,), (num_seeds,)):
    raise ValueError(f"{name}: expected shape () or ({num_seeds},), got {jnp.shape(arr)}")
  return jnp.broadcast_to(arr, (num_seeds,))


def _check_state(state: SeedState) -> None:
  if not isinstance(state, SeedState):
    raise TypeError(f"state: expected a SeedState, got {type(state).__name__}")
  shape = jnp.shape(state.stage)
  if len(shape) != 1:
    raise ValueError(
        f"state.stage: expected shape (num_seeds,), got {shape}; vmap over stacked layers")


def _check_commands(commands: Commands, num_seeds: int) -> None:
  if not isinstance(commands, Commands):
    raise TypeError(f"commands: expected a Commands, got {type(commands).__name__}")
  for name in ("op", "target", "blueprint", "strategy"):
    value = getattr(commands, name)
    if jnp.shape(value) != (num_seeds,):
      raise ValueError(
          f"commands.{name}: expected shape ({num_seeds},), got {jnp.shape(value)}")
    _checks.integer_array(f"commands.{name}", value)
