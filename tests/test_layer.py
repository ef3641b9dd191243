"""Tests of the chunked layer's reference forward (`kasmina_jax.layer`) through its public API.

Every stage's value and gradient is checked against a model written out here by hand from
the stage table of docs/design.md ("Stage table"): the chunks come from `numpy.array_split` and
each child `g` is computed
from its blueprint's definition on the chunk's real nodes (no padding, no per-seed tables), so
the comparison shares no code with the library's layout.
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

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import layer
from kasmina_jax.lifecycle import Stage, init_seed_state
from jaxpr_walk import dot_precisions  # tests/ helper

IDENTITY_STAGES = (Stage.DORMANT, Stage.GERMINATED, Stage.CULLED, Stage.CANCELLED,
                   Stage.ROLLED_BACK)
FULL_STAGES = (Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING, Stage.FOSSILIZED)
FROZEN_STAGES = (Stage.STABILIZATION, Stage.EVALUATING)
# FOSSILIZED children get their gradient (`LifecycleConfig.fossil` decides in the optimizer).
HP = jax.lax.Precision.HIGHEST

DEFAULTS = bp_lib.default_blueprints()
NAMES = tuple(b.name for b in DEFAULTS)
REPLACEMENT = NAMES.index("replacement_bottleneck")
RESIDUAL_IDS = tuple(i for i, b in enumerate(DEFAULTS) if b.kind == "residual")

# An uneven split (chunks of 8, 7, 7 nodes) and the per-node mode.
UNEVEN = layer.KasminaSpec(dim=22, num_seeds=3)
PER_NODE = layer.KasminaSpec(dim=5, num_seeds=5)


@pytest.fixture(autouse=True)
def _exact_matmuls_on_gpu():
  """The hand-written model's matmuls are exact; the layer's follow JAX's default precision
  (docs/design.md, "Kernel precision"), TF32 on a GPU: there, make JAX's default exact too."""
  if jax.default_backend() == "gpu":
    with jax.default_matmul_precision("highest"):
      yield
  else:
    yield


# --------------------------------------------------------------------------------------------
# Helpers: seeds, random children, and the hand-written model.


@functools.lru_cache(maxsize=None)
def _dormant_state(num_seeds):
  # Concrete even when first asked for inside a jit trace (a cached tracer would leak).
  with jax.ensure_compile_time_eval():
    return init_seed_state(num_seeds)


def make_seeds(num_seeds, stage, blueprint=0, alpha=0.0):
  bcast = lambda v, dt: jnp.asarray(np.broadcast_to(np.asarray(v, dt), (num_seeds,)))
  return _dormant_state(num_seeds).replace(
      stage=bcast(stage, np.int32), blueprint=bcast(blueprint, np.int32),
      alpha=bcast(alpha, np.float32))


def random_children(spec, seed, scale=0.5, dtype=jnp.float32):
  """Every entry of the max-capacity layout random and non-zero (padding included: the
  layer must ignore what is outside a blueprint's live parameters)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: layer.init_children(spec, dtype))
  return jax.tree.map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), dtype), shapes)


def normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def chunk_bounds(spec):
  sizes = [len(a) for a in np.array_split(np.arange(spec.dim), spec.num_seeds)]
  starts = np.cumsum([0] + sizes[:-1])
  return [(int(s), int(s + n)) for s, n in zip(starts, sizes)]


ACT = {
    "identity": lambda z: z,
    "relu": jax.nn.relu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=True),
    "tanh": jnp.tanh,
}


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def hand_child(spec, params, k, blueprint_id, xk, uk=None):
  """g(x) of seed k's child on its chunk `xk` (..., ck), from the blueprint's definition."""
  bp = spec.blueprints[blueprint_id]
  ck = xk.shape[-1]
  h = bp.hidden_width(max(s for s in spec.chunk_sizes))
  p = jax.tree.map(lambda a: a[k].astype(jnp.float32), params)
  xk = xk.astype(jnp.float32)
  if bp.wiring == "parallel":
    pre = jnp.matmul(uk.astype(jnp.float32), p.w1u[:, :h], precision=HP)
  else:
    pre = jnp.matmul(xk, p.w1[:ck, :h], precision=HP)
  a = ACT[bp.activation](pre + p.b1[:h])
  if bp.glu:
    a = a * jax.nn.sigmoid(jnp.matmul(xk, p.wg[:ck, :h], precision=HP) + p.bg[:h])
  f = jnp.matmul(a, p.w2[:h, :ck], precision=HP) + p.b2[:ck]
  if bp.diagonal:
    f = f + p.s[:ck] * xk
  return xk + f if bp.kind == "residual" else f


def hand_layer(spec, params, stages, blueprints, alphas, x, u=None, *, isolate=False):
  """The stage table, chunk by chunk. `isolate=True` writes the GRAFTING contribution as
  `x + stop_gradient(alpha * (g(x) - x))` and a TRAINING chunk as `x`: the model whose
  upstream gradient the layer's must equal exactly."""
  return _hand_layer(spec, tuple(int(s) for s in stages), tuple(int(b) for b in blueprints),
                     tuple(float(a) for a in alphas), isolate, params, x, u)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _hand_layer(spec, stages, blueprints, alphas, isolate, params, x, u):
  outs = []
  for k, (lo, hi) in enumerate(chunk_bounds(spec)):
    xk = x[..., lo:hi].astype(jnp.float32)
    stage, b, a = stages[k], blueprints[k], alphas[k]
    if stage in IDENTITY_STAGES or stage == Stage.TRAINING:
      outs.append(xk)
      continue
    gk = hand_child(spec, params, k, b, xk, u)
    if stage == Stage.GRAFTING:
      contribution = a * (gk - xk)
      outs.append(xk + jax.lax.stop_gradient(contribution) if isolate else
                  (1.0 - a) * xk + a * gk)
    else:
      outs.append(gk)
  return jnp.concatenate(outs, axis=-1).astype(x.dtype)


