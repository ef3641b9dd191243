"""Sequence-aware children (`kasmina_jax.sequence`): attention heads beside a host attention
and whole blocks on the residual stream, through the public layer API, the Linen shells,
`transformer.GrowableLM`, the loop and `export`.

The stage rules are those of every residual / parallel child; what is new is that a child
mixes tokens. The tests check function preservation at germination, causality in every
stage, isolation in TRAINING, the gradient through GRAFTING, the non-finite fallback, the
value of a head against a hand-written head, and export parity.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasmina_jax import export, layer, lifecycle, optim, sequence, training, transformer
from kasmina_jax import linen as knn
from kasmina_jax.lifecycle import Stage

K, T, D, DIN = 3, 6, 8, 8
HEADS = layer.make_spec(D, K, sequence.head_blueprints(head_dim=4, heads=(1, 2)), input_dim=DIN)
BLOCKS = layer.make_spec(D, K, sequence.block_blueprints(heads=2, head_dim=4, mlp_hidden=8))
SPECS = {"heads": HEADS, "blocks": BLOCKS}
LIVE = (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
        Stage.FINE_TUNING, Stage.FOSSILIZED)
HP = jax.lax.Precision.HIGHEST


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _seeds(stage, alpha=0.5, blueprint=None, k=K):
  stage = jnp.broadcast_to(jnp.asarray(stage, jnp.int32), (k,))
  b = jnp.arange(k) % 2 if blueprint is None else jnp.broadcast_to(jnp.asarray(blueprint), (k,))
  return lifecycle.init_seed_state(k).replace(
      stage=stage, alpha=jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (k,)),
      blueprint=b.astype(jnp.int32))


def _children(spec, seeds, key=0, perturb=0.0):
  params = layer.germinate_children(spec, layer.init_children(spec), True, seeds.blueprint,
                                    jax.random.key(key))
  if perturb:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key + 1), len(leaves))
    leaves = [p + perturb * jax.random.normal(k_, p.shape) for p, k_ in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
  return params


def _inputs(key=2, batch=2):
  kx, ku = jax.random.split(jax.random.key(key))
  return jax.random.normal(kx, (batch, T, D)), jax.random.normal(ku, (batch, T, DIN))


def _fwd(spec, params, seeds, x, u, **kw):
  return layer.forward(spec, params, seeds, x, u=u if spec is HEADS else None, **kw)


# ------------------------------------------------------------------------------ blueprints


def test_blueprint_errors_name_the_field():
  with pytest.raises(ValueError, match="site"):
    sequence.SequenceBlueprint("x", site="tokens")
  with pytest.raises(ValueError, match="heads child"):
    sequence.SequenceBlueprint("x", site="heads", heads=0)
  with pytest.raises(ValueError, match="block needs"):
    sequence.SequenceBlueprint("x", site="block", heads=0, mlp_hidden=0)
  with pytest.raises(ValueError, match="activation"):
    sequence.SequenceBlueprint("x", site="block", mlp_hidden=4, activation="swish")
  with pytest.raises(ValueError, match="one site"):
    layer.make_spec(D, 2, sequence.head_blueprints() + sequence.block_blueprints(),
                    input_dim=D)
  with pytest.raises(TypeError, match="not both"):
    layer.make_spec(D, 2, sequence.head_blueprints() + (layer.bp_lib.default_blueprints()[0],))
  with pytest.raises(ValueError, match="input_dim"):
    layer.make_spec(D, 2, sequence.head_blueprints())


def test_inputs_without_a_token_axis_are_refused():
  seeds = _seeds(Stage.DORMANT)
  with pytest.raises(ValueError, match="token axis"):
    layer.forward(BLOCKS, layer.init_children(BLOCKS), seeds, jnp.zeros((D,)))
  with pytest.raises(ValueError, match="u"):
    layer.forward(HEADS, layer.init_children(HEADS), seeds, jnp.zeros((2, T, D)))


def test_costs_count_parameters_and_per_token_flops():
  bp = sequence.SequenceBlueprint("h", site="heads", heads=2, head_dim=4)
  params, flops = bp.cost(8, 8)
  assert params == 3 * 8 * 8 + 8 * 8
  assert flops == 2 * params
  assert bp.cost(8, 8, context=16)[1] == 2 * params + 4 * 16 * 8
  cat = HEADS.catalog
  assert tuple(cat.param_count) == tuple(b.cost(D, DIN)[0] for b in cat.blueprints)


# ------------------------------------------------------------------- preservation, causality


def _jitted(spec, train: bool):
  def run(params, seeds, x, u):
    if train:
      out, aux = _fwd(spec, params, seeds, x, u, telemetry=layer.init_telemetry(spec))
    else:
      out, aux = _fwd(spec, params, seeds, x, u, eval_alpha=jnp.full((K,), 0.7))
    return out, aux.nonfinite
  return jax.jit(run)


_RUN = {(name, train): _jitted(spec, train) for name, spec in SPECS.items()
        for train in (True, False)}
stage_lists = st.lists(st.sampled_from(list(Stage)), min_size=K, max_size=K)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stages=stage_lists, alpha=st.floats(0.0, 1.0), site=st.sampled_from(sorted(SPECS)),
       train=st.booleans())
def test_germination_preserves_the_function_in_every_stage(stages, alpha, site, train):
  spec = SPECS[site]
  seeds = _seeds([int(s) for s in stages], alpha)
  x, u = _inputs()
  out, nonfinite = _RUN[site, train](_children(spec, seeds), seeds, x, u)
  chex.assert_trees_all_close(out, x, atol=0, rtol=0)
  assert not np.any(nonfinite)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stages=stage_lists, alpha=st.floats(0.0, 1.0), site=st.sampled_from(sorted(SPECS)),
       train=st.booleans(), cut=st.integers(1, T - 1))
def test_a_future_token_never_changes_an_earlier_output(stages, alpha, site, train, cut):
  spec = SPECS[site]
  seeds = _seeds([int(s) for s in stages], alpha)
  params = _children(spec, seeds, perturb=0.5)
  x, u = _inputs()
  bump = jax.random.normal(jax.random.key(9), x.shape) * 3.0
  later = jnp.arange(T)[None, :, None] >= cut
  out1, _ = _RUN[site, train](params, seeds, x, u)
  out2, _ = _RUN[site, train](params, seeds, jnp.where(later, x + bump, x),
                              jnp.where(later, u + bump, u))
  chex.assert_trees_all_close(out1[:, :cut], out2[:, :cut], atol=1e-6, rtol=1e-6)


def test_children_do_mix_tokens():
  """The point of these children: a later output depends on earlier inputs through them."""
  for spec in SPECS.values():
    seeds = _seeds(Stage.FOSSILIZED)
    params = _children(spec, seeds, perturb=0.5)
    x, u = _inputs()
    f = lambda x_, u_: _fwd(spec, params, seeds, x_, u_)[0][:, -1]
    jx, ju = jax.jacobian(f, argnums=(0, 1))(x, u)
    src = ju if spec is HEADS else jx  # (B, D, B, T, Din): dependence on the first token
    assert float(jnp.max(jnp.abs(src[:, :, :, 0]))) > 1e-3


# ---------------------------------------------------------------------- stage semantics


def _hand_heads(params, k, b, u):
  """One seed's head child written out in numpy from its definition."""
  h, e = (1, 4) if b == 0 else (2, 4)
  p = jax.tree.map(np.asarray, params)
  out = np.zeros(u.shape[:-1] + (D,), np.float64)
  for head in range(h):
    q = u @ p.wq[k][:, head, :e]
    kk = u @ p.wk[k][:, head, :e]
    v = u @ p.wv[k][:, head, :e]
    s = q @ np.swapaxes(kk, -1, -2) / np.sqrt(e)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out += (w @ v) @ p.wo[k][head, :e]
  return out


