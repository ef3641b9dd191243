"""The Flax NNX layers: same function as the Linen layers, jitted training with nnx.Optimizer,
gradient isolation, vmap, parallel-wired seeds and the end-of-epoch helpers."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kasmina_jax import blueprints as bp
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import nn as knn
from kasmina_jax import nnx as knx
from kasmina_jax import optim
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.lifecycle import Stage

IN, FEATURES, K, OUT = 6, 12, 4, 3
BLUEPRINTS = bp.default_blueprints(parallel_hidden=4)
PARALLEL = BLUEPRINTS.index(next(b for b in BLUEPRINTS if b.wiring == "parallel"))
# Per seed: a residual MLP, a replacement bottleneck, a parallel-wired MLP, a GLU MLP.
MIXED_BLUEPRINTS = np.array([0, 4, PARALLEL, 2], np.int32)
ROWS = 16


def seeds_in(stage, blueprint=MIXED_BLUEPRINTS, alpha=0.5):
  stage = jnp.broadcast_to(jnp.asarray(stage, jnp.int32), (K,))
  full_on = (stage >= Stage.STABILIZATION) & (stage <= Stage.FOSSILIZED)
  return lifecycle.init_seed_state(K).replace(
      stage=stage, blueprint=jnp.asarray(blueprint, jnp.int32),
      strategy=jnp.zeros((K,), jnp.int32),
      alpha=jnp.where(stage == Stage.GRAFTING, alpha, full_on.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def live_children(spec, blueprint, key, noise=0.2):
  """Germinated children, perturbed so that every child computes something non-trivial."""
  children = layer_lib.germinate_children(spec, layer_lib.init_children(spec),
                                          jnp.ones((K,), bool), jnp.asarray(blueprint), key)
  leaves, treedef = jax.tree.flatten(children)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(
      treedef, [x + noise * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


class NnxNet(nnx.Module):
  def __init__(self, rngs, with_kasmina=True):
    self.pre = nnx.Linear(IN, IN, rngs=rngs)
    if with_kasmina:
      self.dense = knx.KasminaDense(IN, FEATURES, K, blueprints=BLUEPRINTS, rngs=rngs)
    else:
      self.dense = nnx.Linear(IN, FEATURES, rngs=rngs)
    self.out = nnx.Linear(FEATURES, OUT, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.dense(jax.nn.relu(self.pre(x)))))


def make_dense(stage, key=0, alpha=0.5):
  """An NNX KasminaDense with live children and every seed in `stage`."""
  dense = knx.KasminaDense(IN, FEATURES, K, blueprints=BLUEPRINTS, rngs=nnx.Rngs(key))
  dense.kasmina.children.set(live_children(dense.kasmina.spec, MIXED_BLUEPRINTS,
                                           jax.random.key(key + 1)))
  dense.kasmina.seeds.set_value(seeds_in(stage, alpha=alpha))
  return dense


def linen_variables(dense):
  """The Linen KasminaDense variables holding exactly the NNX layer's parameters and state."""
  k = dense.kasmina
  return {
      "params": {"host": {"kernel": dense.host.kernel.get_value(),
                          "bias": dense.host.bias.get_value()},
                 "kasmina": {"children": k.children.get()}},
      knn.KASMINA: {"kasmina": {"state": knn.KasminaVars(
          seeds=k.seeds.get_value(), telemetry=k.telemetry.get_value(), spec=k.spec)}},
  }


LINEN_DENSE = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS)


@jax.jit
def linen_forward(variables, u, ct, eval_alpha):
  """Training pass (telemetry, summary, grads of <out, ct>) and an evaluation pass."""
  def f(params):
    out, mut = LINEN_DENSE.apply({**variables, "params": params}, u,
                                 mutable=[knn.KASMINA, knn.KASMINA_AUX])
    return jnp.sum(out * ct), (out, mut)
  grads, (out, mut) = jax.grad(f, has_aux=True)(variables["params"])
  evaluated = LINEN_DENSE.apply(
      {**variables, knn.KASMINA_EVAL: {"kasmina": {"eval_alpha": eval_alpha}}}, u)
  return out, mut, grads, evaluated