def jit_grad(f, argnums=0):
  """`jax.grad` compiled as one program, returning numpy arrays."""
  g = jax.jit(jax.grad(f, argnums=argnums))
  return lambda *args: jax.tree.map(np.asarray, g(*args))


def jit_vjp(f, primals, ct):
  """`vjp(f, *primals)(ct)` compiled as one program, as numpy arrays."""
  out = jax.jit(lambda p, c: jax.vjp(f, *p)[1](c))(tuple(primals), ct)
  return jax.tree.map(np.asarray, out)


# Tests run jitted (eager dispatch of the many small ops costs far more than one compile).
@functools.partial(jax.jit, static_argnums=0)
def fwd(spec, params, seeds, x, u=None, telemetry=None, eval_alpha=None):
  return layer.forward(spec, params, seeds, x, u=u, telemetry=telemetry, eval_alpha=eval_alpha)


_germinate = jax.jit(layer.germinate_children, static_argnums=0)


def germinate(spec, params, mask, blueprint, seed):
  """`layer.germinate_children` (jitted; per-seed arrays keep one compiled program)."""
  k = spec.num_seeds
  return _germinate(spec, params, jnp.broadcast_to(jnp.asarray(mask, bool), (k,)),
                    jnp.broadcast_to(jnp.asarray(blueprint, jnp.int32), (k,)),
                    jax.random.PRNGKey(seed))


def assert_bits_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
  np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))


