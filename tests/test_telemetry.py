"""Tests of the per-seed telemetry (`kasmina_jax.telemetry`, taken by `layer.forward` on
training passes and summarised by `layer.health_report`) on inputs with known answers.

Expected values come from a float64 numpy model of the definitions in docs/design.md,
"Telemetry": `chunk_variance`
is the mean over a chunk's nodes of each node's variance over the rows; a node is dead when
`|a| <= 1e-6` on at least 99% of the rows; `avg_inter_node_correlation` is the mean `|corr|`
over distinct node pairs, a node without variance counting 0, and 0 for one-node chunks.
The layers here measure every row (`telemetry_every=1`): these are tests of the statistics;
the row sampling is tested in test_dormant.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kasmina_jax import layer
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.lifecycle import Stage, init_seed_state


@functools.partial(jax.jit, static_argnums=0)
def _step(spec, tel, x):
  seeds = init_seed_state(spec.num_seeds)
  _, aux = layer.forward(spec, layer.init_children(spec), seeds, x, telemetry=tel)
  return aux.telemetry


_report = jax.jit(layer.health_report, static_argnums=0)


def accumulate(spec, batches):
  tel = layer.init_telemetry(spec)
  for b in batches:
    tel = _step(spec, tel, jnp.asarray(b))
  return tel


def report(spec, batches, seeds=None):
  seeds = init_seed_state(spec.num_seeds) if seeds is None else seeds
  return jax.tree.map(np.asarray, _report(spec, accumulate(spec, batches), seeds))


def numpy_statistics(x, num_seeds):
  """(chunk_variance, dead_node_ratio, avg_inter_node_correlation) per chunk, in float64."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  var, dead, corr = [], [], []
  for idx in np.array_split(np.arange(x.shape[-1]), num_seeds):
    c = x[:, idx]
    v = c.var(0)
    var.append(v.mean())
    dead.append(np.mean((np.abs(c) <= 1e-6).mean(0) >= 0.99))
    n = len(idx)
    if n < 2:
      corr.append(0.0)
      continue
    centred = c - c.mean(0)
    cov = centred.T @ centred / len(c)
    has_var = v > 0
    sd = np.sqrt(np.where(has_var, v, 1.0))
    r = np.where(has_var[:, None] & has_var[None, :], np.abs(cov / np.outer(sd, sd)), 0.0)
    corr.append((r.sum() - np.trace(r)) / (n * (n - 1)))
  return np.array(var), np.array(dead), np.array(corr)


def assert_statistics(rep, x, num_seeds, rtol=1e-4, atol=1e-6):
  var, dead, corr = numpy_statistics(x, num_seeds)
  np.testing.assert_allclose(rep.chunk_variance, var, rtol=rtol, atol=atol)
  np.testing.assert_array_equal(rep.dead_node_ratio, dead.astype(np.float32))
  np.testing.assert_allclose(rep.avg_inter_node_correlation, corr, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Known answers.


def test_dead_node_ratio_counts_the_dead_nodes_of_a_chunk():
  spec = layer.KasminaSpec(telemetry_every=1, dim=8, num_seeds=2)  # two chunks of c = 4
  rows = 200
  x = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
  x[:, 1] = 0.0  # dead
  x[:, 2] = 5e-7  # below dead_eps: dead
  x[:199, 4] = 0.0  # zero on 99.5% of the rows: dead
  x[:196, 5] = 0.0  # zero on 98% of the rows: alive
  rep = report(spec, [x])
  np.testing.assert_array_equal(rep.dead_node_ratio, [2 / 4, 1 / 4])
  assert_statistics(rep, x, 2)


def test_perfectly_correlated_nodes_have_correlation_one():
  spec = layer.KasminaSpec(telemetry_every=1, dim=4, num_seeds=2)  # chunks of two nodes: one pair each
  z = np.random.default_rng(1).standard_normal((64, 2)).astype(np.float32)
  x = np.stack([z[:, 0], 3 * z[:, 0] + 1, z[:, 1], -2 * z[:, 1] + 5], -1)  # +1 and -1
  rep = report(spec, [x])
  np.testing.assert_allclose(rep.avg_inter_node_correlation, [1.0, 1.0], rtol=1e-5)
  # In a chunk of three, the correlated pair is one of three pairs.
  spec3 = layer.KasminaSpec(telemetry_every=1, dim=3, num_seeds=1)
  x3 = np.stack([z[:, 0], 2 * z[:, 0], z[:, 1]], -1)
  rep3 = report(spec3, [x3])
  r = abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1])
  np.testing.assert_allclose(rep3.avg_inter_node_correlation, [(1 + 2 * r) / 3], rtol=1e-4)


