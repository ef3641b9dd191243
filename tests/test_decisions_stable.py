"""Decisions do not flip on float noise (docs/design.md, "Decision tolerance";
`kasmina_jax.tolerance`).

One device and several reduce the same sums in another order, so every measurement Tamiyo
and the lifecycle read differs in its last bits. These tests build inputs with exact ties
(equal health signals, trends exactly at their thresholds, a counterfactual exactly at its
margin), perturb every float by a relative 1e-7 in random directions, and require the same
rankings, commands and gates as without the noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasmina_jax import lifecycle, tamiyo, telemetry, tolerance
from kasmina_jax.lifecycle import Op, Stage

from test_tamiyo import GROW, NUM_BP, SPECS, decide_jit, fresh_seeds, report, set_seed

NOISE = 1e-7
K = 8


def _perturb(tree, rng: np.random.Generator):
  """Every float leaf times (1 + s * 1e-7 * u), s a random sign, u uniform in [0.5, 1]."""
  def leaf(x):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
      return x
    factor = 1.0 + rng.choice([-1.0, 1.0], x.shape) * NOISE * rng.uniform(0.5, 1.0, x.shape)
    return (x.astype(np.float64) * factor).astype(x.dtype)
  return jax.tree.map(leaf, tree)


def _expected_rank(score, eligible):
  """Descending score, ties (exactly equal) by index, ineligible last by index."""
  keys = sorted(range(len(score)), key=lambda i: (not eligible[i], -score[i] if eligible[i]
                                                  else 0.0, i))
  rank = np.empty(len(score), int)
  rank[keys] = np.arange(len(score))
  return rank.tolist()


rank_jit = jax.jit(tolerance.stable_rank)


@settings(max_examples=60, deadline=None)
@given(levels=st.lists(st.integers(0, 6), min_size=K, max_size=K),
       eligible=st.lists(st.booleans(), min_size=K, max_size=K),
       noise_seed=st.integers(0, 2**31 - 1))
def test_rank_of_tied_scores_survives_noise(levels, eligible, noise_seed):
  # Scores on a grid far coarser than the tolerance, many of them exactly equal.
  score = np.asarray(levels, np.float32) * np.float32(0.125)
  noisy = _perturb(score, np.random.default_rng(noise_seed))
  want = _expected_rank(score.tolist(), eligible)
  assert np.asarray(rank_jit(score, np.asarray(eligible))).tolist() == want
  assert np.asarray(rank_jit(noisy, np.asarray(eligible))).tolist() == want


def test_rank_ties_within_tolerance_and_orders_real_differences():
  tol = tolerance.DECISION_RTOL * 0.6
  score = jnp.asarray([0.5, 0.6, 0.6 + 0.3 * tol, 0.1, 0.6 - 0.3 * tol, 0.6 + 10 * tol])
  # 5 beats the tie group {1, 2, 4} by far more than the tolerance; the group goes by index.
  assert np.asarray(tolerance.stable_rank(score)).tolist() == [4, 1, 2, 5, 3, 0]
  assert np.asarray(tolerance.stable_rank(score, score < 0.6 + 5 * tol)).tolist() == [
      3, 0, 1, 4, 2, 5]
  assert np.asarray(tolerance.best_index(jnp.stack([score, -score]))).tolist() == [5, 3]
  assert np.asarray(tolerance.stable_rank(jnp.asarray([jnp.nan, 1.0, 1.0]))).tolist() == [
      2, 0, 1]
  with pytest.raises(ValueError, match="score"):
    tolerance.stable_rank(jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="scores"):
    tolerance.best_index(jnp.float32(1.0))


def test_thresholds_count_a_tie_on_one_side():
  rng = np.random.default_rng(0)
  for t in (0.0, 0.12, 1.0, 3.5):
    for _ in range(20):
      a = _perturb(np.float32(t), rng)
      assert not bool(tolerance.greater(a, t)) and not bool(tolerance.less(a, t))
      assert bool(tolerance.at_least(a, t)) and bool(tolerance.at_most(a, t))
    # A real difference decides.
    assert bool(tolerance.greater(t + 0.01, t)) and bool(tolerance.less(t - 0.01, t))
    assert not bool(tolerance.at_most(t + 0.01, t))
  # An infinite best-so-far does not swallow the comparison.
  assert bool(tolerance.less(1.0, jnp.inf)) and not bool(tolerance.greater(1.0, jnp.inf))
  loss = np.float32(2.3)
  np.testing.assert_array_equal(
      np.asarray(tolerance.snap_difference(loss, _perturb(np.full(5, loss), rng))), 0.0)
  assert float(tolerance.snap_difference(loss, loss - 0.01)) == pytest.approx(0.01, rel=1e-5)


@jax.jit
def _readiness(seeds, delta, recon):
  return lifecycle.update_readiness(seeds, delta=delta, recon_ratio=recon,
                                    is_replacement=jnp.asarray([False, True, False]),
                                    config=lifecycle.LifecycleConfig())


def test_gates_at_their_thresholds_survive_noise():
  cfg = lifecycle.LifecycleConfig()
  seeds = lifecycle.init_seed_state(3)
  seeds = seeds.replace(stage=jnp.asarray([Stage.TRAINING, Stage.TRAINING, Stage.FINE_TUNING]),
                        steps_in_stage=jnp.full((3,), 10_000, jnp.int32))
  delta = np.full(3, cfg.improvement_margin, np.float32)
  recon = np.full(3, cfg.recon_tolerance, np.float32)
  ref = _readiness(seeds, delta, recon)
  # At the margin a delta does not improve; at the tolerance a reconstruction passes.
  assert np.asarray(ref.ready).tolist() == [False, True, False]
  assert np.asarray(ref.bad_epochs).tolist() == [0, 0, 1]
  rng = np.random.default_rng(1)
  for _ in range(10):
    # A zero delta made noisy: a few last bits of the losses it is the difference of.
    noisy_delta = (delta + rng.choice([-1, 1], 3) * NOISE * 2.3).astype(np.float32)
    got = _readiness(seeds, noisy_delta, _perturb(recon, rng))
    assert np.asarray(got.ready).tolist() == np.asarray(ref.ready).tolist()
    assert np.asarray(got.bad_epochs).tolist() == np.asarray(ref.bad_epochs).tolist()


# Two germinations a step over the whole model, a queue of two per layer: the need ranking
# across layers and within them decides which seeds go.
NOISY = dataclasses.replace(GROW, max_germinations_per_epoch=2, max_queued_per_layer=2,
                            max_concurrent_training=2, plateau_patience=1,
                            grafting_selection="trend")


def _health(k, var, dead, corr):
  z = jnp.zeros((k,), jnp.float32)
  return telemetry.HealthReport(
      chunk_variance=jnp.asarray(var, jnp.float32), dead_node_ratio=jnp.asarray(dead, jnp.float32),
      avg_inter_node_correlation=jnp.asarray(corr, jnp.float32), alpha=z, objective=z,
      recon_ratio=z, gradient_variance=z, param_count=jnp.zeros((k,), jnp.int32),
      param_bytes=jnp.zeros((k,), jnp.int32), flops_per_row=jnp.zeros((k,), jnp.int32),
      nonfinite=jnp.zeros((k,), bool))


def _decision(cmds):
  return {n: (np.asarray(c.op).tolist(), np.asarray(c.blueprint).tolist(),
              np.asarray(c.strategy).tolist()) for n, c in cmds.items()}


@settings(max_examples=25, deadline=None)
@given(var=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=8, max_size=8),
       dead=st.lists(st.sampled_from([0.0, 0.25, 0.5]), min_size=8, max_size=8),
       corr=st.lists(st.sampled_from([0.1, 0.3]), min_size=8, max_size=8),
       # The trends exactly at the grafting rule's thresholds, or clear of them.
       drift=st.sampled_from([0.01, NOISY.drift_threshold]),
       grad=st.sampled_from([0.5, NOISY.grad_norm_lower, NOISY.grad_norm_upper]),
       # Exactly `plateau_min_delta` below the best, or flat.
       val=st.sampled_from([1.0, 1.0 - NOISY.plateau_min_delta]),
       queued=st.booleans(),
       noise_seed=st.integers(0, 2**31 - 1))
def test_decide_takes_the_same_decisions_under_noise(var, dead, corr, drift, grad, val, queued,
                                                     noise_seed):
  seeds = fresh_seeds()
  if queued:  # a queued seed of each layer whose need may have fallen to the recovery margin
    seeds = set_seed(seeds, "enc", 0, stage=Stage.GERMINATED, ready=True)
    seeds = set_seed(seeds, "dec", 4, stage=Stage.GERMINATED, ready=True)
  ctrl = tamiyo.init_controller(seeds, NUM_BP, NOISY)
  # One epoch of history: best validation loss 1.0, the last one 1.0 (the improvement rule).
  _, ctrl = decide_jit(report(val=1.0, train=1.0, grad=grad, drift=drift), seeds, ctrl,
                       config=NOISY)
  ctrl = ctrl.replace(layers={n: lc.replace(germ_need=jnp.full_like(lc.germ_need, 0.3))
                              for n, lc in ctrl.layers.items()})
  healths = {"enc": _health(3, var[:3], dead[:3], corr[:3]),
             "dec": _health(5, var[3:], dead[3:], corr[3:])}
  rep = report(healths, val=val, train=1.0, grad=grad, drift=drift, epoch=1)
  ref_cmds, ref_ctrl = decide_jit(rep, seeds, ctrl, config=NOISY)
  ref = _decision(ref_cmds)
  rng = np.random.default_rng(noise_seed)
  for _ in range(3):
    cmds, new_ctrl = decide_jit(_perturb(rep, rng), seeds, ctrl, config=NOISY)
    assert _decision(cmds) == ref
    assert int(new_ctrl.plateau_epochs) == int(ref_ctrl.plateau_epochs)


def test_noise_test_exercises_ties():
  # The scenario above is only worth something if ties decide: equal needs in both layers,
  # two germinations: the lowest indices in the model's order (the layers' flattened order,
  # "dec" before "enc") win.
  seeds = fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, NOISY)
  healths = {"enc": _health(3, [1.0] * 3, [0.0, 0.5, 0.5], [0.1] * 3),
             "dec": _health(5, [1.0] * 5, [0.5, 0.0, 0.5, 0.0, 0.0], [0.1] * 5)}
  rep = report(healths, epoch=0)
  want = {"enc": [0, 0, 0], "dec": [Op.GERMINATE, 0, Op.GERMINATE, 0, 0]}
  rng = np.random.default_rng(3)
  for r in (rep, _perturb(rep, rng), _perturb(rep, rng), _perturb(rep, rng)):
    cmds, _ = decide_jit(r, seeds, ctrl, config=NOISY)
    assert {n: np.asarray(c.op).tolist() for n, c in cmds.items()} == want