def tree_all(pred, tree):
  return all(bool(pred(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Chunking, identity stages, shapes and dtypes.


def _round_trip(spec, x):
  blocks = layer.to_blocks(spec, x)
  return blocks, layer.from_blocks(spec, blocks)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40).flatmap(lambda d: st.tuples(st.just(d), st.integers(1, d))))
def test_chunk_sizes_and_blocks_follow_array_split(dk):
  d, k = dk
  spec = layer.KasminaSpec(dim=d, num_seeds=k)
  split = np.array_split(np.arange(d), k)
  assert spec.chunk_sizes == tuple(len(a) for a in split)
  assert spec.chunk_width == max(len(a) for a in split)
  assert spec.chunk_offsets == tuple(int(a[0]) for a in split)
  x = np.arange(2 * 3 * d, dtype=np.float32).reshape(2, 3, d) + 1.0
  blocks, back = jax.jit(_round_trip, static_argnums=0)(spec, jnp.asarray(x))
  blocks = np.asarray(blocks)
  assert blocks.shape == (2, 3, k, spec.chunk_width)
  for i, idx in enumerate(split):
    np.testing.assert_array_equal(blocks[..., i, :len(idx)], x[..., idx])
    np.testing.assert_array_equal(blocks[..., i, len(idx):], 0.0)
  np.testing.assert_array_equal(np.asarray(back), x)
  np.testing.assert_array_equal(np.asarray(spec.node_mask).sum(-1), spec.chunk_sizes)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dk=st.integers(1, 24).flatmap(
        lambda d: st.tuples(st.just(d), st.one_of(st.just(d), st.integers(1, d)))),
    lead=st.sampled_from([(), (3,), (2, 3), (2, 1, 2)]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    data=st.data(),
)
def test_identity_stages_return_x_bit_for_bit(dk, lead, dtype, data):
  d, k = dk
  spec = layer.KasminaSpec(dim=d, num_seeds=k)
  # Identity stages, and TRAINING for every kind of child (residual: STE, value x).
  stage_pool = IDENTITY_STAGES + (Stage.TRAINING,)
  stages = data.draw(st.lists(st.sampled_from(stage_pool), min_size=k, max_size=k))
  bps = data.draw(st.lists(st.integers(0, len(DEFAULTS) - 1), min_size=k, max_size=k))
  seed = data.draw(st.integers(0, 2**16))
  x = normal(seed, lead + (d,), dtype)
  params = random_children(spec, seed + 1)
  seeds = make_seeds(k, stages, bps, alpha=0.7)
  out, aux = fwd(spec, params, seeds, x)
  assert_bits_equal(out, x)
  assert not bool(aux.nonfinite.any())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_and_dtype_preserved_in_every_stage(dtype):
  spec = UNEVEN
  x = normal(0, (2, 3, spec.dim)).astype(dtype)
  params = random_children(spec, 1, scale=0.3)
  for stage in Stage:
    out, aux = fwd(spec, params, make_seeds(3, stage, (0, 2, 4), 0.5), x)
    assert out.shape == x.shape and out.dtype == x.dtype, stage
    assert aux.objective.shape == (3,) and aux.recon_ratio.shape == (3,)
    assert aux.child_loss.shape == ()
  # bfloat16 children as well.
  params16 = random_children(spec, 1, scale=0.3, dtype=jnp.bfloat16)
  out, _ = fwd(spec, params16, make_seeds(3, Stage.FINE_TUNING, (0, 2, 4)), x)
  assert out.dtype == x.dtype and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# --------------------------------------------------------------------------------------------
# Stage values against the hand model.


@pytest.mark.parametrize("spec", [UNEVEN, PER_NODE], ids=["uneven", "per_node"])
@pytest.mark.parametrize("stage", [Stage.GRAFTING, Stage.STABILIZATION, Stage.FINE_TUNING])
def test_stage_values_match_the_stage_table(spec, stage):
  k = spec.num_seeds
  bps = [(0, 2, 4, 1, 3)[i % 5] for i in range(k)]  # residual and replacement children
  alphas = np.linspace(0.2, 0.9, k).astype(np.float32)
  x = normal(2, (6, spec.dim))
  params = random_children(spec, 3)
  out, _ = fwd(spec, params, make_seeds(k, stage, bps, alphas), x)
  want = hand_layer(spec, params, [stage] * k, bps, alphas, x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Every child really contributes (so the comparison is not vacuous).
  assert not np.allclose(out, x)


@pytest.mark.parametrize("b", range(len(DEFAULTS)), ids=NAMES)
def test_grafting_blends_and_full_stages_give_g(b):
  spec = UNEVEN
  x = normal(4, (6, spec.dim))
  params = random_children(spec, 5)
  chunks = [x[:, lo:hi] for lo, hi in chunk_bounds(spec)]
  g = [hand_child(spec, params, k, b, chunks[k]) for k in range(3)]
  x, chunks = np.asarray(x), [np.asarray(c) for c in chunks]
  out, _ = fwd(spec, params, make_seeds(3, Stage.GRAFTING, b, (0.25, 0.5, 1.0)), x)
  want = jnp.concatenate([(1 - a) * c + a * gk for a, c, gk in zip((0.25, 0.5, 1.0), chunks, g)], -1)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for stage in FULL_STAGES:
    out, _ = fwd(spec, params, make_seeds(3, stage, b, 0.3), x)
    np.testing.assert_allclose(out, jnp.concatenate(g, -1), rtol=1e-5, atol=1e-5)


def test_grafting_at_alpha_zero_is_x():
  spec = UNEVEN
  x = normal(6, (6, spec.dim))
  params = random_children(spec, 7)
  out, _ = fwd(spec, params, make_seeds(3, Stage.GRAFTING, (0, 4, 2), 0.0), x)
  assert_bits_equal(out, x)


# --------------------------------------------------------------------------------------------
# Gradient isolation.


def _host_problem(spec, seed, rows=6, din=7):
  v = normal(seed, (rows, din))
  w = normal(seed + 1000, (din, spec.dim)) / np.sqrt(din)
  ct = normal(seed + 2000, (rows, spec.dim))
  return v, w, ct


def _upstream_grads(model, v, w, ct):
  """Gradient of `<ct, model(v @ w)>` w.r.t. the host's input `v`, weights `w` and the
  layer input `x`."""
  def grads(v, w, ct):
    _, vjp = jax.vjp(lambda v, w: model(jnp.matmul(v, w, precision=HP)), v, w)
    dv, dw = vjp(ct)
    (dx,) = jax.vjp(model, jnp.matmul(v, w, precision=HP))[1](ct)
    return dv, dw, dx
  return jax.jit(grads)(v, w, ct)


@pytest.mark.parametrize("stage", [Stage.TRAINING, Stage.GRAFTING])
@pytest.mark.parametrize("bps", [(0, 2, 4), (1, 3, 0)], ids=["res_glu_repl", "lra_scale_res"])
def test_upstream_gradient_equals_the_stopped_contribution_model_exactly(stage, bps):
  spec = UNEVEN
  v, w, ct = _host_problem(spec, 8)
  params = random_children(spec, 9)
  alphas = np.array([0.3, 0.6, 0.9], np.float32)
  seeds = make_seeds(3, stage, bps, alphas)
  lib = lambda x: fwd(spec, params, seeds, x)[0]
  hand = lambda x: hand_layer(spec, params, [stage] * 3, bps, alphas, x, isolate=True)
  got, want = _upstream_grads(lib, v, w, ct), _upstream_grads(hand, v, w, ct)
  for g, h in zip(got, want):
    np.testing.assert_array_equal(g, h)
  # Values agree too (the isolated model's value is the layer's).
  x = v @ w
  np.testing.assert_allclose(lib(x), hand(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bps", [(0, 2, 4), (1, 3, 0)], ids=["res_glu_repl", "lra_scale_res"])
def test_training_host_gradient_equals_host_only_model(bps):
  spec = UNEVEN
  v, w, ct = _host_problem(spec, 10)
  params = random_children(spec, 11)
  host_only = lambda x: fwd(spec, params, make_seeds(3, Stage.DORMANT), x)[0]
  with_training = lambda x: fwd(spec, params, make_seeds(3, Stage.TRAINING, bps), x)[0]
  for g, h in zip(_upstream_grads(with_training, v, w, ct), _upstream_grads(host_only, v, w, ct)):
    np.testing.assert_array_equal(g, h)
  # ... including when the child's own objective is part of the loss.
  def loss(v, w, model_seeds):
    out, aux = fwd(spec, params, model_seeds, v @ w)
    return jnp.sum(out * ct) + aux.child_loss
  g_train = jit_grad(loss, argnums=(0, 1))(v, w, make_seeds(3, Stage.TRAINING, bps))
  g_host = jit_grad(loss, argnums=(0, 1))(v, w, make_seeds(3, Stage.DORMANT))
  for g, h in zip(g_train, g_host):
    np.testing.assert_array_equal(g, h)


def test_grafting_child_gradient_is_alpha_times_g_on_stopped_input():
  spec = UNEVEN
  bps, alphas = (0, 2, 4), np.array([0.3, 0.6, 0.9], np.float32)
  v, w, ct = _host_problem(spec, 12)
  x = v @ w
  params = random_children(spec, 13)
  seeds = make_seeds(3, Stage.GRAFTING, bps, alphas)
  got = jit_grad(lambda p: jnp.sum(fwd(spec, p, seeds, x)[0] * ct))(params)
  want = jit_grad(lambda p: jnp.sum(hand_layer(spec, p, [Stage.GRAFTING] * 3, bps, alphas, x) * ct))(params)
  # The layout's padding is not in the hand model; compare the live entries only.
  live = jax.tree.map(lambda h: np.asarray(h) != 0, want)
  for g, h, m in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(live)):
    np.testing.assert_allclose(np.where(m, g, 0.0), h, rtol=1e-5, atol=1e-6)
  assert tree_all(lambda a: a.any(), jax.tree.map(lambda a: a[..., :1], live).w2)


def test_fossil_children_get_the_fine_tuning_gradient():
  # A fossil computes exactly what a FINE_TUNING child computes; only the optimizer's mask
  # (`optim.learning_mask(..., fossil=...)`) decides whether it moves.
  spec = UNEVEN
  bps = (0, 2, 4)
  v, w, ct = _host_problem(spec, 14)
  params = random_children(spec, 15)
  grads = []
  for stage in (Stage.FINE_TUNING, Stage.FOSSILIZED):
    seeds = make_seeds(3, stage, bps)
    def loss(p, x, seeds=seeds):
      out, aux = fwd(spec, p, seeds, x)
      return jnp.sum(out * ct) + aux.child_loss
    grads.append(jit_grad(loss, argnums=(0, 1))(params, v @ w))
  assert tree_all(lambda a: a.any(), jax.tree.map(lambda a: a[..., :1], grads[1][0]).w2)
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stage", FROZEN_STAGES)
def test_frozen_stages_give_children_zero_gradient(stage):
  spec = UNEVEN
  bps = (0, 2, 4)
  v, w, ct = _host_problem(spec, 14)
  params = random_children(spec, 15)
  seeds = make_seeds(3, stage, bps)
  def loss(p, x):
    out, aux = fwd(spec, p, seeds, x)
    return jnp.sum(out * ct) + aux.child_loss
  gp, gx = jit_grad(loss, argnums=(0, 1))(params, v @ w)
  assert tree_all(lambda a: not a.any(), gp), "a frozen child got a gradient"
  # The host's gradient goes through the (frozen) child.
  (hx,) = jit_vjp(lambda x: hand_layer(spec, params, [stage] * 3, bps, (0,) * 3, x), (v @ w,), ct)
  np.testing.assert_allclose(gx, hx, rtol=1e-5, atol=1e-5)


def test_fine_tuning_children_learn_and_host_gradient_flows_through_them():
  spec = UNEVEN
  bps = (0, 2, 4)
  v, w, ct = _host_problem(spec, 16)
  params = random_children(spec, 17)
  seeds = make_seeds(3, Stage.FINE_TUNING, bps)
  loss = lambda p, v, w: jnp.sum(fwd(spec, p, seeds, v @ w)[0] * ct)
  gp, gv, gw = jit_grad(loss, argnums=(0, 1, 2))(params, v, w)
  for k in range(3):
    assert np.abs(np.asarray(gp.w2[k])).sum() > 0 and np.abs(np.asarray(gp.b2[k])).sum() > 0
  hand = lambda p, v, w: jnp.sum(hand_layer(spec, p, [Stage.FINE_TUNING] * 3, bps, (0,) * 3, v @ w) * ct)
  hv, hw = jit_grad(hand, argnums=(1, 2))(params, v, w)
  np.testing.assert_allclose(gv, hv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, hw, rtol=1e-4, atol=1e-5)
  identity_gv = ct @ w.T
  assert not np.allclose(gv, identity_gv, atol=1e-3)


def test_training_residual_child_trains_on_task_gradient_plus_trust_penalty():
  spec = layer.KasminaSpec(dim=22, num_seeds=3, trust_penalty=0.5)
  bps = (0, 1, 2)
  x = normal(18, (6, spec.dim))
  ct = normal(19, x.shape)
  params = random_children(spec, 20)
  seeds = make_seeds(3, Stage.TRAINING, bps)
  def loss(p):
    out, aux = fwd(spec, p, seeds, x)
    return jnp.sum(out * ct) + aux.child_loss
  def hand_terms(p):
    """(<dL/dout, f>, lambda * mean over rows of ||f||^2), summed over the seeds."""
    linear = penalty = 0.0
    for k, (lo, hi) in enumerate(chunk_bounds(spec)):
      xk = x[:, lo:hi]
      fk = hand_child(spec, p, k, bps[k], xk) - xk
      linear = linear + jnp.sum(fk * ct[:, lo:hi])
      penalty = penalty + 0.5 * jnp.sum(fk * fk) / x.shape[0]
    return linear, penalty
  got, want = jit_grad(loss)(params), jit_grad(lambda p: sum(hand_terms(p)))(params)
  live = jax.tree.map(lambda h: np.asarray(h) != 0, want)
  for g, h, m in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(live)):
    np.testing.assert_allclose(np.where(m, g, 0.0), h, rtol=1e-4, atol=1e-5)
  _, aux = fwd(spec, params, seeds, x)
  np.testing.assert_allclose(aux.child_loss, jax.jit(hand_terms)(params)[1], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Germination.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_germination_is_function_preserving_for_residual_blueprints(dtype):
  spec = UNEVEN
  x = normal(21, (2, 3, spec.dim)).astype(dtype)
  for b in RESIDUAL_IDS:
    params = germinate(spec, layer.init_children(spec), True, b, b)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    for stage in (Stage.TRAINING, Stage.GRAFTING) + FULL_STAGES:
      out, aux = fwd(spec, params, make_seeds(3, stage, b, 0.5), x)
      assert_bits_equal(out, x)
      assert not bool(aux.nonfinite.any())


def test_replacement_children_start_nonzero_and_learn_to_reconstruct():
  spec = UNEVEN
  x = normal(22, (64, spec.dim))
  params = germinate(spec, layer.init_children(spec), True, REPLACEMENT, 23)
  seeds = make_seeds(3, Stage.TRAINING, REPLACEMENT)
  out, aux = fwd(spec, params, seeds, x)
  assert_bits_equal(out, x)
  g_full, _ = fwd(spec, params, make_seeds(3, Stage.STABILIZATION, REPLACEMENT), x)
  g_full = np.asarray(g_full)
  assert all(np.abs(g_full[:, lo:hi]).sum() > 0 for lo, hi in chunk_bounds(spec))
  assert np.all(np.isfinite(aux.recon_ratio)) and np.all(aux.objective > 0)

  opt = optax.adam(1e-2)
  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda p: fwd(spec, p, seeds, x)[1].child_loss)(p)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss
  state = opt.init(params)
  losses = []
  for _ in range(40):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  _, aux_after = fwd(spec, params, seeds, x)
  assert np.all(aux_after.recon_ratio < aux.recon_ratio)


def test_germination_touches_only_masked_seeds():
  spec = UNEVEN
  params = random_children(spec, 24)
  mask = jnp.array([False, True, False])
  new = germinate(spec, params, mask, 0, 25)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
  assert not np.array_equal(new.w1[1], params.w1[1])
  np.testing.assert_array_equal(new.w2[1], 0.0)


# --------------------------------------------------------------------------------------------
# The non-finite guard.


@pytest.mark.parametrize("stage", [Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING])
def test_nonfinite_child_contributes_identity_and_poisons_no_gradient(stage):
  spec = UNEVEN
  bps = (0, 2, 4)
  v, w, ct = _host_problem(spec, 26)
  params = random_children(spec, 27)
  params = params.replace(w2=params.w2.at[0, 0, 0].set(jnp.nan),
                          w1=params.w1.at[2, 0, 0].set(jnp.inf))
  seeds = make_seeds(3, stage, bps, 0.5)
  x = v @ w
  out, aux = fwd(spec, params, seeds, x)
  out, x = np.asarray(out), np.asarray(x)
  np.testing.assert_array_equal(aux.nonfinite, [True, False, True])
  (lo0, hi0), (lo1, hi1), (lo2, hi2) = chunk_bounds(spec)
  assert_bits_equal(out[:, lo0:hi0], x[:, lo0:hi0])
  assert_bits_equal(out[:, lo2:hi2], x[:, lo2:hi2])
  assert np.all(np.isfinite(out))
  # The healthy seed is unaffected.
  ref = np.asarray(hand_layer(spec, params, [stage] * 3, bps, (0.5,) * 3, x))
  np.testing.assert_allclose(out[:, lo1:hi1], ref[:, lo1:hi1], rtol=1e-5, atol=1e-5)
  def loss(p, v, w):
    out, aux = fwd(spec, p, seeds, v @ w)
    return jnp.sum(out * ct) + jnp.sum(out ** 2) + aux.child_loss
  gp, gv, gw = jit_grad(loss, argnums=(0, 1, 2))(params, v, w)
  assert tree_all(lambda a: np.all(np.isfinite(a)), (gp, gv, gw))
  # The bad seeds' update is zeroed; the healthy one still learns.
  for k in (0, 2):
    assert tree_all(lambda a: not a.any(), jax.tree.map(lambda a: a[k], gp))
  assert np.abs(np.asarray(gp.w2[1])).sum() > 0
  # With telemetry the flag is recorded too.
  _, aux = fwd(spec, params, seeds, x, telemetry=layer.init_telemetry(spec))
  np.testing.assert_array_equal(aux.telemetry.nonfinite, [True, False, True])


# --------------------------------------------------------------------------------------------
# Evaluation passes.


def test_eval_alpha_zero_is_x_and_one_is_g_for_live_seeds():
  spec = UNEVEN
  x = normal(28, (6, spec.dim))
  params = random_children(spec, 29)
  tel = layer.init_telemetry(spec)
  bps = (0, 4, 2)
  for stage in (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.FOSSILIZED):
    seeds = make_seeds(3, stage, bps, 0.3)
    out0, aux0 = fwd(spec, params, seeds, x, telemetry=tel, eval_alpha=0.0)
    assert_bits_equal(out0, x)
    assert aux0.telemetry is None
    out1, aux1 = fwd(spec, params, seeds, x, telemetry=tel, eval_alpha=jnp.ones((3,)))
    assert aux1.telemetry is None
    want = hand_layer(spec, params, [Stage.FOSSILIZED] * 3, bps, (0,) * 3, x)
    np.testing.assert_allclose(out1, want, rtol=1e-5, atol=1e-5)
  # Per seed: one seed on, the others off; dormant seeds stay x at any eval_alpha.
  seeds = make_seeds(3, (Stage.TRAINING, Stage.DORMANT, Stage.GRAFTING), bps, 0.3)
  out, _ = fwd(spec, params, seeds, x, eval_alpha=jnp.array([1.0, 1.0, 0.0]))
  out, x = np.asarray(out), np.asarray(x)
  (lo0, hi0), (lo1, hi1), (lo2, hi2) = chunk_bounds(spec)
  np.testing.assert_allclose(out[:, lo0:hi0], hand_child(spec, params, 0, 0, x[:, lo0:hi0]),
                             rtol=1e-5, atol=1e-5)
  assert_bits_equal(out[:, lo1:], x[:, lo1:])


# --------------------------------------------------------------------------------------------
# Parallel wiring.

PAR_BPS = bp_lib.default_blueprints(parallel_hidden=3)
PAR = PAR_BPS.index(next(b for b in PAR_BPS if b.wiring == "parallel"))
PSPEC = layer.KasminaSpec(dim=12, num_seeds=3, blueprints=PAR_BPS, input_dim=5)


def _parallel_problem(seed):
  u = normal(seed, (6, PSPEC.input_dim))
  w = normal(seed + 1000, (PSPEC.input_dim, PSPEC.dim)) / np.sqrt(PSPEC.input_dim)
  ct = normal(seed + 2000, (6, PSPEC.dim))
  return u, w, ct, random_children(PSPEC, seed + 3000)


def _parallel_model(params, seeds):
  """Host layer `x = tanh(u @ w)` wrapped by the Kasmina layer, whose children read `u`."""
  def model(u, w):
    x = jnp.tanh(jnp.matmul(u, w, precision=HP))
    return fwd(PSPEC, params, seeds, x, u=u)[0]
  return model


def _host_only(u, w):
  return jnp.tanh(jnp.matmul(u, w, precision=HP))


def _grads(model, u, w, ct):
  return jit_vjp(model, (u, w), ct)


def test_parallel_germination_preserves_the_function():
  u, w, _, _ = _parallel_problem(30)
  params = germinate(PSPEC, layer.init_children(PSPEC), True, PAR, 31)
  assert np.abs(np.asarray(params.w1u)).sum() > 0
  for stage in (Stage.TRAINING, Stage.GRAFTING) + FULL_STAGES:
    out = _parallel_model(params, make_seeds(3, stage, PAR, 0.5))(u, w)
    assert_bits_equal(out, _host_only(u, w))


def _layer_input_grads(params, seeds, x, u, ct):
  """Gradient of `<ct, layer(x, u)>` w.r.t. the layer's inputs `x` and `u` themselves."""
  return jit_vjp(lambda x, u: fwd(PSPEC, params, seeds, x, u=u)[0], (x, u), ct)


def _assert_host_only_input_grads(params, seeds, u, w, ct):
  # The host-only model is the identity in `x` and does not read `u`.
  dx, du = _layer_input_grads(params, seeds, _host_only(u, w), u, ct)
  np.testing.assert_array_equal(dx, ct)
  np.testing.assert_array_equal(du, 0.0)


def test_parallel_training_is_invisible_to_the_host():
  u, w, ct, params = _parallel_problem(32)
  seeds = make_seeds(3, Stage.TRAINING, PAR)
  model = _parallel_model(params, seeds)
  dormant = _parallel_model(params, make_seeds(3, Stage.DORMANT, PAR))
  assert_bits_equal(model(u, w), _host_only(u, w))
  for g, h, d in zip(_grads(model, u, w, ct), _grads(_host_only, u, w, ct),
                     _grads(dormant, u, w, ct)):
    np.testing.assert_array_equal(g, h)
    np.testing.assert_array_equal(d, h)
  _assert_host_only_input_grads(params, seeds, u, w, ct)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _hand_parallel(params, u, w, alpha, full=False):
  x = _host_only(u, w)
  outs = []
  for k, (lo, hi) in enumerate(chunk_bounds(PSPEC)):
    xk = x[:, lo:hi]
    fk = hand_child(PSPEC, params, k, PAR, xk, u) - xk
    outs.append(xk + fk if full else xk + alpha * jax.lax.stop_gradient(fk))
  return jnp.concatenate(outs, -1)


def test_parallel_grafting_adds_alpha_child_and_no_gradient_reaches_u_through_it():
  u, w, ct, params = _parallel_problem(33)
  seeds = make_seeds(3, Stage.GRAFTING, PAR, 0.4)
  model = _parallel_model(params, seeds)
  np.testing.assert_allclose(model(u, w), _hand_parallel(params, u, w, 0.4), rtol=1e-5, atol=1e-5)
  assert not np.allclose(model(u, w), _host_only(u, w))
  for g, h in zip(_grads(model, u, w, ct), _grads(_host_only, u, w, ct)):
    np.testing.assert_array_equal(g, h)
  _assert_host_only_input_grads(params, seeds, u, w, ct)


def test_parallel_stabilization_gradient_reaches_u():
  u, w, ct, params = _parallel_problem(34)
  model = _parallel_model(params, make_seeds(3, Stage.STABILIZATION, PAR))
  hand = lambda u, w: _hand_parallel(params, u, w, 1.0, full=True)
  np.testing.assert_allclose(model(u, w), hand(u, w), rtol=1e-5, atol=1e-5)
  du, dw = _grads(model, u, w, ct)
  hu, hw = _grads(hand, u, w, ct)
  np.testing.assert_allclose(du, hu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, hw, rtol=1e-4, atol=1e-5)
  host_du, _ = _grads(_host_only, u, w, ct)
  assert not np.allclose(du, host_du, atol=1e-3)
  _, du_layer = _layer_input_grads(params, make_seeds(3, Stage.STABILIZATION, PAR),
                                   _host_only(u, w), u, ct)
  assert np.abs(du_layer).sum() > 0


def test_parallel_and_chunk_children_read_only_their_own_input():
  # A chunk-wired child ignores `u` and a parallel child ignores its chunk, whatever sits in
  # the layout's unused input weights; neither gets a gradient there.
  u, w, ct, params = _parallel_problem(35)
  bps = (PAR, 0, 2)
  seeds = make_seeds(3, Stage.FINE_TUNING, bps)
  x = _host_only(u, w)
  out = fwd(PSPEC, params, seeds, x, u=u)[0]
  want = jnp.concatenate([hand_child(PSPEC, params, k, b, x[:, lo:hi], u)
                          for k, (b, (lo, hi)) in enumerate(zip(bps, chunk_bounds(PSPEC)))], -1)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  gp = jit_grad(lambda p: jnp.sum(fwd(PSPEC, p, seeds, x, u=u)[0] * ct))(params)
  np.testing.assert_array_equal(gp.w1[0], 0.0)
  np.testing.assert_array_equal(gp.w1u[1:], 0.0)
  assert np.abs(np.asarray(gp.w1u[0])).sum() > 0


@pytest.mark.parametrize("stage", [Stage.GRAFTING, Stage.STABILIZATION])
def test_parallel_nonfinite_child_poisons_no_gradient(stage):
  u, w, ct, params = _parallel_problem(36)
  params = params.replace(w1u=params.w1u.at[0, 0, 0].set(jnp.nan))
  seeds = make_seeds(3, stage, PAR, 0.5)
  model = _parallel_model(params, seeds)
  out = model(u, w)
  lo, hi = chunk_bounds(PSPEC)[0]
  assert_bits_equal(out[:, lo:hi], _host_only(u, w)[:, lo:hi])
  assert fwd(PSPEC, params, seeds, _host_only(u, w), u=u)[1].nonfinite.tolist() == [True, False, False]
  du, dw = _grads(model, u, w, ct)
  gp = jit_grad(lambda p: jnp.sum(_parallel_model(p, seeds)(u, w) * ct))(params)
  assert tree_all(lambda a: np.all(np.isfinite(a)), (du, dw, gp))


# --------------------------------------------------------------------------------------------
# jit, vmap, grad.


def test_jit_and_grad_compose():
  # Every test here runs the layer under `jit`; this one checks that the spec may be closed
  # over or static, and that `grad` and a `vjp` returned from `jit` agree.
  spec = UNEVEN
  x = normal(37, (2, 3, spec.dim))
  params = random_children(spec, 38)
  seeds = make_seeds(3, (Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING), (0, 2, 4), 0.5)
  tel = layer.init_telemetry(spec)
  out_a, aux_a = fwd(spec, params, seeds, x, telemetry=tel)
  out_b, aux_b = jax.jit(functools.partial(layer.forward, spec))(params, seeds, x,
                                                                 telemetry=tel)
  np.testing.assert_array_equal(out_a, out_b)
  chex.assert_trees_all_close(aux_a, aux_b)
  def loss(p, x):
    out, aux = fwd(spec, p, seeds, x)
    return jnp.sum(out ** 2) + aux.child_loss
  g_jit = jit_grad(loss, argnums=(0, 1))(params, x)
  _, vjp = jax.jit(lambda p, x: jax.vjp(loss, p, x))(params, x)
  chex.assert_trees_all_close(g_jit, jax.tree.map(np.asarray, vjp(jnp.ones(()))),
                              rtol=1e-5, atol=1e-5)
  assert tree_all(lambda a: np.all(np.isfinite(a)), g_jit)


def test_vmap_over_a_batch_axis_matches_leading_dims():
  spec = UNEVEN
  x = normal(39, (2, 3, spec.dim))
  params = random_children(spec, 40)
  seeds = make_seeds(3, (Stage.GRAFTING, Stage.FOSSILIZED, Stage.TRAINING), (1, 2, 0), 0.5)
  direct, _ = fwd(spec, params, seeds, x)
  mapped = jax.vmap(lambda xi: fwd(spec, params, seeds, xi)[0])(x)
  np.testing.assert_allclose(mapped, direct, rtol=1e-6, atol=1e-6)


def test_vmap_over_stacked_layers():
  spec = UNEVEN
  num_layers = 3
  stages = [(Stage.GRAFTING, Stage.DORMANT, Stage.FINE_TUNING),
            (Stage.TRAINING, Stage.STABILIZATION, Stage.GRAFTING),
            (Stage.FOSSILIZED, Stage.CULLED, Stage.TRAINING)]
  bps = [(0, 1, 2), (4, 3, 0), (2, 4, 1)]
  layers_params = [random_children(spec, 50 + i) for i in range(num_layers)]
  layers_seeds = [make_seeds(3, s, b, 0.25 * (i + 1)) for i, (s, b) in enumerate(zip(stages, bps))]
  xs = normal(41, (num_layers, 6, spec.dim))
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  tels = stack([layer.init_telemetry(spec)] * num_layers)
  def one(p, s, x, t):
    out, aux = fwd(spec, p, s, x, telemetry=t)
    return out, aux
  outs, auxs = jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(
      stack(layers_params), stack(layers_seeds), xs, tels))
  for i in range(num_layers):
    out, aux = fwd(spec, layers_params[i], layers_seeds[i], xs[i], telemetry=layer.init_telemetry(spec))
    np.testing.assert_allclose(outs[i], out, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], auxs), aux, rtol=1e-5, atol=1e-5)
  # grad through vmap.
  g = jit_grad(lambda p: jnp.sum(jax.vmap(one)(p, stack(layers_seeds), xs, tels)[0] ** 2))(
      stack(layers_params))
  assert tree_all(lambda a: np.all(np.isfinite(a)), g)


