"""Tests of `kasmina_jax.checkpoint`: bit-for-bit round trips of a realistic training state,
clear errors for mismatched or damaged checkpoints, pruning, and the in-memory copy."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

pytest.importorskip("orbax.checkpoint")

from kasmina_jax import checkpoint as ckpt  # noqa: E402
from kasmina_jax import nn as knn  # noqa: E402
from kasmina_jax.lifecycle import Stage  # noqa: E402


@struct.dataclass
class State:
  """Shaped like the training loop's state: arrays plus static apply function and optimizer."""

  step: jax.Array
  epoch: jax.Array
  params: Any
  opt_state: Any
  kasmina: Any
  rng: jax.Array
  stats: dict
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


class Model(nn.Module):
  width: int = 16
  num_seeds: int = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.relu(nn.Dense(self.width)(x))
    h = knn.KasminaLayer(num_seeds=self.num_seeds, name="kas")(h, train=train)
    return nn.Dense(3)(h)


def _advance(v: knn.KasminaVars) -> knn.KasminaVars:
  """Seeds in several stages, with alphas, blueprints and NaN objectives."""
  k = v.spec.num_seeds
  stages = [Stage.TRAINING, Stage.GRAFTING, Stage.FOSSILIZED, Stage.CULLED]
  stages = jnp.array((stages + [Stage.DORMANT] * k)[:k], jnp.int32)
  seeds = v.seeds.replace(stage=stages, alpha=jnp.linspace(0.0, 1.0, k),
                          blueprint=jnp.arange(k, dtype=jnp.int32) % 3,
                          objective=jnp.full((k,), jnp.nan, jnp.float32))
  return v.replace(seeds=seeds)


@functools.lru_cache(maxsize=None)
def _builder(width: int, num_seeds: int):
  model = Model(width=width, num_seeds=num_seeds)
  tx = optax.adam(1e-3)

  # One jitted build: eager Linen init of a Kasmina layer compiles op by op (seconds).
  @jax.jit
  def build(key):
    x = jax.random.normal(jax.random.fold_in(key, 1), (32, 8))
    variables = model.init(jax.random.fold_in(key, 2), x, train=False)
    params = variables["params"]
    # One training pass accumulates telemetry; one optimizer update fills adam's moments.
    _, mutated = model.apply(variables, x, train=True, mutable=[knn.KASMINA])
    kasmina = knn.map_layers(_advance, mutated[knn.KASMINA])
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    return params, opt_state, kasmina, jax.random.fold_in(key, 3)

  return model, tx, build


def make_state(width: int = 16, num_seeds: int = 4, seed: int = 0, *,
               abstract: bool = False) -> State:
  """A training-like state; `abstract`: `ShapeDtypeStruct` leaves (nothing compiled)."""
  model, tx, build = _builder(width, num_seeds)
  key = jax.random.key(seed)
  params, opt_state, kasmina, rng = jax.eval_shape(build, key) if abstract else build(key)
  return State(step=jnp.asarray(7, jnp.int32), epoch=jnp.asarray(2, jnp.int32), params=params,
               opt_state=opt_state, kasmina=kasmina, rng=rng,
               stats={"loss_sum": jnp.asarray(1.5, jnp.float32), "count": 3,
                      "hist": np.arange(4, dtype=np.int64)},
               apply_fn=model.apply, tx=tx)


def assert_bitwise_equal(a, b):
  """Same leaves, bit for bit (paths, types, dtypes, shapes, bytes)."""
  la, _ = jax.tree_util.tree_flatten_with_path(a)
  lb, _ = jax.tree_util.tree_flatten_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  la, lb = [x for _, x in la], [x for _, x in lb]
  for x, y in zip(la, lb):
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def state():
  return make_state()


def test_round_trip_is_bit_for_bit(state, tmp_path):
  path = ckpt.save(tmp_path, state)
  assert os.path.isdir(path) and path.endswith("7")
  assert ckpt.latest_step(tmp_path) == 7
  fresh = make_state(seed=1)  # same structure, other values
  restored = ckpt.restore(tmp_path, fresh)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(fresh)
  assert_bitwise_equal(restored, state)
  # Static metadata comes from the target; leaves are ordinary device arrays.
  assert restored.apply_fn == fresh.apply_fn and restored.tx is fresh.tx
  assert isinstance(restored.params["Dense_0"]["kernel"], jax.Array)
  assert isinstance(restored.stats["count"], int) and isinstance(restored.stats["hist"], np.ndarray)
  seeds = knn.find_layers(restored.kasmina)[("kas",)].seeds
  assert [int(s) for s in seeds.stage] == [Stage.TRAINING, Stage.GRAFTING, Stage.FOSSILIZED,
                                          Stage.CULLED]
  # The restored key draws the same numbers.
  np.testing.assert_array_equal(jax.random.normal(restored.rng, (3,)),
                                jax.random.normal(state.rng, (3,)))