@nnx.jit
def nnx_forward(dense, u, ct, eval_alpha):
  def f(d):
    out = d(u)
    return jnp.sum(out * ct), out
  grads, out = nnx.grad(f, has_aux=True)(dense)
  return out, grads, dense(u, eval_alpha=eval_alpha)


# Jitted calls (a training pass when eval_alpha is None); eager calls compile op by op.
run_net = nnx.jit(lambda m, x: m(x))
run_dense = nnx.jit(lambda d, u, eval_alpha=None: d(u, eval_alpha=eval_alpha))
run_layer = nnx.jit(lambda l, h, u, eval_alpha=None: l(h, u=u, eval_alpha=eval_alpha))


def pure_dict(state):
  return nnx.as_pure(state).to_pure_dict()


def data(key=0, rows=ROWS):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(k1, (rows, IN)), jax.random.normal(k2, (rows, FEATURES)),
          jax.random.normal(k3, (rows, OUT)))


# --------------------------------------------------------------- same function as Linen


STAGE_CASES = {s.name: s for s in Stage}


@pytest.mark.parametrize("stage", list(STAGE_CASES) + ["mixed"])
def test_nnx_layer_equals_linen_layer(stage):
  stage = (np.array([Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING, Stage.FOSSILIZED])
           if stage == "mixed" else STAGE_CASES[stage])
  dense = make_dense(stage)
  variables = linen_variables(dense)
  u, ct, _ = data()
  eval_alpha = jnp.array([0.0, 0.3, 1.0, 0.7])
  out_l, mut_l, grads_l, eval_l = linen_forward(variables, u, ct, eval_alpha)
  out_n, grads_n, eval_n = nnx_forward(dense, u, ct, eval_alpha)
  chex.assert_trees_all_close(out_n, out_l, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(eval_n, eval_l, rtol=1e-6, atol=1e-6)
  # Telemetry and the step summary of the training pass.
  chex.assert_trees_all_close(dense.kasmina.telemetry.get_value(),
                              mut_l[knn.KASMINA]["kasmina"]["state"].telemetry, rtol=1e-5,
                              atol=1e-5)
  chex.assert_trees_all_close(dense.kasmina.last_step.get_value(),
                              mut_l[knn.KASMINA_AUX]["kasmina"]["step"], rtol=1e-5, atol=1e-6)
  # Gradients of every parameter.
  children_n = pure_dict(grads_n["kasmina"]["children"])
  children_l = {k: getattr(grads_l["kasmina"]["children"], k) for k in children_n}
  chex.assert_trees_all_close(children_n, children_l, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(pure_dict(grads_n["host"]), grads_l["host"], rtol=1e-5, atol=1e-6)
  # The seed state is untouched by a forward pass; the evaluation pass took no telemetry.
  chex.assert_trees_all_equal(dense.kasmina.seeds.get_value(),
                              variables[knn.KASMINA]["kasmina"]["state"].seeds)
  assert float(dense.kasmina.telemetry.get_value().count) == ROWS


def test_grafting_blends_at_alpha_and_eval_alpha_reproduces_it():
  dense = make_dense(Stage.GRAFTING, alpha=0.5)
  u, _, _ = data()
  host = nnx.jit(lambda d, u: d.host(u))(dense, u)
  full = run_dense(dense, u, 1.0)
  out = run_dense(dense, u)
  np.testing.assert_allclose(out, host + 0.5 * (full - host), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run_dense(dense, u, 0.0), host, rtol=0, atol=0)
  np.testing.assert_allclose(run_dense(dense, u, knn.current_eval_alpha(
      dense.kasmina.seeds.get_value())), out, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------- jitted training with nnx.Optimizer


def linen_train_step(tx):
  model = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS)

  @jax.jit
  def step(params, kasmina, opt_state, u, y):
    def loss_fn(p):
      out, mut = model.apply({"params": p, knn.KASMINA: kasmina}, u,
                             mutable=[knn.KASMINA, knn.KASMINA_AUX])
      child = mut[knn.KASMINA_AUX]["kasmina"]["step"].child_loss
      return jnp.mean((out - y) ** 2) + child, mut[knn.KASMINA]
    (loss, new_kas), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   learn_mask=optim.learning_mask(params, kasmina))
    return optax.apply_updates(params, updates), new_kas, opt_state, loss

  return step


def train_step(model, optimizer, u, y):
  def loss_fn(m):
    return jnp.mean((m(u) - y) ** 2) + knx.child_loss(m)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads, learn_mask=knx.learning_mask(model))
  return loss


