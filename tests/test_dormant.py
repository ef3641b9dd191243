"""A dormant layer costs nothing it does not need (issue 19): the child path under `lax.cond`,
the telemetry schedule, drift only where a strategy reads it, masks that are no ops on the
host. Every change must leave values and gradients as they were."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import grafting as graft_lib
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import optim
from kasmina_jax import orchestration as orch
from kasmina_jax import telemetry as tel_lib
from kasmina_jax import training
from kasmina_jax.kernels import common
from kasmina_jax.lifecycle import Stage

MIXED = (Stage.TRAINING, Stage.GRAFTING, Stage.DORMANT, Stage.FINE_TUNING, Stage.STABILIZATION,
         Stage.FOSSILIZED)


def _problem(stages, *, parallel=False, dtype=jnp.float32, nan_dormant=False, every=1):
  bps = bp_lib.default_blueprints(parallel_hidden=4) if parallel else bp_lib.default_blueprints()
  spec = layer_lib.KasminaSpec(dim=26, num_seeds=6, blueprints=bps,
                               input_dim=10 if parallel else None, corr_rows=5,
                               telemetry_every=every)
  k = spec.num_seeds
  bids = [0, 1, 2, 3, 4, 5 if parallel else 0]
  seeds = lifecycle.init_seed_state(k).replace(
      stage=jnp.asarray(stages, jnp.int32),
      blueprint=jnp.asarray([b if s != Stage.DORMANT else -1 for b, s in zip(bids, stages)],
                            jnp.int32),
      alpha=jnp.asarray([0.0, 0.3, 0.0, 1.0, 1.0, 1.0], jnp.float32))
  p = layer_lib.germinate_children(spec, layer_lib.init_children(spec), jnp.ones(k, bool),
                                   jnp.asarray(bids), jax.random.key(1))
  leaves, tdef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  # Random children: a fresh residual child has f = 0, which would hide every difference.
  p = jax.tree.unflatten(tdef, [l + 0.1 * jax.random.normal(r, l.shape)
                                for l, r in zip(leaves, keys)])
  if nan_dormant:
    dormant = jnp.asarray(stages) == Stage.DORMANT
    p = jax.tree.map(lambda l: jnp.where(dormant.reshape((-1,) + (1,) * (l.ndim - 1)),
                                         jnp.nan, l), p)
  x = jax.random.normal(jax.random.key(3), (4, 5, 26)).astype(dtype)
  u = jax.random.normal(jax.random.key(4), (4, 5, 10)) if parallel else None
  return spec, seeds, p, x, u


def _unconditioned(spec, params, seeds, x, u, eval_alpha=None):
  """The child path run directly, as the layer did before the dormant branch existed."""
  rows = int(np.prod(x.shape[:-1]))
  u2 = None if u is None else u.reshape((rows, spec.input_dim))
  ea = None if eval_alpha is None else jnp.asarray(eval_alpha, jnp.float32)
  const = (seeds.stage, seeds.blueprint, seeds.alpha)
  out2d, loss, obj, ratio, ok = layer_lib._child_path(  # pylint: disable=protected-access
      spec, eval_alpha is not None, None, (params, x.reshape((rows, spec.dim)), u2, ea), const)
  return out2d.reshape(x.shape), loss, obj, ratio, ok


def _value_and_grads(fn, x, params, u, w):
  def f(x_, p_, u_):
    out, loss, obj, ratio, ok = fn(x_, p_, u_)
    return (jnp.sum(out.astype(jnp.float32) * w) + loss), (out, obj, ratio, ok)
  argnums = (0, 1) if u is None else (0, 1, 2)
  return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(x, params, u)


def _assert_trees(a, b, tol=0.0):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["dormant", "mixed", "mixed_parallel", "dormant_bf16",
                                  "mixed_eval"])
def test_forward_and_gradients_as_before(case):
  stages = [Stage.DORMANT] * 6 if case.startswith("dormant") else list(MIXED)
  dtype = jnp.bfloat16 if case.endswith("bf16") else jnp.float32
  spec, seeds, p, x, u = _problem(stages, parallel=case == "mixed_parallel", dtype=dtype)
  ea = jnp.asarray([1.0, 0.5, 1.0, 0.0, 1.0, 1.0]) if case == "mixed_eval" else None
  w = jax.random.normal(jax.random.key(5), x.shape)

  def layer(x_, p_, u_):
    out, aux = layer_lib.forward(spec, p_, seeds, x_, u=u_, eval_alpha=ea)
    ok = ~aux.nonfinite
    return out, aux.child_loss, aux.objective, aux.recon_ratio, ok

  got = _value_and_grads(layer, x, p, u, w)
  want = _value_and_grads(lambda a, b, c: _unconditioned(spec, b, seeds, a, c, ea), x, p, u, w)
  _assert_trees(got, want, tol=1e-6)
  if case.startswith("dormant"):
    (_, (out, obj, ratio, ok)), grads = got
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32))
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32),
                                  np.asarray(w.astype(dtype), np.float32))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[1]))
    assert np.all(np.isnan(obj)) and np.all(np.isnan(ratio)) and np.all(ok)


def test_dormant_layer_runs_no_child():
  """Dormant seeds holding NaN children: the dormant branch never evaluates them."""
  spec, seeds, p, x, _ = _problem([Stage.DORMANT] * 6, nan_dormant=True)
  def f(x_, p_):
    out, aux = layer_lib.forward(spec, p_, seeds, x_, telemetry=layer_lib.init_telemetry(spec))
    return jnp.sum(out * out) + aux.child_loss, aux
  (val, aux), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, p)
  assert np.isfinite(float(val)) and not np.any(np.asarray(aux.nonfinite))
  np.testing.assert_allclose(np.asarray(grads[0]), 2 * np.asarray(x), rtol=1e-6)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[1]))
  # The jitted dormant step's child path sits in a conditional (forward and backward).
  text = jax.jit(jax.grad(lambda x_, p_: f(x_, p_)[0], argnums=(0, 1))).lower(x, p).as_text()
  assert text.count("stablehlo.case") + text.count("mhlo.case") + text.count("conditional") >= 2


def test_vmap_over_stacked_layers():
  """Under `vmap` (stacked layers, one dormant and one live) the cond becomes a select."""
  spec, seeds_live, p, x, _ = _problem(list(MIXED))
  seeds_dorm = seeds_live.replace(stage=jnp.full((6,), int(Stage.DORMANT), jnp.int32))
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), seeds_dorm, seeds_live)
  f = lambda s: layer_lib.forward(spec, p, s, x)[0]
  got = jax.vmap(f)(stacked)
  _assert_trees(got, jnp.stack([f(seeds_dorm), f(seeds_live)]), tol=1e-6)


# ------------------------------------------------------------------------------- telemetry


def _passes(spec, seeds, p, xs, forward):
  tel = layer_lib.init_telemetry(spec)
  for x in xs:
    _, aux = forward(spec, p, seeds, x, telemetry=tel)
    tel = aux.telemetry
  return tel


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_telemetry_measures_a_moving_block_of_rows(path):
  """`telemetry_every=4` on 1024-row passes: the reference path measures rows 0-255 of the
  first pass, 256-511 of the second, ... (the same sums as measuring those rows whole); the
  fused path, which sums every row in passing, measures them all."""
  fwd = (layer_lib.forward_reference if path == "reference"
         else lambda *a, **k: common.forward(*a, **k, fused=common.fused_blend_jnp))
  _, seeds, p, _, _ = _problem(list(MIXED))
  rows = 4 * tel_lib.TELEMETRY_MIN_ROWS
  xs = [jax.random.normal(jax.random.key(10 + i), (rows, 26)) for i in range(6)]
  spec4, _, _, _, _ = _problem(list(MIXED), every=4)
  spec1, _, _, _, _ = _problem(list(MIXED), every=1)
  got = _passes(spec4, seeds, p, xs, fwd)
  size = tel_lib.measured_rows(rows, 4)
  assert size == rows // 4
  blocks = xs if path == "fused" else [x[(i % 4) * size:(i % 4 + 1) * size]
                                       for i, x in enumerate(xs)]
  want = _passes(spec1, seeds, p, blocks, fwd)
  whole = _passes(spec1, seeds, p, xs, fwd)
  assert int(got.passes) == 6 and float(got.count) == sum(b.shape[0] for b in blocks)
  # The sums: those of the blocks; the Gram matrix: each pass's own first rows, as always.
  corr = ("corr_count", "corr_sum", "gram")
  want = want.replace(**{f: getattr(whole, f) for f in corr})
  _assert_trees(got, want, tol=1e-5)
  # Its report: averages over the measured rows.
  _assert_trees(layer_lib.health_report(spec4, got, seeds),
                layer_lib.health_report(spec1, want, seeds), tol=1e-5)


def test_small_batches_are_measured_whole():
  spec, seeds, p, _, _ = _problem(list(MIXED), every=4)
  tel = _passes(spec, seeds, p, [jnp.ones((3, 26))] * 2, layer_lib.forward_reference)
  assert float(tel.count) == 6.0 and int(tel.passes) == 2
  tel = tel_lib.reset(tel)
  assert int(tel.passes) == 0
  _, aux = layer_lib.forward_reference(spec, p, seeds, jnp.ones((3, 26)), telemetry=tel)
  assert float(aux.telemetry.count) == 3.0


class _Net(nn.Module):
  every: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = knn.KasminaDense(24, 4, activation=nn.relu, corr_rows=8, telemetry_every=self.every,
                         name="hidden")(x, train=train)
    return nn.Dense(3, name="head")(x)


def test_epoch_report_same_on_a_deterministic_case():
  """Activations that repeat every step (learning rate 0, one batch): the epoch report is the
  same whether every row or a moving quarter of them is measured each step (after four steps
  every row was measured equally often)."""
  rng = np.random.default_rng(0)
  rows = 4 * tel_lib.TELEMETRY_MIN_ROWS
  batch = {"x": jnp.asarray(rng.standard_normal((rows, 5), np.float32)),
           "y": jnp.asarray(rng.integers(0, 3, rows).astype(np.int32))}
  reports = {}
  for every in (1, 4):
    state = training.create_train_state(_Net(every), optax.sgd(0.0), batch["x"],
                                        jax.random.key(0))
    for _ in range(8):
      state, _ = training.train_step(state, batch, training.cross_entropy_loss)
    lv = knn.find_layers(state.kasmina)[("hidden", "kasmina")]
    assert float(lv.telemetry.count) == 8 * rows // every
    reports[every] = layer_lib.health_report(lv.spec, lv.telemetry, lv.seeds)
    _, out = training.epoch_transition(state, batch, training.cross_entropy_loss)
    reports[f"epoch{every}"] = out.report.layers[("hidden", "kasmina")]
  _assert_trees(reports[1], reports[4], tol=1e-5)
  _assert_trees(reports["epoch1"], reports["epoch4"], tol=1e-5)


# ------------------------------------------------------------------------------- drift, masks


def _drift_case(strategy):
  spec = layer_lib.KasminaSpec(dim=8, num_seeds=2)
  children = layer_lib.init_children(spec)
  snap = {"d": {"host": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
                "kasmina": {"children": children}}}
  params = {"d": {"host": {"kernel": 1.5 * jnp.ones((4, 8)), "bias": jnp.zeros(8)},
                  "kasmina": {"children": children}}}
  seeds = lifecycle.init_seed_state(2).replace(
      stage=jnp.asarray([Stage.GRAFTING, Stage.DORMANT], jnp.int32),
      blueprint=jnp.asarray([0, -1], jnp.int32), strategy=jnp.asarray([strategy, -1], jnp.int32),
      alpha=jnp.asarray([0.2, 0.0], jnp.float32))
  slot = orch.LayerSlot(seeds=seeds, telemetry=layer_lib.init_telemetry(spec), spec=spec)
  summary = knn.StepSummary(child_loss=jnp.zeros(()), objective=jnp.full((2,), jnp.nan),
                            recon_ratio=jnp.full((2,), jnp.nan), nonfinite=jnp.zeros(2, bool))
  path = ("d", "kasmina")
  grads = jax.tree.map(jnp.zeros_like, params)
  out = orch.step_update({path: slot}, old_params=params, params=params, grads=grads,
                         snapshot=snap, summaries={path: summary}, host_norm=jnp.float32(0.5),
                         grafting=graft_lib.GraftingConfig(), fossil="integrated")[path]
  # What the strategies give with the drift always computed (the code before the change).
  drift = orch.layer_host_drift(params, snap, path)
  assert float(drift) == pytest.approx(0.5)
  want = graft_lib.grafting_step(lifecycle.tick_step(seeds), graft_lib.GraftSignals(
      objective=jnp.full((2,), jnp.nan), host_drift=drift, host_grad_norm=jnp.float32(0.5)))
  return out.seeds, want


@pytest.mark.parametrize("strategy", list(graft_lib.GraftingStrategy))
def test_drift_only_where_read(strategy):
  got, want = _drift_case(int(strategy))
  _assert_trees(got, want, tol=0.0)
  if strategy == graft_lib.GraftingStrategy.DRIFT_CONTROLLED:
    assert float(got.alpha[0]) == pytest.approx(0.2)  # paused on drift 0.5 > 0.12
  elif strategy == graft_lib.GraftingStrategy.FIXED_RAMP:
    assert float(got.alpha[0]) > 0.2


def test_host_masks_are_no_ops():
  spec = layer_lib.KasminaSpec(dim=8, num_seeds=2)
  params = {"w": jnp.arange(12.0).reshape(3, 4),
            "k": {"children": layer_lib.init_children(spec)}}
  seeds = {("k",): lifecycle.init_seed_state(2)}
  grads = jax.tree.map(lambda a: jnp.ones_like(a) * 0.1, params)
  tx = optim.kasmina_optimizer(optax.adam(1e-2))
  plain = optax.adam(1e-2)

  def masked(g, p):
    mask = optim.learning_mask(p, seeds)
    return tx.update(g, tx.init(p), p, learn_mask=mask)[0]

  got = jax.jit(masked)(grads, params)
  want = plain.update(grads["w"], plain.init(params["w"]), params["w"])[0]
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(got["k"]))
  jaxpr = jax.make_jaxpr(masked)(grads, params)
  host_selects = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "select_n"
                  and e.outvars[0].aval.shape == (3, 4)]
  assert not host_selects


# ------------------------------------------------------------------- static liveness (`live`)


@pytest.mark.parametrize("case,impl", [
    ("dormant", "reference"), ("mixed", "reference"), ("mixed_parallel", "reference"),
    ("mixed_eval", "reference"), ("dormant", "pallas"), ("mixed", "pallas")])
def test_static_live_gives_the_same_values_and_gradients(case, impl):
  """`live=False` (all dormant, known at trace time) and `live=True` (no device-side branch)
  give what the branch gives: outputs, telemetry, child loss and every gradient."""
  stages = [Stage.DORMANT] * 6 if case == "dormant" else list(MIXED)
  spec, seeds, p, x, u = _problem(stages, parallel=case == "mixed_parallel")
  ea = jnp.asarray([1.0, 0.5, 1.0, 0.0, 1.0, 1.0]) if case == "mixed_eval" else None
  w = jax.random.normal(jax.random.key(5), x.shape)
  tel0 = None if ea is not None else layer_lib.init_telemetry(spec)

  def run(live):
    def f(x_, p_, u_):
      out, aux = layer_lib.forward(spec, p_, seeds, x_, u=u_, eval_alpha=ea, telemetry=tel0,
                                   impl=impl, live=live)
      return jnp.sum(out * w) + aux.child_loss, (out, aux)
    argnums = (0, 1) if u is None else (0, 1, 2)
    return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(x, p, u)

  want = run(None)
  _assert_trees(run(True), want, tol=1e-6)
  if case == "dormant":
    _assert_trees(run(False), want, tol=1e-6)


def test_static_live_false_leaves_out_the_child_path():
  spec, seeds, p, x, _ = _problem([Stage.DORMANT] * 6, nan_dormant=True)
  def f(live):
    def g(x_, p_):
      out, aux = layer_lib.forward(spec, p_, seeds, x_, telemetry=layer_lib.init_telemetry(spec),
                                   live=live)
      return jnp.sum(out * out) + aux.child_loss
    return jax.jit(jax.grad(g, argnums=(0, 1))).lower(x, p).as_text()
  dormant, branch = f(False), f(None)
  assert "case" not in dormant and "case" in branch
  assert dormant.count("dot_general") < branch.count("dot_general")
  assert "case" not in f(True)


@pytest.mark.parametrize("live", [0, 1.0, "yes", jnp.asarray(True)])
def test_static_live_must_be_a_python_bool(live):
  spec, seeds, p, x, _ = _problem([Stage.DORMANT] * 6)
  with pytest.raises(TypeError, match="live"):
    layer_lib.forward(spec, p, seeds, x, live=live)


def _tiny_run(seed):
  """A 16-row batch and a fresh `_Net(1)` state trained by Adam (every seed dormant)."""
  rng = np.random.default_rng(seed)
  batch = {"x": jnp.asarray(rng.standard_normal((16, 5), np.float32)),
           "y": jnp.asarray(rng.integers(0, 3, 16).astype(np.int32))}
  state = training.create_train_state(_Net(1), optax.adam(1e-2), batch["x"], jax.random.key(0))
  return state, batch


def test_liveness_follows_the_stages_and_is_never_stale():
  state, batch = _tiny_run(0)
  path = ("hidden", "kasmina")
  lv = knn.find_layers(state.kasmina)[path]
  assert lv.live is False  # a new model: every seed dormant
  # New seeds without a new `live` make it unknown (it was read from the old stages).
  grafting = lv.seeds.replace(stage=lv.seeds.stage.at[0].set(int(Stage.GRAFTING)),
                              blueprint=lv.seeds.blueprint.at[0].set(0),
                              alpha=lv.seeds.alpha.at[0].set(0.5))
  assert lv.replace(seeds=grafting).live is None
  slot = knn.layer_slots(state.kasmina)[path]
  assert slot.replace(seeds=grafting).live is None
  live_state = state.replace(kasmina=knn.set_path(state.kasmina, path + ("state",),
                                                  lv.replace(seeds=grafting)))
  assert knn.find_layers(training.refresh_liveness(live_state).kasmina)[path].live is True
  # A train step keeps the fact (it changes no stage); the three programs agree.
  outs = {}
  for name, st in (("unknown", live_state), ("known", training.refresh_liveness(live_state))):
    new, _ = training.train_step(st, batch, training.cross_entropy_loss)
    outs[name] = new
  assert knn.find_layers(outs["known"].kasmina)[path].live is True
  _assert_trees(jax.tree.leaves((outs["known"].params, outs["known"].kasmina)),
                jax.tree.leaves((outs["unknown"].params, outs["unknown"].kasmina)), tol=1e-6)
  dormant_new, _ = training.train_step(state, batch, training.cross_entropy_loss)
  assert knn.find_layers(dormant_new.kasmina)[path].live is False
  # An epoch end commits commands (stages may change) and then reads the stages again.
  end, _, _ = training.end_of_epoch(dormant_new, batch, training.cross_entropy_loss)
  got = knn.find_layers(end.kasmina)[path]
  assert got.live is bool(np.any(np.asarray(
      (got.seeds.stage >= Stage.TRAINING) & (got.seeds.stage <= Stage.FOSSILIZED))))


def test_checkpoints_neither_store_nor_compare_liveness(tmp_path):
  import warnings  # pylint: disable=g-import-not-at-top
  from kasmina_jax import checkpoint  # pylint: disable=g-import-not-at-top
  x = jnp.ones((4, 5))
  state = training.create_train_state(_Net(1), optax.adam(1e-2), x, jax.random.key(0))
  path = ("hidden", "kasmina")
  assert knn.find_layers(state.kasmina)[path].live is False
  checkpoint.save(tmp_path, state, step=0)
  unknown = state.replace(kasmina=knn.map_layers(lambda v: v.replace(live=None), state.kasmina))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    restored = checkpoint.restore(tmp_path, unknown, strict_static=True)
    restored_known = checkpoint.restore(tmp_path, state, strict_static=True)
  # Restored data may come from any stages: the fact is forgotten, never carried over.
  assert knn.find_layers(restored.kasmina)[path].live is None
  assert knn.find_layers(restored_known.kasmina)[path].live is None


# ------------------------------------------------------- forwarded leaves, the drift sample


def _arrays(tree):
  """The array leaves of `tree` (PRNG keys as their data), for comparing values."""
  return [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
          for x in jax.tree.leaves(tree)]


def _germinated_state():
  """A model whose layer has no live seed but one GERMINATED seed (its step counters move)."""
  state, batch = _tiny_run(1)
  path = ("hidden", "kasmina")
  lv = knn.find_layers(state.kasmina)[path]
  seeds = lv.seeds.replace(stage=lv.seeds.stage.at[1].set(int(Stage.GERMINATED)),
                           blueprint=lv.seeds.blueprint.at[1].set(0))
  state = state.replace(kasmina=knn.set_path(state.kasmina, path + ("state",),
                                             lv.replace(seeds=seeds)))
  return training.refresh_liveness(state), batch, path


def test_statically_dormant_step_equals_the_general_step():
  """A layer known to have no live seed skips the seeds' update, the children's optimizer
  work and the non-finite flags; three steps leave every leaf of the state as the general
  program (liveness unknown) does."""
  state, batch, path = _germinated_state()
  assert knn.find_layers(state.kasmina)[path].live is False
  unknown = state.replace(kasmina=knn.map_layers(lambda v: v.replace(live=None), state.kasmina))
  outs = {}
  for name, st in (("known", state), ("unknown", unknown)):
    for _ in range(3):
      st, _ = training.train_step(st, batch, training.cross_entropy_loss)
    outs[name] = st
  known_seeds = knn.find_layers(outs["known"].kasmina)[path].seeds
  assert np.asarray(known_seeds.steps_in_stage).tolist() == [0, 3, 0, 0]
  _assert_trees(_arrays(outs["known"]), _arrays(outs["unknown"]), tol=1e-6)


def test_train_step_forwards_the_leaves_it_leaves_alone():
  """The leaves a dormant step does not change come back as the caller's own arrays (no
  copies); the values are those of the plain jitted step."""
  state, batch, path = _germinated_state()
  new, metrics = training.train_step(state, batch, training.cross_entropy_loss)
  # Under an outer `jit` every leaf is an output of the one program: the plain jitted step.
  plain_new, plain_metrics = jax.jit(training.train_step, static_argnums=2)(
      state, batch, training.cross_entropy_loss)
  _assert_trees(_arrays((new, metrics)), _arrays((plain_new, plain_metrics)), tol=0.0)
  assert new.rng is state.rng and new.epoch is state.epoch
  assert all(a is b for a, b in zip(jax.tree.leaves(new.ctrl), jax.tree.leaves(state.ctrl)))
  children = knn.children_path(path)
  assert all(a is b for a, b in zip(jax.tree.leaves(knn.get_path(new.params, children)),
                                     jax.tree.leaves(knn.get_path(state.params, children))))
  old_seeds = knn.find_layers(state.kasmina)[path].seeds
  new_seeds = knn.find_layers(new.kasmina)[path].seeds
  assert new_seeds.stage is old_seeds.stage and new_seeds.alpha is old_seeds.alpha
  assert new_seeds.steps_in_stage is not old_seeds.steps_in_stage
  # What changes is new: the host weights, the step, the telemetry.
  assert new.step is not state.step and int(new.step) == 1
  host = jax.tree.leaves(knn.get_path(new.params, ("head",)))
  assert not any(a is b for a, b in zip(host, jax.tree.leaves(
      knn.get_path(state.params, ("head",)))))
  # Under an outer trace (jit, scan) it is the same function.
  twice = jax.jit(lambda s: training.train_step(
      training.train_step(s, batch, training.cross_entropy_loss)[0], batch,
      training.cross_entropy_loss)[0])(state)
  step2, _ = training.train_step(new, batch, training.cross_entropy_loss)
  _assert_trees(_arrays(twice), _arrays(step2), tol=1e-6)


def test_drift_is_measured_on_sampled_rows():
  """A leaf with more than `DRIFT_ROWS` rows keeps every s-th row in the snapshot; the drift
  of a uniformly scaled host is exact, and a full snapshot gives the same figure."""
  rows = 4 * orch.DRIFT_ROWS + 3
  params = {"big": {"kernel": jnp.ones((rows, 6)), "bias": jnp.ones((6,))},
            "small": {"kernel": jnp.ones((orch.DRIFT_ROWS, 2))}}
  snap = orch.drift_snapshot(params)
  assert snap["big"]["kernel"].shape == (len(range(0, rows, 4)), 6)
  assert snap["small"]["kernel"].shape == (orch.DRIFT_ROWS, 2)
  moved = jax.tree.map(lambda x: 1.25 * x, params)
  assert float(orch.host_drift(moved, snap)) == pytest.approx(0.25, rel=1e-6)
  assert float(orch.host_drift(moved, params)) == pytest.approx(0.25, rel=1e-6)
  kept = orch.refresh_snapshot(jnp.asarray(False), moved, snap)
  new = orch.refresh_snapshot(jnp.asarray(True), moved, snap)
  _assert_trees(kept, snap)
  assert float(orch.host_drift(moved, new)) == 0.0
