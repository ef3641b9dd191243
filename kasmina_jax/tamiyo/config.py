"""Tamiyo's configuration: the knobs (`TamiyoConfig`), selection strategies and the shared constants."""

from __future__ import annotations

import dataclasses
import enum

from kasmina_jax import _checks
from kasmina_jax import lifecycle
from kasmina_jax import telemetry
from kasmina_jax.grafting import STRATEGY_NAMES, GraftingStrategy
from kasmina_jax.lifecycle import Stage


# Grafting strategy ids and names: those of `kasmina_jax.grafting` (one definition).
FIXED_RAMP = int(GraftingStrategy.FIXED_RAMP)
PERFORMANCE_LINKED = int(GraftingStrategy.PERFORMANCE_LINKED)
DRIFT_CONTROLLED = int(GraftingStrategy.DRIFT_CONTROLLED)
GRAD_NORM_GATED = int(GraftingStrategy.GRAD_NORM_GATED)
NUM_GRAFTING_STRATEGIES = len(GraftingStrategy)
GRAFTING_STRATEGY_NAMES = STRATEGY_NAMES

# How `decide` picks a germinating seed's grafting strategy among its layer's (see TamiyoConfig).
GRAFTING_SELECTIONS = ("trend", "bandit")

# The health fields Tamiyo reads, in the order of its (K, 3) health matrices.
HEALTH_FIELDS = telemetry.HEALTH_FIELDS


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
      (default; waiting for a global plateau wastes the run, docs/design.md, "Growth protocol").
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
    grafting_selection: "trend" (default): the host-trend rule below picks one of the built-in
      strategies; a layer that was not given that one (its `grafting_strategies`) takes the
      bandit's pick among its own. "bandit": every layer picks among its own strategies, custom
      ones included, by UCB over their field reports (`ucb_c`; untried ones first, ties: the
      lowest id).
    grafting_strategy: a fixed grafting strategy instead of the choice: an id into every
      layer's strategies, or a name (a strategy function's `__name__`) every layer must have;
      None: choose.
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
  grafting_selection: str = "trend"
  grafting_strategy: int | str | None = None
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
    if self.grafting_selection not in GRAFTING_SELECTIONS:
      raise ValueError(f"grafting_selection: expected one of {GRAFTING_SELECTIONS}, got "
                       f"{self.grafting_selection!r}")
    if isinstance(self.grafting_strategy, str):
      if not self.grafting_strategy:
        raise ValueError("grafting_strategy: expected a strategy name, got ''")
    elif self.grafting_strategy is not None:
      _checks.non_negative_int("grafting_strategy", self.grafting_strategy)
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


def _check_config(config) -> None:
  if not isinstance(config, TamiyoConfig):
    raise TypeError(f"config: expected a TamiyoConfig, got {type(config).__name__}")