nnx_train_step = nnx.jit(train_step)


def test_nnx_train_step_matches_linen_and_accumulates_telemetry():
  stage = np.array([Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING, Stage.EVALUATING])
  dense = make_dense(stage)
  variables = linen_variables(dense)
  frozen_before = np.asarray(dense.kasmina.children.w1u.get_value()[3])
  optimizer = knx.kasmina_optimizer(dense, optax.adam(1e-2), max_grad_norm=1.0)
  tx = optim.kasmina_optimizer(optax.adam(1e-2), max_grad_norm=1.0)
  step = linen_train_step(tx)
  params, kas = variables["params"], variables[knn.KASMINA]
  opt_state = tx.init(params)
  u, _, _ = data(1)
  y = jax.random.normal(jax.random.key(9), (ROWS, FEATURES))
  for i in range(3):
    loss_n = nnx_train_step(dense, optimizer, u, y)
    params, kas, opt_state, loss_l = step(params, kas, opt_state, u, y)
    np.testing.assert_allclose(loss_n, loss_l, rtol=1e-5)
    # Every training pass measures its share of the rows (`telemetry.measured_rows`).
    every = dense.kasmina.spec.telemetry_every
    assert (float(dense.kasmina.telemetry.get_value().count)
            == tel_lib.measured_rows(ROWS, every) * (i + 1))
  chex.assert_trees_all_close(dense.host.kernel.get_value(), params["host"]["kernel"], rtol=1e-4,
                              atol=1e-6)
  chex.assert_trees_all_close(dense.kasmina.children.get(), params["kasmina"]["children"],
                              rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(dense.kasmina.telemetry.get_value(),
                              kas["kasmina"]["state"].telemetry, rtol=1e-4, atol=1e-5)
  # The EVALUATING child (seed 3) is frozen; the others learnt.
  np.testing.assert_array_equal(dense.kasmina.children.w1u.get_value()[3], frozen_before)
  assert int(optimizer.step.get_value()) == 3


def test_training_seeds_leave_host_gradients_equal_to_host_only_model():
  model = NnxNet(nnx.Rngs(0))
  host_only = NnxNet(nnx.Rngs(0), with_kasmina=False)
  # Same host weights in both.
  host_only.dense.kernel.set_value(model.dense.host.kernel.get_value())
  host_only.dense.bias.set_value(model.dense.host.bias.get_value())
  for name in ("pre", "out"):
    for p in ("kernel", "bias"):
      getattr(getattr(host_only, name), p).set_value(getattr(getattr(model, name), p).get_value())
  layer = model.dense.kasmina
  layer.children.set(live_children(layer.spec, MIXED_BLUEPRINTS, jax.random.key(3), noise=0.5))
  layer.seeds.set_value(seeds_in(Stage.TRAINING))
  x, _, y = data(2)

  @nnx.jit
  def grads_of(m):
    return nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)

  g, g_host = grads_of(model), grads_of(host_only)
  # The children do learn (through the straight-through estimator) ...
  assert float(jnp.abs(g["dense"]["kasmina"]["children"]["w1u"].get_value()[2]).sum()) > 0
  # ... and nothing of it reaches the host (up to the rounding of XLA's differently fused
  # row sums: a leak would be of the children's size, ~1e-2 here).
  close = functools.partial(chex.assert_trees_all_close, rtol=1e-6, atol=1e-9)
  for name in ("pre", "out"):
    close(pure_dict(g[name]), pure_dict(g_host[name]))
  close(pure_dict(g["dense"]["host"]), pure_dict(g_host["dense"]))
  np.testing.assert_array_equal(run_net(model, x), run_net(host_only, x))