def test_head_children_match_a_hand_written_attention():
  seeds = _seeds([Stage.FOSSILIZED, Stage.GRAFTING, Stage.DORMANT], alpha=0.25)
  params = _children(HEADS, seeds, perturb=0.3)
  x, u = _inputs()
  out, _ = layer.forward(HEADS, params, seeds, x, u=u, precision=HP)
  u64 = np.asarray(u, np.float64)
  want = (np.asarray(x, np.float64) + _hand_heads(params, 0, 0, u64)
          + 0.25 * _hand_heads(params, 1, 1, u64))
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)


def _host_grads(spec, params, seeds, x, u):
  w = jax.random.normal(jax.random.key(5), x.shape)

  def loss(x_, u_):
    out, aux = _fwd(spec, params, seeds, x_, u_)
    return jnp.sum(out * w) + aux.child_loss

  return jax.grad(loss, argnums=(0, 1))(x, u), w


@pytest.mark.parametrize("site", sorted(SPECS))
def test_training_is_isolated_from_the_host(site):
  spec = SPECS[site]
  seeds = _seeds(Stage.TRAINING)
  params = _children(spec, seeds, perturb=0.5)
  x, u = _inputs()
  out, aux = _fwd(spec, params, seeds, x, u)
  chex.assert_trees_all_close(out, x, atol=1e-6)  # the value is x
  (gx, gu), w = _host_grads(spec, params, seeds, x, u)
  chex.assert_trees_all_close(gx, w, atol=1e-6)  # identity: nothing through the child
  chex.assert_trees_all_close(gu, jnp.zeros_like(u), atol=0)
  # ... while the child learns <dL/dout, f> + lambda mean ||f||^2
  gp = jax.grad(lambda p: jnp.sum(_fwd(spec, p, seeds, x, u)[0] * w)
                + _fwd(spec, p, seeds, x, u)[1].child_loss)(params)
  assert float(jnp.min(jnp.sqrt(jnp.sum(gp.wo.reshape(K, -1) ** 2, -1)
                                + jnp.sum(gp.w_out.reshape(K, -1) ** 2, -1)))) > 0
  assert float(aux.child_loss) > 0


