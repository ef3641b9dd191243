"""Export: the plain Flax model (Linen and NNX) equals the Kasmina model's evaluation pass,
for every default blueprint, both wirings, coarse and per-node layers and both fossil modes;
in-flight seeds are an error or folded exactly (`include="live"`); the serialized StableHLO
and the saved plain-Flax model run in a fresh process without kasmina_jax."""

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kasmina_jax import blueprints as bp
from kasmina_jax import export as kex
from kasmina_jax import export_model as em
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import nn as knn
from kasmina_jax import nnx as knx
from kasmina_jax import training
from kasmina_jax.lifecycle import Stage

IN, W0, K0, W1, OUT = 7, 12, 5, 6, 3  # layer 0: 5 uneven chunks; layer 1: per-node (6 x 1)
CATALOG = bp.default_blueprints(parallel_hidden=4)
NB = len(CATALOG)  # 6: five chunk-wired blueprints and one parallel-wired one
# Every blueprint of the default catalog in both layers, both wirings in each.
BLUEPRINTS = {0: np.array([5, 4, 2, 0, 3], np.int32), 1: np.arange(NB, dtype=np.int32)}
TOL = dict(rtol=1e-6, atol=1e-6)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = knn.KasminaDense(W0, K0, blueprints=CATALOG, activation=nn.relu, name="hidden0")(
        x, train=train)
    x = knn.KasminaDense(W1, W1, blueprints=CATALOG, activation=jnp.tanh, name="hidden1")(
        x, train=train)
    return nn.Dense(OUT, name="head")(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden0 = knx.KasminaDense(IN, W0, K0, blueprints=CATALOG, activation=jax.nn.relu,
                                    rngs=rngs)
    self.hidden1 = knx.KasminaDense(W0, W1, W1, blueprints=CATALOG, activation=jnp.tanh,
                                    rngs=rngs)
    self.head = nnx.Linear(W1, OUT, rngs=rngs)

  def __call__(self, x):
    return self.head(self.hidden1(self.hidden0(x)))


def grown_children(spec, blueprint, key, trained):
  """Children for every seed (numpy: germinating under jit compiles for long).

  `trained`: every leaf random, padding slots included (the export must slice them away), as
  children that kept learning ("integrated" fossils) are; otherwise as germinated (frozen
  from then on): residual children's output layer zero, replacement ones random.
  """
  rng = np.random.default_rng(key)
  shapes = jax.eval_shape(lambda: layer_lib.init_children(spec))
  children = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32), shapes)
  if not trained:
    residual = np.array([spec.blueprints[b].kind == "residual" for b in blueprint])
    zero = lambda a: np.where(residual.reshape((-1,) + (1,) * (a.ndim - 1)), 0.0, a).astype(np.float32)
    children = children.replace(w2=zero(children.w2), b2=zero(children.b2), s=zero(children.s))
  return jax.tree.map(jnp.asarray, children)


def seed_state(stage, blueprint, alpha=0.37):
  k = len(blueprint)
  stage = np.broadcast_to(np.asarray(stage, np.int32), (k,))
  full_on = (stage >= Stage.STABILIZATION) & (stage <= Stage.FOSSILIZED)
  return lifecycle.init_seed_state(k).replace(
      stage=jnp.asarray(stage), blueprint=jnp.asarray(blueprint),
      alpha=jnp.asarray(np.where(stage == Stage.GRAFTING, alpha, full_on), jnp.float32))


@pytest.fixture(scope="module")
def base_state():
  return training.create_train_state(LinenMLP(), optax.sgd(0.1), jnp.zeros((2, IN)),
                                     jax.random.key(0))


def grown_state(state, stages, *, trained=True, key=1):
  """`state` with children in every seed, in `stages[i]` (per seed or one stage) a layer."""
  params, kasmina = state.params, state.kasmina
  for i, (path, lv) in enumerate(sorted(knn.find_layers(kasmina).items())):
    children = grown_children(lv.spec, BLUEPRINTS[i], key + i, trained)
    params = knn.set_path(params, knn.children_path(path), children)
    kasmina = knn.set_path(kasmina, path + ("state",),
                           lv.replace(seeds=seed_state(stages[i], BLUEPRINTS[i])))
  return state.replace(params=params, kasmina=kasmina)


@jax.jit
def linen_eval(variables, x):
  return LinenMLP().apply(variables, x, train=False)


