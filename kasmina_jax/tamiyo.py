"""Tamiyo: the stateless controller that decides, at every epoch end, what the seeds do next.

`decide(report, seeds, ctrl, config) -> (commands, ctrl)` is a pure, jittable policy over the
seed states of every Kasmina layer of a model (any pytree of `SeedState`, e.g. a dict keyed by
layer name). All of its memory lives in `ControllerState`; the config is static (hashable).
Everything here only *emits commands*: `lifecycle.apply_commands` keeps the gates, so Tamiyo
never bypasses one (DESIGN.md, "Who decides what").

The training loop's end-of-epoch order:

  health reports + validation counterfactual per seed -> lifecycle.tick_epoch
  -> lifecycle.update_readiness -> tamiyo.decide -> lifecycle.apply_commands
  -> tamiyo.field_reports(old, new, report, ctrl) -> tamiyo.observe

If `ctrl.rollback_requested` is set after `decide`, the loop restores its last good checkpoint,
applies `rollback_commands(restored_seeds)` (in-flight seeds ROLLED_BACK, queued ones CANCELLED)
and emits their field reports, so the restore does not erase them (DESIGN.md, "Rollback").

What `decide` does, in this order of precedence per seed (one command per seed):

1. Emergency rollback (whole model): the epoch's mean training loss is non-finite or larger than
   `rollback_factor` x the median of the last `rollback_window` epochs' (finite, kept) training
   losses, or a FOSSILIZED seed's child went non-finite (its child is frozen, so only a restore
   can undo it). Then every seed in TRAINING ... FINE_TUNING gets ROLLBACK, every GERMINATED seed
   CANCEL, nothing else happens and `ctrl.rollback_requested` is set. The epoch's losses do not
   enter the history.
2. One bad seed: a seed whose `health.nonfinite` (or `SeedState.nonfinite`) is set is rolled back
   (TRAINING ... FINE_TUNING) or cancelled (GERMINATED).
3. Culls: TRAINING seeds not `ready` after `lifecycle.max_training_steps` steps in the stage;
   EVALUATING seeds after >= 1 epoch in the stage that are not `ready` (their last counterfactual
   `delta <= improvement_margin`: harmful or useless); FINE_TUNING seeds with `bad_epochs >=
   lifecycle.fine_tuning_patience`. A seed whose counterfactual was not measured this epoch
   (`SeedState.unjudged`: left out by the loop's `max_judged`) is never culled (nor cancelled
   by recovery) on that missing measurement; it keeps its stage until it is judged.
4. Recovery: a GERMINATED seed, or a TRAINING seed that is not `ready`, whose chunk's need score
   (below) fell by at least `recovery_margin` since its germination is cancelled: the host fixed
   that chunk itself. (A `ready` TRAINING seed has shown a positive counterfactual and goes on.)
5. Success path: every `ready` seed in TRAINING, GRAFTING, STABILIZATION, EVALUATING,
   FINE_TUNING, CULLED or CANCELLED advances (ADVANCE to the next stage); GERMINATED seeds are
   promoted to TRAINING, oldest germination first (then highest need, then lowest index), while
   fewer than `max_concurrent_training` seeds of *that layer* are training (slots are per layer,
   DESIGN.md's "1 a layer"; slots freed this epoch are reused at once).
6. Germination: when the validation loss has plateaued (`plateau_patience` epochs in a row
   without improving the best by more than `plateau_min_delta`; or always when
   `germinate_without_plateau`) and the cooldown clock is out, the DORMANT, non-embargoed seeds
   with the highest need score (at least `min_need`) are germinated, at most
   `max_germinations_per_epoch` over the whole model and at most `max_queued_per_layer` seeds
   waiting in GERMINATED per layer. After a germinating epoch no seed germinates for
   `germination_cooldown_epochs` epochs. A layer stops growing for good once
   `growth_patience` of its children in a row did not pay (culled, rolled back, or fossilized
   with a validation counterfactual `delta <= pay_margin`; `observe` keeps the count): the
   grown size is found, not told.

The need score of a seed is a weighted mean of three numbers in [0, 1] from its health report:
`stuck = clip(1 - v / mean_layer(v), 0, 1)` with `v` the chunk variance (a chunk far below its
layer's mean variance is not carrying signal), the dead-node ratio, and the average inter-node
correlation (redundant nodes); weights `variance_weight`, `dead_weight`, `correlation_weight`.
Non-finite health values count 0.

What to grow: every germinated seed gets the blueprint maximising

  strategy_score[b] + signature_weight * affinity[seed, b] - cost_weight * cost[b]

over its layer's catalog (ties: the lowest id). `cost[b]` is the mean of the blueprint's
parameter count and FLOPs per row, each divided by the catalog's largest; `capacity[b]` is the
parameter count divided by the largest. `affinity` matches the health signature to the child:

  dead * (residual * (capacity + parallel) / 2)           dead nodes: a residual MLP-like child
                                                           (parallel wiring revives a dead chunk)
  + correlation * max(replacement, parallel)              redundant chunk: a replacement
                                                           bottleneck or fresh parallel features
  + noise * (chunk-wired residual * (1 - capacity / 2))   noisy chunk (`noise = clip(v / mean -
                                                           1, 0, 1)`): a small chunk-wired child

`strategy_score` by `selection` (statistics per layer and blueprint, fed by `observe`; `n`
reports counted, `N` their sum over the layer's blueprints, `mean` the mean reward, `fail` the
culls and rollbacks, `tries` the germinations):

  PERFORMANCE  UCB: mean + ucb_c * sqrt(log(N + 1) / (n + 1))
  STABILITY    mean - fail / (n + 1) - cost - replacement   (cheap, residual, rarely failing)
  ACCURACY     capacity + mean                               (the biggest child)
  RISK         mean - 2 * fail / (n + 1)                     (avoid what got culled / rolled back)
  NOVELTY      1 / (1 + tries)                               (the least tried)

How to graft (one strategy for every seed germinated in an epoch, from the host's trend over
the last `trend_window` epochs, this one included): mean relative weight drift above
`drift_threshold` -> DRIFT_CONTROLLED; else mean host gradient norm outside
`[grad_norm_lower, grad_norm_upper]` -> GRAD_NORM_GATED (non-finite values are left out of
the means); else validation loss
falling by more than `fast_improvement` (relative) since the last epoch -> PERFORMANCE_LINKED;
else FIXED_RAMP. `grafting_strategy` (an int) overrides the choice.

`observe` feeds the bandit with every field report but CANCELLED ones (a cancel says the chunk
recovered, nothing about the blueprint): reward `reward_fossilized` / `reward_culled` /
`reward_rolled_back` plus `delta_reward_weight * tanh(delta / delta_reward_scale)`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from kasmina_jax import _struct as struct

from kasmina_jax import _checks
from kasmina_jax import lifecycle
from kasmina_jax import telemetry
from kasmina_jax.lifecycle import Op, SeedState, Stage

# Grafting strategy ids: the order of `kasmina_jax.grafting.GraftingStrategy`.
FIXED_RAMP = 0
PERFORMANCE_LINKED = 1
DRIFT_CONTROLLED = 2
GRAD_NORM_GATED = 3
NUM_GRAFTING_STRATEGIES = 4
GRAFTING_STRATEGY_NAMES = ("fixed_ramp", "performance_linked", "drift_controlled",
                           "grad_norm_gated")

HEALTH_FIELDS = ("chunk_variance", "dead_node_ratio", "avg_inter_node_correlation")
# Stages whose entry produces a field report.
REPORTED_STAGES = (Stage.FOSSILIZED, Stage.CULLED, Stage.CANCELLED, Stage.ROLLED_BACK)


class SelectionStrategy(enum.IntEnum):
  """How `decide` picks the blueprint of a germinating seed (see the module docstring)."""

  PERFORMANCE = 0
  STABILITY = 1
  ACCURACY = 2
  RISK = 3
  NOVELTY = 4


@dataclasses.dataclass(frozen=True)
class TamiyoConfig:
  """The controller's knobs (hashable: pass it as a static argument of `jax.jit`).

  When to grow:
    plateau_patience: epochs in a row without improving the best validation loss by more than
      `plateau_min_delta` that make a plateau (germination is allowed from then on).
    plateau_min_delta: the improvement (absolute, in loss units) that counts.
    germinate_without_plateau: allow germination on health alone, without a plateau
      (default; waiting for a global plateau wastes the run, DESIGN.md amendment 3).
    germination_cooldown_epochs: epochs after a germinating epoch in which no seed germinates.
    max_germinations_per_epoch: germinations an epoch, over the whole model (None: no limit).
    max_queued_per_layer: seeds a layer may have waiting in GERMINATED (None: every seed).
    max_concurrent_training: seeds a layer may have in TRAINING at once (slots are per layer;
      None: every slot of the layer at once).
    The defaults grow every slot at once, on health, and let `growth_patience` stop a layer:
    measured on MNIST-1D (validation accuracy, 3 RNG seeds, lr 3e-3) 63.0% against 53.8%
    for one seed at a time after a plateau (README, "Growth that pays").
    min_need: a DORMANT seed germinates only if its need score is at least this.
    growth_patience: a layer stops germinating for good after this many children in a row
      that did not pay (culled, rolled back, or fossilized with `delta <= pay_margin`); one
      child that pays resets the count. So the grown size is found, not told.
    pay_margin: the validation counterfactual (loss units) a fossilized child must beat to
      count as paying.
  Where to grow (the need score, a weighted mean in [0, 1]; higher = needs help more):
    variance_weight, dead_weight, correlation_weight: weights of `stuck` (low chunk variance
      relative to the layer's mean), the dead-node ratio and the inter-node correlation.
    recovery_margin: a queued or training (not ready) seed whose need fell by at least this
      since its germination is cancelled.
  What to grow:
    selection: the `SelectionStrategy` (default ACCURACY, the largest child: on MNIST-1D the
      PERFORMANCE bandit's first picks were replacement bottlenecks that never met their
      reconstruction gate, were culled, and stopped the layer's growth: 54.1% validation
      accuracy against 63.0%).
    ucb_c: exploration constant of the PERFORMANCE (UCB) score.
    signature_weight: weight of the health-signature affinity.
    cost_weight: weight of the normalised (params, FLOPs) cost.
  How to graft (per-epoch host trends over `trend_window` epochs):
    drift_threshold: relative host weight drift above which DRIFT_CONTROLLED is chosen.
    grad_norm_lower, grad_norm_upper: host gradient-norm band; outside -> GRAD_NORM_GATED.
    fast_improvement: relative fall of the validation loss in one epoch above which
      PERFORMANCE_LINKED is chosen.
    grafting_strategy: a fixed grafting strategy id (0..3) instead of the choice; None: choose.
    trend_window: epochs averaged for the drift and gradient-norm trends.
  Safety:
    rollback_factor: emergency rollback when the epoch's mean training loss is non-finite or
      above this times the median of the last `rollback_window` epochs'.
    rollback_window: epochs in that median.
    history: length of the loss / drift / gradient-norm ring buffers (>= both windows).
  Bandit rewards (`observe`):
    reward_fossilized, reward_culled, reward_rolled_back: reward of each outcome (CANCELLED
      reports are not counted).
    delta_reward_weight, delta_reward_scale: plus `weight * tanh(delta / scale)` of the seed's
      last counterfactual contribution `delta` (validation-loss units).
  lifecycle: the `LifecycleConfig` whose `max_training_steps`, `fine_tuning_patience` and
    `improvement_margin` the culls use (pass the one given to the lifecycle functions).
  """

  plateau_patience: int = 2
  plateau_min_delta: float = 1e-3
  history: int = 8
  max_concurrent_training: int | None = None
  max_germinations_per_epoch: int | None = None
  max_queued_per_layer: int | None = None
  germination_cooldown_epochs: int = 0
  germinate_without_plateau: bool = True
  min_need: float = 0.0
  growth_patience: int = 2
  pay_margin: float = 0.0
  variance_weight: float = 1.0
  dead_weight: float = 1.0
  correlation_weight: float = 1.0
  recovery_margin: float = 0.25
  selection: SelectionStrategy = SelectionStrategy.ACCURACY
  ucb_c: float = 1.0
  signature_weight: float = 0.5
  cost_weight: float = 0.1
  drift_threshold: float = 0.12
  grad_norm_lower: float = 0.1
  grad_norm_upper: float = 1.0
  fast_improvement: float = 0.05
  grafting_strategy: int | None = None
  trend_window: int = 3
  rollback_factor: float = 10.0
  rollback_window: int = 5
  reward_fossilized: float = 1.0
  reward_culled: float = -1.0
  reward_rolled_back: float = -2.0
  delta_reward_weight: float = 0.5
  delta_reward_scale: float = 0.01
  lifecycle: lifecycle.LifecycleConfig = lifecycle.LifecycleConfig()

  def __post_init__(self):
    _checks.positive_int("plateau_patience", self.plateau_patience)
    _checks.finite_float("plateau_min_delta", self.plateau_min_delta, min_value=0.0)
    _checks.positive_int("history", self.history)
    if self.max_concurrent_training is not None:
      _checks.positive_int("max_concurrent_training", self.max_concurrent_training)
    if self.max_germinations_per_epoch is not None:
      _checks.non_negative_int("max_germinations_per_epoch", self.max_germinations_per_epoch)
    if self.max_queued_per_layer is not None:
      _checks.positive_int("max_queued_per_layer", self.max_queued_per_layer)
    _checks.non_negative_int("germination_cooldown_epochs", self.germination_cooldown_epochs)
    if not isinstance(self.germinate_without_plateau, bool):
      raise TypeError("germinate_without_plateau: expected a bool, got "
                      f"{self.germinate_without_plateau!r}")
    _checks.finite_float("min_need", self.min_need, min_value=0.0, max_value=1.0)
    _checks.positive_int("growth_patience", self.growth_patience)
    _checks.finite_float("pay_margin", self.pay_margin)
    for name in ("variance_weight", "dead_weight", "correlation_weight"):
      _checks.finite_float(name, getattr(self, name), min_value=0.0)
    if self.variance_weight + self.dead_weight + self.correlation_weight <= 0:
      raise ValueError("variance_weight, dead_weight, correlation_weight: at least one must be "
                       f"> 0, got {self.variance_weight}, {self.dead_weight}, "
                       f"{self.correlation_weight}")
    _checks.finite_float("recovery_margin", self.recovery_margin, min_value=0.0)
    try:
      object.__setattr__(self, "selection", SelectionStrategy(self.selection))
    except ValueError:
      raise ValueError(f"selection: expected a SelectionStrategy, got {self.selection!r}") from None
    _checks.finite_float("ucb_c", self.ucb_c, min_value=0.0)
    _checks.finite_float("signature_weight", self.signature_weight, min_value=0.0)
    _checks.finite_float("cost_weight", self.cost_weight, min_value=0.0)
    _checks.finite_float("drift_threshold", self.drift_threshold, min_value=0.0)
    _checks.finite_float("grad_norm_lower", self.grad_norm_lower, min_value=0.0)
    _checks.finite_float("grad_norm_upper", self.grad_norm_upper, min_value=0.0)
    if self.grad_norm_upper < self.grad_norm_lower:
      raise ValueError(f"grad_norm_upper: must be >= grad_norm_lower ({self.grad_norm_lower}), "
                       f"got {self.grad_norm_upper}")
    _checks.finite_float("fast_improvement", self.fast_improvement, min_value=0.0)
    if self.grafting_strategy is not None:
      _checks.non_negative_int("grafting_strategy", self.grafting_strategy)
      if self.grafting_strategy >= NUM_GRAFTING_STRATEGIES:
        raise ValueError(f"grafting_strategy: expected None or 0..{NUM_GRAFTING_STRATEGIES - 1}, "
                         f"got {self.grafting_strategy}")
    _checks.positive_int("trend_window", self.trend_window)
    _checks.finite_float("rollback_factor", self.rollback_factor, min_value=1.0)
    _checks.positive_int("rollback_window", self.rollback_window)
    if self.history < max(self.rollback_window, self.trend_window, 2):
      raise ValueError(f"history: must be >= rollback_window ({self.rollback_window}), "
                       f"trend_window ({self.trend_window}) and 2, got {self.history}")
    for name in ("reward_fossilized", "reward_culled", "reward_rolled_back",
                 "delta_reward_weight"):
      _checks.finite_float(name, getattr(self, name))
    _checks.finite_float("delta_reward_scale", self.delta_reward_scale)
    if self.delta_reward_scale <= 0:
      raise ValueError(f"delta_reward_scale: expected > 0, got {self.delta_reward_scale}")
    if not isinstance(self.lifecycle, lifecycle.LifecycleConfig):
      raise TypeError("lifecycle: expected a lifecycle.LifecycleConfig, got "
                      f"{type(self.lifecycle).__name__}")


# ----------------------------------------------------------------------------- reports


@struct.dataclass
class LayerReport:
  """One Kasmina layer's end-of-epoch view: its health and its catalog's static costs."""

  health: telemetry.HealthReport  # leaves (K,)
  blueprint_params: jax.Array  # (B,) int32 parameter count per blueprint
  blueprint_flops: jax.Array  # (B,) int32 FLOPs per row per blueprint
  blueprint_replacement: jax.Array  # (B,) bool: kind == "replacement"
  blueprint_parallel: jax.Array  # (B,) bool: wiring == "parallel"

  @property
  def num_blueprints(self) -> int:
    return int(jnp.shape(self.blueprint_params)[-1])


def layer_report(spec, health: telemetry.HealthReport) -> LayerReport:
  """A `LayerReport` with the catalog arrays of `spec` (a `layer.KasminaSpec`)."""
  from kasmina_jax import layer as layer_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, layer_lib.KasminaSpec):
    raise TypeError(f"spec: expected a KasminaSpec, got {type(spec).__name__}")
  if not isinstance(health, telemetry.HealthReport):
    raise TypeError(f"health: expected a telemetry.HealthReport, got {type(health).__name__}")
  _check_health(health, spec.num_seeds, "health")
  cat = spec.catalog
  return LayerReport(
      health=health,
      blueprint_params=jnp.asarray(cat.param_count, jnp.int32),
      blueprint_flops=jnp.asarray(cat.flops_per_row, jnp.int32),
      blueprint_replacement=jnp.asarray(~cat.residual),
      blueprint_parallel=jnp.asarray(cat.parallel),
  )


@struct.dataclass
class EpochReport:
  """What the controller sees at an epoch end."""

  layers: Any  # pytree of LayerReport, keyed like the seed-state pytree
  train_loss: jax.Array  # () mean training loss of the epoch (may be NaN / inf)
  val_loss: jax.Array  # () validation loss with the seeds as they are
  host_grad_norm: jax.Array  # () mean host-only gradient norm this epoch
  host_drift: jax.Array  # () relative host weight drift this epoch
  epoch: jax.Array  # () int32


# ----------------------------------------------------------------------------- state


@struct.dataclass
class LayerControllerState:
  """The controller's memory about one layer."""

  bp_count: jax.Array  # (B,) float32: field reports counted per blueprint
  bp_reward_sum: jax.Array  # (B,) float32: their rewards, summed
  bp_failures: jax.Array  # (B,) float32: culls and rollbacks among them
  bp_tries: jax.Array  # (B,) float32: germinations commanded per blueprint
  germ_health: jax.Array  # (K, 3) float32: HEALTH_FIELDS at the seed's last germination
  germ_need: jax.Array  # (K,) float32: need score at the seed's last germination
  unpaid_streak: jax.Array  # () int32: children in a row that did not pay (see growth_patience)


@struct.dataclass
class ControllerState:
  """All the memory of the controller (a pytree; checkpoint it with the model)."""

  train_history: jax.Array  # (H,) float32 ring buffer of kept epochs' mean training losses
  val_history: jax.Array  # (H,) validation losses of those epochs (NaN if not finite)
  drift_history: jax.Array  # (H,) host weight drift of those epochs
  grad_history: jax.Array  # (H,) host gradient norms of those epochs
  history_count: jax.Array  # () int32: epochs written into the rings (slot = count % H)
  best_val_loss: jax.Array  # () float32
  plateau_epochs: jax.Array  # () int32: epochs in a row without improving by min_delta
  cooldown_left: jax.Array  # () int32: epochs before germination is allowed again
  rollback_requested: jax.Array  # () bool: the last `decide` asked for a checkpoint restore
  layers: Any  # pytree of LayerControllerState keyed like the seeds


def _is_seed_state(x) -> bool:
  return isinstance(x, SeedState)


def _flatten_layers(seeds):
  leaves, treedef = jax.tree.flatten(seeds, is_leaf=_is_seed_state)
  if not leaves:
    raise ValueError("seeds: expected a pytree with at least one SeedState, got none")
  for i, leaf in enumerate(leaves):
    if not isinstance(leaf, SeedState):
      raise TypeError(f"seeds: every leaf must be a SeedState, leaf {i} is "
                      f"{type(leaf).__name__}")
    if len(jnp.shape(leaf.stage)) != 1:
      raise ValueError(f"seeds: leaf {i} has stage shape {jnp.shape(leaf.stage)}; expected "
                       "(num_seeds,) (one SeedState per layer, not stacked)")
  return leaves, treedef


def _up_to(treedef, tree, name: str, kind: type):
  try:
    items = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name}: expected the same layer structure as seeds ({treedef}): {e}") from None
  for i, item in enumerate(items):
    if not isinstance(item, kind):
      raise TypeError(f"{name}: layer {i} is a {type(item).__name__}, expected {kind.__name__}")
  return items