@pytest.mark.parametrize("site", sorted(SPECS))
def test_grafting_keeps_the_identity_gradient_and_joins_stabilization(site):
  spec = SPECS[site]
  x, u = _inputs()
  graft = _seeds(Stage.GRAFTING, alpha=1.0)
  params = _children(spec, graft, perturb=0.5)
  stab = graft.replace(stage=jnp.full((K,), Stage.STABILIZATION, jnp.int32))
  out_g, _ = _fwd(spec, params, graft, x, u)
  out_s, _ = _fwd(spec, params, stab, x, u)
  chex.assert_trees_all_close(out_g, out_s, atol=1e-6)  # the ramp ends where it continues
  (gx, gu), w = _host_grads(spec, params, graft, x, u)
  chex.assert_trees_all_close(gx, w, atol=1e-6)  # the host's gradient is the identity's
  chex.assert_trees_all_close(gu, jnp.zeros_like(u), atol=0)
  (sx, su), _ = _host_grads(spec, params, stab, x, u)
  moved = su if site == "heads" else sx - w
  assert float(jnp.max(jnp.abs(moved))) > 1e-3  # from STABILIZATION on: through the child
  # at alpha the value is x + alpha f
  half = graft.replace(alpha=jnp.full((K,), 0.3))
  out_h, _ = _fwd(spec, params, half, x, u)
  chex.assert_trees_all_close(out_h - x, 0.3 * (out_s - x), atol=1e-6)


def test_a_non_finite_child_contributes_identity_and_no_nan_gradient():
  seeds = _seeds(Stage.FINE_TUNING, blueprint=0)
  params = _children(BLOCKS, seeds, perturb=0.5)
  params = params.replace(wo=params.wo.at[0].set(jnp.nan))
  x, _ = _inputs()
  out, aux = layer.forward(BLOCKS, params, seeds, x, telemetry=layer.init_telemetry(BLOCKS))
  assert list(np.asarray(aux.nonfinite)) == [True, False, False]
  assert bool(aux.telemetry.nonfinite[0])
  clean = _seeds([Stage.DORMANT, Stage.FINE_TUNING, Stage.FINE_TUNING], blueprint=0)
  want, _ = layer.forward(BLOCKS, params, clean, x)
  chex.assert_trees_all_close(out, want, atol=1e-6)
  grads = jax.grad(lambda p, x_: jnp.sum(layer.forward(BLOCKS, p, seeds, x_)[0] ** 2),
                   argnums=(0, 1))(params, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_whole_objective_is_the_linear_term_plus_the_penalty():
  """Euler's identity over the last layers gives <dL/dout, f> for sequence children too."""
  seeds = _seeds(Stage.FINE_TUNING)
  params = _children(BLOCKS, seeds, perturb=0.5)
  x, _ = _inputs()
  w = jax.random.normal(jax.random.key(3), x.shape)
  grads = jax.grad(lambda p: jnp.sum(layer.forward(BLOCKS, p, seeds, x)[0] * w))(params)
  out, aux = layer.forward(BLOCKS, params, seeds, x)
  got = layer.whole_objective(BLOCKS, params, grads, seeds, aux.objective, aux.nonfinite)
  f_each = jax.vmap(lambda k: layer.forward(
      BLOCKS, params, seeds.replace(stage=jnp.where(jnp.arange(K) == k, Stage.FINE_TUNING,
                                                    Stage.DORMANT)), x)[0] - x)(jnp.arange(K))
  linear = jnp.sum(f_each * w[None], axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), np.asarray(linear + aux.objective), rtol=1e-4,
                             atol=1e-4)