def test_constant_chunk_has_zero_variance_and_zero_correlation():
  spec = layer.KasminaSpec(telemetry_every=1, dim=9, num_seeds=3)
  x = np.random.default_rng(2).standard_normal((32, 9)).astype(np.float32)
  x[:, 0:3] = 5.0  # a constant chunk, not dead
  x[:, 3:6] = 0.0  # a zero chunk: constant and dead
  rep = report(spec, [x[:16], x[16:]])
  np.testing.assert_array_equal(rep.chunk_variance[:2], [0.0, 0.0])
  np.testing.assert_array_equal(rep.avg_inter_node_correlation[:2], [0.0, 0.0])
  np.testing.assert_array_equal(rep.dead_node_ratio, [0.0, 1.0, 0.0])
  assert rep.chunk_variance[2] > 0.1 and rep.avg_inter_node_correlation[2] > 0
  assert_statistics(rep, x, 3)


def test_large_mean_does_not_cancel():
  spec = layer.KasminaSpec(telemetry_every=1, dim=6, num_seeds=2)
  rng = np.random.default_rng(3)
  z = rng.standard_normal((2048, 6))
  z[:, 1] = 0.8 * z[:, 0] + 0.6 * z[:, 1]  # correlated with node 0
  z = (z - z.mean(0)) / z.std(0)  # every node's variance exactly 1
  x = (1e4 + z).astype(np.float32)
  rep = report(spec, np.split(x, 4))
  # Naive float32 sums of squares would cancel catastrophically here (errors of order 1).
  np.testing.assert_allclose(rep.chunk_variance, [1.0, 1.0], rtol=1e-2)
  # Against the same float32 values in float64.
  var, _, _ = numpy_statistics(x, 2)
  np.testing.assert_allclose(rep.chunk_variance, var, rtol=1e-4)
  # Correlation is taken on the first `corr_rows` rows of each step.
  subsample = np.concatenate([b[:spec.corr_rows] for b in np.split(x, 4)])
  _, _, corr = numpy_statistics(subsample, 2)
  np.testing.assert_allclose(rep.avg_inter_node_correlation, corr, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(rep.dead_node_ratio, [0.0, 0.0])


@pytest.mark.parametrize("dim, num_seeds", [(7, 3), (12, 4)])
def test_statistics_match_numpy_on_random_data(dim, num_seeds):
  # Different means and scales per node, uneven chunks (padded node slots must not count).
  rng = np.random.default_rng(dim)
  x = (rng.standard_normal((48, dim)) * rng.uniform(0.1, 3.0, dim)
       + rng.uniform(-5, 5, dim)).astype(np.float32)
  x[:, -1] = 0.5 * x[:, -2] + 0.1 * rng.standard_normal(48).astype(np.float32)
  rep = report(layer.KasminaSpec(telemetry_every=1, dim=dim, num_seeds=num_seeds), [x])
  assert_statistics(rep, x, num_seeds)


def test_accumulation_over_steps_equals_one_shot():
  spec = layer.KasminaSpec(telemetry_every=1, dim=10, num_seeds=3)
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((48, 10)) * 2 + 3).astype(np.float32)
  x[:, 0] = 0.0
  steps = report(spec, np.split(x, 3))
  once = report(spec, [x])
  for name in ("chunk_variance", "dead_node_ratio", "avg_inter_node_correlation"):
    np.testing.assert_allclose(getattr(steps, name), getattr(once, name), rtol=1e-5, atol=1e-7)
  assert_statistics(steps, x, 3)
  tel = accumulate(spec, np.split(x, 3))
  assert float(tel.count) == 48 and float(tel.corr_count) == 48


def test_correlation_uses_the_first_corr_rows_of_each_step():
  spec = layer.KasminaSpec(telemetry_every=1, dim=6, num_seeds=2, corr_rows=8)
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 32, 6)).astype(np.float32)
  rep = report(spec, list(x))
  sub = x[:, :8].reshape(-1, 6)
  _, _, corr = numpy_statistics(sub, 2)
  np.testing.assert_allclose(rep.avg_inter_node_correlation, corr, rtol=1e-4)
  # Variance and dead counts still use every row.
  var, _, _ = numpy_statistics(x.reshape(-1, 6), 2)
  np.testing.assert_allclose(rep.chunk_variance, var, rtol=1e-4)


def test_correlation_disabled():
  spec = layer.KasminaSpec(telemetry_every=1, dim=6, num_seeds=2, corr_rows=0)
  assert layer.init_telemetry(spec).gram.shape == (2, 0, 0)
  z = np.random.default_rng(6).standard_normal((16, 1)).astype(np.float32)
  rep = report(spec, [np.tile(z, (1, 6))])
  np.testing.assert_array_equal(rep.avg_inter_node_correlation, [0.0, 0.0])


