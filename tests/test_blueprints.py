"""Tests of `kasmina_jax.blueprints`: the default catalog, costs, the shared layout, validation.

A blueprint's live parameters are counted from the layer itself: every entry of the
max-capacity layout is set to a random non-zero value, and an entry is live when the layer's
output depends on it (a non-zero gradient on random inputs). `cost()` must count exactly those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import layer
from kasmina_jax.blueprints import Blueprint
from kasmina_jax.lifecycle import Stage, init_seed_state

CHUNK = 16
INPUT_DIM = 6
CATALOG = bp_lib.default_blueprints(parallel_hidden=5)
# One seed per blueprint, every chunk full width.
SPEC = layer.KasminaSpec(dim=CHUNK * len(CATALOG), num_seeds=len(CATALOG), blueprints=CATALOG,
                         input_dim=INPUT_DIM)
ROWS = 64
germinate = jax.jit(layer.germinate_children, static_argnums=0)


def _seeds(spec, stage, blueprint):
  k = spec.num_seeds
  return init_seed_state(k).replace(
      stage=jnp.full((k,), stage, jnp.int32),
      blueprint=jnp.asarray(np.broadcast_to(blueprint, (k,)), jnp.int32),
      alpha=jnp.full((k,), 0.5, jnp.float32))


def _random_layout(spec, seed):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: layer.init_children(spec))
  return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32),
                      shapes)


@functools.lru_cache(maxsize=None)
def _live_mask():
  """Per layout entry: does seed k's output depend on it (seed k holds blueprint k)?"""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((ROWS, SPEC.dim)), jnp.float32)
  u = jnp.asarray(rng.standard_normal((ROWS, INPUT_DIM)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((ROWS, SPEC.dim)), jnp.float32)
  seeds = _seeds(SPEC, Stage.FINE_TUNING, np.arange(len(CATALOG)))
  def loss(p):
    return jnp.sum(layer.forward(SPEC, p, seeds, x, u=u)[0] * ct)
  grads = jax.jit(jax.grad(loss))(_random_layout(SPEC, 1))
  return jax.tree.map(lambda g: np.asarray(g) != 0, grads)


# --------------------------------------------------------------------------------------------
# The default catalog.


def test_default_catalog_has_the_five_kinds_of_child():
  defaults = bp_lib.default_blueprints()
  assert len(defaults) >= 5
  names = [b.name for b in defaults]
  assert len(set(names)) == len(names)
  by_name = {b.name: b for b in defaults}
  assert by_name["glu_mlp"].glu
  assert by_name["chunk_scale"].diagonal and by_name["chunk_scale"].hidden_width(CHUNK) == 0
  assert by_name["low_rank_adapter"].activation == "identity"
  assert by_name["replacement_bottleneck"].kind == "replacement"
  assert by_name["residual_mlp"].kind == "residual"
  assert all(b.wiring == "chunk" for b in defaults)
  with_parallel = bp_lib.default_blueprints(parallel_hidden=0.5)
  assert with_parallel[:len(defaults)] == defaults
  assert [b.wiring for b in with_parallel[len(defaults):]] == ["parallel"]


@pytest.mark.parametrize("dim", [64, 256, 1024])
@pytest.mark.parametrize("num_seeds", [4, 16, 64])
def test_default_allocation_stays_within_a_fifth_of_a_square_host(dim, num_seeds):
  spec = layer.KasminaSpec(dim=dim, num_seeds=num_seeds)
  shapes = jax.eval_shape(lambda: layer.init_children(spec))
  allocated = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  host = dim * dim + dim
  # docs/design.md, "Cost accounting": the default sizes stay within 20%.
  assert allocated / host <= 0.20
  # The widest child fits the layout.
  assert spec.catalog.param_count.max() * num_seeds <= allocated


# --------------------------------------------------------------------------------------------
# Costs.


@pytest.mark.parametrize("b", range(len(CATALOG)), ids=[bp.name for bp in CATALOG])
def test_cost_counts_exactly_the_live_parameters(b):
  live = _live_mask()
  count = sum(int(m[b].sum()) for m in jax.tree.leaves(live))
  params, flops = CATALOG[b].cost(CHUNK, INPUT_DIM)
  assert count == params
  assert SPEC.catalog.param_count[b] == params
  assert SPEC.catalog.flops_per_row[b] == flops
  assert flops > 0


def test_germination_writes_only_live_entries_and_residual_children_start_at_zero():
  live = _live_mask()
  params = germinate(SPEC, layer.init_children(SPEC), jnp.ones((len(CATALOG),), bool),
                     jnp.arange(len(CATALOG)), jax.random.PRNGKey(3))
  for name, p, m in zip(("w1", "w1u", "b1", "wg", "bg", "w2", "b2", "s"),
                        jax.tree.leaves(params), jax.tree.leaves(live)):
    p = np.asarray(p)
    assert not np.any((p != 0) & ~m), f"germination wrote a dead entry of {name}"
  for b, bp in enumerate(CATALOG):
    last = [np.asarray(params.w2[b]), np.asarray(params.b2[b]), np.asarray(params.s[b])]
    first = np.abs(np.asarray(params.w1[b])).sum() + np.abs(np.asarray(params.w1u[b])).sum()
    if bp.kind == "residual":
      assert all(not a.any() for a in last), bp.name
    else:
      assert np.abs(last[0]).sum() > 0, bp.name
    if bp.hidden_width(CHUNK):
      assert first > 0, bp.name


def test_cost_formula_on_a_known_case():
  c, h = 8, 4
  assert Blueprint("m", hidden=h).cost(c) == (c * h + h + h * c + c, 2 * c * h + 2 * h * c)
  glu = Blueprint("g", hidden=h, glu=True).cost(c)
  assert glu[0] == c * h + h + h * c + c + c * h + h
  assert glu[1] > Blueprint("m", hidden=h).cost(c)[1]
  scale = Blueprint("s", hidden=0, diagonal=True).cost(c)
  assert scale == (2 * c, 2 * c)
  par = Blueprint("p", hidden=h, wiring="parallel").cost(c, 10)
  assert par[0] == 10 * h + h + h * c + c


def test_hidden_widths():
  assert Blueprint("a", hidden=0.25).hidden_width(64) == 16
  assert Blueprint("a", hidden=0.25).hidden_width(7) == 1  # floor, at least one unit
  assert Blueprint("a", hidden=0.125).hidden_width(1) == 1
  assert Blueprint("a", hidden=3).hidden_width(64) == 3
  assert Blueprint("a", hidden=0, diagonal=True).hidden_width(64) == 0
  assert Blueprint("a", hidden=0.0, diagonal=True).hidden_width(64) == 0
  spec = layer.KasminaSpec(dim=22, num_seeds=3)  # chunks of 8, 7, 7: widths at the widest
  assert spec.catalog.hidden == max(b.hidden_width(8) for b in spec.blueprints)
  np.testing.assert_array_equal(spec.catalog.hidden_mask.sum(-1),
                                [b.hidden_width(8) for b in spec.blueprints])


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(activation="swish"), ValueError, "activation"),
    (dict(kind="adapter"), ValueError, "kind"),
    (dict(wiring="sideways"), ValueError, "wiring"),
    (dict(hidden=-1), ValueError, "hidden"),
    (dict(hidden=True), ValueError, "hidden"),
    (dict(hidden="4"), ValueError, "hidden"),
    (dict(hidden=0), ValueError, "diagonal"),
    (dict(glu=True, wiring="parallel"), ValueError, "glu"),
    (dict(diagonal=True, wiring="parallel"), ValueError, "diagonal"),
    (dict(kind="replacement", wiring="parallel"), ValueError, "parallel"),
])
def test_blueprint_validation_names_the_argument(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    Blueprint("child", **kwargs)


def test_blueprint_name_must_be_a_nonempty_string():
  with pytest.raises(ValueError, match="name"):
    Blueprint("")
  with pytest.raises(ValueError, match="name"):
    Blueprint(3)


def test_catalog_validation_names_the_argument():
  with pytest.raises(ValueError, match="blueprints"):
    layer.KasminaSpec(dim=8, num_seeds=2, blueprints=())
  with pytest.raises(ValueError, match="blueprints.*unique"):
    layer.KasminaSpec(dim=8, num_seeds=2, blueprints=(Blueprint("a"), Blueprint("a", hidden=2)))
  with pytest.raises(TypeError, match=r"blueprints\[1\]"):
    layer.KasminaSpec(dim=8, num_seeds=2, blueprints=(Blueprint("a"), "b"))
  with pytest.raises(ValueError, match="input_dim"):
    layer.KasminaSpec(dim=8, num_seeds=2, blueprints=(Blueprint("p", wiring="parallel"),))
  with pytest.raises(ValueError, match="input_dim"):
    layer.KasminaSpec(dim=8, num_seeds=2, input_dim=0)


def test_catalog_tables_follow_the_blueprints():
  cat = SPEC.catalog
  assert cat.names == tuple(b.name for b in CATALOG)
  assert cat.chunk_width == CHUNK and cat.input_width == INPUT_DIM
  np.testing.assert_array_equal(cat.residual, [b.kind == "residual" for b in CATALOG])
  np.testing.assert_array_equal(cat.parallel, [b.wiring == "parallel" for b in CATALOG])
  np.testing.assert_array_equal(cat.glu, [b.glu for b in CATALOG])
  assert cat.any_parallel and cat.any_glu and cat.any_diagonal
  assert SPEC.blueprint_id("parallel_mlp") == len(CATALOG) - 1
  # Equal catalogs hash equal (the spec is a static jit argument).
  again = bp_lib.build_catalog(CATALOG, CHUNK, INPUT_DIM)
  assert again == cat and hash(again) == hash(cat)
  # A layer without GLU, diagonal or parallel blueprints allocates nothing for them.
  plain = layer.KasminaSpec(dim=8, num_seeds=2, blueprints=(Blueprint("m", hidden=2),))
  params = layer.init_children(plain)
  assert params.wg.shape == (2, 4, 0) and params.bg.shape == (2, 0)
  assert params.s.shape == (2, 0) and params.w1u.shape == (2, 0, 2)


# --------------------------------------------------------------------------------------------
# Reinitialisation after commands.


def test_reinit_children_after_stage_changes():
  spec = SPEC
  params = _random_layout(spec, 5)
  old = jnp.array([Stage.DORMANT, Stage.TRAINING, Stage.GRAFTING, Stage.GERMINATED,
                   Stage.CULLED, Stage.FINE_TUNING], jnp.int32)
  new = jnp.array([Stage.GERMINATED, Stage.CULLED, Stage.GRAFTING, Stage.CANCELLED,
                   Stage.DORMANT, Stage.ROLLED_BACK], jnp.int32)
  seeds = init_seed_state(6).replace(stage=new, blueprint=jnp.full((6,), 2, jnp.int32))
  key = jax.random.PRNGKey(7)
  out = jax.jit(layer.reinit_children, static_argnums=0)(spec, params, old, seeds, key)
  np.testing.assert_array_equal(layer.changed_children(old, new),
                                [True, True, False, True, True, True])
  fresh = germinate(spec, layer.init_children(spec), jnp.ones((6,), bool),
                    jnp.full((6,), 2, jnp.int32), key)
  for p, o, f in zip(jax.tree.leaves(params), jax.tree.leaves(out), jax.tree.leaves(fresh)):
    p, o, f = np.asarray(p), np.asarray(o), np.asarray(f)
    np.testing.assert_array_equal(o[0], f[0])  # germinated: a fresh child from the key
    np.testing.assert_array_equal(o[2], p[2])  # unchanged
    for k in (1, 3, 4, 5):  # culled, cancelled, back to dormant, rolled back: zero
      np.testing.assert_array_equal(o[k], 0.0)