def init_controller(seeds, num_blueprints,
                    config: TamiyoConfig = TamiyoConfig()) -> ControllerState:
  """A fresh `ControllerState` for the seed-state pytree `seeds`.

  `num_blueprints`: the catalog size, an int for every layer or a pytree of ints keyed like
  `seeds`.
  """
  _check_config(config)
  leaves, treedef = _flatten_layers(seeds)
  if isinstance(num_blueprints, numbers.Integral) and not isinstance(num_blueprints, bool):
    counts = [num_blueprints] * len(leaves)
  else:
    try:
      counts = treedef.flatten_up_to(num_blueprints)
    except (ValueError, TypeError) as e:
      raise ValueError("num_blueprints: expected an int or a pytree of ints keyed like seeds, "
                       f"got {num_blueprints!r}: {e}") from None
  layer_states = []
  for i, (leaf, b) in enumerate(zip(leaves, counts)):
    b = _checks.positive_int(f"num_blueprints[{i}]", b)
    k = leaf.num_seeds
    zb = jnp.zeros((b,), jnp.float32)
    layer_states.append(LayerControllerState(
        bp_count=zb, bp_reward_sum=zb, bp_failures=zb, bp_tries=zb,
        germ_health=jnp.full((k, len(HEALTH_FIELDS)), jnp.nan, jnp.float32),
        germ_need=jnp.zeros((k,), jnp.float32), unpaid_streak=jnp.zeros((), jnp.int32)))
  h = config.history
  nan_h = jnp.full((h,), jnp.nan, jnp.float32)
  return ControllerState(
      train_history=nan_h, val_history=nan_h, drift_history=nan_h, grad_history=nan_h,
      history_count=jnp.zeros((), jnp.int32),
      best_val_loss=jnp.full((), jnp.inf, jnp.float32),
      plateau_epochs=jnp.zeros((), jnp.int32),
      cooldown_left=jnp.zeros((), jnp.int32),
      rollback_requested=jnp.zeros((), bool),
      layers=jax.tree.unflatten(treedef, layer_states))