# ------------------------------------------------------------------------------------ vmap


def test_vmap_over_a_batch_in_eval_mode():
  dense = make_dense(np.array([Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING,
                               Stage.FOSSILIZED]))
  u, _, _ = data(3)
  dense.eval()
  assert dense.kasmina.deterministic
  batched = run_dense(dense, u)
  per_row = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(dense, u)
  np.testing.assert_allclose(per_row, batched, rtol=1e-6, atol=1e-6)
  per_row_eval = nnx.vmap(lambda m, x: m(x, eval_alpha=1.0), in_axes=(None, 0))(dense, u)
  np.testing.assert_allclose(per_row_eval, run_dense(dense, u, 1.0), rtol=1e-6, atol=1e-6)
  graphdef, state = nnx.split(dense)
  pure = jax.jit(jax.vmap(lambda x: nnx.merge(graphdef, state)(x)))(u)
  np.testing.assert_allclose(pure, batched, rtol=1e-6, atol=1e-6)
  # Evaluation mode takes no telemetry.
  assert float(dense.kasmina.telemetry.get_value().count) == 0
  dense.train()
  assert not dense.kasmina.deterministic


def test_ensemble_train_step_under_nnx_vmap():
  """Independent members (their own params, seeds, telemetry, optimizer state) trained in
  one jitted `nnx.vmap`ped step equal the members trained one by one."""
  members = 2
  stage = np.array([Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING, Stage.FOSSILIZED])

  def build(i):
    m = NnxNet(nnx.Rngs(i))
    layer = m.dense.kasmina
    layer.children.set(live_children(layer.spec, MIXED_BLUEPRINTS, jax.random.key(i)))
    layer.seeds.set_value(seeds_in(stage))
    return m, knx.kasmina_optimizer(m, optax.adam(1e-2), max_grad_norm=1.0)

  # Stack the members' states along a leading axis.
  graphdefs, states = zip(*[nnx.split(build(i)) for i in range(members)])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  models, optimizers = nnx.merge(graphdefs[0], stacked)
  x = jax.random.normal(jax.random.key(5), (members, ROWS, IN))
  y = jax.random.normal(jax.random.key(6), (members, ROWS, OUT))
  vstep = nnx.jit(nnx.vmap(train_step, in_axes=(0, 0, 0, 0)))
  for _ in range(2):
    losses = vstep(models, optimizers, x, y)
  assert losses.shape == (members,)
  compared = nnx.Any(nnx.Param, knx.SeedVar, knx.TelemetryVar, nnx.optimizer.OptState)
  for i in range(members):
    single, opt = build(i)
    for _ in range(2):
      loss = nnx_train_step(single, opt, x[i], y[i])
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
    member = jax.tree.map(lambda a: a[i], pure_dict(nnx.state((models, optimizers), compared)))
    chex.assert_trees_all_close(member, pure_dict(nnx.state((single, opt), compared)),
                                rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------- parallel wiring and end of epoch


def test_parallel_wired_lifecycle_through_nnx_helpers():
  model = NnxNet(nnx.Rngs(0))
  optimizer = knx.kasmina_optimizer(model, optax.adam(1e-2))
  layers = knx.find_layers(model)
  assert list(layers) == [("dense", "kasmina")]
  path = ("dense", "kasmina")
  x, _, y = data(4)
  before = run_net(model, x)
  # Germinate two parallel-wired seeds: the function is preserved bit for bit.
  seeds, accepted = lifecycle.request_germination(
      knx.seed_states(model)[path], [0, 2], PARALLEL, 0, num_blueprints=len(BLUEPRINTS),
      num_strategies=4)
  np.testing.assert_array_equal(accepted, [True, False, True, False])
  changed = knx.commit_seed_states(model, {path: seeds}, optimizer=optimizer)
  np.testing.assert_array_equal(changed[path], [True, False, True, False])
  w1u = model.dense.kasmina.children.w1u.get_value()
  assert np.all(np.abs(np.asarray(w1u)[[0, 2]]).sum(axis=(1, 2)) > 0)
  assert np.all(np.asarray(w1u)[[1, 3]] == 0)
  np.testing.assert_array_equal(run_net(model, x), before)
  # GERMINATED -> TRAINING; train: the output stays the host's, the children learn.
  seeds = lifecycle.update_readiness(knx.seed_states(model)[path])
  seeds, accepted = lifecycle.apply_commands(
      seeds, lifecycle.make_commands(K, op=np.where(np.arange(K) % 2 == 0, lifecycle.Op.ADVANCE,
                                                    lifecycle.Op.NONE)),
      num_blueprints=len(BLUEPRINTS), num_strategies=4)
  np.testing.assert_array_equal(seeds.stage, [Stage.TRAINING, 0, Stage.TRAINING, 0])
  knx.commit_seed_states(model, {path: seeds}, optimizer=optimizer)
  knx.reset_telemetry(model)  # the passes above were training passes too
  for _ in range(3):
    loss = nnx_train_step(model, optimizer, x, y)
  assert np.isfinite(float(loss))
  assert float(knx.child_loss(model)) > 0
  every = model.dense.kasmina.spec.telemetry_every
  assert (float(model.dense.kasmina.telemetry.get_value().count)
          == 3 * tel_lib.measured_rows(ROWS, every))
  w2 = np.asarray(model.dense.kasmina.children.w2.get_value())
  assert np.all(np.abs(w2[[0, 2]]).sum(axis=(1, 2)) > 0)
  host_out = nnx.jit(lambda m: m.out(jax.nn.relu(m.dense.host(jax.nn.relu(m.pre(x))))))(model)
  np.testing.assert_allclose(run_net(model, x), host_out, rtol=1e-6, atol=1e-6)
  mu = nnx.as_pure(optimizer.opt_state)[0].inner_state[0].mu["dense"]["kasmina"]["children"]
  assert np.all(np.abs(np.asarray(mu["w2"])[[0, 2]]).sum(axis=(1, 2)) > 0)
  reports = knx.health_reports(model)
  assert reports[path].param_count[0] > 0 and reports[path].param_count[1] == 0
  # GRAFTING at alpha = 0.5: host + alpha * child on the seed's chunk.
  seeds = training_seeds = knx.seed_states(model)[path]
  knx.set_seed_states(model, {path: seeds.replace(
      stage=jnp.where(seeds.stage == Stage.TRAINING, Stage.GRAFTING, seeds.stage),
      alpha=jnp.where(seeds.stage == Stage.TRAINING, 0.5, 0.0))})
  layer = model.dense.kasmina
  u = jax.nn.relu(nnx.jit(lambda m: m.pre(x))(model))
  h = nnx.jit(lambda m: m.dense.host(u))(model)
  np.testing.assert_allclose(run_layer(layer, h, u), h + 0.5 * (run_layer(layer, h, u, 1.0) - h),
                             rtol=1e-5, atol=1e-5)
  # Cull seed 0: its child is zeroed and its optimizer state reset; seed 2 keeps both.
  knx.set_seed_states(model, {path: training_seeds})
  seeds, accepted = lifecycle.apply_commands(
      training_seeds, lifecycle.make_commands(K, op=np.array([lifecycle.Op.CULL, 0, 0, 0])),
      num_blueprints=len(BLUEPRINTS), num_strategies=4)
  np.testing.assert_array_equal(accepted, [True, False, False, False])
  knx.commit_seed_states(model, {path: seeds}, optimizer=optimizer, key=jax.random.key(1))
  assert np.all(np.asarray(model.dense.kasmina.children.w1u.get_value()[0]) == 0)
  mu2 = nnx.as_pure(optimizer.opt_state)[0].inner_state[0].mu["dense"]["kasmina"]["children"]
  for name in model.dense.kasmina.children.fields:
    assert np.all(np.asarray(mu2[name][0]) == 0)
    np.testing.assert_array_equal(mu2[name][2], mu[name][2])
  knx.reset_telemetry(model)
  assert float(model.dense.kasmina.telemetry.get_value().count) == 0


def test_helpers_validate_their_arguments():
  model = NnxNet(nnx.Rngs(0))
  path = ("dense", "kasmina")
  with pytest.raises(ValueError, match="one SeedState per Kasmina layer"):
    knx.set_seed_states(model, {("nope",): lifecycle.init_seed_state(K)})
  with pytest.raises(ValueError, match="do not match"):
    knx.set_seed_states(model, {path: lifecycle.init_seed_state(K + 1)})
  with pytest.raises(TypeError, match="SeedState"):
    knx.set_seed_states(model, {path: "dormant"})
  layer = knx.KasminaLayer(8, 2)
  with pytest.raises(ValueError, match="key"):
    knx.commit_seed_states(layer, {(): lifecycle.init_seed_state(2)})
  with pytest.raises(ValueError, match="input_dim"):
    knx.KasminaLayer(8, 2, blueprints=BLUEPRINTS)
  with pytest.raises(ValueError, match="num_seeds"):
    knx.KasminaLayer(4, 8)
  with pytest.raises(ValueError, match="impl"):
    knx.KasminaLayer(8, 2, impl="cuda")
  with pytest.raises(ValueError, match="x: expected shape"):
    layer(jnp.ones((3, 7)))


# ------------------------------------------------------------- the shared training loop


def _linen_net():
  import flax.linen as fnn  # pylint: disable=g-import-not-at-top

  class Net(fnn.Module):
    @fnn.compact
    def __call__(self, x, train=True):
      h = jax.nn.relu(fnn.Dense(IN, name="pre")(x))
      h = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS,
                           name="dense")(h, train=train)
      return fnn.Dense(OUT, name="out")(jax.nn.relu(h))
  return Net()


