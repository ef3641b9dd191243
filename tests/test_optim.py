"""kasmina_jax.optim: stage masking, moment freezing, resets and per-partition clipping."""

import functools

import chex
import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kasmina_jax import blueprints as bp
from kasmina_jax import lifecycle
from kasmina_jax import nn as knn
from kasmina_jax import optim
from kasmina_jax.lifecycle import Stage

K = len(Stage)  # one seed per stage
FEATURES = 2 * K
IN = 5
LEARNING = lifecycle.learning_stages()  # the default fossil mode, "integrated"
BLUEPRINTS = bp.default_blueprints(parallel_hidden=3)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    h = knn.KasminaDense(features=FEATURES, num_seeds=K, blueprints=BLUEPRINTS,
                         activation=jax.nn.relu, name="hidden")(x, train=train)
    return nn.Dense(3, name="out")(h)


@functools.cache
def _init_variables():
  return jax.jit(Net().init)(jax.random.key(0), jnp.ones((4, IN)))


@pytest.fixture(scope="module")
def variables():
  return _init_variables()


def with_stages(kasmina, stage, nonfinite=None):
  stage = jnp.asarray(stage, jnp.int32)

  def set_seeds(v):
    seeds = v.seeds.replace(stage=stage, blueprint=jnp.zeros_like(stage),
                            strategy=jnp.zeros_like(stage))
    if nonfinite is not None:
      seeds = seeds.replace(nonfinite=jnp.asarray(nonfinite))
    return v.replace(seeds=seeds)

  return knn.map_layers(set_seeds, kasmina)


