"""Tests of `kasmina_jax.grafting`: the four alpha schedules, the pause bound, the objective
windows, NaN safety, jit / vmap agreement, and argument checks.

Schedules are run under `jax.jit` (each function jitted once at module level, the config static)
and checked step by step against a pure-numpy model of the rules in docs/design.md, "Grafting
strategies".
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasmina_jax import grafting
from kasmina_jax import lifecycle
from kasmina_jax.grafting import (
    DEFAULT_STRATEGIES,
    STRATEGY_NAMES,
    GraftingConfig,
    GraftingStrategy,
    GraftSignals,
    drift_controlled,
    fixed_ramp,
    grad_norm_gated,
    grafting_step,
    performance_linked,
    update_alpha,
    update_objective,
)
from kasmina_jax.lifecycle import Stage, init_seed_state

FIXED, PERF, DRIFT, GRAD = (int(s) for s in GraftingStrategy)
F32 = np.float32

# Jitted once; the config is static (hashable frozen dataclass).
J_STEP = jax.jit(grafting_step, static_argnums=(2,))
J_ALPHA = jax.jit(update_alpha, static_argnums=(2,))
J_OBJ = jax.jit(update_objective, static_argnums=(2,))
V_STEP = jax.jit(jax.vmap(grafting_step, in_axes=(0, 0, None)), static_argnums=(2,))


# --------------------------------------------------------------------------------------------
# Helpers.


def _seeds(k=1, *, stage=Stage.GRAFTING, strategy=FIXED, alpha=0.0, **fields):
  """`k` seeds in `stage` with `strategy`; `fields` override other leaves (broadcast to k)."""
  s = init_seed_state(k)
  values = dict(stage=stage, strategy=strategy, blueprint=0, alpha=alpha, **fields)
  out = {}
  for name, v in values.items():
    old = getattr(s, name)
    out[name] = jnp.broadcast_to(jnp.asarray(v, old.dtype), old.shape)
  return s.replace(**out)


def _signals(k=1, *, objective=math.nan, drift=0.0, grad=0.5):
  return GraftSignals(objective=jnp.broadcast_to(jnp.asarray(objective, jnp.float32), (k,)),
                      host_drift=jnp.asarray(drift, jnp.float32),
                      host_grad_norm=jnp.asarray(grad, jnp.float32))


def _assert_bits_equal(a, b, what=""):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, what
    assert x.tobytes() == y.tobytes(), f"{what}: {x} != {y}"


def _np(seeds):
  return {k: np.asarray(v) for k, v in vars(seeds).items()}


def _run(seeds, config, *, steps, objective=math.nan, drift=0.0, grad=0.5):
  """Run `steps` jitted grafting steps; the signals may be sequences (one value a step).

  Returns the final seeds and the alpha and pause_steps after every step, (steps, K)."""
  k = seeds.num_seeds
  seq = lambda v: v if isinstance(v, (list, tuple, np.ndarray)) else [v] * steps
  objs, drifts, grads = seq(objective), seq(drift), seq(grad)
  alphas, pauses = [], []
  for t in range(steps):
    seeds = J_STEP(seeds, _signals(k, objective=objs[t], drift=drifts[t], grad=grads[t]), config)
    alphas.append(np.asarray(seeds.alpha))
    pauses.append(np.asarray(seeds.pause_steps))
  return seeds, np.stack(alphas), np.stack(pauses)


def _steps_to_one(alphas) -> int:
  """1-based index of the first step with alpha == 1 (per seed 0)."""
  hits = np.nonzero(alphas[:, 0] == 1.0)[0]
  return int(hits[0]) + 1 if hits.size else -1


def _oracle_schedule(paused_signal, config):
  """Expected (incremented?, pause_steps) per step for a constant-step strategy."""
  ps, out = 0, []
  for p in paused_signal:
    if p and ps < config.pause_limit:
      ps += 1
      out.append((False, ps))
    elif p:
      out.append((True, ps))
    else:
      ps = 0
      out.append((True, 0))
  return out


# --------------------------------------------------------------------------------------------
# Names, config.


def test_strategy_enum_names_and_tuple():
  assert [int(s) for s in GraftingStrategy] == [0, 1, 2, 3]
  assert [s.name for s in GraftingStrategy] == ["FIXED_RAMP", "PERFORMANCE_LINKED",
                                                "DRIFT_CONTROLLED", "GRAD_NORM_GATED"]
  assert DEFAULT_STRATEGIES == (fixed_ramp, performance_linked, drift_controlled, grad_norm_gated)
  for s in GraftingStrategy:
    assert DEFAULT_STRATEGIES[s] is getattr(grafting, s.name.lower())
  assert len(STRATEGY_NAMES) == 4 and all(isinstance(n, str) for n in STRATEGY_NAMES)
  assert len(set(STRATEGY_NAMES)) == 4


def test_config_defaults_and_pause_limit():
  c = GraftingConfig()
  assert (c.fixed_steps, c.high_drift_threshold, c.grad_norm_lower, c.grad_norm_upper) == (
      30, 0.12, 0.1, 1.0)
  assert c.max_pause_steps is None and c.pause_limit == 90
  assert GraftingConfig(fixed_steps=7).pause_limit == 21
  assert GraftingConfig(max_pause_steps=0).pause_limit == 0
  assert GraftingConfig(max_pause_steps=5).pause_limit == 5
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.fixed_steps = 3
  hash(c)  # usable as a static jit argument


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(fixed_steps=0), ValueError, "fixed_steps"),
    (dict(fixed_steps=-3), ValueError, "fixed_steps"),
    (dict(fixed_steps=2.5), TypeError, "fixed_steps"),
    (dict(fixed_steps=True), TypeError, "fixed_steps"),
    (dict(high_drift_threshold=-0.1), ValueError, "high_drift_threshold"),
    (dict(high_drift_threshold=math.nan), ValueError, "high_drift_threshold"),
    (dict(high_drift_threshold="0.1"), TypeError, "high_drift_threshold"),
    (dict(grad_norm_lower=-1.0), ValueError, "grad_norm_lower"),
    (dict(grad_norm_lower=math.inf), ValueError, "grad_norm_lower"),
    (dict(grad_norm_upper=0.05), ValueError, "grad_norm_upper"),  # below lower (0.1)
    (dict(grad_norm_upper=math.inf), ValueError, "grad_norm_upper"),
    (dict(grad_norm_upper=None), TypeError, "grad_norm_upper"),
    (dict(max_pause_steps=-1), ValueError, "max_pause_steps"),
    (dict(max_pause_steps=2.0), TypeError, "max_pause_steps"),
])
def test_config_validation_names_the_field(kwargs, exc, name):
  with pytest.raises(exc, match=name):
    GraftingConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Fixed ramp.


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 30, 97, 1000])
def test_fixed_ramp_reaches_one_in_exactly_fixed_steps(n):
  cfg = GraftingConfig(fixed_steps=n)
  seeds, alphas, pauses = _run(_seeds(2, strategy=FIXED), cfg, steps=n + 3)
  a = alphas[:, 0]
  np.testing.assert_array_equal(alphas[:, 0], alphas[:, 1])
  assert np.all(np.diff(a) >= 0) and np.all((a >= 0) & (a <= 1))
  assert np.all(a[:n - 1] < 1.0) and np.all(a[n - 1:] == 1.0)
  np.testing.assert_allclose(a[:n], np.arange(1, n + 1) / n, atol=1e-5)
  assert not pauses.any()


def test_fixed_ramp_ignores_signals():
  cfg = GraftingConfig(fixed_steps=5)
  _, alphas, pauses = _run(_seeds(1, strategy=FIXED), cfg, steps=5, drift=math.nan,
                           grad=math.inf, objective=math.nan)
  np.testing.assert_allclose(alphas[:, 0], [0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-6)
  assert alphas[-1, 0] == 1.0 and not pauses.any()


# --------------------------------------------------------------------------------------------
# Gated strategies: pause exactly when the signal is outside its band, up to the pause limit.

_CFG_GATE = GraftingConfig(fixed_steps=10, high_drift_threshold=0.12, grad_norm_lower=0.1,
                           grad_norm_upper=1.0, max_pause_steps=6)


def _check_gated_schedule(strategy, signal_name, values, inside):
  cfg = _CFG_GATE
  steps = len(values)
  _, alphas, pauses = _run(_seeds(1, strategy=strategy), cfg, steps=steps,
                           **{signal_name: values})
  a = np.concatenate([[0.0], alphas[:, 0]])
  expected = _oracle_schedule([not x for x in inside], cfg)
  ramped = 0
  for t, (inc, ps) in enumerate(expected):
    assert pauses[t, 0] == ps, (t, values[t])
    if a[t] < 1.0:
      assert (a[t + 1] > a[t]) == inc, (t, values[t], a[t], a[t + 1])
    ramped += inc
    np.testing.assert_allclose(a[t + 1], min(ramped / cfg.fixed_steps, 1.0), atol=1e-5)
  assert np.all(np.diff(a) >= 0) and np.all((a >= 0) & (a <= 1))
  return a


def test_drift_controlled_pauses_exactly_outside_band():
  thr = _CFG_GATE.high_drift_threshold
  values = ([0.0, 0.05, thr, 0.2, 0.5, math.nan, 0.01, math.inf, -math.inf, 0.13]
            + [0.3] * 9 + [0.0] * 3 + [math.nan] * 4 + [0.1] * 12)
  inside = [math.isfinite(v) and F32(v) <= F32(thr) for v in values]
  a = _check_gated_schedule(DRIFT, "drift", values, inside)
  assert a[-1] == 1.0  # completes while inside


def test_grad_norm_gated_pauses_exactly_outside_band():
  lo, hi = _CFG_GATE.grad_norm_lower, _CFG_GATE.grad_norm_upper
  values = ([0.5, lo, hi, 0.05, 1.5, math.nan, 0.0, math.inf, 2.0, 0.3]
            + [10.0] * 8 + [0.5] * 2 + [-1.0] * 7 + [0.7] * 12)
  inside = [math.isfinite(v) and F32(lo) <= F32(v) <= F32(hi) for v in values]
  a = _check_gated_schedule(GRAD, "grad", values, inside)
  assert a[-1] == 1.0


@pytest.mark.parametrize("strategy,signal", [(DRIFT, dict(drift=0.5)), (GRAD, dict(grad=5.0)),
                                             (DRIFT, dict(drift=math.nan)),
                                             (GRAD, dict(grad=math.nan))])
@pytest.mark.parametrize("limit", [None, 0, 4])
def test_pause_is_bounded_then_ramp_completes(strategy, signal, limit):
  cfg = GraftingConfig(fixed_steps=5, max_pause_steps=limit)
  total = cfg.pause_limit + cfg.fixed_steps
  _, alphas, pauses = _run(_seeds(1, strategy=strategy), cfg, steps=total + 2, **signal)
  a = alphas[:, 0]
  assert np.all(a[:cfg.pause_limit] == 0.0)
  np.testing.assert_array_equal(pauses[:cfg.pause_limit, 0], np.arange(1, cfg.pause_limit + 1))
  assert np.all(pauses[cfg.pause_limit:, 0] == cfg.pause_limit)
  assert _steps_to_one(alphas) == total
  assert np.all(np.diff(a) >= 0)


def test_inside_band_completes_in_fixed_steps():
  cfg = GraftingConfig(fixed_steps=8)
  for strategy, sig in ((DRIFT, dict(drift=0.01)), (GRAD, dict(grad=0.5))):
    _, alphas, pauses = _run(_seeds(1, strategy=strategy), cfg, steps=10, **sig)
    assert _steps_to_one(alphas) == 8 and not pauses.any()


def test_unpaused_step_resets_pause_counter():
  cfg = GraftingConfig(fixed_steps=10, max_pause_steps=3)
  grads = [5.0, 5.0, 0.5, 5.0, 5.0, 5.0, 5.0, 5.0, 0.5]
  _, alphas, pauses = _run(_seeds(1, strategy=GRAD), cfg, steps=len(grads), grad=grads)
  np.testing.assert_array_equal(pauses[:, 0], [1, 2, 0, 1, 2, 3, 3, 3, 0])
  np.testing.assert_allclose(alphas[:, 0], np.array([0, 0, 1, 1, 1, 1, 2, 3, 4]) / 10, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Performance-linked.


@pytest.mark.parametrize("r,r0,scale", [
    (0.1, 0.1, 1.0), (0.15, 0.1, 1.5), (0.2, 0.1, 2.0), (0.5, 0.1, 2.0), (0.05, 0.1, 0.5),
    (0.08, 0.1, 0.8), (0.0, 0.1, 0.5), (-0.3, 0.1, 0.5), (0.1, 0.0, 1.0), (0.1, -0.2, 1.0),
    (0.1, math.nan, 1.0), (0.1, math.inf, 1.0), (math.nan, 0.1, 1.0), (1.0, 1e-30, 2.0),
])
def test_performance_linked_scale(r, r0, scale):
  cfg = GraftingConfig(fixed_steps=10)
  s = _seeds(1, strategy=PERF, objective_rate=r, objective_rate_ref=r0)
  inc, paused = performance_linked(s, _signals(), cfg)
  chex.assert_shape([inc, paused], (1,))
  np.testing.assert_allclose(np.asarray(inc), [scale / 10], rtol=1e-6)
  assert not bool(paused[0])
  # Also through update_alpha.
  out = J_ALPHA(s, _signals(), cfg)
  np.testing.assert_allclose(np.asarray(out.alpha), [scale / 10], rtol=1e-6)


def _perf_steps(objective_value):
  """Steps to alpha = 1 for a PERF seed mid-window (5 of 10 steps in, mean 1, r = r0 = 0.1),
  fed a constant objective: the window closes at step 5 with rate 1 - (5 + 5 v) / 10."""
  cfg = GraftingConfig(fixed_steps=10)
  s = _seeds(1, strategy=PERF, objective=1.0, objective_count=5, objective_window_start=1.0,
             objective_rate=0.1, objective_rate_ref=0.1)
  _, alphas, _ = _run(s, cfg, steps=30, objective=objective_value)
  a = alphas[:, 0]
  assert np.all(np.diff(a) >= 0) and np.all((a >= 0) & (a <= 1))
  return _steps_to_one(alphas)


def test_performance_linked_faster_when_objective_falls_fast_slower_when_flat():
  # Steps 1-4 at scale 1 (alpha 0.4); from step 5 (window closed) at the new scale.
  fast = _perf_steps(0.5)  # mean 0.75: r = 0.25, r / r0 = 2.5 -> 2: 0.4 + 3 * 0.2
  very_fast = _perf_steps(1e-3)  # r ~ 0.5, clipped to 2 as well
  matched = _perf_steps(0.8)  # mean 0.9: r = 0.1 = r0: the fixed ramp
  flat = _perf_steps(1.0)  # r = 0 -> 0.5: 0.4 + 12 * 0.05
  rising = _perf_steps(3.0)  # r < 0 -> 0.5
  assert (fast, very_fast, matched, flat, rising) == (7, 7, 10, 16, 16)
  # The clip bounds it: never faster than fixed_steps / 2, never slower than 2 * fixed_steps.
  assert 5 <= fast < matched < flat <= 20


def test_performance_linked_reference_taken_when_grafting_begins():
  """End to end with the lifecycle: TRAINING windows set the rate; GRAFTING copies it."""
  cfg = GraftingConfig(fixed_steps=4)
  lcfg = lifecycle.LifecycleConfig(min_training_steps=8)
  s, acc = lifecycle.request_germination(init_seed_state(2), 0, 0, PERF, num_blueprints=1,
                                         num_strategies=4)
  s = lifecycle.update_readiness(s, config=lcfg)
  s, acc = lifecycle.apply_commands(s, lifecycle.make_commands(2, op=jnp.array([2, 0])), lcfg,
                                    num_blueprints=1, num_strategies=4)
  assert int(s.stage[0]) == Stage.TRAINING
  objective = [1.0] * 4 + [0.9] * 4 + [0.81] * 4  # windows: 1, 0.9, 0.81 -> rate 0.1
  for v in objective:
    s = lifecycle.tick_step(s)
    s = J_STEP(s, _signals(2, objective=v), cfg)
  assert float(s.alpha[0]) == 0.0  # TRAINING: no ramp
  np.testing.assert_allclose(float(s.objective_rate[0]), 0.1, rtol=1e-5)
  assert float(s.objective_rate[1]) == 0.0  # DORMANT seed untouched
  s = lifecycle.update_readiness(s, delta=jnp.array([1.0, 1.0]), config=lcfg)
  s, acc = lifecycle.apply_commands(s, lifecycle.make_commands(2, op=jnp.array([2, 0])), lcfg,
                                    num_blueprints=1, num_strategies=4)
  assert bool(acc[0]) and int(s.stage[0]) == Stage.GRAFTING
  assert float(s.objective_rate_ref[0]) == float(s.objective_rate[0])
  # The objective keeps falling 10% per window: the fixed ramp's pace.
  _, alphas, _ = _run(s, cfg, steps=6, objective=[0.81 * 0.9] * 4 + [0.81 * 0.81] * 2)
  assert _steps_to_one(alphas) == 4


# --------------------------------------------------------------------------------------------
# update_objective.


def test_update_objective_windows():
  cfg = GraftingConfig(fixed_steps=4)
  s = _seeds(1, stage=Stage.TRAINING)
  for v, count, mean in ((1.0, 1, 1.0), (2.0, 2, 1.5), (math.nan, 2, 1.5), (3.0, 3, 2.0),
                         (math.inf, 3, 2.0)):
    s = J_OBJ(s, jnp.array([v], jnp.float32), cfg)
    assert int(s.objective_count[0]) == count
    np.testing.assert_allclose(float(s.objective[0]), mean, rtol=1e-6)
  s = J_OBJ(s, jnp.array([4.0]), cfg)  # first window closes: mean 2.5, only sets the start
  assert int(s.objective_count[0]) == 0 and float(s.objective[0]) == 0.0
  np.testing.assert_allclose(float(s.objective_window_start[0]), 2.5, rtol=1e-6)
  assert float(s.objective_rate[0]) == 0.0
  for _ in range(4):
    s = J_OBJ(s, jnp.array([2.0]), cfg)
  np.testing.assert_allclose(float(s.objective_rate[0]), 0.2, rtol=1e-5)  # (2.5 - 2) / 2.5
  np.testing.assert_allclose(float(s.objective_window_start[0]), 2.0, rtol=1e-6)
  for _ in range(4):
    s = J_OBJ(s, jnp.array([2.5]), cfg)
  np.testing.assert_allclose(float(s.objective_rate[0]), -0.25, rtol=1e-5)  # rising


def test_update_objective_negative_objective_is_relative_to_its_magnitude():
  cfg = GraftingConfig(fixed_steps=2)
  s = _seeds(1, stage=Stage.GRAFTING, objective_window_start=-0.5)
  s = J_OBJ(s, jnp.array([-1.0]), cfg)
  s = J_OBJ(s, jnp.array([-1.0]), cfg)
  np.testing.assert_allclose(float(s.objective_rate[0]), 1.0, rtol=1e-6)  # (-0.5 + 1) / 0.5


@pytest.mark.parametrize("stage", [s for s in Stage if s not in lifecycle.ROLLBACK_STAGES])
def test_update_objective_ignores_stages_outside_training_to_fine_tuning(stage):
  cfg = GraftingConfig(fixed_steps=1)
  s = _seeds(3, stage=stage, objective=0.5, objective_count=0, objective_window_start=1.0)
  out = J_OBJ(s, jnp.array([0.1, 0.2, 0.3]), cfg)
  _assert_bits_equal(out, s)


def test_update_objective_accepts_scalar_objective():
  cfg = GraftingConfig(fixed_steps=3)
  s = _seeds(2, stage=Stage.TRAINING)
  _assert_bits_equal(update_objective(s, 0.7, cfg), update_objective(s, jnp.full((2,), 0.7), cfg))


# --------------------------------------------------------------------------------------------
# Stage isolation, NaN safety, custom strategies.


@pytest.mark.parametrize("stage", [s for s in Stage if s != Stage.GRAFTING])
def test_non_grafting_seeds_untouched_by_update_alpha(stage):
  cfg = GraftingConfig(fixed_steps=2, max_pause_steps=1)
  s = _seeds(4, stage=stage, strategy=jnp.array([0, 1, 2, 3]), alpha=0.25, pause_steps=1,
             objective_rate=0.3, objective_rate_ref=0.1)
  for sig in (_signals(4), _signals(4, drift=5.0, grad=math.nan)):
    _assert_bits_equal(J_ALPHA(s, sig, cfg), s)


def test_mixed_stages_only_grafting_moves():
  cfg = GraftingConfig(fixed_steps=4)
  stages = jnp.array([Stage.GRAFTING, Stage.TRAINING, Stage.STABILIZATION, Stage.GRAFTING])
  s = _seeds(4, stage=stages, strategy=jnp.array([0, 0, 0, 3]))
  out = J_STEP(s, _signals(4, objective=1.0, grad=0.5), cfg)
  np.testing.assert_allclose(np.asarray(out.alpha), [0.25, 0, 0, 0.25])
  assert int(out.objective_count[1]) == 1 and int(out.objective_count[2]) == 1


def test_nan_and_inf_signals_never_reach_state():
  cfg = GraftingConfig(fixed_steps=3, max_pause_steps=2)
  stages = jnp.array([Stage.TRAINING, Stage.GRAFTING, Stage.GRAFTING, Stage.GRAFTING,
                      Stage.GRAFTING, Stage.FINE_TUNING])
  s = _seeds(6, stage=stages, strategy=jnp.array([0, 0, 1, 2, 3, 1]))
  bad = [math.nan, math.inf, -math.inf]
  rng = np.random.default_rng(1)
  for t in range(40):
    obj = rng.choice(bad + [0.5, 1e38], size=6).astype(np.float32)
    sig = GraftSignals(objective=jnp.asarray(obj), host_drift=jnp.float32(rng.choice(bad)),
                       host_grad_norm=jnp.float32(rng.choice(bad)))
    s = J_STEP(s, sig, cfg)
    n = _np(s)
    for name in ("alpha", "objective", "objective_window_start", "objective_rate",
                 "objective_rate_ref"):
      assert np.all(np.isfinite(n[name])), (t, name, n[name])
    assert np.all((n["alpha"] >= 0) & (n["alpha"] <= 1))
  # Gated seeds are paused up to the limit, then ramp: all finish.
  assert np.all(np.asarray(s.alpha)[1:5] == 1.0)


def test_custom_strategies_and_out_of_range_ids_clamp():
  cfg = GraftingConfig(fixed_steps=10)
  half = lambda seeds, signals, config: (jnp.full(seeds.stage.shape, 0.5), False)
  never = lambda seeds, signals, config: (jnp.float32(1.0), jnp.ones(seeds.stage.shape, bool))
  s = _seeds(4, strategy=jnp.array([0, 1, -1, 7]))
  out = update_alpha(s, _signals(4), GraftingConfig(fixed_steps=10, max_pause_steps=2),
                     strategies=(half, never))
  np.testing.assert_allclose(np.asarray(out.alpha), [0.5, 0.0, 0.5, 0.0])
  np.testing.assert_array_equal(np.asarray(out.pause_steps), [0, 1, 0, 1])
  # A strategy returning a negative or NaN increment cannot lower alpha or poison it.
  bad = lambda seeds, signals, config: (jnp.array([-0.5, jnp.nan]), jnp.zeros(2, bool))
  s = _seeds(2, alpha=0.3)
  out = update_alpha(s, _signals(2), cfg, strategies=(bad,))
  np.testing.assert_array_equal(np.asarray(out.alpha), np.asarray(s.alpha))


def test_grafting_step_is_update_objective_then_update_alpha():
  cfg = GraftingConfig(fixed_steps=2)
  s = _seeds(3, strategy=jnp.array([1, 2, 3]), objective=1.0, objective_count=1,
             objective_window_start=2.0, objective_rate=0.1, objective_rate_ref=0.1)
  sig = _signals(3, objective=0.5, drift=0.05, grad=0.3)
  _assert_bits_equal(grafting_step(s, sig, cfg),
                     update_alpha(update_objective(s, sig.objective, cfg), sig, cfg))
  _assert_bits_equal(J_STEP(s, sig, cfg), grafting_step(s, sig, cfg))


# --------------------------------------------------------------------------------------------
# vmap over stacked layers.


def _random_layer(rng, k):
  return _seeds(
      k,
      stage=rng.choice([Stage.TRAINING, Stage.GRAFTING, Stage.GRAFTING, Stage.FINE_TUNING,
                        Stage.DORMANT], size=k),
      strategy=rng.integers(0, 4, size=k),
      alpha=rng.uniform(0, 1, size=k).astype(np.float32),
      pause_steps=rng.integers(0, 3, size=k),
      objective_rate=rng.uniform(-0.1, 0.3, size=k).astype(np.float32),
      objective_rate_ref=rng.uniform(-0.1, 0.3, size=k).astype(np.float32),
      objective_window_start=rng.uniform(0.5, 2, size=k).astype(np.float32))


def test_vmap_over_stacked_layers_equals_per_layer():
  cfg = GraftingConfig(fixed_steps=3, max_pause_steps=2)
  rng = np.random.default_rng(0)
  nl, k = 3, 5
  layers = [_random_layer(rng, k) for _ in range(nl)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  for _ in range(12):
    obj = rng.uniform(0, 2, size=(nl, k)).astype(np.float32)
    obj[rng.random((nl, k)) < 0.2] = np.nan
    drift = rng.choice([0.05, 0.3, np.nan], size=nl).astype(np.float32)  # one per layer
    grad = rng.choice([0.5, 3.0, np.inf], size=nl).astype(np.float32)
    sig = GraftSignals(objective=jnp.asarray(obj), host_drift=jnp.asarray(drift),
                       host_grad_norm=jnp.asarray(grad))
    stacked = V_STEP(stacked, sig, cfg)
    for i in range(nl):
      sig_i = jax.tree.map(lambda x: x[i], sig)
      layers[i] = grafting_step(layers[i], sig_i, cfg)  # eager
      _assert_bits_equal(jax.tree.map(lambda x: x[i], stacked), layers[i], f"layer {i}")


# --------------------------------------------------------------------------------------------
# Property test against a numpy model.

K = 5
_CFG_P = GraftingConfig(fixed_steps=4, high_drift_threshold=0.12, grad_norm_lower=0.1,
                        grad_norm_upper=1.0, max_pause_steps=3)


def _oracle_alpha(row, drift, grad, cfg):
  """(alpha, pause_steps, moved) for one GRAFTING seed after update_alpha, in float32."""
  strategy = min(max(int(row["strategy"]), 0), 3)
  base = F32(1.0 / cfg.fixed_steps)
  inc, paused = base, False
  if strategy == PERF:
    r, r0 = F32(row["objective_rate"]), F32(row["objective_rate_ref"])
    if math.isfinite(r) and math.isfinite(r0) and r0 > 0:
      with np.errstate(over="ignore"):
        inc = F32(base * F32(min(max(F32(r / r0), F32(0.5)), F32(2.0))))
  elif strategy == DRIFT:
    paused = not (math.isfinite(drift) and F32(drift) <= F32(cfg.high_drift_threshold))
  elif strategy == GRAD:
    paused = not (math.isfinite(grad) and F32(cfg.grad_norm_lower) <= F32(grad)
                  <= F32(cfg.grad_norm_upper))
  alpha, ps = F32(row["alpha"]), int(row["pause_steps"])
  if paused and ps < cfg.pause_limit:
    return alpha, ps + 1, False
  ps = min(ps + 1, cfg.pause_limit) if paused else 0
  new = F32(alpha + inc)
  if F32(1.0) - new < F32(0.5) * inc:  # within half a step of 1: snap
    new = F32(1.0)
  return min(new, F32(1.0)), ps, True


def _oracle_objective(row, obj, cfg):
  """(objective, count, window_start, rate) after update_objective, in float32."""
  mean, count = F32(row["objective"]), int(row["objective_count"])
  start, rate = F32(row["objective_window_start"]), F32(row["objective_rate"])
  live = int(row["stage"]) in [int(s) for s in lifecycle.ROLLBACK_STAGES]
  if not live or not math.isfinite(obj):
    return mean, count, start, rate
  count += 1
  mean = F32(mean + F32(F32(F32(obj) - mean) / F32(count)))
  if count >= cfg.fixed_steps:
    rate = F32(0.0) if start == 0 else F32(F32(start - mean) / max(abs(start), F32(1e-12)))
    return F32(0.0), 0, mean, rate
  return mean, count, start, rate


_f32s = lambda lo, hi: st.floats(lo, hi, width=32, allow_subnormal=False)
_k = lambda s: st.lists(s, min_size=K, max_size=K)
_sig_float = st.one_of(_f32s(0.0, 2.0), _f32s(-1.0, 0.25),
                       st.sampled_from([math.nan, math.inf, -math.inf, 0.1, 0.12, 1.0]))
_layer_init = st.fixed_dictionaries({
    "stage": _k(st.sampled_from([int(Stage.GRAFTING)] * 3 + list(range(11)))),
    "strategy": _k(st.integers(-1, 5)),
    "alpha": _k(_f32s(0.0, 1.0)),
    "pause_steps": _k(st.integers(0, 3)),
    "objective_rate": _k(_f32s(-0.5, 0.5)),
    "objective_rate_ref": _k(_f32s(-0.125, 0.5)),
    "objective_window_start": _k(st.sampled_from([0.0, 1.0, -0.5, 2.0])),
})
_step_signals = st.tuples(st.lists(_sig_float, min_size=K, max_size=K), _sig_float, _sig_float)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layer_init, st.lists(_step_signals, min_size=1, max_size=25))
def test_property_monotone_bounded_and_matches_model(init, seq):
  cfg = _CFG_P
  s = _seeds(K, **{k: np.asarray(v) for k, v in init.items()})
  for obj, drift, grad in seq:
    sig = GraftSignals(objective=jnp.asarray(obj, jnp.float32), host_drift=jnp.float32(drift),
                       host_grad_norm=jnp.float32(grad))
    pre = _np(s)
    mid = J_OBJ(s, sig.objective, cfg)
    post = J_ALPHA(mid, sig, cfg)
    _assert_bits_equal(J_STEP(s, sig, cfg), post, "grafting_step")
    m, p = _np(mid), _np(post)
    for k in range(K):
      row = {n: v[k] for n, v in pre.items()}
      e_mean, e_count, e_start, e_rate = _oracle_objective(row, float(F32(obj[k])), cfg)
      assert m["objective_count"][k] == e_count
      np.testing.assert_allclose(m["objective"][k], e_mean, rtol=1e-6)
      np.testing.assert_allclose(m["objective_window_start"][k], e_start, rtol=1e-6)
      np.testing.assert_allclose(m["objective_rate"][k], e_rate, rtol=1e-6)
      mrow = {n: v[k] for n, v in m.items()}
      if row["stage"] == Stage.GRAFTING:
        e_alpha, e_ps, moved = _oracle_alpha(mrow, float(F32(drift)), float(F32(grad)), cfg)
        assert p["pause_steps"][k] == e_ps
        if moved:
          np.testing.assert_allclose(p["alpha"][k], e_alpha, rtol=1e-6)
        else:
          assert p["alpha"][k] == mrow["alpha"]
      else:
        assert p["alpha"][k].tobytes() == mrow["alpha"].tobytes()
        assert p["pause_steps"][k] == mrow["pause_steps"]
    # Invariants.
    assert np.all(p["alpha"] >= pre["alpha"]), "alpha never decreases"
    assert np.all((p["alpha"] >= 0) & (p["alpha"] <= 1))
    assert np.all((p["pause_steps"] >= 0) & (p["pause_steps"] <= max(cfg.pause_limit, 3)))
    for name in ("alpha", "objective", "objective_window_start", "objective_rate",
                 "objective_rate_ref", "delta"):
      assert np.all(np.isfinite(p[name])), name
    for name in ("stage", "strategy", "blueprint", "steps_in_stage", "ready", "embargo_left"):
      assert pre[name].tobytes() == p[name].tobytes(), name
    s = post


# --------------------------------------------------------------------------------------------
# Argument errors name the argument.

_S = _seeds(3)
_SIG = _signals(3)


@pytest.mark.parametrize("fn,exc,name", [
    (lambda: update_alpha("seeds", _SIG), TypeError, "seeds"),
    (lambda: update_alpha(jax.tree.map(lambda x: jnp.stack([x, x]), _S), _SIG), ValueError,
     "seeds"),
    (lambda: update_alpha(_S, (1.0, 0.0, 0.5)), TypeError, "signals"),
    (lambda: update_alpha(_S, _SIG, {"fixed_steps": 3}), TypeError, "config"),
    (lambda: update_alpha(_S, _SIG.replace(host_drift=jnp.zeros(2)), GraftingConfig()),
     ValueError, "signals.host_drift"),
    (lambda: update_alpha(_S, _SIG.replace(host_grad_norm=jnp.zeros((3, 1))), GraftingConfig()),
     ValueError, "signals.host_grad_norm"),
    (lambda: update_alpha(_S, _SIG.replace(objective=jnp.zeros(4)), GraftingConfig()),
     ValueError, "signals.objective"),
    (lambda: update_alpha(_S, _SIG.replace(host_drift=jnp.array(True)), GraftingConfig()),
     TypeError, "signals.host_drift"),
    (lambda: update_alpha(_S, _SIG.replace(objective=jnp.zeros(3, jnp.complex64)),
                          GraftingConfig()), TypeError, "signals.objective"),
    (lambda: update_alpha(_S, _SIG, GraftingConfig(), strategies=()), ValueError, "strategies"),
    (lambda: update_alpha(_S, _SIG, GraftingConfig(), strategies=fixed_ramp), TypeError,
     "strategies"),
    (lambda: update_alpha(_S, _SIG, GraftingConfig(), strategies=(fixed_ramp, 3)), TypeError,
     r"strategies\[1\]"),
    (lambda: update_alpha(_S, _SIG, GraftingConfig(),
                          strategies=(lambda s, g, c: (jnp.zeros(2), jnp.zeros(2, bool)),)),
     ValueError, r"strategies\[0\]"),
    (lambda: update_alpha(_S, _SIG, GraftingConfig(), strategies=(lambda s, g, c: 0.1,)),
     TypeError, r"strategies\[0\]"),
    (lambda: update_objective(_S, jnp.zeros(5)), ValueError, "objective"),
    (lambda: update_objective(_S, jnp.zeros(3), GraftingConfig(), ), None, None),
    (lambda: update_objective(_S, jnp.zeros(3, bool)), TypeError, "objective"),
    (lambda: update_objective(None, jnp.zeros(3)), TypeError, "seeds"),
    (lambda: grafting_step(_S, _SIG.replace(objective=jnp.zeros(2))), ValueError,
     "signals.objective"),
    (lambda: grafting_step(_S, _SIG, 30), TypeError, "config"),
])
def test_argument_errors(fn, exc, name):
  if exc is None:
    fn()
    return
  with pytest.raises(exc, match=name):
    fn()