def _as_linen_params(nnx_params):
  """The NNX pure params dict with the children mappings as `ChildParams` (Linen's form)."""
  is_child = optim._is_child  # pylint: disable=protected-access
  return jax.tree.map(lambda x: bp.ChildParams(**x) if is_child(x) else x, nnx_params,
                      is_leaf=is_child)


def test_nnx_and_linen_take_the_same_decisions_through_the_shared_fit():
  from kasmina_jax import tamiyo, training  # pylint: disable=g-import-not-at-top
  rows = 256
  x = jax.random.normal(jax.random.key(3), (rows, IN))
  w = jax.random.normal(jax.random.key(4), (IN, OUT))
  y = jnp.argmax(jnp.tanh(x @ w) + 0.1 * jnp.sin(3 * x[:, :OUT]), -1)
  train = {"x": np.asarray(x[:192]), "y": np.asarray(y[:192])}
  val = {"x": np.asarray(x[192:]), "y": np.asarray(y[192:])}
  config = training.TrainConfig(tamiyo=tamiyo.TamiyoConfig(germinate_without_plateau=True))
  key = jax.random.key(11)

  model = NnxNet(nnx.Rngs(0))
  nstate = knx.create_train_state(model, optax.adam(3e-2), key, config)
  lstate = training.create_train_state(_linen_net(), optax.adam(3e-2), train["x"][:2], key,
                                       config)
  lstate = lstate.replace(params=_as_linen_params(nstate.params),
                          host_snapshot=_as_linen_params(nstate.host_snapshot),
                          opt_state=lstate.tx.init(_as_linen_params(nstate.params)))
  np.testing.assert_array_equal(jax.random.key_data(nstate.rng),
                                jax.random.key_data(lstate.rng))
  histories = {}
  for name, state in (("nnx", nstate), ("linen", lstate)):
    state, histories[name] = training.fit(state, train, val, training.cross_entropy_loss,
                                          epochs=4, batch_size=32, progress=False)
    if name == "nnx":
      knx.update_model(model, state)
  stages = {k: [h["stages"] for h in v] for k, v in histories.items()}
  assert stages["nnx"] == stages["linen"]
  assert any(s != "DORMANT" for h in stages["nnx"] for s in h["dense/kasmina"])
  for hn, hl in zip(histories["nnx"], histories["linen"]):
    np.testing.assert_allclose(hn["val_loss"], hl["val_loss"], rtol=1e-4)
  np.testing.assert_array_equal(
      np.asarray(model.dense.kasmina.seeds.get_value().stage),
      [lifecycle.Stage[s] for s in stages["nnx"][-1]["dense/kasmina"]])