def kasmina_out(state, x):
  return np.asarray(linen_eval({"params": state.params, knn.KASMINA: state.kasmina}, x))


def inputs(rows=33, key=2):
  return jax.random.normal(jax.random.key(key), (rows, IN)) * 2.0


def has_kasmina(tree) -> bool:
  kinds = (knn.KasminaVars, bp.ChildParams, lifecycle.SeedState)
  return any(isinstance(x, kinds) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kinds)))


@pytest.mark.parametrize("fossil_mode", ["integrated", "frozen"])
def test_linen_parity_every_blueprint(base_state, fossil_mode):
  state = grown_state(base_state, (Stage.FOSSILIZED, Stage.FOSSILIZED),
                      trained=fossil_mode == "integrated")
  ex = kex.export(state)
  x = inputs()
  np.testing.assert_allclose(np.asarray(ex.apply(x)), kasmina_out(state, x), **TOL)
  # Structure: plain layers, every seed folded, nothing of Kasmina left.
  assert [layer.name for layer in ex.spec.layers] == ["hidden0", "hidden1", "head"]
  l0, l1, head = ex.spec.layers
  assert [c.seed for c in l0.children] == list(range(K0))
  assert [c.seed for c in l1.children] == list(range(W1))
  assert {c.wiring for c in l0.children} == {c.wiring for c in l1.children} == {"chunk", "parallel"}
  assert not head.children and set(ex.params["head"]) == {"kernel", "bias"}
  assert l0.extra_width == 4 and l1.extra_width == 4  # one parallel child a layer, hidden 4
  assert ex.params["hidden0"]["dense"]["kernel"].shape == (IN, W0 + 4)
  replacement = [c for c in l0.children if c.seed == 1][0]  # blueprint 4
  assert not replacement.residual
  assert not has_kasmina(ex.params)
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(ex.params))


def test_empty_slots_dropped(base_state):
  # Layer 0: FOSSILIZED beside every stage whose chunk is x; layer 1: no fossil at all.
  stages0 = [Stage.FOSSILIZED, Stage.CULLED, Stage.DORMANT, Stage.CANCELLED, Stage.FOSSILIZED]
  stages1 = [Stage.ROLLED_BACK, Stage.GERMINATED, Stage.DORMANT, Stage.DORMANT, Stage.CULLED,
             Stage.CANCELLED]
  state = grown_state(base_state, (stages0, stages1))
  ex = kex.export(state)
  x = inputs()
  np.testing.assert_allclose(np.asarray(ex.apply(x)), kasmina_out(state, x), **TOL)
  l0, l1, _ = ex.spec.layers
  assert [c.seed for c in l0.children] == [0, 4]
  assert l0.extra_width == 4  # seed 0 holds the parallel child
  assert not l1.children and set(ex.params["hidden1"]) == {"kernel", "bias"}
  host = state.params["hidden1"]["host"]
  np.testing.assert_array_equal(ex.params["hidden1"]["kernel"], np.asarray(host["kernel"]))
  assert ex.param_count() < sum(np.size(a) for a in jax.tree.leaves(state.params))


@pytest.mark.parametrize("stage", [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION,
                                   Stage.EVALUATING, Stage.FINE_TUNING])
def test_in_flight_seeds_are_an_error(base_state, stage):
  stages1 = [Stage.FOSSILIZED, stage, Stage.DORMANT, stage, Stage.DORMANT, Stage.DORMANT]
  state = grown_state(base_state, (Stage.FOSSILIZED, stages1))
  with pytest.raises(ValueError, match=rf"layer hidden1 .*seed 1 \({stage.name}\), seed 3"):
    kex.export(state)


def test_live_folds_the_evaluation_pass_exactly(base_state):
  # GRAFTING children of every kind (replacement, residual, parallel) fold with their alpha;
  # TRAINING children (chunk still x) are dropped; fully-on ones fold like fossils.
  stages0 = [Stage.GRAFTING, Stage.GRAFTING, Stage.TRAINING, Stage.GRAFTING, Stage.EVALUATING]
  stages1 = [Stage.GRAFTING, Stage.STABILIZATION, Stage.FINE_TUNING, Stage.FOSSILIZED,
             Stage.GRAFTING, Stage.TRAINING]
  state = grown_state(base_state, (stages0, stages1))
  ex = kex.export(state, include="live")
  x = inputs()
  np.testing.assert_allclose(np.asarray(ex.apply(x)), kasmina_out(state, x), **TOL)
  l0, l1, _ = ex.spec.layers
  assert [c.seed for c in l0.children] == [0, 1, 3, 4]
  assert [c.seed for c in l1.children] == [0, 1, 2, 3, 4]
  grafting_replacement = [c for c in l0.children if c.seed == 1][0]
  assert grafting_replacement.residual and grafting_replacement.diagonal