# --------------------------------------------------------------------- the model and loop


V = 11


@functools.lru_cache(maxsize=None)
def _lm():
  return transformer.GrowableLM(V, 16, T, layers=2, heads=2, head_seeds=2, block_seeds=2,
                                mlp_seeds=2)


@functools.lru_cache(maxsize=None)
def _small_lm():
  return transformer.GrowableLM(V, 8, T, layers=1, heads=2, head_seeds=2, block_seeds=2,
                                mlp_seeds=2)


def _state_with(stages_of, perturb=0.3, seed=1, model=None):
  """A `GrowableLM` train state whose every layer holds children in `stages_of(i, k)`."""
  model = model or _lm()
  tok = jax.random.randint(jax.random.key(0), (2, T), 0, V)
  state = training.create_train_state(model, optax.adam(1e-3), tok, jax.random.key(seed))
  params, kas = state.params, state.kasmina
  for i, (path, lv) in enumerate(knn.find_layers(kas).items()):
    k, nb = lv.spec.num_seeds, lv.spec.num_blueprints
    b = jnp.arange(k, dtype=jnp.int32) % nb
    cp = knn.children_path(path)
    ch = layer.germinate_children(lv.spec, knn.get_path(params, cp), True, b,
                                  jax.random.key(10 + i))
    if perturb:
      ch = jax.tree.map(lambda a: a + perturb * jax.random.normal(jax.random.key(20 + i),
                                                                  a.shape), ch)
    params = knn.set_path(params, cp, ch)
    seeds = lv.seeds.replace(stage=jnp.asarray([stages_of(i, j) for j in range(k)], jnp.int32),
                             alpha=jnp.full((k,), 0.4), blueprint=b)
    kas = knn.set_path(kas, path + ("state",), lv.replace(seeds=seeds))
  return state.replace(params=params, kasmina=kas)


MIXED = [Stage.FOSSILIZED, Stage.GRAFTING, Stage.TRAINING, Stage.DORMANT, Stage.STABILIZATION,
         Stage.FINE_TUNING, Stage.CULLED, Stage.EVALUATING]


def test_growable_lm_is_causal_with_children_in_every_stage():
  state = _state_with(lambda i, j: MIXED[(2 * i + j) % len(MIXED)])
  tok = jax.random.randint(jax.random.key(4), (2, T), 0, V)
  tok2 = tok.at[:, 3:].set((tok[:, 3:] + 5) % V)
  variables = {"params": state.params, knn.KASMINA: state.kasmina}
  for train in (False, True):
    run = lambda t: _lm().apply(variables, t, train=train, mutable=[knn.KASMINA])[0]
    a, b = run(tok), run(tok2)
    chex.assert_trees_all_close(a[:, :3], b[:, :3], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 3:] - b[:, 3:]))) > 1e-4


def test_export_folds_heads_blocks_and_width_into_a_plain_transformer():
  state = _state_with(lambda i, j: MIXED[(2 * i + j) % len(MIXED)])
  tok = jax.random.randint(jax.random.key(4), (3, T), 0, V)
  want = _lm().apply({"params": state.params, knn.KASMINA: state.kasmina}, tok, train=False)
  exported = export.export(state, include="live")
  got = exported.apply(tok)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  blocks = exported.spec.blocks
  assert sum(len(b.extra_heads) for b in blocks) > 0 and sum(len(b.grown) for b in blocks) > 0
  assert any(b.mlp_width > 4 * 16 for b in blocks)
  # the LMSpec round-trips through JSON, and in-flight seeds need include="live"
  assert type(exported.spec).from_json(exported.spec.to_json()) == exported.spec
  with pytest.raises(ValueError, match="in flight"):
    export.export(state)