class BatchNormNet(nnx.Module):
  """A model with non-parameter NNX state: BatchNorm statistics and a Dropout RNG stream."""

  def __init__(self, rngs):
    self.pre = nnx.Linear(IN, IN, rngs=rngs)
    self.norm = nnx.BatchNorm(IN, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=7))
    self.dense = knx.KasminaDense(IN, FEATURES, K, blueprints=BLUEPRINTS, rngs=rngs)
    self.out = nnx.Linear(FEATURES, OUT, rngs=rngs)

  def __call__(self, x):
    h = self.drop(jax.nn.relu(self.norm(self.pre(x))))
    return self.out(jax.nn.relu(self.dense(h)))


def _task(rows=128):
  x = jax.random.normal(jax.random.key(3), (rows, IN)) * 3.0 + 1.0
  y = jnp.argmax(x[:, :OUT], -1)
  return ({"x": np.asarray(x[:96]), "y": np.asarray(y[:96])},
          {"x": np.asarray(x[96:]), "y": np.asarray(y[96:])})


def test_batch_norm_statistics_and_dropout_rngs_train_through_the_shared_loop():
  from kasmina_jax import training  # pylint: disable=g-import-not-at-top
  train, val = _task()
  model = BatchNormNet(nnx.Rngs(0))
  state = knx.create_train_state(model, optax.adam(1e-2), jax.random.key(1))
  other = state.model_state[knx.NnxModel.STATE]
  mean0 = np.asarray(other["norm"]["mean"])
  count0 = int(other["drop"]["rngs"]["count"])
  np.testing.assert_array_equal(mean0, 0.0)
  # Evaluation passes read the statistics and change nothing.
  loss_a, _, _ = training.evaluate(state, val, training.cross_entropy_loss)
  loss_b, _, _ = training.evaluate(state, val, training.cross_entropy_loss)
  assert float(loss_a) == float(loss_b)
  state, _ = training.fit(state, train, val, training.cross_entropy_loss, epochs=2,
                          batch_size=32, progress=False)
  other = state.model_state[knx.NnxModel.STATE]
  mean = np.asarray(other["norm"]["mean"])
  assert np.all(np.abs(mean - mean0) > 1e-3)  # the running mean moved (inputs have mean ~1)
  assert int(other["drop"]["rngs"]["count"]) == count0 + 6  # one draw per step
  knx.update_model(model, state)
  np.testing.assert_array_equal(np.asarray(model.norm.mean.get_value()), mean)
  # A non-finite step keeps the statistics as they were.
  bad = {"x": np.full((32, IN), np.nan, np.float32), "y": train["y"][:32]}
  skipped, _ = training.train_step(state, bad, training.cross_entropy_loss)
  np.testing.assert_array_equal(
      np.asarray(skipped.model_state[knx.NnxModel.STATE]["norm"]["mean"]), mean)