def test_per_node_mode():
  spec = layer.KasminaSpec(telemetry_every=1, dim=5, num_seeds=5)
  x = np.random.default_rng(7).standard_normal((40, 5)).astype(np.float32)
  x[:, 3] = 0.0
  rep = report(spec, [x])
  np.testing.assert_array_equal(rep.avg_inter_node_correlation, np.zeros(5))
  np.testing.assert_array_equal(rep.dead_node_ratio, [0, 0, 0, 1, 0])
  np.testing.assert_allclose(rep.chunk_variance, x.astype(np.float64).var(0), rtol=1e-4)


def test_leading_dims_and_bfloat16_inputs():
  spec = layer.KasminaSpec(telemetry_every=1, dim=8, num_seeds=2)
  x = np.random.default_rng(8).standard_normal((2, 3, 8))
  xb = jnp.asarray(x, jnp.bfloat16)
  tel = accumulate(spec, [xb])
  assert float(tel.count) == 6
  rep = jax.tree.map(np.asarray, _report(spec, tel, init_seed_state(2)))
  assert_statistics(rep, np.asarray(xb.astype(jnp.float32)), 2)


def test_nonfinite_steps_are_dropped():
  spec = layer.KasminaSpec(telemetry_every=1, dim=6, num_seeds=2)
  rng = np.random.default_rng(9)
  good = rng.standard_normal((16, 6)).astype(np.float32)
  bad = rng.standard_normal((16, 6)).astype(np.float32)
  bad[3, 4] = np.nan
  with_bad = report(spec, [good, bad])
  only_good = report(spec, [good])
  for a, b in zip(jax.tree.leaves(with_bad), jax.tree.leaves(only_good)):
    np.testing.assert_array_equal(a, b)


def test_evaluation_passes_take_no_telemetry():
  spec = layer.KasminaSpec(telemetry_every=1, dim=6, num_seeds=2)
  x = jnp.ones((4, 6))
  _, aux = jax.jit(layer.forward, static_argnums=0)(
      spec, layer.init_children(spec), init_seed_state(2), x,
      telemetry=layer.init_telemetry(spec), eval_alpha=1.0)
  assert aux.telemetry is None


# --------------------------------------------------------------------------------------------
# The rest of the health report.


def test_health_report_blueprint_metrics_for_active_seeds():
  spec = layer.KasminaSpec(telemetry_every=1, dim=16, num_seeds=4)
  stages = jnp.array([Stage.DORMANT, Stage.TRAINING, Stage.GRAFTING, Stage.FOSSILIZED], jnp.int32)
  blueprints = jnp.array([-1, 0, 2, 4], jnp.int32)
  seeds = init_seed_state(4).replace(
      stage=stages, blueprint=blueprints, alpha=jnp.array([0.0, 0.0, 0.4, 1.0]),
      objective=jnp.array([0.0, 2.0, 3.0, 4.0]), recon_ratio=jnp.array([1.0, 0.5, 0.25, 0.1]),
      nonfinite=jnp.array([False, False, True, False]))
  tel = accumulate(spec, [np.random.default_rng(10).standard_normal((8, 16)).astype(np.float32)])
  learning = jnp.array([False, True, True, False])
  for norm in (1.0, 3.0):
    tel = tel_lib.record_gradients(tel, jnp.full((4,), norm), learning)
  tel = tel_lib.record_gradients(tel, jnp.full((4,), jnp.nan), learning)  # ignored
  rep = jax.tree.map(np.asarray, _report(spec, tel, seeds))
  pc = spec.catalog.param_count
  np.testing.assert_array_equal(rep.param_count, [0, pc[0], pc[2], pc[4]])
  np.testing.assert_array_equal(rep.param_bytes, 4 * rep.param_count)
  fl = spec.catalog.flops_per_row
  np.testing.assert_array_equal(rep.flops_per_row, [0, fl[0], fl[2], fl[4]])
  np.testing.assert_allclose(rep.alpha, [0.0, 0.0, 0.4, 1.0])
  np.testing.assert_allclose(rep.objective, [np.nan, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(rep.recon_ratio, [np.nan, 0.5, 0.25, 0.1])
  np.testing.assert_allclose(rep.gradient_variance, [0.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(rep.nonfinite, [False, False, True, False])
  for leaf in jax.tree.leaves(rep):
    assert leaf.shape == (4,)


def test_reset_gives_fresh_accumulators_of_the_same_shapes():
  spec = layer.KasminaSpec(telemetry_every=1, dim=6, num_seeds=2)
  tel = accumulate(spec, [np.ones((4, 6), np.float32)])
  fresh = tel_lib.reset(tel)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(layer.init_telemetry(spec))):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