# ----------------------------------------------------------------------------- helpers


def _finite_or(x: jax.Array, value: float) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, value)


def _health_matrix(health: telemetry.HealthReport) -> jax.Array:
  """(K, 3) float32: HEALTH_FIELDS side by side."""
  return jnp.stack([jnp.asarray(getattr(health, f), jnp.float32) for f in HEALTH_FIELDS], -1)


def _signature(health: telemetry.HealthReport):
  """Per seed (stuck, noise, dead, corr), each in [0, 1]; non-finite inputs count 0."""
  var = jnp.maximum(_finite_or(jnp.asarray(health.chunk_variance, jnp.float32), 0.0), 0.0)
  mean_var = jnp.mean(var)
  rel = jnp.where(mean_var > 0, var / jnp.where(mean_var > 0, mean_var, 1.0), 0.0)
  stuck = jnp.clip(1.0 - rel, 0.0, 1.0)
  noise = jnp.clip(rel - 1.0, 0.0, 1.0)
  dead = jnp.clip(_finite_or(jnp.asarray(health.dead_node_ratio, jnp.float32), 0.0), 0.0, 1.0)
  corr = jnp.clip(
      _finite_or(jnp.asarray(health.avg_inter_node_correlation, jnp.float32), 0.0), 0.0, 1.0)
  return stuck, noise, dead, corr