def test_export_of_fossils_only_drops_every_other_seed():
  state = _state_with(lambda i, j: Stage.FOSSILIZED if j == 0 else Stage.CULLED)
  tok = jax.random.randint(jax.random.key(4), (2, T), 0, V)
  want = _lm().apply({"params": state.params, knn.KASMINA: state.kasmina}, tok, train=False)
  exported = export.export(state)
  np.testing.assert_allclose(np.asarray(exported.apply(tok)), np.asarray(want), atol=1e-5,
                             rtol=1e-5)
  assert all(len(b.extra_heads) == 1 and len(b.grown) == 1 for b in exported.spec.blocks)


def test_frozen_stages_get_no_update_and_learning_ones_do():
  stages = [Stage.STABILIZATION, Stage.FINE_TUNING]
  state = _state_with(lambda i, j: stages[j], perturb=0.1, model=_small_lm())
  state = state.replace(opt_state=state.tx.init(state.params))
  tok = jax.random.randint(jax.random.key(4), (4, T + 1), 0, V)
  batch = {"x": tok[:, :-1], "y": tok[:, 1:]}
  new, _ = training.train_step(state, batch, training.cross_entropy_loss)
  for path in knn.find_layers(state.kasmina):
    pairs = [(a, b) for a, b in zip(jax.tree.leaves(optim.find_children(new.params)[path]),
                                    jax.tree.leaves(optim.find_children(state.params)[path]))
             if a.size]
    moved = [max(float(jnp.max(jnp.abs(a[j] - b[j]))) for a, b in pairs) for j in (0, 1)]
    assert moved[0] == 0.0, path  # STABILIZATION: frozen
    assert moved[1] > 0.0, path  # FINE_TUNING learns


@pytest.mark.slow
def test_a_growable_lm_grows_heads_and_blocks_through_fit():
  from kasmina_jax import grafting, tamiyo  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  seq = rng.integers(0, V, (96, T + 1)).astype(np.int32)
  seq[:, 2:] = seq[:, :-2]  # a token two back predicts the next: attention pays
  train = {"x": seq[:64, :-1], "y": seq[:64, 1:]}
  val = {"x": seq[64:, :-1], "y": seq[64:, 1:]}
  model = transformer.GrowableLM(V, 16, T, layers=1, heads=2, head_seeds=1, block_seeds=1)
  life = lifecycle.LifecycleConfig(min_training_steps=4, max_training_steps=100,
                                   stabilization_steps=4, fine_tuning_steps=4,
                                   embargo_epochs=1)
  config = training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=4),
                                tamiyo=tamiyo.TamiyoConfig(lifecycle=life))
  state = training.create_train_state(model, optax.adam(1e-2), jnp.asarray(train["x"][:2]),
                                      jax.random.key(0), config)
  state, history = training.fit(state, train, val, training.cross_entropy_loss, epochs=6,
                                batch_size=16, progress=False)
  assert all(np.isfinite(h["val_loss"]) for h in history)
  reached = {p: int(np.max(np.asarray(v.seeds.stage)))
             for p, v in knn.find_layers(state.kasmina).items()}
  # every site's seed germinated and went on at least to TRAINING (or was culled after it)
  assert all(s >= Stage.TRAINING for s in reached.values()), reached


def test_a_state_with_sequence_children_checkpoints_bit_for_bit(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  from kasmina_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  state = _state_with(lambda i, j: MIXED[(3 * i + j) % len(MIXED)], model=_small_lm())
  ckpt.save(tmp_path, state, step=3)
  fresh = _state_with(lambda i, j: Stage.DORMANT, perturb=0.0, seed=5, model=_small_lm())
  restored = ckpt.restore(tmp_path, fresh)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for path, lv in knn.find_layers(restored.kasmina).items():
    np.testing.assert_array_equal(np.asarray(lv.seeds.stage),
                                  np.asarray(knn.find_layers(state.kasmina)[path].seeds.stage))
  assert isinstance(optim.find_children(restored.params)[("grow0", "kasmina")],
                    sequence.SequenceChildParams)