def test_nnx_parity_and_nnx_output():
  model = nnx.jit(lambda: NnxMLP(nnx.Rngs(0)))()  # one compilation, not eager inits
  stages = {0: [Stage.FOSSILIZED, Stage.DORMANT, Stage.FOSSILIZED, Stage.FOSSILIZED,
                Stage.CULLED], 1: [Stage.FOSSILIZED] * W1}
  for i, layer in enumerate((model.hidden0.kasmina, model.hidden1.kasmina)):
    layer.children.set(grown_children(layer.spec, BLUEPRINTS[i], 10 + i, True))
    layer.seeds.set_value(seed_state(stages[i], BLUEPRINTS[i]))
  ex = kex.export(model)
  x = inputs()
  ref = np.asarray(jax.jit(kex.kasmina_eval_fn(model))(x))
  np.testing.assert_allclose(np.asarray(ex.apply(x)), ref, **TOL)
  assert not model.hidden0.kasmina.deterministic  # the export left the model as it was
  assert [c.seed for c in ex.spec.layers[0].children] == [0, 2, 3]
  plain = ex.nnx_model()
  assert isinstance(plain, em.GrownModelNNX)
  assert not any(isinstance(m, (knx.KasminaLayer, knx.KasminaDense))
                 for _, m in nnx.iter_modules(plain))
  # Same parameter tree as the Linen export (the fresh-process test runs it).
  plain_params = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, plain_params, ex.params)


