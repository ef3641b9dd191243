"""The learned Tamiyo (`tamiyo.learned`), its vmapped environment (`population`) and its
trainer (`evolution`), through the public API.

The policy's scenarios reuse `test_tamiyo`'s synthetic telemetry (two layers of 3 and 5
seeds) and its hypothesis generators of seed states, reports and controller memories.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_tamiyo as tt
from kasmina_jax import evolution as es
from kasmina_jax import lifecycle, population, tamiyo
from kasmina_jax.lifecycle import LEGAL_TRANSITIONS, Op, Stage
from kasmina_jax.tamiyo import learned

CONFIG = tt.PROP_CONFIG  # at most 2 germinations an epoch, 2 queued and 2 training a layer


@jax.jit
def _learned_and_apply(params, rep, seeds, ctrl):
  cmds, new_ctrl = learned.decide(params, rep, seeds, ctrl, CONFIG)
  heuristic_cmds, heuristic_ctrl = learned.decide(params, rep, seeds, ctrl, CONFIG,
                                                  heuristic=True)
  reference = tamiyo.decide(rep, seeds, ctrl, CONFIG)
  new, acc = {}, {}
  for n in seeds:
    new[n], acc[n] = lifecycle.apply_commands(seeds[n], cmds[n], CONFIG.lifecycle,
                                              num_blueprints=tt.NUM_BP[n],
                                              num_strategies=tt.NUM_STRATEGIES)
  return cmds, new_ctrl, new, acc, (heuristic_cmds, heuristic_ctrl), reference


@st.composite
def policy_params(draw):
  """Random networks: any scale, germination bias of either sign."""
  key = jax.random.PRNGKey(draw(st.integers(0, 2**31 - 1)))
  scale = draw(st.sampled_from([0.0, 0.3, 3.0, 30.0]))
  vec = learned.to_vector(learned.init())
  noise = jax.random.normal(key, vec.shape)
  return learned.from_vector(vec + scale * noise)


# Jitted once per config (the eager policy compiles every small op on its own: minutes).
_decide = jax.jit(learned.decide, static_argnums=(4,))
_heuristic_decide = jax.jit(tamiyo.decide, static_argnums=(3,))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tt.scenarios(), policy_params())
def test_property_learned_policy_emits_only_accepted_commands(scenario, params):
  rep, seeds, ctrl = scenario
  cmds, new_ctrl, new, acc, heuristic, reference = _learned_and_apply(params, rep, seeds, ctrl)
  germinations = 0
  for n in seeds:
    op = np.asarray(cmds[n].op)
    np.testing.assert_array_equal(np.asarray(acc[n]), op != Op.NONE, err_msg=f"{n}: {op}")
    old_stage, new_stage = np.asarray(seeds[n].stage), np.asarray(new[n].stage)
    moved = old_stage != new_stage
    assert np.all(LEGAL_TRANSITIONS[old_stage[moved], new_stage[moved]])
    germ = op == Op.GERMINATE
    germinations += int(germ.sum())
    # Only DORMANT seeds past their embargo germinate, with a catalog blueprint.
    assert np.all(old_stage[germ] == Stage.DORMANT)
    assert np.all(np.asarray(seeds[n].embargo_left)[germ] <= 0)
    bp = np.asarray(cmds[n].blueprint)[germ]
    assert np.all((bp >= 0) & (bp < tt.NUM_BP[n]))
    # Every other command is the heuristic's: the safety rules are not learned.
    other = ~germ & (np.asarray(reference[0][n].op) != Op.GERMINATE)
    np.testing.assert_array_equal(op[other], np.asarray(reference[0][n].op)[other])
    # Slot limits: at most `max_queued_per_layer` seeds waiting in GERMINATED.
    queued = np.sum(np.asarray(new[n].stage) == Stage.GERMINATED)
    assert queued <= max(CONFIG.max_queued_per_layer,
                         np.sum(old_stage == Stage.GERMINATED))
  assert germinations <= CONFIG.max_germinations_per_epoch
  # heuristic=True is exactly `tamiyo.decide`.
  chex.assert_trees_all_equal(heuristic, reference)
  if bool(new_ctrl.rollback_requested):
    assert germinations == 0
    for n in seeds:
      chex.assert_trees_all_equal(cmds[n], tamiyo.rollback_commands(seeds)[n])


def test_illegal_commands_are_rejected_without_state_change():
  seeds = tt.fresh_seeds()
  seeds = tt.set_seed(seeds, "enc", 0, stage=Stage.TRAINING, blueprint=0, strategy=0)
  seeds = tt.set_seed(seeds, "enc", 1, stage=Stage.CULLED, embargo_left=2)
  ctrl = tamiyo.init_controller(seeds, tt.NUM_BP, CONFIG)
  eager = learned.init()._replace(b_germ=jnp.float32(50.0))
  cmds, _ = _decide(eager, tt.report(), seeds, ctrl, CONFIG)
  c = cmds["enc"]
  # The policy's command for seed 2 (a DORMANT seed), bent into illegal ones.
  bad = [c.replace(op=c.op.at[0].set(Op.GERMINATE), blueprint=c.blueprint.at[0].set(0),
                   strategy=c.strategy.at[0].set(0)),            # GERMINATE while TRAINING
         c.replace(op=c.op.at[1].set(Op.GERMINATE), blueprint=c.blueprint.at[1].set(0),
                   strategy=c.strategy.at[1].set(0)),            # during the embargo
         c.replace(op=c.op.at[2].set(Op.GERMINATE), blueprint=c.blueprint.at[2].set(99),
                   strategy=c.strategy.at[2].set(0))]            # unknown blueprint
  for i, cmd in enumerate(bad):
    new, acc = lifecycle.apply_commands(seeds["enc"], cmd, CONFIG.lifecycle,
                                        num_blueprints=tt.NUM_BP["enc"],
                                        num_strategies=tt.NUM_STRATEGIES)
    assert not bool(acc[i])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b)[i]),
                 seeds["enc"], new)


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_safety_rules_stay_outside_what_is_learned(bias):
  """Emergency rollback, a non-finite seed's rollback, the embargo and the per-epoch limit
  act the same whatever the network wants."""
  params = learned.init()._replace(b_germ=jnp.float32(bias))
  seeds = tt.fresh_seeds()
  seeds = tt.set_seed(seeds, "enc", 0, stage=Stage.TRAINING, blueprint=0, strategy=0)
  seeds = tt.set_seed(seeds, "enc", 1, stage=Stage.GERMINATED, blueprint=0, strategy=0)
  seeds = tt.set_seed(seeds, "dec", 0, stage=Stage.CULLED, embargo_left=2)
  seeds = tt.set_seed(seeds, "dec", 1, stage=Stage.FINE_TUNING, blueprint=0, strategy=0,
                      nonfinite=True)
  ctrl = tamiyo.init_controller(seeds, tt.NUM_BP, CONFIG)
  # An exploding loss: the whole model rolls back, as with the heuristic, nothing germinates.
  boom = tt.report(train=float("nan"))
  cmds, new_ctrl = _decide(params, boom, seeds, ctrl, CONFIG)
  ref, ref_ctrl = _heuristic_decide(boom, seeds, ctrl, CONFIG)
  chex.assert_trees_all_equal(cmds, ref)
  chex.assert_trees_all_equal(new_ctrl, ref_ctrl)
  assert bool(new_ctrl.rollback_requested)
  # A normal epoch: the sick seed is rolled back and the embargoed one left alone either way.
  cmds, _ = _decide(params, tt.report(), seeds, ctrl, CONFIG)
  assert int(cmds["dec"].op[1]) == Op.ROLLBACK
  assert int(cmds["dec"].op[0]) != Op.GERMINATE
  germ = sum(int(np.sum(np.asarray(c.op) == Op.GERMINATE)) for c in cmds.values())
  assert germ == (CONFIG.max_germinations_per_epoch if bias > 0 else 0)


def test_bad_params_are_refused_before_tracing():
  p = learned.init()
  with pytest.raises(ValueError, match="params.w_in"):
    learned.check_params(p._replace(w_in=jnp.zeros((3, 16))))
  with pytest.raises(TypeError, match="params"):
    learned.policy({"w_in": 1})
  with pytest.raises(ValueError, match="vector"):
    learned.from_vector(jnp.zeros(7))
  with pytest.raises(ValueError, match="hidden"):
    learned.init(hidden=0)


def test_policy_files_round_trip_and_the_shipped_policy_loads(tmp_path):
  p = learned.init(jax.random.PRNGKey(3), hidden=8)
  path = learned.save(str(tmp_path / "p.npz"), p, note="test", generations=3)
  chex.assert_trees_all_equal(learned.load(path), p)
  assert learned.load_metadata(path) == {"note": "test", "generations": 3}
  shipped = learned.load_pretrained()
  assert learned.check_params(shipped) == shipped.hidden
  assert "generations" in learned.load_metadata(learned.PRETRAINED_MNIST1D)
  # The bound policy has `tamiyo.decide`'s signature.
  seeds = tt.fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, tt.NUM_BP, CONFIG)
  cmds, _ = learned.policy(shipped)(tt.report(), seeds, ctrl, CONFIG)
  assert set(cmds) == set(seeds)


# ----------------------------------------------------------------------------- environment

TINY = population.EnvConfig(task="spirals", width=8, depth=1, num_seeds=2, child_width=4,
                            epochs=3, steps_per_epoch=3, batch_size=16, fit_rows=200,
                            val_rows=64, test_rows=64)


def test_vmapped_members_match_their_single_runs():
  s1 = population.Setting("spirals", samples=400, data_seed=0)
  s2 = population.Setting("spirals", samples=300, noise=0.5, data_seed=1)
  eager = learned.init(jax.random.PRNGKey(0))._replace(b_germ=jnp.float32(5.0))
  members = [population.member(TINY, s1, seed=0, learning_rate=1e-2),  # heuristic
             population.member(TINY, s2, seed=1, learning_rate=3e-3, policy=eager)]
  batched = population.run_population(TINY, population.stack_members(members),
                                      fast_compile=True)
  single = jax.jit(population.growth_run, static_argnums=0).lower(TINY, members[1]).compile(
      population.FAST_COMPILE_OPTIONS)
  # One un-vmapped program serves both members (the controller is a traced flag).
  for i, m in enumerate(members):
    one = single(jax.tree.map(jnp.asarray, m))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), one, rtol=1e-5,
                                atol=1e-5)
  # Growth happened (the runs are not trivially equal), and the members differ.
  assert int(batched.params[1]) > int(batched.initial_params[1])
  assert not np.allclose(batched.curve_val_accuracy[0], batched.curve_val_accuracy[1])
  r = population.reward(batched, TINY)
  assert r.shape == (2,) and np.all(np.isfinite(r))
  test = population.evaluate_test(TINY, jax.tree.map(lambda x: x[1], batched.variables), s2)
  assert 0.0 <= test["accuracy"] <= 1.0


def test_learning_rate_reaches_every_member():
  # The member's rate is written into the optimizer state it starts from...
  s = population.Setting("spirals", samples=400, data_seed=0)
  members = [population.member(TINY, s, seed=0, learning_rate=lr) for lr in (1e-4, 3e-2)]
  for m, lr in zip(members, (1e-4, 3e-2)):
    state = population.init_state(TINY, jax.tree.map(jnp.asarray, m))
    hyper = [x.hyperparams["learning_rate"] for x in jax.tree.leaves(
        state.opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
             if hasattr(x, "hyperparams")]
    assert hyper and all(np.isclose(float(h), lr) for h in hyper)
  # ...and two rates, everything else equal, give two different runs.
  out = population.run_population(TINY, population.stack_members(members), fast_compile=True)
  assert not np.isclose(float(out.val_loss[0]), float(out.val_loss[1]), rtol=1e-3)
  first = lambda tree: jax.tree.leaves(jax.tree.map(lambda x: x[0], tree))
  second = lambda tree: jax.tree.leaves(jax.tree.map(lambda x: x[1], tree))
  assert any(not np.allclose(a, b) for a, b in zip(first(out.variables["params"]),
                                                   second(out.variables["params"])))
  with pytest.raises(ValueError, match="learning_rate"):
    population._with_learning_rate(optax.adam(1e-3).init({"w": jnp.zeros(2)}), 1e-2)


def test_env_settings_are_checked():
  with pytest.raises(ValueError, match="task"):
    population.EnvConfig(task="cifar")
  with pytest.raises(ValueError, match="num_seeds"):
    population.EnvConfig(width=2, num_seeds=4)
  with pytest.raises(ValueError, match="setting"):
    population.make_data(population.Setting("mnist1d"), TINY)
  with pytest.raises(ValueError, match="shapes differ"):
    population.stack_members([
        population.member(TINY, population.Setting("spirals", samples=400), seed=0,
                          learning_rate=1e-3),
        population.member(TINY, population.Setting("spirals", samples=400), seed=0,
                          learning_rate=1e-3, policy=learned.init(hidden=4))])


# ----------------------------------------------------------------------------- ES


def _toy_fitness(x):
  target = jnp.linspace(-1.0, 1.0, x.shape[-1])
  return -jnp.sum((x - target) ** 2, -1)


def _es_step(state, config):
  cands, noise = es.ask(state, config)
  return es.tell(state, noise, _toy_fitness(cands), config)


def test_es_gradient_points_uphill_and_the_search_climbs():
  config = es.ESConfig(pairs=64, sigma=0.05, learning_rate=0.05)
  state = es.init(jnp.zeros(6), jax.random.PRNGKey(0))
  cands, noise = es.ask(state, config)
  # Antithetic pairs around the mean.
  np.testing.assert_allclose(cands[0::2] + cands[1::2],
                             np.broadcast_to(2 * state.mean, (64, 6)), atol=1e-6)
  g = es.gradient(noise, _toy_fitness(cands), config)
  true = jax.grad(lambda x: _toy_fitness(x))(state.mean)
  assert float(g @ true / (jnp.linalg.norm(g) * jnp.linalg.norm(true))) > 0.8
  start = float(_toy_fitness(state.mean))
  state = jax.jit(lambda s: jax.lax.fori_loop(0, 60, lambda _, s: _es_step(s, config), s))(state)
  assert float(_toy_fitness(state.mean)) > start / 4
  ranks = es.centred_ranks(jnp.array([3.0, jnp.nan, 1.0, 3.0]))
  np.testing.assert_allclose(ranks, [5 / 6 - 0.5, -0.5, 1 / 3 - 0.5, 5 / 6 - 0.5], atol=1e-6)
  with pytest.raises(ValueError, match="fitness"):
    es.tell(state, noise, jnp.zeros(3), config)


def test_es_checkpoint_resumes_exactly(tmp_path):
  config = es.ESConfig(pairs=4, sigma=0.1, learning_rate=0.1)

  step = jax.jit(lambda s: _es_step(s, config))

  def run(state, n):
    for _ in range(n):
      state = step(state)
    return state

  straight = run(es.init(jnp.ones(5), jax.random.PRNGKey(4)), 4)
  half = run(es.init(jnp.ones(5), jax.random.PRNGKey(4)), 2)
  path = es.save(str(tmp_path / "es.npz"), half, history=np.asarray("[1, 2]"))
  resumed, extra = es.load(path)
  assert str(extra["history"]) == "[1, 2]"
  chex.assert_trees_all_equal(run(resumed, 2), straight)