def test_restore_into_abstract_target(state, tmp_path):
  # Python scalars are stored at full precision; an abstract target has jax's dtype for them.
  state = state.replace(stats={"loss_sum": state.stats["loss_sum"], "count": 3})
  ckpt.save(tmp_path, state, step=3)
  abstract = jax.eval_shape(lambda: state)
  restored = ckpt.restore(tmp_path, abstract)
  assert_bitwise_equal(jax.tree.map(np.asarray, restored.params),
                       jax.tree.map(np.asarray, state.params))
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))


def test_metadata_has_fingerprint(state, tmp_path):
  ckpt.save(tmp_path, state, step=1)
  meta = ckpt.read_metadata(tmp_path)
  assert meta["step"] == 1
  assert "KasminaVars" in meta["treedef"] or any(n["type"] == "KasminaVars"
                                                 for n in meta["nodes"])
  paths = {d["path"]: d for d in meta["leaves"]}
  kernel = paths[".params['Dense_0']['kernel']"]
  assert kernel["shape"] == [8, 16] and kernel["dtype"] == "float32"
  assert paths[".rng"]["dtype"].startswith("key<")
  json.dumps(meta)  # plain JSON


def test_wrong_width_names_the_leaf(state, tmp_path):
  ckpt.save(tmp_path, state)
  with pytest.raises(ckpt.CheckpointError, match=r"\['Dense_0'\]\['kernel'\]: shape \(8, 16\) "
                     r"in the checkpoint, \(8, 24\) in the target"):
    ckpt.restore(tmp_path, make_state(width=24, abstract=True))


def test_wrong_num_seeds_names_the_seed_state(state, tmp_path):
  ckpt.save(tmp_path, state)
  with pytest.raises(ckpt.CheckpointError) as err:
    ckpt.restore(tmp_path, make_state(num_seeds=8, abstract=True))
  message = str(err.value)
  assert "['kas']['children'].w2: shape (4, 1, 4) in the checkpoint, (8, 1, 2) in the target" \
      in message
  assert "num_seeds=4" in message and "num_seeds=8" in message  # the layer spec, named


def test_missing_and_extra_leaves(state, tmp_path):
  ckpt.save(tmp_path, state)
  stats = dict(state.stats)
  del stats["loss_sum"]
  with pytest.raises(ckpt.CheckpointError,
                     match=r"\['loss_sum'\] \(float32\(\)\) is in the checkpoint but not"):
    ckpt.restore(tmp_path, state.replace(stats=stats))
  with pytest.raises(ckpt.CheckpointError, match=r"\['extra'\] .* is in the target but not"):
    ckpt.restore(tmp_path, state.replace(stats={**state.stats, "extra": jnp.zeros(2)}))


def test_wrong_dtype_and_optimizer(state, tmp_path):
  ckpt.save(tmp_path, state)
  with pytest.raises(ckpt.CheckpointError, match=r"\.step: dtype int32 in the checkpoint, "
                     r"float32 in the target"):
    ckpt.restore(tmp_path, state.replace(step=jnp.asarray(7.0, jnp.float32)))
  sgd = optax.sgd(0.1, momentum=0.9)
  with pytest.raises(ckpt.CheckpointError, match="opt_state"):
    ckpt.restore(tmp_path, state.replace(opt_state=sgd.init(state.params), tx=sgd))


def test_static_metadata_difference_warns_or_fails(state, tmp_path):
  ckpt.save(tmp_path, state)

  def respec(v):  # same shapes, other setting: only the static spec differs
    return v.replace(spec=dataclasses.replace(v.spec, trust_penalty=0.5))

  other = state.replace(kasmina=knn.map_layers(respec, state.kasmina))
  with pytest.warns(ckpt.CheckpointWarning, match="trust_penalty"):
    restored = ckpt.restore(tmp_path, other)
  assert knn.find_layers(restored.kasmina)[("kas",)].spec.trust_penalty == 0.5
  with pytest.raises(ckpt.CheckpointError, match="static metadata"):
    ckpt.restore(tmp_path, other, strict_static=True)