# --------------------------------------------------------------------------------------------
# Argument errors.


def test_argument_errors_name_the_argument():
  spec = UNEVEN
  params = layer.init_children(spec)
  seeds = make_seeds(3, Stage.DORMANT)
  x = jnp.zeros((2, spec.dim))
  with pytest.raises(ValueError, match="x"):
    layer.forward(spec, params, seeds, jnp.zeros((2, spec.dim + 1)))
  with pytest.raises(TypeError, match="x"):
    layer.forward(spec, params, seeds, jnp.zeros((2, spec.dim), jnp.int32))
  with pytest.raises(TypeError, match="x"):
    layer.forward(spec, params, seeds, [[0.0] * spec.dim])
  with pytest.raises(ValueError, match=r"params\.w1"):
    layer.forward(spec, params.replace(w1=params.w1[:, :-1]), seeds, x)
  with pytest.raises(ValueError, match=r"params\.b2"):
    layer.forward(spec, params.replace(b2=params.b2[:2]), seeds, x)
  with pytest.raises(ValueError, match="params"):
    layer.forward(spec, layer.init_children(layer.KasminaSpec(dim=22, num_seeds=2)), seeds, x)
  with pytest.raises(ValueError, match="seeds"):
    layer.forward(spec, params, make_seeds(2, Stage.DORMANT), x)
  with pytest.raises(ValueError, match="eval_alpha"):
    layer.forward(spec, params, seeds, x, eval_alpha=jnp.ones((2,)))
  with pytest.raises(ValueError, match="impl"):
    layer.forward(spec, params, seeds, x, impl="cuda")
  with pytest.raises(TypeError, match="spec"):
    layer.forward(object(), params, seeds, x)
  pparams = layer.init_children(PSPEC)
  px = jnp.zeros((2, PSPEC.dim))
  with pytest.raises(ValueError, match="u"):
    layer.forward(PSPEC, pparams, seeds, px)
  with pytest.raises(ValueError, match="u"):
    layer.forward(PSPEC, pparams, seeds, px, u=jnp.zeros((2, PSPEC.input_dim + 1)))
  with pytest.raises(ValueError, match="num_seeds"):
    layer.KasminaSpec(dim=4, num_seeds=5)
  with pytest.raises(ValueError, match="dim"):
    layer.KasminaSpec(dim=0, num_seeds=1)
  with pytest.raises(TypeError, match="num_seeds"):
    layer.KasminaSpec(dim=4, num_seeds=2.0)
  with pytest.raises(ValueError, match="corr_rows"):
    layer.KasminaSpec(dim=4, num_seeds=2, corr_rows=-1)
  with pytest.raises(ValueError, match="trust_penalty"):
    layer.KasminaSpec(dim=4, num_seeds=2, trust_penalty=-1.0)
  with pytest.raises(ValueError, match="blueprint"):
    spec.blueprint_id("no_such_child")
  assert spec.blueprint_id("glu_mlp") == NAMES.index("glu_mlp")