def random_like(tree, key, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def children_of(tree):
  return tree["hidden"]["kasmina"]["children"]


def host_of(tree):
  return {"hidden_host": tree["hidden"]["host"], "out": tree["out"]}


def child_state_leaves(state):
  """Every leaf of an optimizer state that lies under a 'children' key (seed-aligned)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if any(getattr(p, "key", None) == "children" for p in path):
      out.append((jax.tree_util.keystr(path), leaf))
  return out


def host_state_leaves(state):
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not any(getattr(p, "key", None) == "children" for p in path):
      out.append((jax.tree_util.keystr(path), leaf))
  return out


INNERS = {  # one instance each, so that their jitted steps are compiled once
    "adam": optax.adam(1e-2),
    "sgd_momentum": optax.sgd(1e-2, momentum=0.9),
    "adamw": optax.adamw(1e-2, weight_decay=0.1),
    "chain_rms_trace": optax.chain(optax.scale_by_rms(), optax.trace(0.9), optax.scale(-1e-2)),
    "inject_hyperparams_adam": optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
}


@functools.cache
def kasmina_tx(name, max_grad_norm=None):
  return optim.kasmina_optimizer(INNERS[name], max_grad_norm=max_grad_norm)


@functools.cache
def make_step(tx):
  @jax.jit
  def step(params, opt_state, grads, kasmina):
    mask = optim.learning_mask(params, kasmina)
    updates, opt_state = tx.update(grads, opt_state, params, learn_mask=mask)
    return optax.apply_updates(params, updates), opt_state, updates
  return step


# ------------------------------------------------------------------------------ the mask


@pytest.mark.parametrize("fossil", lifecycle.FOSSIL_MODES)
def test_learning_mask_shapes_and_values(variables, fossil):
  params = variables["params"]
  nonfinite = np.zeros(K, bool)
  nonfinite[Stage.FINE_TUNING] = True
  kas = with_stages(variables["kasmina"], np.arange(K), nonfinite)
  mask = optim.learning_mask(params, kas, fossil=fossil)
  chex.assert_trees_all_equal_structs(mask, params)
  for leaf in jax.tree.leaves(host_of(mask)):
    assert leaf.shape == () and leaf.dtype == jnp.bool_ and bool(leaf)
  children = children_of(params)
  for m, p in zip(jax.tree.leaves(children_of(mask)), jax.tree.leaves(children)):
    assert m.shape == (K,) + (1,) * (p.ndim - 1) and m.dtype == jnp.bool_
    learns = (Stage.TRAINING, Stage.GRAFTING) + (
        (Stage.FOSSILIZED,) if fossil == "integrated" else ())
    expected = np.array([s in learns for s in Stage])
    np.testing.assert_array_equal(np.asarray(m).reshape(K), expected)


def test_learning_mask_errors(variables):
  params = variables["params"]
  with pytest.raises(ValueError, match="no seed state for the layer"):
    optim.learning_mask({"other": params["hidden"]}, variables["kasmina"])
  tx = optim.stage_masked(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(TypeError, match="learn_mask"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="learn_mask"):
    tx.update(params, state, params, learn_mask={"hidden": True})
  with pytest.raises(ValueError, match="max_norm"):
    optim.clip_by_partition_norm(0.0)
  with pytest.raises(TypeError, match="inner"):
    optim.kasmina_optimizer("adam")


def test_learn_mask_may_give_one_flag_per_seed(variables):
  """A hand-made mask may give the children one (K,) flag instead of one per leaf."""
  params = variables["params"]
  tx = kasmina_tx("adam", 1.0)
  grads = random_like(params, jax.random.key(4))
  kas = with_stages(variables["kasmina"], np.arange(K))
  full = optim.learning_mask(params, kas)
  flags = jax.tree.map(lambda x: x, full)
  flags["hidden"] = dict(full["hidden"])
  flags["hidden"]["kasmina"] = {"children": children_of(full).w1.reshape(K)}
  u_full, _ = tx.update(grads, tx.init(params), params, learn_mask=full)
  u_flags, _ = tx.update(grads, tx.init(params), params, learn_mask=flags)
  chex.assert_trees_all_equal(u_full, u_flags)


def test_reset_mask(variables):
  params = variables["params"]
  old = np.array([Stage.DORMANT, Stage.TRAINING, Stage.GRAFTING, Stage.CANCELLED,
                  Stage.FINE_TUNING, Stage.EVALUATING, Stage.CULLED, Stage.GERMINATED,
                  Stage.STABILIZATION, Stage.TRAINING, Stage.FOSSILIZED])
  new = np.array([Stage.GERMINATED, Stage.CULLED, Stage.GRAFTING, Stage.DORMANT,
                  Stage.ROLLED_BACK, Stage.FINE_TUNING, Stage.DORMANT, Stage.TRAINING,
                  Stage.EVALUATING, Stage.TRAINING, Stage.FOSSILIZED])
  mask = optim.reset_mask(params, with_stages(variables["kasmina"], old),
                          with_stages(variables["kasmina"], new))
  chex.assert_trees_all_equal_structs(mask, params)
  assert not any(bool(m) for m in jax.tree.leaves(host_of(mask)))
  expected = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0], bool)
  for m in jax.tree.leaves(children_of(mask)):
    np.testing.assert_array_equal(np.asarray(m).reshape(K), expected)


# ------------------------------------------------------------------ frozen: no update, no drift


@pytest.mark.parametrize("name", sorted(INNERS))
def test_frozen_children_get_zero_updates_and_keep_their_moments(variables, name):
  params0 = variables["params"]
  tx = kasmina_tx(name)
  step = make_step(tx)
  opt_state = tx.init(params0)
  # Two steps with every seed learning, so that every seed's moments are non-zero ...
  all_learning = with_stages(variables["kasmina"], np.full(K, Stage.TRAINING))
  params = params0
  for i in range(2):
    params, opt_state, _ = step(params, opt_state, random_like(params, jax.random.key(i)),
                                all_learning)
  # ... then each seed in its own stage for several steps.
  kas = with_stages(variables["kasmina"], np.arange(K))
  learning = np.array([s in LEARNING for s in Stage])
  frozen_params, frozen_state = params, opt_state
  for i in range(3):
    params, opt_state, updates = step(params, opt_state,
                                      random_like(params, jax.random.key(10 + i)), kas)
    for u in jax.tree.leaves(children_of(updates)):
      assert np.all(np.asarray(u)[~learning] == 0.0)
  for p_new, p_old in zip(jax.tree.leaves(children_of(params)),
                          jax.tree.leaves(children_of(frozen_params))):
    np.testing.assert_array_equal(np.asarray(p_new)[~learning], np.asarray(p_old)[~learning])
    assert np.all(np.any(np.asarray(p_new != p_old).reshape(K, -1), axis=1)[learning]
                  | (np.asarray(p_new).reshape(K, -1).shape[1] == 0))
  new_leaves, old_leaves = child_state_leaves(opt_state), child_state_leaves(frozen_state)
  assert new_leaves, "the optimizer state holds no seed-aligned leaves"
  for (path, s_new), (_, s_old) in zip(new_leaves, old_leaves):
    s_new, s_old = np.asarray(s_new), np.asarray(s_old)
    np.testing.assert_array_equal(s_new[~learning], s_old[~learning], err_msg=path)
    if s_new.reshape(K, -1).shape[1]:
      assert np.all(np.any((s_new != s_old).reshape(K, -1), axis=1)[learning]), path
  # The host learns throughout.
  for h_new, h_old in zip(jax.tree.leaves(host_of(params)),
                          jax.tree.leaves(host_of(frozen_params))):
    assert np.any(np.asarray(h_new) != np.asarray(h_old))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(list(Stage)), min_size=K, max_size=K),
                  st.lists(st.booleans(), min_size=K, max_size=K))
def test_updates_are_zero_exactly_where_not_learning(stages, nonfinite):
  variables = _init_variables()
  params = variables["params"]
  kas = with_stages(variables["kasmina"], np.array(stages), np.array(nonfinite))
  _, _, updates = _HYP_STEP(params, _HYP_TX.init(params), random_like(params, jax.random.key(3)),
                            kas)
  learns = np.array([s in LEARNING for s in stages]) & ~np.array(nonfinite)
  for u in jax.tree.leaves(children_of(updates)):
    u = np.asarray(u).reshape(K, -1)
    assert np.all(u[~learns] == 0.0)
    if u.shape[1]:
      assert np.all(np.any(u[learns] != 0.0, axis=1))


_HYP_TX = kasmina_tx("adam", 1.0)
_HYP_STEP = make_step(_HYP_TX)


# ------------------------------------------------------------------------------- resets


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "inject_hyperparams_adam"])
def test_regermination_resets_moments_of_exactly_those_seeds(variables, name):
  params = variables["params"]
  tx = kasmina_tx(name, 1.0)
  step = make_step(tx)
  opt_state = tx.init(params)
  old = np.full(K, Stage.TRAINING)
  old[3] = Stage.FINE_TUNING
  old[4] = Stage.CULLED
  kas_old = with_stages(variables["kasmina"], old)
  for i in range(2):
    params, opt_state, _ = step(params, opt_state, random_like(params, jax.random.key(i)),
                                with_stages(variables["kasmina"], np.full(K, Stage.TRAINING)))
  new = old.copy()
  new[1] = Stage.CANCELLED  # discarded
  new[3] = Stage.CULLED  # discarded
  new[4] = Stage.DORMANT  # embargo over
  kas_mid = with_stages(variables["kasmina"], new)
  regerm = new.copy()
  regerm[4] = Stage.GERMINATED  # a new child in a reused slot
  reset1 = optim.reset_mask(params, kas_old, kas_mid)
  reset2 = optim.reset_mask(params, kas_mid, with_stages(variables["kasmina"], regerm))
  state1 = jax.jit(optim.reset_children)(opt_state, params, reset1)
  state2 = optim.reset_children(state1, params, reset2)
  changed = np.zeros(K, bool)
  changed[[1, 3, 4]] = True
  for (path, s_new), (_, s_old) in zip(child_state_leaves(state2), child_state_leaves(opt_state)):
    s_new, s_old = np.asarray(s_new), np.asarray(s_old)
    assert np.all(s_new[changed] == 0.0), path
    np.testing.assert_array_equal(s_new[~changed], s_old[~changed], err_msg=path)
  for (path, s_new), (_, s_old) in zip(host_state_leaves(state2), host_state_leaves(opt_state)):
    np.testing.assert_array_equal(np.asarray(s_new), np.asarray(s_old), err_msg=path)


# ----------------------------------------------------------------------- partition clipping


def test_partition_norms(variables):
  grads = random_like(variables["params"], jax.random.key(5))
  host_norm, child_norms = optim.partition_norms(grads)
  expected_host = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                              for x in jax.tree.leaves(host_of(grads))))
  np.testing.assert_allclose(float(host_norm), expected_host, rtol=1e-5)
  assert set(child_norms) == {("hidden", "kasmina")}
  per_seed = np.sqrt(sum(np.sum(np.asarray(x, np.float64).reshape(K, -1) ** 2, axis=1)
                         for x in jax.tree.leaves(children_of(grads))))
  np.testing.assert_allclose(np.asarray(child_norms[("hidden", "kasmina")]), per_seed, rtol=1e-5)
  # Layer paths match the seed state's (nn.find_layers) paths.
  assert set(child_norms) == set(knn.find_layers(variables["kasmina"]))


def test_huge_child_gradient_leaves_host_update_identical(variables):
  params = variables["params"]
  grads = random_like(params, jax.random.key(7), scale=10.0)  # host norm well above 1
  huge = jax.tree.map(lambda g: 1e6 * g, children_of(grads))
  zero = jax.tree.map(jnp.zeros_like, children_of(grads))

  def with_children(children):
    g = jax.tree.map(lambda x: x, grads)
    g["hidden"] = dict(g["hidden"])
    g["hidden"]["kasmina"] = {"children": children}
    return g

  clip = optim.clip_by_partition_norm(1.0)
  out_huge, _ = jax.jit(clip.update)(with_children(huge), clip.init(params))
  out_zero, _ = jax.jit(clip.update)(with_children(zero), clip.init(params))
  chex.assert_trees_all_equal(host_of(out_huge), host_of(out_zero))
  # ... and equals optax's global-norm clipping of the host alone.
  host_only, _ = optax.clip_by_global_norm(1.0).update(host_of(grads), optax.EmptyState())
  chex.assert_trees_all_close(host_of(out_huge), host_only, rtol=1e-6, atol=0)
  # Each seed's child is clipped by its own norm.
  _, norms = optim.partition_norms(out_huge)
  np.testing.assert_allclose(np.asarray(norms[("hidden", "kasmina")]), 1.0, rtol=1e-5)
  small = jax.tree.map(lambda g: 1e-3 * g, children_of(grads))
  out_small, _ = clip.update(with_children(small), clip.init(params))
  chex.assert_trees_all_equal(children_of(out_small), small)

  # Through the whole optimizer: the host's update does not see the child's gradient.
  tx = kasmina_tx("adam", 1.0)
  kas = with_stages(variables["kasmina"], np.full(K, Stage.TRAINING))
  step = make_step(tx)
  _, _, u_huge = step(params, tx.init(params), with_children(huge), kas)
  _, _, u_zero = step(params, tx.init(params), with_children(zero), kas)
  chex.assert_trees_all_equal(host_of(u_huge), host_of(u_zero))


def test_nonfinite_child_gradient_is_zeroed_and_contained(variables):
  params = variables["params"]
  tx = kasmina_tx("adam", 1.0)
  step = make_step(tx)
  kas = with_stages(variables["kasmina"], np.full(K, Stage.TRAINING))
  state = tx.init(params)
  params, state, _ = step(params, state, random_like(params, jax.random.key(0)), kas)
  grads = random_like(params, jax.random.key(1))
  children = children_of(grads)
  bad = children.replace(w1=children.w1.at[2, 0, 0].set(jnp.nan),
                         b2=children.b2.at[5, 0].set(jnp.inf))
  grads_bad = jax.tree.map(lambda x: x, grads)
  grads_bad["hidden"] = dict(grads["hidden"])
  grads_bad["hidden"]["kasmina"] = {"children": bad}
  p_bad, s_bad, u_bad = step(params, state, grads_bad, kas)
  p_ok, s_ok, u_ok = step(params, state, grads, kas)
  for leaf in jax.tree.leaves((p_bad, s_bad, u_bad)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  hit = np.zeros(K, bool)
  hit[[2, 5]] = True
  for u in jax.tree.leaves(children_of(u_bad)):
    assert np.all(np.asarray(u)[hit] == 0.0)
  for (path, s_new), (_, s_old) in zip(child_state_leaves(s_bad), child_state_leaves(state)):
    np.testing.assert_array_equal(np.asarray(s_new)[hit], np.asarray(s_old)[hit], err_msg=path)
  # The host and the other seeds update as if nothing had happened.
  chex.assert_trees_all_equal(host_of(u_bad), host_of(u_ok))
  for a, b in zip(jax.tree.leaves(children_of(u_bad)), jax.tree.leaves(children_of(u_ok))):
    np.testing.assert_array_equal(np.asarray(a)[~hit], np.asarray(b)[~hit])


# -------------------------------------------------------- a real train step on the Linen layer


def test_linen_train_step_freezes_children_exactly(variables):
  """Real forward/backward: a FOSSILIZED and an EVALUATING child stay bit-for-bit the same
  over several jitted steps while TRAINING / FINE_TUNING children and the host learn."""
  model = Net()
  key = jax.random.key(2)
  params = variables["params"]
  spec = knn.find_layers(variables["kasmina"])[("hidden", "kasmina")].spec
  blueprint = np.array([0, 1, 2, 3, 4, 5, 0, 1, 5, 5, 0])  # includes parallel-wired (5)
  children = bp.germinate_children(spec.catalog, children_of(params), jnp.ones(K, bool),
                                   jnp.asarray(blueprint), key, jnp.asarray(spec.node_mask))
  children = jax.tree.map(lambda c: c + 0.1 * jax.random.normal(key, c.shape), children)
  params = jax.tree.map(lambda x: x, params)
  params["hidden"] = dict(params["hidden"])
  params["hidden"]["kasmina"] = {"children": children}
  stage = np.array([Stage.TRAINING, Stage.FINE_TUNING, Stage.GRAFTING, Stage.FOSSILIZED,
                    Stage.EVALUATING, Stage.TRAINING, Stage.FINE_TUNING, Stage.STABILIZATION,
                    Stage.GRAFTING, Stage.FOSSILIZED, Stage.DORMANT])
  kas = knn.map_layers(lambda v: v.replace(seeds=v.seeds.replace(
      stage=jnp.asarray(stage), blueprint=jnp.asarray(blueprint), strategy=jnp.zeros(K, jnp.int32),
      alpha=jnp.where(jnp.asarray(stage) == Stage.GRAFTING, 0.5,
                      (jnp.asarray(stage) >= Stage.STABILIZATION).astype(jnp.float32)))),
      variables["kasmina"])
  tx = optim.kasmina_optimizer(optax.adam(1e-2), max_grad_norm=1.0)

  @jax.jit
  def train_step(params, kas, opt_state, x, y):
    def loss_fn(p):
      out, mut = model.apply({"params": p, "kasmina": kas}, x,
                             mutable=[knn.KASMINA, knn.KASMINA_AUX])
      aux = jax.tree.leaves(mut[knn.KASMINA_AUX], is_leaf=lambda s: isinstance(s, knn.StepSummary))
      return jnp.mean((out - y) ** 2) + sum(s.child_loss for s in aux), mut[knn.KASMINA]
    (loss, new_kas), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   learn_mask=optim.learning_mask(params, kas))
    return optax.apply_updates(params, updates), new_kas, opt_state, loss

  x = jax.random.normal(jax.random.key(3), (32, IN))
  y = jax.random.normal(jax.random.key(4), (32, 3))
  opt_state = tx.init(params)
  p = params
  for _ in range(4):
    p, kas, opt_state, loss = train_step(p, kas, opt_state, x, y)
    assert np.isfinite(float(loss))
  learning = np.isin(stage, LEARNING)
  moved = np.zeros(K, bool)
  for new, old in zip(jax.tree.leaves(children_of(p)), jax.tree.leaves(children_of(params))):
    new, old = np.asarray(new).reshape(K, -1), np.asarray(old).reshape(K, -1)
    np.testing.assert_array_equal(new[~learning], old[~learning])
    moved |= np.any(new != old, axis=1)
  np.testing.assert_array_equal(moved, learning)
  for (path, s), _ in zip(child_state_leaves(opt_state), range(100)):
    if "count" not in path:
      assert np.all(np.asarray(s)[~learning] == 0.0), path


# ----------------------------------------------------------------------- fossil modes


def test_fossil_mode_is_checked(variables):
  with pytest.raises(ValueError, match="fossil"):
    optim.learning_mask(variables["params"], variables["kasmina"], fossil="melted")
  with pytest.raises(ValueError, match="fossil"):
    lifecycle.LifecycleConfig(fossil="melted")


@pytest.mark.parametrize("fossil", lifecycle.FOSSIL_MODES)
def test_fossil_child_updates_follow_the_mode(variables, fossil):
  params = variables["params"]
  kas = with_stages(variables["kasmina"], np.full(K, Stage.FOSSILIZED))
  grads = random_like(params, jax.random.key(3))
  tx = kasmina_tx("adam", None)
  mask = optim.learning_mask(params, kas, fossil=fossil)
  updates, _ = tx.update(grads, tx.init(params), params, learn_mask=mask)
  child = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(children_of(updates))])
  if fossil == "integrated":
    assert np.count_nonzero(child) > 0  # fossils keep training with the host
  else:
    assert np.count_nonzero(child) == 0  # frozen forever


@pytest.mark.parametrize("fossil", lifecycle.FOSSIL_MODES)
def test_integrated_fossils_clip_with_the_host(variables, fossil):
  params = variables["params"]
  stage = np.full(K, Stage.TRAINING)
  stage[:3] = Stage.FOSSILIZED
  kas = with_stages(variables["kasmina"], stage)
  grads = random_like(params, jax.random.key(9), scale=10.0)
  part = optim.host_partition_mask(params, kas, fossil=fossil)
  host_norm, child_norms = optim.partition_norms(grads, part)
  host_sq = sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                for x in jax.tree.leaves(host_of(grads)))
  per_seed = np.asarray(child_norms[("hidden", "kasmina")], np.float64)
  fossil_sq = float(np.sum(per_seed[:3] ** 2)) if fossil == "integrated" else 0.0
  np.testing.assert_allclose(float(host_norm), np.sqrt(host_sq + fossil_sq), rtol=1e-5)
  clip = optim.clip_by_partition_norm(1.0)
  out, _ = jax.jit(clip.update)(grads, clip.init(params), host_partition=part)
  _, out_norms = optim.partition_norms(out)
  out_norms = np.asarray(out_norms[("hidden", "kasmina")])
  # Non-fossil children: each clipped to norm 1 by its own norm.
  np.testing.assert_allclose(out_norms[3:], 1.0, rtol=1e-5)
  if fossil == "integrated":
    # Fossils share the host's scale factor 1 / host_norm.
    np.testing.assert_allclose(out_norms[:3], per_seed[:3] / float(host_norm), rtol=1e-5)
  else:
    np.testing.assert_allclose(out_norms[:3], 1.0, rtol=1e-5)
