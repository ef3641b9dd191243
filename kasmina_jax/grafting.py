"""Grafting: the per-step alpha ramp of GRAFTING seeds, and the child-objective windows.

A grafting strategy is a pure function `(seeds, signals, config) -> (increment, paused)`, both
shaped (num_seeds,): how much alpha would rise this step and whether the strategy pauses the
ramp. `update_alpha` computes every strategy, selects per seed by `seeds.strategy`, applies the
pause bound (`GraftingConfig.pause_limit`) and clips alpha to [0, 1]. Strategies are given as a
tuple (`DEFAULT_STRATEGIES`, index == `GraftingStrategy` value); users may pass their own, to
the layer at construction (`linen.KasminaLayer(grafting_strategies=...)`, the NNX layer's
twin): a seed's `strategy` is an id into its layer's tuple, and a strategy's name (what Tamiyo's
`grafting_strategy` and the field reports use) is its function's `__name__`
(`strategy_names`).

A train step calls `grafting_step(seeds, signals, config)` once per step (after
`lifecycle.tick_step`). Everything here is jittable and vmappable over stacked layers.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from kasmina_jax import _struct as struct

from kasmina_jax import _checks
from kasmina_jax import lifecycle
from kasmina_jax import tolerance
from kasmina_jax.lifecycle import SeedState, Stage


class GraftingStrategy(enum.IntEnum):
  """The design's four strategies (docs/design.md, "Grafting strategies"); the value is the
  index into `DEFAULT_STRATEGIES`."""

  FIXED_RAMP = 0
  PERFORMANCE_LINKED = 1
  DRIFT_CONTROLLED = 2
  GRAD_NORM_GATED = 3


@dataclasses.dataclass(frozen=True)
class GraftingConfig:
  """The design's grafting parameters, its defaults, and the pause bound (docs/design.md,
  "Grafting strategies").

  `fixed_steps`: steps of the fixed ramp, also the window of the objective rate.
  `high_drift_threshold`: drift-controlled pauses while host drift exceeds it.
  `grad_norm_lower`, `grad_norm_upper`: grad-norm-gated pauses outside this band.
  `max_pause_steps`: consecutive paused steps after which the ramp goes on anyway;
  None means 3 * `fixed_steps` (see `pause_limit`).
  """

  fixed_steps: int = 30
  high_drift_threshold: float = 0.12
  grad_norm_lower: float = 0.1
  grad_norm_upper: float = 1.0
  max_pause_steps: int | None = None

  def __post_init__(self):
    _checks.positive_int("fixed_steps", self.fixed_steps)
    _checks.finite_float("high_drift_threshold", self.high_drift_threshold, min_value=0.0)
    _checks.finite_float("grad_norm_lower", self.grad_norm_lower, min_value=0.0)
    _checks.finite_float("grad_norm_upper", self.grad_norm_upper,
                         min_value=float(self.grad_norm_lower))
    if self.max_pause_steps is not None:
      _checks.non_negative_int("max_pause_steps", self.max_pause_steps)

  @property
  def pause_limit(self) -> int:
    """Consecutive paused steps allowed before the ramp goes on regardless."""
    if self.max_pause_steps is None:
      return 3 * int(self.fixed_steps)
    return int(self.max_pause_steps)


@struct.dataclass
class GraftSignals:
  """Per-step signals, float32.

  `objective`: (K,) the child's own objective this step (reconstruction loss or trust-region
  objective); NaN = not measured. `host_drift`: () or (K,) `||theta - theta_snap|| /
  ||theta_snap||` of the wrapped host layer's weights. `host_grad_norm`: () or (K,) the
  host-only gradient norm this step. Non-finite drift / grad norm count as outside the band.
  """

  objective: jax.Array
  host_drift: jax.Array
  host_grad_norm: jax.Array


Strategy = Callable[[SeedState, GraftSignals, GraftingConfig], tuple[jax.Array, jax.Array]]


def _base_step(seeds: SeedState, config: GraftingConfig) -> jax.Array:
  return jnp.full(seeds.stage.shape, 1.0 / config.fixed_steps, jnp.float32)


def _no_pause(seeds: SeedState) -> jax.Array:
  return jnp.zeros(seeds.stage.shape, bool)


def fixed_ramp(seeds: SeedState, signals: GraftSignals,
               config: GraftingConfig) -> tuple[jax.Array, jax.Array]:
  """alpha += 1 / fixed_steps every step; never pauses."""
  del signals
  return _base_step(seeds, config), _no_pause(seeds)


def performance_linked(seeds: SeedState, signals: GraftSignals,
                       config: GraftingConfig) -> tuple[jax.Array, jax.Array]:
  """The fixed step scaled by clip(r / r0, 0.5, 2); never pauses.

  `r` is `seeds.objective_rate` (relative fall of the child's objective over the last window),
  `r0` is `seeds.objective_rate_ref` (its value when GRAFTING began). Scale 1 when `r0 <= 0`
  or either is non-finite.
  """
  del signals
  r, r0 = seeds.objective_rate, seeds.objective_rate_ref
  usable = jnp.isfinite(r) & jnp.isfinite(r0) & (r0 > 0)
  ratio = jnp.where(usable, r, 1.0) / jnp.where(usable, r0, 1.0)
  scale = jnp.where(usable, jnp.clip(ratio, 0.5, 2.0), 1.0)
  return _base_step(seeds, config) * scale, _no_pause(seeds)


def drift_controlled(seeds: SeedState, signals: GraftSignals,
                     config: GraftingConfig) -> tuple[jax.Array, jax.Array]:
  """The fixed step; paused while host drift > high_drift_threshold (or non-finite)."""
  drift = signals.host_drift
  # At the threshold up to float noise counts as inside (`tolerance`: no flip between devices).
  inside = jnp.isfinite(drift) & tolerance.at_most(drift, config.high_drift_threshold)
  return _base_step(seeds, config), jnp.broadcast_to(~inside, seeds.stage.shape)


def grad_norm_gated(seeds: SeedState, signals: GraftSignals,
                    config: GraftingConfig) -> tuple[jax.Array, jax.Array]:
  """The fixed step; paused while the host gradient norm is outside [lower, upper]."""
  g = signals.host_grad_norm
  # At a bound up to float noise counts as inside (`tolerance`: no flip between devices).
  inside = (jnp.isfinite(g) & tolerance.at_least(g, config.grad_norm_lower)
            & tolerance.at_most(g, config.grad_norm_upper))
  return _base_step(seeds, config), jnp.broadcast_to(~inside, seeds.stage.shape)


DEFAULT_STRATEGIES: tuple[Strategy, ...] = (fixed_ramp, performance_linked, drift_controlled,
                                            grad_norm_gated)
STRATEGY_NAMES: tuple[str, ...] = tuple(s.name.lower() for s in GraftingStrategy)

# --------------------------------------------------------------------------------------------
# Argument checks (run before tracing).


def _check_seeds(seeds) -> int:
  if not isinstance(seeds, SeedState):
    raise TypeError(f"seeds: expected a SeedState, got {type(seeds).__name__}")
  shape = jnp.shape(seeds.stage)
  if len(shape) != 1:
    raise ValueError(
        f"seeds.stage: expected shape (num_seeds,), got {shape}; vmap over stacked layers")
  return shape[0]


def _check_config(config) -> None:
  if not isinstance(config, GraftingConfig):
    raise TypeError(f"config: expected a GraftingConfig, got {type(config).__name__}")


def _signal(name: str, value, num_seeds: int) -> jax.Array:
  """A real-valued signal as float32 of shape (num_seeds,); names `name` on bad input."""
  arr = jnp.asarray(value)
  dtype = arr.dtype
  if dtype == jnp.bool_ or not (jnp.issubdtype(dtype, jnp.floating)
                                or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"{name}: expected a real (float) array, got dtype {dtype}")
  if arr.shape not in ((), (1,), (num_seeds,)):
    raise ValueError(f"{name}: expected shape () or ({num_seeds},), got {arr.shape}")
  return jnp.broadcast_to(arr.astype(jnp.float32), (num_seeds,))


def _check_signals(signals, num_seeds: int) -> GraftSignals:
  if not isinstance(signals, GraftSignals):
    raise TypeError(f"signals: expected a GraftSignals, got {type(signals).__name__}")
  return GraftSignals(
      objective=_signal("signals.objective", signals.objective, num_seeds),
      host_drift=_signal("signals.host_drift", signals.host_drift, num_seeds),
      host_grad_norm=_signal("signals.host_grad_norm", signals.host_grad_norm, num_seeds),
  )


def check_strategies(strategies, name: str = "strategies", *,
                     named: bool = True) -> tuple[Strategy, ...]:
  """`strategies` as a tuple of strategy functions, with distinct names (`strategy_names`)
  when `named` (a layer's, whose ids Tamiyo and the field reports name); a TypeError /
  ValueError naming `name` otherwise."""
  if isinstance(strategies, (str, bytes)) or not isinstance(strategies, Sequence):
    raise TypeError(f"{name}: expected a tuple of functions, got {type(strategies).__name__}")
  if not strategies:
    raise ValueError(f"{name}: expected at least one strategy")
  seen = {}
  for i, s in enumerate(strategies):
    if not callable(s):
      raise TypeError(f"{name}[{i}]: expected a function, got {type(s).__name__}")
    if not named:
      continue
    label = getattr(s, "__name__", None)
    if not isinstance(label, str) or not label or label == "<lambda>":
      raise TypeError(f"{name}[{i}]: a strategy is named by its `__name__`; got "
                      f"{label!r} (use a def, or set `__name__`)")
    if label in seen:
      raise ValueError(f"{name}: strategies {seen[label]} and {i} are both named {label!r}")
    seen[label] = i
  return tuple(strategies)


def _check_strategies(strategies) -> tuple[Strategy, ...]:
  return check_strategies(strategies, named=False)


def strategy_names(strategies: Sequence[Strategy]) -> tuple[str, ...]:
  """The names of a strategy tuple (each function's `__name__`; the built-ins' are
  `STRATEGY_NAMES`)."""
  return tuple(s.__name__ for s in check_strategies(strategies))


# --------------------------------------------------------------------------------------------
# The per-step updates.


def update_objective(seeds: SeedState, objective: jax.Array,
                     config: GraftingConfig = GraftingConfig()) -> SeedState:
  """Fold this step's child objective into each live seed's window (TRAINING..FINE_TUNING).

  A running mean accumulates in `seeds.objective` / `objective_count`. When the count reaches
  `fixed_steps` the window closes: `objective_rate = (window_start - mean) /
  max(|window_start|, 1e-12)`, the relative fall since the previous window, and
  `objective_window_start = mean`; the mean restarts. The first closed window (window_start
  still 0, as after germination) only sets window_start (rate 0). Non-finite objectives are
  skipped and never enter the state.
  """
  k = _check_seeds(seeds)
  _check_config(config)
  obj = _signal("objective", objective, k)
  take = lifecycle.stage_in(seeds.stage, lifecycle.ROLLBACK_STAGES) & jnp.isfinite(obj)
  safe = jnp.where(take, obj, 0.0)
  count = seeds.objective_count + take.astype(jnp.int32)
  mean = seeds.objective + (safe - seeds.objective) / jnp.maximum(count, 1).astype(jnp.float32)
  take = take & jnp.isfinite(mean)  # (a finite objective whose mean overflows is skipped too)
  count = seeds.objective_count + take.astype(jnp.int32)
  mean = jnp.where(take, mean, seeds.objective)
  close = take & (count >= config.fixed_steps)
  start = seeds.objective_window_start
  first = start == 0.0
  rate = jnp.where(first, 0.0, (start - mean) / jnp.maximum(jnp.abs(start), 1e-12))
  rate = jnp.where(jnp.isfinite(rate), rate, 0.0)
  return seeds.replace(
      objective=jnp.where(close, 0.0, mean),
      objective_count=jnp.where(close, 0, count),
      objective_window_start=jnp.where(close, mean, start),
      objective_rate=jnp.where(close, rate, seeds.objective_rate),
  )


def update_alpha(seeds: SeedState, signals: GraftSignals,
                 config: GraftingConfig = GraftingConfig(),
                 strategies: Sequence[Strategy] = DEFAULT_STRATEGIES) -> SeedState:
  """One step of the alpha ramp for every GRAFTING seed (others unchanged bit for bit).

  Each seed follows `strategies[seeds.strategy]` (ids outside the tuple are clamped to it, as
  `jax.lax.switch` does). A paused seed gets no increment and `pause_steps += 1`, until
  `pause_steps` has reached `config.pause_limit`: from then on the ramp goes on while the pause
  lasts. An unpaused step resets `pause_steps` to 0. A non-finite or negative increment counts
  as 0; alpha never decreases and stays in [0, 1]. Alpha snaps to 1 when less than half of
  this step's increment short of it, so the fixed ramp completes in exactly `fixed_steps`
  steps despite float32 rounding (checked for every fixed_steps up to 5858).
  """
  k = _check_seeds(seeds)
  _check_config(config)
  strategies = _check_strategies(strategies)
  signals = _check_signals(signals, k)
  incs, pauses = [], []
  for i, strategy in enumerate(strategies):
    out = strategy(seeds, signals, config)
    if not isinstance(out, tuple) or len(out) != 2:
      raise TypeError(f"strategies[{i}]: expected to return (increment, paused)")
    inc, paused = (jnp.asarray(x) for x in out)
    for name, x in (("increment", inc), ("paused", paused)):
      if x.shape not in ((), (k,)):
        raise ValueError(f"strategies[{i}]: {name} must have shape () or ({k},), got {x.shape}")
    incs.append(jnp.broadcast_to(inc.astype(jnp.float32), (k,)))
    pauses.append(jnp.broadcast_to(paused.astype(bool), (k,)))
  idx = jnp.clip(seeds.strategy, 0, len(strategies) - 1)[None, :]
  inc = jnp.take_along_axis(jnp.stack(incs), idx, axis=0)[0]
  paused = jnp.take_along_axis(jnp.stack(pauses), idx, axis=0)[0]
  inc = jnp.where(jnp.isfinite(inc), jnp.maximum(inc, 0.0), 0.0)

  limit = config.pause_limit
  hold = paused & (seeds.pause_steps < limit)  # paused and still within the bound
  pause_steps = jnp.where(paused, jnp.minimum(seeds.pause_steps + 1, limit), 0)
  inc = jnp.where(hold, 0.0, inc)
  alpha = seeds.alpha + inc
  alpha = jnp.where((inc > 0) & (1.0 - alpha < 0.5 * inc), 1.0, alpha)
  alpha = jnp.maximum(jnp.clip(alpha, 0.0, 1.0), jnp.clip(seeds.alpha, 0.0, 1.0))

  grafting = seeds.stage == Stage.GRAFTING
  return seeds.replace(
      alpha=jnp.where(grafting, alpha, seeds.alpha),
      pause_steps=jnp.where(grafting, pause_steps.astype(jnp.int32), seeds.pause_steps),
  )


def grafting_step(seeds: SeedState, signals: GraftSignals,
                  config: GraftingConfig = GraftingConfig(),
                  strategies: Sequence[Strategy] = DEFAULT_STRATEGIES) -> SeedState:
  """What a train step calls each step: `update_objective`, then `update_alpha`."""
  k = _check_seeds(seeds)
  checked = _check_signals(signals, k)
  seeds = update_objective(seeds, checked.objective, config)
  return update_alpha(seeds, checked, config, strategies)