def need_score(health: telemetry.HealthReport, config: TamiyoConfig = TamiyoConfig()) -> jax.Array:
  """(K,) in [0, 1]: how much each seed's chunk needs help (see the module docstring)."""
  stuck, _, dead, corr = _signature(health)
  w = (config.variance_weight, config.dead_weight, config.correlation_weight)
  return (w[0] * stuck + w[1] * dead + w[2] * corr) / sum(w)


def _recent(ring: jax.Array, count: jax.Array, n: int):
  """The newest `n` entries of a ring buffer (newest first) and which of them exist."""
  h = ring.shape[0]
  i = jnp.arange(n)
  idx = jnp.mod(count - 1 - i, h)
  exists = (i < count) & (i < h)
  return ring[idx], exists


def _masked_median(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of `values[mask]` (NaN when empty), static shapes."""
  m = jnp.sum(mask.astype(jnp.int32))
  s = jnp.sort(jnp.where(mask, values, jnp.inf))
  lo = jnp.clip((m - 1) // 2, 0, values.shape[0] - 1)
  hi = jnp.clip(m // 2, 0, values.shape[0] - 1)
  return jnp.where(m > 0, 0.5 * (s[lo] + s[hi]), jnp.nan)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask & jnp.isfinite(values)
  n = jnp.sum(m.astype(jnp.float32))
  return jnp.where(n > 0, jnp.sum(jnp.where(m, values, 0.0)) / jnp.maximum(n, 1.0), jnp.nan)


def _stable_rank(priority: jax.Array, eligible: jax.Array) -> jax.Array:
  """Rank of each entry by descending `priority` among `eligible` (ties: lower index first);
  ineligible entries rank after all eligible ones."""
  key = jnp.where(eligible, -priority, jnp.inf)
  order = jnp.argsort(key, stable=True)
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _grafting_choice(report: EpochReport, ctrl: ControllerState, config: TamiyoConfig):
  if config.grafting_strategy is not None:
    return jnp.asarray(config.grafting_strategy, jnp.int32)
  w = config.trend_window
  drift_prev, drift_ok = _recent(ctrl.drift_history, ctrl.history_count, w - 1)
  grad_prev, grad_ok = _recent(ctrl.grad_history, ctrl.history_count, w - 1)
  drift_now = jnp.asarray(report.host_drift, jnp.float32)
  grad_now = jnp.asarray(report.host_grad_norm, jnp.float32)
  drift = _masked_mean(jnp.concatenate([drift_now[None], drift_prev]),
                       jnp.concatenate([jnp.ones((1,), bool), drift_ok]))
  grad = _masked_mean(jnp.concatenate([grad_now[None], grad_prev]),
                      jnp.concatenate([jnp.ones((1,), bool), grad_ok]))
  last_val, has_last = _recent(ctrl.val_history, ctrl.history_count, 1)
  val = jnp.asarray(report.val_loss, jnp.float32)
  improvement = (last_val[0] - val) / jnp.maximum(jnp.abs(last_val[0]), 1e-12)
  fast = has_last[0] & jnp.isfinite(improvement) & (improvement > config.fast_improvement)
  drifting = jnp.isfinite(drift) & (drift > config.drift_threshold)
  # No finite measurement at all counts as stable (a non-finite loss is an emergency anyway).
  grad_bad = jnp.isfinite(grad) & ((grad < config.grad_norm_lower)
                                   | (grad > config.grad_norm_upper))
  return jnp.select([drifting, grad_bad, fast],
                    [jnp.int32(DRIFT_CONTROLLED), jnp.int32(GRAD_NORM_GATED),
                     jnp.int32(PERFORMANCE_LINKED)], jnp.int32(FIXED_RAMP))


def _blueprint_scores(lr: LayerReport, lc: LayerControllerState, health_sig,
                      config: TamiyoConfig) -> jax.Array:
  """(K, B) score of each blueprint for each seed (see the module docstring)."""
  params = jnp.asarray(lr.blueprint_params, jnp.float32)
  flops = jnp.asarray(lr.blueprint_flops, jnp.float32)
  repl = jnp.asarray(lr.blueprint_replacement, bool).astype(jnp.float32)
  par = jnp.asarray(lr.blueprint_parallel, bool).astype(jnp.float32)
  capacity = params / jnp.maximum(jnp.max(params), 1.0)
  cost = 0.5 * (capacity + flops / jnp.maximum(jnp.max(flops), 1.0))
  residual = 1.0 - repl
  chunk_residual = residual * (1.0 - par)
  n = lc.bp_count
  total = jnp.sum(n)
  mean = lc.bp_reward_sum / jnp.maximum(n, 1.0)
  fail = lc.bp_failures / (n + 1.0)
  sel = config.selection
  if sel == SelectionStrategy.PERFORMANCE:
    strategy = mean + config.ucb_c * jnp.sqrt(jnp.log(total + 1.0) / (n + 1.0))
  elif sel == SelectionStrategy.STABILITY:
    strategy = mean - fail - cost - repl
  elif sel == SelectionStrategy.ACCURACY:
    strategy = capacity + mean
  elif sel == SelectionStrategy.RISK:
    strategy = mean - 2.0 * fail
  else:  # NOVELTY
    strategy = 1.0 / (1.0 + lc.bp_tries)
  stuck, noise, dead, corr = health_sig
  del stuck
  affinity = (dead[:, None] * (residual * 0.5 * (capacity + par))[None]
              + corr[:, None] * jnp.maximum(repl, par)[None]
              + noise[:, None] * (chunk_residual * (1.0 - 0.5 * capacity))[None])
  return strategy[None] + config.signature_weight * affinity - config.cost_weight * cost[None]


# ----------------------------------------------------------------------------- decide


def rollback_commands(seeds):
  """Commands that roll back every in-flight seed (TRAINING ... FINE_TUNING -> ROLLED_BACK) and
  cancel every queued one (GERMINATED -> CANCELLED); same pytree structure as `seeds`.

  Apply them to the seed states restored from the last good checkpoint (DESIGN.md, "Rollback").
  """
  _flatten_layers(seeds)

  def one(s: SeedState) -> lifecycle.Commands:
    inflight = lifecycle.stage_in(s.stage, lifecycle.ROLLBACK_STAGES)
    queued = s.stage == Stage.GERMINATED
    op = jnp.where(inflight, Op.ROLLBACK, jnp.where(queued, Op.CANCEL, Op.NONE))
    k = s.num_seeds
    return lifecycle.Commands(op=op.astype(jnp.int32), target=jnp.full((k,), -1, jnp.int32),
                              blueprint=jnp.full((k,), -1, jnp.int32),
                              strategy=jnp.full((k,), -1, jnp.int32))

  return jax.tree.map(one, seeds, is_leaf=_is_seed_state)


def decide(report: EpochReport, seeds, ctrl: ControllerState,
           config: TamiyoConfig = TamiyoConfig()):
  """The policy: one `lifecycle.Commands` per layer and the next `ControllerState`.

  `seeds` are the seed states after `tick_epoch` and `update_readiness`; `report.layers` and
  `ctrl.layers` are keyed like them. Pure and jittable (`config` static); emits only commands
  that `apply_commands` accepts. See the module docstring for the rules.
  """
  _check_config(config)
  if not isinstance(report, EpochReport):
    raise TypeError(f"report: expected an EpochReport, got {type(report).__name__}")
  if not isinstance(ctrl, ControllerState):
    raise TypeError(f"ctrl: expected a ControllerState, got {type(ctrl).__name__}")
  seed_leaves, treedef = _flatten_layers(seeds)
  report_leaves = _up_to(treedef, report.layers, "report.layers", LayerReport)
  ctrl_leaves = _up_to(treedef, ctrl.layers, "ctrl.layers", LayerControllerState)
  if jnp.shape(ctrl.train_history) != (config.history,):
    raise ValueError(f"ctrl.train_history: expected shape ({config.history},) for this config, "
                     f"got {jnp.shape(ctrl.train_history)}")
  for i, (s, lr, lc) in enumerate(zip(seed_leaves, report_leaves, ctrl_leaves)):
    _check_layer(i, s, lr, lc)

  # -- the model: losses, emergency, plateau --
  train_loss = jnp.asarray(report.train_loss, jnp.float32)
  val_loss = jnp.asarray(report.val_loss, jnp.float32)
  recent_train, recent_ok = _recent(ctrl.train_history, ctrl.history_count, config.rollback_window)
  median = _masked_median(recent_train, recent_ok & jnp.isfinite(recent_train))
  exploding = jnp.isfinite(median) & (train_loss > config.rollback_factor * median)
  fossil_bad = jnp.zeros((), bool)
  for s, lr in zip(seed_leaves, report_leaves):
    bad = jnp.asarray(lr.health.nonfinite, bool) | s.nonfinite
    fossil_bad = fossil_bad | jnp.any(bad & (s.stage == Stage.FOSSILIZED))
  emergency = ~jnp.isfinite(train_loss) | exploding | fossil_bad

  val_ok = jnp.isfinite(val_loss) & ~emergency
  improved = val_ok & (val_loss < ctrl.best_val_loss - config.plateau_min_delta)
  plateau_epochs = jnp.where(improved, 0,
                             jnp.where(val_ok, ctrl.plateau_epochs + 1, ctrl.plateau_epochs))
  best_val = jnp.where(val_ok, jnp.minimum(ctrl.best_val_loss, val_loss), ctrl.best_val_loss)
  plateau = plateau_epochs >= config.plateau_patience
  growth_time = ((plateau | config.germinate_without_plateau) & (ctrl.cooldown_left <= 0)
                 & ~emergency)
  strategy = _grafting_choice(report, ctrl, config)

  # -- per layer: everything but germination --
  partial = []
  for s, lr, lc in zip(seed_leaves, report_leaves, ctrl_leaves):
    partial.append(_layer_commands(s, lr, lc, emergency, config))

  # -- germination: the neediest eligible seeds over the whole model --
  eligible = jnp.concatenate([p["eligible"] for p in partial])
  need = jnp.concatenate([p["need"] for p in partial])
  rank = _stable_rank(need, eligible)
  budget = (eligible.shape[0] if config.max_germinations_per_epoch is None
            else config.max_germinations_per_epoch)
  chosen = eligible & (rank < budget) & growth_time
  sizes = np.cumsum([0] + [s.num_seeds for s in seed_leaves])

  commands, new_layers = [], []
  for i, (s, lr, lc, p) in enumerate(zip(seed_leaves, report_leaves, ctrl_leaves, partial)):
    germ = chosen[sizes[i]:sizes[i + 1]]
    scores = _blueprint_scores(lr, lc, p["signature"], config)
    blueprint = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    op = jnp.where(germ, Op.GERMINATE, p["op"]).astype(jnp.int32)
    k = s.num_seeds
    commands.append(lifecycle.Commands(
        op=op, target=jnp.full((k,), -1, jnp.int32),
        blueprint=jnp.where(germ, blueprint, -1).astype(jnp.int32),
        strategy=jnp.where(germ, strategy, -1).astype(jnp.int32)))
    b = lc.bp_tries.shape[0]
    tries = jnp.sum(jax.nn.one_hot(blueprint, b, dtype=jnp.float32) * germ[:, None], 0)
    new_layers.append(lc.replace(
        bp_tries=lc.bp_tries + tries,
        germ_health=jnp.where(germ[:, None], _health_matrix(lr.health), lc.germ_health),
        germ_need=jnp.where(germ, p["need"], lc.germ_need)))
  germinated_any = jnp.any(chosen)
  keep = ~emergency & jnp.isfinite(train_loss)
  slot = jnp.mod(ctrl.history_count, config.history)
  push = lambda ring, v: jnp.where(keep, ring.at[slot].set(jnp.asarray(v, jnp.float32)), ring)
  new_ctrl = ControllerState(
      train_history=push(ctrl.train_history, train_loss),
      val_history=push(ctrl.val_history, val_loss),
      drift_history=push(ctrl.drift_history, report.host_drift),
      grad_history=push(ctrl.grad_history, report.host_grad_norm),
      history_count=ctrl.history_count + keep.astype(jnp.int32),
      best_val_loss=best_val.astype(jnp.float32),
      plateau_epochs=plateau_epochs.astype(jnp.int32),
      cooldown_left=jnp.where(germinated_any, config.germination_cooldown_epochs,
                              jnp.maximum(ctrl.cooldown_left - 1, 0)).astype(jnp.int32),
      rollback_requested=emergency,
      layers=jax.tree.unflatten(treedef, new_layers))
  return jax.tree.unflatten(treedef, commands), new_ctrl


def _layer_commands(s: SeedState, lr: LayerReport, lc: LayerControllerState,
                    emergency: jax.Array, config: TamiyoConfig):
  """One layer's commands other than GERMINATE, and its germination candidates."""
  lcfg = config.lifecycle
  st = s.stage
  health = lr.health
  sig = _signature(health)
  need = need_score(health, config)
  inflight = lifecycle.stage_in(st, lifecycle.ROLLBACK_STAGES)
  queued = st == Stage.GERMINATED
  training = st == Stage.TRAINING
  ready = s.ready
  bad = jnp.asarray(health.nonfinite, bool) | s.nonfinite

  # A seed left unjudged this epoch (no counterfactual: `max_judged`) keeps its stage: its
  # `ready` is False for want of a measurement, which is no verdict to cull or cancel on.
  judged = ~s.unjudged
  cull = judged & ((training & ~ready & (s.steps_in_stage >= lcfg.max_training_steps))
                   | ((st == Stage.EVALUATING) & (s.epochs_in_stage >= 1) & ~ready)
                   | ((st == Stage.FINE_TUNING) & (s.bad_epochs >= lcfg.fine_tuning_patience)))
  recovered = ((queued | (training & ~ready & judged))
               & (need <= lc.germ_need - config.recovery_margin))
  advancing_stage = lifecycle.stage_in(
      st, (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
           Stage.FINE_TUNING, Stage.CULLED, Stage.CANCELLED))
  advance = advancing_stage & ready
  # CULLED -> DORMANT also needs the embargo to be over (its readiness says so; be explicit).
  advance = advance & ~((st == Stage.CULLED) & (s.embargo_left > 0))

  op = jnp.select(
      [inflight & bad, queued & bad, cull, recovered, advance],
      [Op.ROLLBACK, Op.CANCEL, Op.CULL, Op.CANCEL, Op.ADVANCE], Op.NONE).astype(jnp.int32)

  # Promotion from the queue into free training slots (slots per layer).
  still_training = training & (op == Op.NONE)
  slots = s.num_seeds if config.max_concurrent_training is None else config.max_concurrent_training
  free = slots - jnp.sum(still_training.astype(jnp.int32))
  waiting = queued & ready & (op == Op.NONE)  # GERMINATED seeds are always ready
  # Oldest germination first, then the neediest, then the lowest index.
  by_need = jnp.argsort(jnp.where(waiting, -need, jnp.inf), stable=True)
  born = jnp.where(waiting, s.germinated_epoch, jnp.iinfo(jnp.int32).max)
  order = by_need[jnp.argsort(born[by_need], stable=True)]
  queue_rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  promote = waiting & (queue_rank < free)
  op = jnp.where(promote, Op.ADVANCE, op)

  # Emergency: every in-flight seed is rolled back, every queued one cancelled, nothing else.
  op = jnp.where(emergency,
                 jnp.where(inflight, Op.ROLLBACK, jnp.where(queued, Op.CANCEL, Op.NONE)),
                 op).astype(jnp.int32)

  # Germination candidates: DORMANT, no embargo, room in the layer's queue.
  queued_after = jnp.sum((queued & (op == Op.NONE)).astype(jnp.int32))
  queue = s.num_seeds if config.max_queued_per_layer is None else config.max_queued_per_layer
  room = queue - queued_after
  # A layer whose recent children stopped paying grows no more.
  growing = lc.unpaid_streak < config.growth_patience
  candidate = ((st == Stage.DORMANT) & (s.embargo_left <= 0) & (op == Op.NONE)
               & (need >= config.min_need) & growing)
  eligible = candidate & (_stable_rank(need, candidate) < room)
  return {"op": op, "eligible": eligible, "need": need, "signature": sig}


# ----------------------------------------------------------------------------- field reports


@struct.dataclass
class FieldReports:
  """One layer's field reports of an epoch: leaves (K,) (`valid`: the seed produced one)."""

  valid: jax.Array  # bool: the seed entered a reported stage this epoch
  seed: jax.Array  # int32: seed index within the layer
  blueprint: jax.Array  # int32: blueprint id (-1 if none)
  strategy: jax.Array  # int32: grafting strategy id (-1 if none)
  outcome: jax.Array  # int32 Stage: FOSSILIZED, CULLED, CANCELLED or ROLLED_BACK
  epoch: jax.Array  # int32: the epoch of the report
  germinated_epoch: jax.Array  # int32: the epoch the seed germinated (-1 if unknown)
  stage_epochs: jax.Array  # int32 (K, 11): epochs spent in each stage in this lifecycle
  health_before: jax.Array  # float32 (K, 3): HEALTH_FIELDS at germination (NaN: not by decide)
  health_after: jax.Array  # float32 (K, 3): HEALTH_FIELDS now
  delta: jax.Array  # float32: last counterfactual val_loss(off) - val_loss(on)
  param_count: jax.Array  # int32: the blueprint's parameters
  flops_per_row: jax.Array  # int32: the blueprint's FLOPs per row (the compute-cost figure)
  # float32: variance over the last epoch's learning steps of the child's gradient norm
  # (`telemetry.record_gradients` -> `HealthReport.gradient_variance`; 0 where the child took
  # no learning step in that epoch, NaN where not valid)
  gradient_variance: jax.Array
  param_bytes: jax.Array  # int32: memory of the child's parameters (float32: 4 bytes each)
  # int32: training steps from germination to this report (`SeedState.lifecycle_steps`): the
  # latency of the outcome in steps. No wall-clock latency: it cannot be measured in `jit`.
  lifecycle_steps: jax.Array


def field_reports(old_seeds, new_seeds, report: EpochReport, ctrl: ControllerState):
  """Field reports of the seeds that entered FOSSILIZED, CULLED, CANCELLED or ROLLED_BACK
  between `old_seeds` and `new_seeds` (a pytree of `FieldReports` keyed like the seeds)."""
  old_leaves, treedef = _flatten_layers(old_seeds)
  new_leaves = _up_to(treedef, new_seeds, "new_seeds", SeedState)
  report_leaves = _up_to(treedef, report.layers, "report.layers", LayerReport)
  ctrl_leaves = _up_to(treedef, ctrl.layers, "ctrl.layers", LayerControllerState)
  epoch = jnp.asarray(report.epoch, jnp.int32)
  out = []
  for i, (old, new, lr, lc) in enumerate(zip(old_leaves, new_leaves, report_leaves, ctrl_leaves)):
    if new.num_seeds != old.num_seeds:
      raise ValueError(f"new_seeds: layer {i} has {new.num_seeds} seeds, old_seeds "
                       f"{old.num_seeds}")
    _check_layer(i, new, lr, lc)
    k = new.num_seeds
    valid = (new.stage != old.stage) & lifecycle.stage_in(new.stage, REPORTED_STAGES)
    b = lr.blueprint_params.shape[0]
    has_bp = valid & (new.blueprint >= 0) & (new.blueprint < b)
    bi = jnp.clip(new.blueprint, 0, b - 1)
    out.append(FieldReports(
        valid=valid,
        seed=jnp.arange(k, dtype=jnp.int32),
        blueprint=jnp.where(valid, new.blueprint, -1).astype(jnp.int32),
        strategy=jnp.where(valid, new.strategy, -1).astype(jnp.int32),
        outcome=jnp.where(valid, new.stage, -1).astype(jnp.int32),
        epoch=jnp.broadcast_to(epoch, (k,)),
        germinated_epoch=jnp.where(valid, new.germinated_epoch, -1).astype(jnp.int32),
        stage_epochs=jnp.where(valid[:, None], new.stage_epochs, 0).astype(jnp.int32),
        health_before=jnp.where(valid[:, None], lc.germ_health, jnp.nan),
        health_after=jnp.where(valid[:, None], _health_matrix(lr.health), jnp.nan),
        delta=jnp.where(valid, new.delta, jnp.nan).astype(jnp.float32),
        param_count=jnp.where(has_bp, jnp.asarray(lr.blueprint_params, jnp.int32)[bi], 0),
        flops_per_row=jnp.where(has_bp, jnp.asarray(lr.blueprint_flops, jnp.int32)[bi], 0),
        gradient_variance=jnp.where(valid, jnp.asarray(lr.health.gradient_variance, jnp.float32),
                                    jnp.nan),
        # Children are stored in float32 (`layer.init_children`), as the health report counts.
        param_bytes=jnp.where(has_bp, 4 * jnp.asarray(lr.blueprint_params, jnp.int32)[bi], 0),
        lifecycle_steps=jnp.where(valid, new.lifecycle_steps, 0).astype(jnp.int32)))
  return jax.tree.unflatten(treedef, out)


def observe(ctrl: ControllerState, reports,
            config: TamiyoConfig = TamiyoConfig()) -> ControllerState:
  """Feeds a pytree of `FieldReports` (keyed like the seeds) into the blueprint statistics."""
  _check_config(config)
  if not isinstance(ctrl, ControllerState):
    raise TypeError(f"ctrl: expected a ControllerState, got {type(ctrl).__name__}")
  ctrl_leaves, treedef = jax.tree.flatten(
      ctrl.layers, is_leaf=lambda x: isinstance(x, LayerControllerState))
  report_leaves = _up_to(treedef, reports, "reports", FieldReports)
  new_layers = []
  for lc, r in zip(ctrl_leaves, report_leaves):
    b = lc.bp_count.shape[0]
    outcome = r.outcome
    counted = (r.valid & (r.blueprint >= 0) & (r.blueprint < b)
               & lifecycle.stage_in(outcome, (Stage.FOSSILIZED, Stage.CULLED, Stage.ROLLED_BACK)))
    failed = counted & ((outcome == Stage.CULLED) | (outcome == Stage.ROLLED_BACK))
    base = jnp.select([outcome == Stage.FOSSILIZED, outcome == Stage.CULLED],
                      [config.reward_fossilized, config.reward_culled],
                      config.reward_rolled_back)
    delta = _finite_or(jnp.asarray(r.delta, jnp.float32), 0.0)
    reward = base + config.delta_reward_weight * jnp.tanh(delta / config.delta_reward_scale)
    hot = jax.nn.one_hot(jnp.clip(r.blueprint, 0, b - 1), b, dtype=jnp.float32)
    add = lambda m: jnp.sum(hot * m[:, None], 0)
    # Growth stop: a child pays when it fossilized with a counterfactual above pay_margin.
    paid = counted & (outcome == Stage.FOSSILIZED) & (delta > config.pay_margin)
    unpaid = jnp.sum((counted & ~paid).astype(jnp.int32))
    streak = jnp.where(jnp.any(paid), 0, lc.unpaid_streak + unpaid).astype(jnp.int32)
    new_layers.append(lc.replace(
        unpaid_streak=streak,
        bp_count=lc.bp_count + add(counted.astype(jnp.float32)),
        bp_reward_sum=lc.bp_reward_sum + add(jnp.where(counted, reward, 0.0)),
        bp_failures=lc.bp_failures + add(failed.astype(jnp.float32))))
  return ctrl.replace(layers=jax.tree.unflatten(treedef, new_layers))


def blueprint_statistics(ctrl: ControllerState):
  """Per layer, plain-Python bandit statistics: {count, mean_reward, failures, tries} lists."""
  def one(lc: LayerControllerState):
    n = np.asarray(lc.bp_count)
    return {"count": n.tolist(),
            "mean_reward": (np.asarray(lc.bp_reward_sum) / np.maximum(n, 1.0)).tolist(),
            "failures": np.asarray(lc.bp_failures).tolist(),
            "tries": np.asarray(lc.bp_tries).tolist()}
  return jax.tree.map(one, ctrl.layers, is_leaf=lambda x: isinstance(x, LayerControllerState))


# ----------------------------------------------------------------------------- records


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts) if parts else "layer"


