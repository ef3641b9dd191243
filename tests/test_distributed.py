"""Data-parallel training (`kasmina_jax.distributed`): a run sharded over 8 and over 2 (forced
host) devices, and one over 4 x 2 devices with each layer's seeds split over 2, match the
single-device run with the same data order: per-step losses and telemetry sums within float
tolerance, seed stages, commands and acceptances exactly, field reports, and every device
holds the same copy of the state and of the decisions.

The device count must be fixed before JAX starts, so the runs happen in a subprocess
(tests/distributed_run.py) with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kasmina_jax import datasets, distributed, training
from kasmina_jax import nn as knn

HERE = os.path.dirname(os.path.abspath(__file__))
# Data-parallel over 8 and 2 devices; 4 ways of data by 2 ways of seeds (model parallel).
DEVICES = ("8", "2", "4x2")
HOST_DEVICES = 8


def _close(a, b, *, rtol, what):
  """Nested lists (None = NaN) equal in structure and NaN pattern, close in value; the
  tolerance is relative to the largest magnitude of `a` (sums of many rows)."""
  a = np.asarray(np.array(a, dtype=object), dtype=float)
  b = np.asarray(np.array(b, dtype=object), dtype=float)
  assert a.shape == b.shape, what
  np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what)
  scale = max(float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0, 1.0)
  np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=0, atol=rtol * scale,
                             err_msg=what)


def _sharded_runs():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={HOST_DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  # The timeout is a bound for a slow or shared machine, not a benchmark (it ran past 600 s
  # on 2 cores shared with other work).
  proc = subprocess.run([sys.executable, os.path.join(HERE, "distributed_run.py"),
                         *DEVICES], env=env, capture_output=True, text=True,
                        timeout=1500, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  reference, *sharded = result["runs"]
  assert reference["devices"] == "0" and [r["devices"] for r in sharded] == list(DEVICES)
  return reference, sharded, result["errors"]


def _check_lifecycle_coverage(reference):
  # The comparison is only worth something if seeds germinate, graft and fossilize.
  seen = {s for e in reference["epochs"] for stages in e["stages"].values() for s in stages}
  assert {1, 2, 3, 7} <= seen  # GERMINATED, TRAINING, GRAFTING, FOSSILIZED
  assert any(e["field_reports"] for e in reference["epochs"])
  assert not any(e["rolled_back"] for e in reference["epochs"])


def _check_epochs(reference, run):
  assert run["replicas_agree"], "a device's copy of the state or of the epoch output differs"
  assert len(run["epochs"]) == len(reference["epochs"])
  for epoch, (ref, got) in enumerate(zip(reference["epochs"], run["epochs"])):
    where = f"{run['devices']} devices, epoch {epoch}"
    # Decisions: exactly the same.
    assert got["stages"] == ref["stages"], where
    assert got["commands"] == ref["commands"], where
    assert got["accepted"] == ref["accepted"], where
    assert got["rolled_back"] == ref["rolled_back"], where
    # Losses and measurements: the same up to the order of float additions.
    _close(ref["losses"], got["losses"], rtol=1e-5, what=f"{where}: step losses")
    for key in ("train_loss", "val_loss"):
      _close(ref[key], got[key], rtol=1e-5, what=f"{where}: {key}")
    for layer, tel in ref["telemetry"].items():
      # Row counts are exact; the correlation subsample is the first rows of the global batch.
      for key in ("count", "corr_count"):
        assert got["telemetry"][layer][key] == tel[key], f"{where}: {layer} {key}"
      for key, value in tel.items():
        _close(value, got["telemetry"][layer][key], rtol=1e-5, what=f"{where}: {layer} {key}")
    for layer, health in ref["health"].items():
      for key, value in health.items():
        _close(value, got["health"][layer][key], rtol=1e-4, what=f"{where}: {layer} {key}")
      _close(ref["delta"][layer], got["delta"][layer], rtol=1e-4, what=f"{where}: {layer} delta")
    assert len(got["field_reports"]) == len(ref["field_reports"]), where
    for r_ref, r_got in zip(ref["field_reports"], got["field_reports"]):
      assert r_got.keys() == r_ref.keys()
      for key, value in r_ref.items():
        if isinstance(value, float) or key == "delta":
          _close(value, r_got[key], rtol=1e-4, what=f"{where}: field report {key}")
        elif isinstance(value, dict) and key.startswith("health"):
          for k, v in value.items():
            _close(v, r_got[key][k], rtol=1e-4, what=f"{where}: field report {key}.{k}")
        else:
          assert r_got[key] == value, f"{where}: field report {key}"


def _check_fit(reference, run):
  got = run["fit"]
  assert [r["stages"] for r in got] == [r["stages"] for r in reference["fit"]]
  for r_ref, r_got in zip(reference["fit"], got):
    _close(r_ref["train_loss"], r_got["train_loss"], rtol=1e-5, what="fit train_loss")
    _close(r_ref["val_loss"], r_got["val_loss"], rtol=1e-5, what="fit val_loss")


@pytest.mark.slow
def test_sharded_runs_match_single_device():
  # One test (one subprocess), so that pytest-xdist does not start the runs twice.
  reference, sharded, errors = _sharded_runs()
  _check_lifecycle_coverage(reference)
  for run in sharded:
    _check_epochs(reference, run)
    _check_fit(reference, run)
  # Batches whose rows do not divide over the data axis are refused, naming the argument.
  assert errors["shard_batch"] is not None and "not divisible" in errors["shard_batch"]
  assert errors["fit"] is not None and errors["fit"].startswith("batch_size:")


# ------------------------------------------------------------- in-process (one device) checks


def test_argument_errors():
  mesh = distributed.data_mesh()
  with pytest.raises(TypeError, match="mesh"):
    distributed.shard_batch({"x": np.zeros((4, 2))}, mesh="data")
  with pytest.raises(ValueError, match="axis"):
    distributed.shard_batch({"x": np.zeros((4, 2))}, mesh, axis="model")
  with pytest.raises(ValueError, match=r"batch\['y'\]"):
    distributed.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros((3,))}, mesh)
  with pytest.raises(TypeError, match="batch"):
    distributed.shard_batch([np.zeros((4, 2))], mesh)
  with pytest.raises(ValueError, match="devices"):
    distributed.data_mesh([])
  with pytest.raises(TypeError, match="axis"):
    distributed.data_mesh(axis="")
  with pytest.raises(TypeError, match="state"):
    distributed.data_parallel({"params": 1})
  with pytest.raises(ValueError, match="seed_ways"):
    distributed.data_seed_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match="seed_axis"):
    distributed.DataParallel(mesh, seed_axis="seeds")


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = knn.KasminaDense(8, 2, activation=nn.relu, corr_rows=8, name="hidden")(x, train=train)
    return nn.Dense(2, name="head")(x)


def test_one_device_mesh_runs_the_single_device_program():
  data = datasets.two_spirals(64, seed=1)
  state = training.create_train_state(_Tiny(), optax.adam(1e-2), jnp.asarray(data["x"][:2]),
                                      jax.random.key(0))
  placed, dp = distributed.data_parallel(state)
  assert dp.num_shards == jax.device_count() and distributed.is_replicated(placed)
  loss = training.cross_entropy_loss
  for i in range(2):
    batch = {k: v[i * 32:(i + 1) * 32] for k, v in data.items()}
    state, m_ref = training.train_step(state, batch, loss)
    placed, m_got = dp.train_step(placed, batch, loss)
    np.testing.assert_allclose(float(m_got["loss"]), float(m_ref["loss"]), rtol=1e-6)
  state, out_ref = training.epoch_transition(state, data, loss)
  placed, out_got = dp.epoch_transition(placed, data, loss)
  assert distributed.is_replicated((placed, out_got))
  chex.assert_trees_all_close(placed.params, state.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(out_got.new_stage, out_ref.new_stage)
  chex.assert_trees_all_equal(out_got.commands, out_ref.commands)


def test_fit_checks_the_data_before_placing_anything():
  data = datasets.two_spirals(64, seed=1)
  state = training.create_train_state(_Tiny(), optax.adam(1e-2), jnp.asarray(data["x"][:2]),
                                      jax.random.key(0))
  loss = training.cross_entropy_loss
  bad_x = {**data, "x": data["x"].copy()}
  bad_x["x"][11, 1] = np.nan
  with pytest.raises(ValueError, match=r"^train_data\['x'\]: row 11 of 64 holds a non-finite"):
    distributed.fit(state, bad_x, data, loss, epochs=1, batch_size=32, progress=False)
  bad_y = {**data, "y": data["y"].copy()}
  bad_y["y"][30] = 2
  with pytest.raises(ValueError, match=r"^val_data\['y'\]: row 30 of 64 holds label 2"):
    distributed.fit(state, data, bad_y, loss, epochs=1, batch_size=32, progress=False)
  short = {**data, "y": data["y"][:60]}
  with pytest.raises(ValueError, match=r"^train_data\['y'\]: 60 rows, but"):
    distributed.fit(state, short, data, loss, epochs=1, batch_size=32, progress=False)
  nan_loss = lambda out, batch: (loss(out, batch)[0] * jnp.nan, {})
  with pytest.raises(training.NonFiniteTrainingError, match="last 2 epochs") as info:
    distributed.fit(state, data, data, nan_loss, epochs=5, batch_size=32, progress=False,
                    max_skipped_epochs=2)
  assert len(info.value.history) == 2
  chex.assert_trees_all_close(info.value.state.params, state.params, rtol=0, atol=0)


def test_shard_batch_places_rows_along_the_axis():
  mesh = distributed.data_mesh()
  batch = distributed.shard_batch({"x": np.arange(8.0).reshape(4, 2), "y": np.arange(4)}, mesh)
  assert batch["x"].sharding == distributed.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(batch["y"]), np.arange(4))
  tree = distributed.replicate({"a": jnp.ones(3), "k": jax.random.key(1)}, mesh)
  assert distributed.is_replicated(tree) and distributed.replicas_agree(tree)


def _hlo_signature(compiled_text: str):
  """(entry parameters, entry outputs, {opcode: count}) of a compiled HLO module."""
  import re  # pylint: disable=g-import-not-at-top
  import collections  # pylint: disable=g-import-not-at-top
  head = compiled_text.splitlines()[0]
  layout = head.split("entry_computation_layout={(", 1)[1]
  ins, outs = layout.split(")->(", 1)

  def count(text):
    depth, n = 0, 1
    for ch in text:
      if ch in "[{(":
        depth += 1
      elif ch in "]})":
        if depth == 0:
          break
        depth -= 1
      elif ch == "," and depth == 0:
        n += 1
    return n

  ops = collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", compiled_text))
  return count(ins), count(outs), ops


def test_one_device_data_parallel_step_is_the_plain_step():
  # On one device the data-parallel program is the plain `train_step`'s: the same entry
  # parameters and outputs (no extra copies of state that passes through), the same ops, no
  # collective. (What remains of the one-GPU overhead is host time: see
  # benchmarks/scaling.py's dispatch figures.)
  data = datasets.two_spirals(64, seed=1)
  state = training.create_train_state(_Tiny(), optax.adam(1e-2), jnp.asarray(data["x"][:2]),
                                      jax.random.key(0))
  loss = training.cross_entropy_loss
  batch = {k: jnp.asarray(v[:32]) for k, v in data.items()}
  placed, dp = distributed.data_parallel(state, distributed.data_mesh(jax.devices()[:1]))
  plain = training.train_step.lower(state, batch, loss).compile().as_text()
  sharded = dp.lower_train_step(placed, batch, loss).compile().as_text()
  p_in, p_out, p_ops = _hlo_signature(plain)
  d_in, d_out, d_ops = _hlo_signature(sharded)
  assert (d_in, d_out) == (p_in, p_out)
  assert d_ops == p_ops
  assert not any(op.startswith(("all-", "reduce-scatter", "collective")) for op in d_ops)
  # A batch placed ahead is passed on as it is (no re-placement each step).
  placed_batch = dp.shard_batch(batch)
  assert all(dp.shard_batch(placed_batch)[k] is placed_batch[k] for k in batch)