def test_spec_is_hashable_and_static():
  a, b = layer.KasminaSpec(dim=22, num_seeds=3), layer.KasminaSpec(dim=22, num_seeds=3)
  assert a == b and hash(a) == hash(b)
  assert a != layer.KasminaSpec(dim=22, num_seeds=2)


# --------------------------------------------------------------------------------------------
# Precision of the child matmuls (docs/design.md, "Kernel precision").




def _precision_case():
  spec = PSPEC
  params = random_children(spec, 0)
  seeds = make_seeds(3, [Stage.FINE_TUNING, Stage.GRAFTING, Stage.STABILIZATION],
                     blueprint=[PAR, NAMES.index("glu_mlp"), 0], alpha=0.5)
  return spec, params, seeds, normal(1, (6, spec.dim)), normal(2, (6, spec.input_dim))


@pytest.mark.parametrize("precision,expected", [
    (None, "as jnp.dot"),
    ("highest", (HP, HP)),
    (jax.lax.Precision.HIGHEST, (HP, HP)),
    ("default", (jax.lax.Precision.DEFAULT,) * 2),
])
def test_precision_reaches_every_child_matmul(precision, expected):
  """Forward and backward, the parallel children's input GEMM included: every dot runs at
  the caller's precision (None: JAX's default, as `jnp.dot` without one)."""
  spec, params, seeds, x, u = _precision_case()

  def loss(params, x, u, precision=precision):
    out, aux = layer.forward(spec, params, seeds, x, u=u, precision=precision)
    return jnp.sum(out * out) + aux.child_loss

  grad = jax.grad(loss, argnums=(0, 1, 2))
  found = dot_precisions(grad, params, x, u)
  if expected == "as jnp.dot":  # None, or what `jax.default_matmul_precision` set
    expected, = dot_precisions(jnp.dot, x[:, :2], x[:2])
  assert len(found) >= 12, found  # w1, wg, w2 and the u GEMM, forward and backward
  assert all(p == expected for p in found), found
  if jax.default_backend() == "cpu":  # every precision is exact float32 there
    chex.assert_trees_all_close(grad(params, x, u),
                                jax.grad(functools.partial(loss, precision="highest"),
                                         argnums=(0, 1, 2))(params, x, u),
                                rtol=1e-6, atol=1e-6)


def test_precision_is_validated_before_tracing():
  spec, params, seeds, x, u = _precision_case()
  for bad in ("fast", "HIGHESTT", 3, ("highest", "highest"), jax.lax.DotAlgorithmPreset.DEFAULT):
    with pytest.raises(ValueError, match="precision"):
      layer.forward(spec, params, seeds, x, u=u, precision=bad)
    with pytest.raises(ValueError, match="precision"):
      layer.forward_reference(spec, params, seeds, x, u=u, precision=bad)
  for good in (None, "HIGHEST", "high", "float32", jax.lax.Precision.DEFAULT):
    layer.forward(spec, params, seeds, x, u=u, precision=good)
  assert layer.canonical_precision("Highest") is jax.lax.Precision.HIGHEST
  assert layer.canonical_precision("tensorfloat32") is jax.lax.Precision.HIGH