def test_saved_model_and_stablehlo_run_in_a_fresh_process(base_state, tmp_path):
  state = grown_state(base_state, (Stage.FOSSILIZED, Stage.FOSSILIZED))
  ex = kex.export(state)
  paths = ex.save(str(tmp_path / "grown"))
  assert set(paths) == {"model.json", "params.msgpack", "grown_model.py", "apply.stablehlo"}
  x = np.asarray(inputs(rows=17, key=5))  # not the batch size the function was traced with
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent("""
      import sys
      import flax.serialization, jax, numpy as np
      from flax import nnx
      sys.path.insert(0, sys.argv[1])
      import grown_model
      d = sys.argv[1]
      spec = grown_model.ModelSpec.from_json(open(d + "/model.json").read())
      params = flax.serialization.msgpack_restore(open(d + "/params.msgpack", "rb").read())
      x = np.load(sys.argv[2])
      linen = jax.jit(grown_model.GrownModel(spec).apply)({"params": params}, x)
      nnx_out = nnx.jit(lambda m, x: m(x))(grown_model.load_nnx(spec, params), x)
      exp = jax.export.deserialize(bytearray(open(d + "/apply.stablehlo", "rb").read()))
      hlo = exp.call(x)
      assert not any(m.startswith("kasmina_jax") for m in sys.modules), "kasmina_jax imported"
      np.save(sys.argv[3], np.stack([np.asarray(linen), np.asarray(nnx_out), np.asarray(hlo)]))
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  subprocess.run([sys.executable, "-c", script, os.path.dirname(paths["grown_model.py"]),
                  str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
                 check=True, cwd=str(tmp_path), env=env, timeout=120)
  outs = np.load(tmp_path / "out.npy")
  ref = kasmina_out(state, jnp.asarray(x))
  for out in outs:
    np.testing.assert_allclose(out, ref, **TOL)


def test_cost_report(base_state):
  state = grown_state(base_state, ([Stage.FOSSILIZED, Stage.DORMANT, Stage.DORMANT,
                                    Stage.DORMANT, Stage.FOSSILIZED], Stage.DORMANT))
  ex = kex.export(state)
  report = kex.cost_report(state, ex, inputs(rows=64), repeats=3)
  k, e = report["kasmina"], report["exported"]
  assert e["params"] == ex.param_count() < k["params_active"] <= k["params"]
  assert 0 < e["flops_per_row"] < k["flops_per_row"]
  assert k["ms_per_batch"] > 0 and e["ms_per_batch"] > 0
  assert "| exported |" in kex.format_cost(report)


def test_bad_arguments_and_unsupported_models(base_state):
  import kasmina_jax  # pylint: disable=g-import-not-at-top
  assert kasmina_jax.export is kex and kasmina_jax.export_model is em  # lazy re-export
  with pytest.raises(ValueError, match="include"):
    kex.export(base_state, include="all")
  with pytest.raises(TypeError, match="source"):
    kex.export({"params": {}})
  with pytest.raises(ValueError, match="input_dim"):
    kex.export(base_state, input_dim=0)

  class Between(nn.Module):  # a function between two layers
    @nn.compact
    def __call__(self, x, train=True):
      x = knn.KasminaDense(W0, K0, blueprints=CATALOG, name="a")(x, train=train)
      return nn.Dense(OUT, name="b")(jax.nn.relu(x))

  state = training.create_train_state(Between(), optax.sgd(0.1), jnp.zeros((2, IN)),
                                      jax.random.key(0))
  with pytest.raises(ValueError, match="layer b does not read layer a's output unchanged"):
    kex.export(state)
  with pytest.raises(ValueError, match="activation"):
    kex.activation_name(lambda x: x * 2, "layer a")
  assert kex.activation_name(functools.partial(jax.nn.gelu, approximate=False), "a") == "gelu_exact"


class _LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = x.reshape(x.shape[0], -1)
    x = knn.KasminaDense(16, 2, activation=nn.relu, name="hidden")(x, train=train)
    return nn.Dense(3, name="head")(x)


class _LinenAttention(nn.Module):  # a one-block transformer's pieces
  @nn.compact
  def __call__(self, tokens, train=True):
    x = nn.Embed(11, 16, name="embed")(tokens)
    x = x + nn.SelfAttention(num_heads=2, name="attn")(x)
    x = knn.KasminaDense(16, 2, activation=nn.relu, name="mlp")(x, train=train)
    return nn.Dense(11, name="head")(x)


class _LinenNormThenChain(nn.Module):  # the input width is known; the first module is not a layer
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.LayerNorm(name="norm")(x)
    x = knn.KasminaDense(16, 2, activation=nn.relu, name="hidden")(x, train=train)
    return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize("model,x,first", [
    (_LinenCNN(), jnp.zeros((2, 6, 6, 1)), "Conv at conv"),
    (_LinenAttention(), jnp.zeros((2, 5), jnp.int32), "Embed at embed"),
    (_LinenNormThenChain(), jnp.zeros((2, 7)), "LayerNorm at norm"),
])
def test_unsupported_linen_models_name_the_first_module_export_cannot_fold(model, x, first):
  state = training.create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
  with pytest.raises(ValueError, match=f"^model: export folds chains .*cannot fold {first}$"):
    kex.export(state)


class _NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.hidden = knx.KasminaDense(in_features=144, features=16, num_seeds=2, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.hidden(self.conv(x).reshape(x.shape[0], -1)))


class _NnxBlock(nnx.Module):  # a container: walked into, its attention named
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(2, 16, decode=False, rngs=rngs)
    self.mlp = knx.KasminaDense(in_features=16, features=16, num_seeds=2, rngs=rngs)

  def __call__(self, x):
    return self.mlp(x + self.attn(x))


class _NnxAttention(nnx.Module):
  def __init__(self, rngs, embed=True):
    self.embed = nnx.Embed(11, 16, rngs=rngs) if embed else None
    self.block = _NnxBlock(rngs)
    self.head = nnx.Linear(16, 11, rngs=rngs)

  def __call__(self, t):
    return self.head(self.block(self.embed(t) if self.embed is not None else t))


@pytest.mark.parametrize("make,first", [
    (lambda: _NnxCNN(nnx.Rngs(0)), "Conv at conv"),
    (lambda: _NnxAttention(nnx.Rngs(0)), "Embed at embed"),
    (lambda: _NnxAttention(nnx.Rngs(0), embed=False), "MultiHeadAttention at block/attn"),
])
def test_unsupported_nnx_models_name_the_first_module_export_cannot_fold(make, first):
  with pytest.raises(ValueError, match=f"^model: export folds chains .*cannot fold {first}$"):
    kex.export(make())