def test_nnx_train_state_checkpoint_round_trip(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  from kasmina_jax import checkpoint, training  # pylint: disable=g-import-not-at-top
  train, val = _task()
  tx = optax.adam(1e-2)  # one optimizer object: the wrapped transformation is static
  state = knx.create_train_state(BatchNormNet(nnx.Rngs(0)), tx, jax.random.key(1))
  state, _ = training.fit(state, train, val, training.cross_entropy_loss, epochs=2,
                          batch_size=32, progress=False)
  checkpoint.save(tmp_path, state)
  template = knx.create_train_state(BatchNormNet(nnx.Rngs(5)), tx, jax.random.key(9))
  template = template.replace(model=state.model)  # same static structure, other values
  # A checkpoint does not carry the layers' static liveness (restored: unknown); reading the
  # restored stages gives back the saved state's.
  restored = training.refresh_liveness(checkpoint.restore(tmp_path, template))
  chex.assert_trees_all_equal(jax.tree.map(_plain, restored), jax.tree.map(_plain, state))
  # Training goes on identically from the restored state.
  batch = {k: v[:32] for k, v in train.items()}
  a, _ = training.train_step(state, batch, training.cross_entropy_loss)
  b, _ = training.train_step(restored, batch, training.cross_entropy_loss)
  chex.assert_trees_all_equal(jax.tree.map(_plain, a), jax.tree.map(_plain, b))


def _plain(x):
  """Key arrays as their data (chex compares plain arrays)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


class _TinySequenceLM(nnx.Module):
  """Head seeds beside an attention and a block site, the NNX shells' sequence layers."""

  def __init__(self, vocab, dim, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = knx.KasminaAttention(dim, 2, 2, rngs=rngs)
    self.grow = knx.KasminaBlocks(dim, 1, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(self.ln(x))
    return self.head(self.grow(x))


@pytest.mark.slow
def test_sequence_layers_grow_through_the_shared_loop():
  from kasmina_jax import grafting, tamiyo, training  # pylint: disable=g-import-not-at-top
  vocab, t = 11, 6
  rng = np.random.default_rng(0)
  seq = rng.integers(0, vocab, (96, t + 1)).astype(np.int32)
  seq[:, 2:] = seq[:, :-2]
  train, val = ({"x": seq[:64, :-1], "y": seq[:64, 1:]}, {"x": seq[64:, :-1], "y": seq[64:, 1:]})
  model = _TinySequenceLM(vocab, 8, nnx.Rngs(0))
  # causal before growing and after: later tokens never change earlier logits
  tok = jnp.asarray(seq[:2, :-1])
  life = lifecycle.LifecycleConfig(min_training_steps=4, max_training_steps=100,
                                   stabilization_steps=4, fine_tuning_steps=4, embargo_epochs=1)
  config = training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=4),
                                tamiyo=tamiyo.TamiyoConfig(lifecycle=life))
  state = knx.create_train_state(model, optax.adam(1e-2), jax.random.key(1), config)
  state, history = training.fit(state, train, val, training.cross_entropy_loss, epochs=5,
                                batch_size=16, progress=False)
  knx.update_model(model, state)
  stages = {p: np.asarray(layer.seeds.get_value().stage) for p, layer in
            knx.find_layers(model).items()}
  assert set(stages) == {("attn", "kasmina"), ("grow", "kasmina")}
  assert all(np.all(s >= lifecycle.Stage.TRAINING) for s in stages.values()), stages
  assert all(np.isfinite(h["val_loss"]) for h in history)
  model.eval()
  a, b = model(tok), model(tok.at[:, 3:].set((tok[:, 3:] + 1) % vocab))
  np.testing.assert_allclose(np.asarray(a[:, :3]), np.asarray(b[:, :3]), atol=1e-6)