def _float_or_none(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _names_for(names, layer: str, index: int, what: str):
  if names is None:
    return None
  if isinstance(names, Mapping):
    if layer not in names:
      raise ValueError(f"{what}: no entry for layer {layer!r}; has {sorted(names)}")
    return tuple(names[layer])
  if isinstance(names, Sequence) and not isinstance(names, str):
    names = tuple(names)
    if names and all(isinstance(n, str) for n in names):
      return names
    if names and all(isinstance(n, Sequence) and not isinstance(n, str) for n in names):
      if index >= len(names):
        raise ValueError(f"{what}: {len(names)} per-layer lists for more layers")
      return tuple(names[index])
  raise TypeError(f"{what}: expected a sequence of names, a sequence of such per layer or a "
                  f"dict from layer name to names, got {type(names).__name__}")


def _lookup(names, i: int) -> str | None:
  if i < 0:
    return None
  if names is None:
    return str(i)
  return names[i] if i < len(names) else str(i)


def to_records(reports, *, layer_names: Sequence[str] | Mapping[str, str] | None = None,
               blueprint_names=None, strategy_names: Sequence[str] | None = None) -> list[dict]:
  """JSON-serialisable records (plain Python types) of the valid field reports; outside `jit`.

  `reports`: a pytree of `FieldReports` keyed like the seeds. Layers are named by their pytree
  path (for a dict of layers: the key); `layer_names` renames them: a dict from path name to
  name, or a sequence, which is either exactly the path names (in any order; nothing is
  renamed) or one name per layer in pytree order (for a dict: sorted keys). `blueprint_names`: one
  sequence for every layer, a sequence of sequences (one per layer) or a dict from layer name
  to names (default: the id as a string). `strategy_names`: grafting strategy names (default
  `GRAFTING_STRATEGY_NAMES`). Non-finite floats become None.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
      reports, is_leaf=lambda x: isinstance(x, FieldReports))
  for path, leaf in flat:
    if not isinstance(leaf, FieldReports):
      raise TypeError(f"reports: leaf at {jax.tree_util.keystr(path)} is a "
                      f"{type(leaf).__name__}, expected FieldReports")
  path_names = [_path_name(path) for path, _ in flat]
  if layer_names is None:
    names = path_names
  elif isinstance(layer_names, Mapping):
    names = [str(layer_names.get(p, p)) for p in path_names]
  else:
    layer_names = [str(n) for n in layer_names]
    if len(layer_names) != len(flat):
      raise ValueError(f"layer_names: expected {len(flat)} names, got {len(layer_names)}")
    names = path_names if sorted(layer_names) == sorted(path_names) else layer_names
  strategy_names = tuple(GRAFTING_STRATEGY_NAMES if strategy_names is None else strategy_names)
  records = []
  for li, (path, r) in enumerate(flat):
    name = names[li]
    bp_names = _names_for(blueprint_names, name, li, "blueprint_names")
    r = jax.tree.map(np.asarray, r)
    for k in np.nonzero(r.valid)[0]:
      bp, sg, outcome = int(r.blueprint[k]), int(r.strategy[k]), int(r.outcome[k])
      records.append({
          "layer": name,
          "seed": int(r.seed[k]),
          "blueprint": _lookup(bp_names, bp),
          "blueprint_id": bp,
          "strategy": _lookup(strategy_names, sg),
          "strategy_id": sg,
          "outcome": Stage(outcome).name if 0 <= outcome < lifecycle.NUM_STAGES else str(outcome),
          "epoch": int(r.epoch[k]),
          "germinated_epoch": int(r.germinated_epoch[k]),
          "stage_epochs": {st.name: int(r.stage_epochs[k, st]) for st in Stage},
          "health_before": {f: _float_or_none(r.health_before[k, j])
                            for j, f in enumerate(HEALTH_FIELDS)},
          "health_after": {f: _float_or_none(r.health_after[k, j])
                           for j, f in enumerate(HEALTH_FIELDS)},
          "delta": _float_or_none(r.delta[k]),
          "param_count": int(r.param_count[k]),
          "flops_per_row": int(r.flops_per_row[k]),
          "gradient_variance": _float_or_none(r.gradient_variance[k]),
          "param_bytes": int(r.param_bytes[k]),
          "lifecycle_steps": int(r.lifecycle_steps[k]),
      })
  return records


# ----------------------------------------------------------------------------- checks


def _check_config(config) -> None:
  if not isinstance(config, TamiyoConfig):
    raise TypeError(f"config: expected a TamiyoConfig, got {type(config).__name__}")


def _check_health(health: telemetry.HealthReport, k: int, name: str) -> None:
  for f in HEALTH_FIELDS + ("nonfinite",):
    shape = jnp.shape(getattr(health, f))
    if shape != (k,):
      raise ValueError(f"{name}.{f}: expected shape ({k},), got {shape}")


def _check_layer(i: int, s: SeedState, lr: LayerReport, lc: LayerControllerState) -> None:
  k = s.num_seeds
  _check_health(lr.health, k, f"report.layers[{i}].health")
  b = jnp.shape(lr.blueprint_params)
  if len(b) != 1 or b[0] < 1:
    raise ValueError(f"report.layers[{i}].blueprint_params: expected shape (B,), B >= 1, got {b}")
  for f in ("blueprint_flops", "blueprint_replacement", "blueprint_parallel"):
    if jnp.shape(getattr(lr, f)) != b:
      raise ValueError(f"report.layers[{i}].{f}: expected shape {b}, got "
                       f"{jnp.shape(getattr(lr, f))}")
  if jnp.shape(lc.bp_count) != b:
    raise ValueError(f"ctrl.layers[{i}]: statistics for {jnp.shape(lc.bp_count)[0]} blueprints, "
                     f"the report's catalog has {b[0]}")
  if jnp.shape(lc.germ_need) != (k,):
    raise ValueError(f"ctrl.layers[{i}].germ_need: expected shape ({k},), got "
                     f"{jnp.shape(lc.germ_need)}")