def test_no_checkpoint(tmp_path):
  assert ckpt.latest_step(tmp_path / "nowhere") is None
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
    ckpt.restore(tmp_path / "nowhere", {"a": jnp.zeros(2)})
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
    ckpt.restore(tmp_path, {"a": jnp.zeros(2)})


def _data_files(step_dir: str) -> list[pathlib.Path]:
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*")
           if p.is_file() and "/d/" in p.as_posix()]
  assert files, f"no data files under {step_dir}"
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


# orbax leaves an asyncio callback behind when tensorstore fails mid-read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "flip_data_only", "delete_state",
                                    "metadata", "checksum"])
def test_damaged_checkpoint_fails_clearly(damage, tmp_path):
  tree = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64), "b": jnp.ones((64,)),
          "n": jnp.asarray(3, jnp.int32)}
  path = ckpt.save(tmp_path, tree, step=5)
  if damage == "truncate":
    for f in _data_files(path):
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif damage == "flip_bytes":
    for f in _data_files(path):
      data = bytearray(f.read_bytes())
      for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xFF
      f.write_bytes(bytes(data))
  elif damage == "flip_data_only":  # the largest file holds the (compressed) chunk data
    f = _data_files(path)[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
  elif damage == "checksum":  # data that decodes but is not what was written
    meta_path = pathlib.Path(path, "meta", "metadata")
    meta = json.loads(meta_path.read_text())
    meta["leaves"][0]["crc32"] ^= 1
    meta_path.write_text(json.dumps(meta))
  elif damage == "delete_state":
    for f in _data_files(path):
      f.unlink()
  else:
    meta = pathlib.Path(path, "meta", "metadata")
    meta.write_text(meta.read_text()[:40])
  with pytest.raises(ckpt.CheckpointError, match=r"step 5.*(damaged|truncated)") as err:
    ckpt.restore(tmp_path, tree)
  if damage == "checksum":
    assert "CRC-32" in str(err.value) and "['b']" in str(err.value)


def test_keep_prunes_old_steps(tmp_path):
  tree = {"w": jnp.zeros((3,))}
  for step in range(5):
    ckpt.save(tmp_path, jax.tree.map(lambda x, s=step: x + s, tree), step=step, keep=2)
  assert ckpt.all_steps(tmp_path) == [3, 4]
  np.testing.assert_array_equal(ckpt.restore(tmp_path, tree)["w"], np.full((3,), 4.0))
  np.testing.assert_array_equal(ckpt.restore(tmp_path, tree, step=3)["w"], np.full((3,), 3.0))
  with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint of step 1 \(steps present: "
                     r"\[3, 4\]\)"):
    ckpt.restore(tmp_path, tree, step=1)


def test_step_defaults_and_overwrite(tmp_path):
  tree = {"w": jnp.zeros((3,))}
  ckpt.save(tmp_path, tree)
  ckpt.save(tmp_path, tree)
  assert ckpt.all_steps(tmp_path) == [0, 1]
  with pytest.raises(ckpt.CheckpointError, match="step 1 already has a checkpoint"):
    ckpt.save(tmp_path, tree, step=1)
  ckpt.save(tmp_path, {"w": jnp.ones((3,))}, step=1, overwrite=True)
  np.testing.assert_array_equal(ckpt.restore(tmp_path, tree)["w"], np.ones(3))
  with pytest.raises(ValueError, match="keep"):
    ckpt.save(tmp_path, tree, keep=0)
  with pytest.raises(ckpt.CheckpointError, match="str"):
    ckpt.save(tmp_path, {"w": "text"})


def test_in_memory_checkpoint_survives_donation(state):
  mem = ckpt.InMemoryCheckpoint()
  assert not mem.has_value
  with pytest.raises(ckpt.CheckpointError, match="nothing has been saved"):
    mem.restore()
  mem.save(state)
  assert mem.has_value and mem.step == 7

  @jax.jit
  def bump(params):
    return jax.tree.map(lambda p: p + 1, params)

  donating = jax.jit(lambda p: jax.tree.map(lambda x: x * 0, p), donate_argnums=0)
  restored = mem.restore()
  donating(restored.params)  # a train step that donates its input must not hurt the kept copy
  again = mem.restore()
  assert_bitwise_equal(again, state)
  assert_bitwise_equal(bump(again.params), bump(state.params))
  mem.clear()
  assert not mem.has_value


def test_missing_orbax_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import fails
  with pytest.raises(ImportError, match=r"kasmina_jax\[checkpoint\]"):
    ckpt.save(tmp_path, {"w": jnp.zeros(2)})
  ckpt.InMemoryCheckpoint().save({"w": jnp.zeros(2)})  # needs no orbax
