"""The Linen layers inside a jitted train step: under vmap, with parallel-wired seeds, and with
isolation holding at the update (the host trains as if the TRAINING children were not there)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kasmina_jax import blueprints as bp
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import nn as knn
from kasmina_jax import nnx as knx
from kasmina_jax import optim
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.lifecycle import Stage

IN, FEATURES, K, OUT, ROWS = 6, 12, 4, 3, 16
BLUEPRINTS = bp.default_blueprints(parallel_hidden=4)
PARALLEL = BLUEPRINTS.index(next(b for b in BLUEPRINTS if b.wiring == "parallel"))
PATH = ("hidden", "kasmina")


class Net(nn.Module):
  with_kasmina: bool = True

  @nn.compact
  def __call__(self, x, train=True):
    h = jax.nn.relu(nn.Dense(IN, name="pre")(x))
    if self.with_kasmina:
      h = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS,
                           activation=jax.nn.relu, name="hidden")(h, train=train)
    else:
      h = jax.nn.relu(HostOnly(name="hidden")(h))
    return nn.Dense(OUT, name="out")(h)


class HostOnly(nn.Module):
  @nn.compact
  def __call__(self, u):
    return nn.Dense(FEATURES, name="host")(u)


MODEL = Net()


@functools.cache
def spec():
  v = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.ones((2, IN)))
  return knn.find_layers(v[knn.KASMINA])[PATH].spec


@functools.partial(jax.jit, static_argnums=(2,))
def init_member(key, stage, blueprint):
  """Variables with live (germinated, perturbed) children and every seed in `stage`."""
  variables = MODEL.init(key, jnp.ones((2, IN)))
  s = spec()
  blueprint = jnp.asarray(blueprint, jnp.int32)
  children = layer_lib.germinate_children(s, layer_lib.init_children(s), jnp.ones((K,), bool),
                                          blueprint, jax.random.fold_in(key, 1))
  leaves, treedef = jax.tree.flatten(children)
  keys = jax.random.split(jax.random.fold_in(key, 2), len(leaves))
  children = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                          for k, x in zip(keys, leaves)])
  params = dict(variables["params"])
  params["hidden"] = {**params["hidden"], "kasmina": {"children": children}}
  stage = jnp.asarray(stage, jnp.int32)
  full_on = (stage >= Stage.STABILIZATION) & (stage <= Stage.FOSSILIZED)
  seeds = lifecycle.init_seed_state(K).replace(
      stage=stage, blueprint=blueprint, strategy=jnp.zeros((K,), jnp.int32),
      alpha=jnp.where(stage == Stage.GRAFTING, 0.5, full_on.astype(jnp.float32)))
  kasmina = knn.map_layers(lambda v: v.replace(seeds=seeds), variables[knn.KASMINA])
  return params, kasmina


TX = optim.kasmina_optimizer(optax.adam(1e-2), max_grad_norm=1.0)


def train_step(params, kasmina, opt_state, x, y):
  def loss_fn(p):
    out, mut = MODEL.apply({"params": p, knn.KASMINA: kasmina}, x,
                           mutable=[knn.KASMINA, knn.KASMINA_AUX])
    summaries = jax.tree.leaves(mut[knn.KASMINA_AUX],
                                is_leaf=lambda s: isinstance(s, knn.StepSummary))
    return jnp.mean((out - y) ** 2) + sum(s.child_loss for s in summaries), mut[knn.KASMINA]
  (loss, new_kasmina), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = TX.update(grads, opt_state, params,
                                 learn_mask=optim.learning_mask(params, kasmina))
  return optax.apply_updates(params, updates), new_kasmina, opt_state, loss


jit_step = jax.jit(train_step)
vmapped_step = jax.jit(jax.vmap(train_step))

MIXED_STAGE = (Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING, Stage.EVALUATING)
# Seeds 0 and 2 parallel-wired, 1 a residual MLP, 3 a replacement bottleneck.
MIXED_BLUEPRINT = (PARALLEL, 0, PARALLEL, 4)


def test_jitted_train_step_under_vmap_equals_members_one_by_one():
  members = 3
  keys = jax.random.split(jax.random.key(0), members)
  inits = [init_member(k, MIXED_STAGE, MIXED_BLUEPRINT) for k in keys]
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  params = stack([p for p, _ in inits])
  kasmina = stack([k for _, k in inits])
  opt_state = jax.vmap(TX.init)(params)
  x = jax.random.normal(jax.random.key(1), (members, ROWS, IN))
  y = jax.random.normal(jax.random.key(2), (members, ROWS, OUT))
  steps = 3
  for _ in range(steps):
    params, kasmina, opt_state, losses = vmapped_step(params, kasmina, opt_state, x, y)
  assert losses.shape == (members,)
  for i, (p, kas) in enumerate(inits):
    p0 = p
    s = TX.init(p)
    for _ in range(steps):
      p, kas, s, loss = jit_step(p, kas, s, x[i], y[i])
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
    member = jax.tree.map(lambda a: a[i], (params, kasmina, opt_state))
    chex.assert_trees_all_close(member, (p, kas, s), rtol=1e-4, atol=1e-5)
    # Telemetry accumulated on every pass, on its share of the rows.
    lv = knn.find_layers(kas)[PATH]
    assert (float(lv.telemetry.count)
            == steps * tel_lib.measured_rows(ROWS, lv.spec.telemetry_every))
    # The EVALUATING child is frozen; the parallel-wired TRAINING / FINE_TUNING ones learnt.
    c_new, c_old = p["hidden"]["kasmina"]["children"], p0["hidden"]["kasmina"]["children"]
    np.testing.assert_array_equal(c_new.w2[3], c_old.w2[3])
    assert np.all(np.any(np.asarray(c_new.w1u != c_old.w1u).reshape(K, -1), axis=1)[[0, 2]])


def test_vmap_over_a_batch_in_evaluation():
  params, kasmina = init_member(jax.random.key(3), MIXED_STAGE, MIXED_BLUEPRINT)
  x = jax.random.normal(jax.random.key(4), (ROWS, IN))
  variables = {"params": params, knn.KASMINA: kasmina}
  batched = MODEL.apply(variables, x, train=False)
  per_row = jax.jit(jax.vmap(lambda r: MODEL.apply(variables, r, train=False)))(x)
  np.testing.assert_allclose(per_row, batched, rtol=1e-6, atol=1e-6)
  eval_vars = {**variables, knn.KASMINA_EVAL: knn.eval_alpha_tree(
      kasmina, lambda _, v: jnp.array([1.0, 0.0, 0.5, 1.0]))}
  per_row = jax.jit(jax.vmap(lambda r: MODEL.apply(eval_vars, r)))(x)
  np.testing.assert_allclose(per_row, MODEL.apply(eval_vars, x), rtol=1e-6, atol=1e-6)


def test_training_seeds_leave_the_host_trajectory_unchanged():
  """Isolation at the update: with every seed in TRAINING (parallel and chunk wired), the host
  trains exactly as the same model without Kasmina under clip_by_global_norm + adam."""
  params, kasmina = init_member(jax.random.key(5), (Stage.TRAINING,) * K,
                                (PARALLEL, 0, PARALLEL, 2))
  host_params = dict(params)
  host_params["hidden"] = {"host": params["hidden"]["host"]}
  host_model = Net(with_kasmina=False)
  host_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))

  @jax.jit
  def host_step(p, s, x, y):
    loss_fn = lambda p: jnp.mean((host_model.apply({"params": p}, x) - y) ** 2)
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = host_tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  x = 3.0 * jax.random.normal(jax.random.key(6), (ROWS, IN))
  y = jax.random.normal(jax.random.key(7), (ROWS, OUT))
  s, hs = TX.init(params), host_tx.init(host_params)
  children0 = params["hidden"]["kasmina"]["children"]
  for _ in range(4):
    params, kasmina, s, loss = jit_step(params, kasmina, s, x, y)
    host_params, hs, host_loss = host_step(host_params, hs, x, y)
  without_children = dict(params)
  without_children["hidden"] = {"host": params["hidden"]["host"]}
  chex.assert_trees_all_close(without_children, host_params, rtol=1e-5, atol=1e-7)
  # The children did learn meanwhile (and their loss is part of `loss`).
  assert float(loss) > float(host_loss)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params["hidden"]["kasmina"]["children"],
                       children0)
  assert moved.w1u and moved.w2 and moved.w1


# ---------------------------------------------------------------- telemetry after the activation


def _dense_apply(model, params, kasmina, u):
  out, mutated = model.apply({"params": params, knn.KASMINA: kasmina}, u, train=True,
                             mutable=[knn.KASMINA])
  return out, knn.find_layers(mutated[knn.KASMINA])[("kasmina",)]


def test_kasmina_dense_telemetry_sees_dead_relus():
  """Every ReLU dead (bias -1, zero kernel): the health report reads dead_node_ratio 1."""
  u = jax.random.normal(jax.random.key(0), (ROWS, IN))
  for impl in ("reference", "pallas"):
    model = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS,
                             activation=jax.nn.relu, impl=impl)
    variables = model.init(jax.random.key(1), u, train=False)
    params = dict(variables["params"])
    params["host"] = {"kernel": jnp.zeros((IN, FEATURES)), "bias": jnp.full((FEATURES,), -1.0)}
    out, lv = _dense_apply(model, params, variables[knn.KASMINA], u)
    chex.assert_trees_all_equal(out, jnp.zeros((ROWS, FEATURES)))
    health = layer_lib.health_report(lv.spec, lv.telemetry, lv.seeds)
    np.testing.assert_allclose(health.dead_node_ratio, np.ones(K), err_msg=impl)


def test_kasmina_dense_output_is_the_kasmina_layer_over_the_activations():
  """Dormant seeds: exactly activation(Dense(u)). Live seeds: the Kasmina layer's stage rules
  applied to x = activation(Dense(u)) (a parallel child adds to the activations)."""
  u = jax.random.normal(jax.random.key(0), (ROWS, IN))
  model = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS,
                           activation=jax.nn.relu)
  variables = model.init(jax.random.key(1), u, train=False)
  params = variables["params"]
  host = params["host"]
  x = jax.nn.relu(u @ host["kernel"] + host["bias"])
  out, _ = _dense_apply(model, params, variables[knn.KASMINA], u)
  chex.assert_trees_all_close(out, x, rtol=1e-6, atol=1e-6)

  s = spec()
  children = layer_lib.germinate_children(s, layer_lib.init_children(s), jnp.ones((K,), bool),
                                          PARALLEL, jax.random.key(2))
  children = jax.tree.map(lambda p: p + 0.3, children)
  seeds = lifecycle.init_seed_state(K).replace(
      stage=jnp.full((K,), Stage.GRAFTING, jnp.int32), blueprint=jnp.full((K,), PARALLEL),
      strategy=jnp.zeros((K,), jnp.int32), alpha=jnp.full((K,), 0.5))
  kasmina = knn.map_layers(lambda v: v.replace(seeds=seeds), variables[knn.KASMINA])
  params = {**params, "kasmina": {"children": children}}
  out, _ = _dense_apply(model, params, kasmina, u)
  want, _ = layer_lib.forward(s, children, seeds, x, u=u)
  chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, x)


def test_precision_reaches_the_layer_and_bad_values_name_it():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
  for precision in ("highest", jax.lax.Precision.DEFAULT, None):
    model = knn.KasminaDense(16, 4, activation=nn.relu, precision=precision)
    variables = model.init(jax.random.PRNGKey(1), x)
    out = model.apply(variables, x, train=False)
    assert out.shape == (8, 16)
  model = knn.KasminaDense(16, 4, activation=nn.relu, precision="exact")
  with pytest.raises(ValueError, match="precision"):
    model.init(jax.random.PRNGKey(1), x)
  with pytest.raises(ValueError, match="precision"):
    knx.KasminaLayer(16, 4, precision="fast")
