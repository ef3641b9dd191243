"""The framework-free orchestration: the commit sequence on either children form (Linen's
`ChildParams`, NNX's field mapping), and the rollback ending in-flight seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kasmina_jax import blueprints as bp
from kasmina_jax import grafting
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import optim
from kasmina_jax import orchestration as orch
from kasmina_jax import tamiyo
from kasmina_jax.lifecycle import Op, Stage

K = 4
SPEC = layer_lib.KasminaSpec(dim=8, num_seeds=K, blueprints=bp.default_blueprints())
PATH = ("dense", "kasmina")


def _setup(as_mapping: bool):
  children = layer_lib.init_children(SPEC)
  if as_mapping:  # what `nnx.state` makes of the NNX layer's per-field params
    children = {k: getattr(children, k) for k in children.__dataclass_fields__}
  params = {"dense": {"host": {"kernel": jnp.ones((8, 8))}, "kasmina": {"children": children}}}
  slots = {PATH: orch.LayerSlot(seeds=lifecycle.init_seed_state(K),
                                telemetry=layer_lib.init_telemetry(SPEC), spec=SPEC)}
  return params, slots


def _germinate_one():
  c = lifecycle.no_commands(K)
  return c.replace(op=c.op.at[1].set(Op.GERMINATE), blueprint=c.blueprint.at[1].set(0),
                   strategy=c.strategy.at[1].set(0))


def test_commit_is_the_same_on_both_children_forms_and_rollback_cancels():
  cfg = tamiyo.TamiyoConfig()
  tx = optim.kasmina_optimizer(optax.adam(1e-3))
  out = {}
  for as_mapping in (False, True):
    params, slots = _setup(as_mapping)
    opt_state = tx.init(params)
    slots2, params2, opt2, new_seeds, accepted = orch.commit(
        slots, params, opt_state, orch.seed_map(slots), {PATH: _germinate_one()},
        config=cfg.lifecycle, epoch=0, keys={PATH: jax.random.key(0)}, reset_telemetry=True)
    assert isinstance(orch.get_path(params2, orch.children_path(PATH)),
                      dict if as_mapping else bp.ChildParams)
    assert bool(accepted[PATH][1]) and set(new_seeds) == {PATH}
    np.testing.assert_array_equal(slots2[PATH].seeds.stage,
                                  [Stage.DORMANT, Stage.GERMINATED, Stage.DORMANT, Stage.DORMANT])
    out[as_mapping] = orch.get_children(params2, PATH)
    ctrl = orch.init_controller(slots2, cfg)
    slots3, params3, _, _, _ = orch.rollback(slots2, params2, opt2, ctrl, config=cfg, epoch=1,
                                             key=jax.random.key(1))
    assert int(slots3[PATH].seeds.stage[1]) == Stage.CANCELLED
    assert all(float(jnp.abs(x[1]).sum()) == 0.0
               for x in jax.tree.leaves(orch.get_children(params3, PATH)))
  jax.tree.map(np.testing.assert_array_equal, out[False], out[True])
  assert any(float(jnp.abs(x[1]).sum()) > 0 for x in jax.tree.leaves(out[False]))


def test_maps_are_keyed_by_layer_path_and_named_only_for_json():
  params, slots = _setup(False)
  cfg = tamiyo.TamiyoConfig()
  with pytest.raises(ValueError, match="commands"):
    orch.commit(slots, params, None, orch.seed_map(slots), {"dense/kasmina": _germinate_one()},
                config=cfg.lifecycle, epoch=0, keys={PATH: jax.random.key(0)},
                reset_telemetry=True)
  ctrl = orch.init_controller(slots, cfg)
  assert set(orch.layer_reports(slots)) == set(slots) == set(ctrl.layers)
  assert orch.layer_name(PATH) == "dense/kasmina"
  with pytest.raises(TypeError, match="path"):
    orch.layer_name("dense/kasmina")


def _half_step(seeds, signals, config):  # a user strategy: half of the ramp a step
  del signals, config
  return jnp.full(seeds.stage.shape, 0.5), jnp.zeros(seeds.stage.shape, bool)


def test_a_slots_own_strategies_drive_commit_and_the_alpha_update():
  params, slots = _setup(False)
  slots = {PATH: slots[PATH].replace(strategies=(_half_step,))}
  assert slots[PATH].strategy_names == ("_half_step",)
  cfg = tamiyo.TamiyoConfig()
  bad = _germinate_one()
  bad = bad.replace(strategy=bad.strategy.at[1].set(1))  # id 1: out of this layer's range
  _, _, _, _, accepted = orch.commit(slots, params, None, orch.seed_map(slots), {PATH: bad},
                                     config=cfg.lifecycle, epoch=0,
                                     keys={PATH: jax.random.key(0)}, reset_telemetry=True)
  assert not bool(accepted[PATH][1])
  seeds = slots[PATH].seeds
  seeds = seeds.replace(stage=seeds.stage.at[1].set(Stage.GRAFTING),
                        strategy=seeds.strategy.at[1].set(0))
  slots = {PATH: slots[PATH].replace(seeds=seeds)}
  grads = jax.tree.map(jnp.zeros_like, params)
  summary = type("S", (), {"objective": jnp.full((K,), jnp.nan), "nonfinite": jnp.zeros(K, bool)})
  out = orch.step_update(slots, old_params=params, params=params, grads=grads, snapshot=params,
                         summaries={PATH: summary}, host_norm=jnp.float32(0.5),
                         grafting=grafting.GraftingConfig(), fossil="integrated")
  np.testing.assert_allclose(np.asarray(out[PATH].seeds.alpha), [0, 0.5, 0, 0])
