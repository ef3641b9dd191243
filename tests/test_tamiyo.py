"""Scenario and property tests of `kasmina_jax.tamiyo` on synthetic telemetry built by hand.

Every scenario runs over a model of two Kasmina layers with different seed counts (a dict of
`SeedState`s), through the public API and the end-of-epoch order the training loop uses:
`decide` -> `lifecycle.apply_commands` -> `field_reports` -> `observe`.
"""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasmina_jax import blueprints, layer, lifecycle, tamiyo, telemetry
from kasmina_jax.lifecycle import LEGAL_TRANSITIONS, Op, Stage

SPECS = {"enc": layer.KasminaSpec(dim=12, num_seeds=3),
         "dec": layer.KasminaSpec(dim=20, num_seeds=5)}
NUM_BP = {n: s.num_blueprints for n, s in SPECS.items()}
NUM_STRATEGIES = tamiyo.NUM_GRAFTING_STRATEGIES
LCFG = lifecycle.LifecycleConfig()

# Few configs, so that `decide` compiles only a few times in this file.
# One seed at a time after a plateau, a bandit choosing the blueprint (the design's literal
# controller; the library's defaults grow every slot at once, see test_defaults_grow_every_slot).
BASE = tamiyo.TamiyoConfig(max_concurrent_training=1, max_germinations_per_epoch=1,
                           max_queued_per_layer=1, germination_cooldown_epochs=1,
                           germinate_without_plateau=False,
                           selection=tamiyo.SelectionStrategy.PERFORMANCE)
# Growth on health alone, every epoch (no plateau, no cooldown), one seed an epoch.
GROW = dataclasses.replace(BASE, germinate_without_plateau=True, germination_cooldown_epochs=0,
                           recovery_margin=0.2)

decide_jit = jax.jit(tamiyo.decide, static_argnames="config")
field_reports_jit = jax.jit(tamiyo.field_reports)
observe_jit = jax.jit(tamiyo.observe, static_argnames="config")


def health(k, *, var=None, dead=None, corr=None, nonfinite=None):
  z = jnp.zeros((k,), jnp.float32)
  f = lambda v, d: jnp.full((k,), d, jnp.float32) if v is None else jnp.asarray(v, jnp.float32)
  return telemetry.HealthReport(
      chunk_variance=f(var, 1.0), dead_node_ratio=f(dead, 0.0),
      avg_inter_node_correlation=f(corr, 0.1), alpha=z, objective=z, recon_ratio=z,
      gradient_variance=z, param_count=jnp.zeros((k,), jnp.int32),
      param_bytes=jnp.zeros((k,), jnp.int32), flops_per_row=jnp.zeros((k,), jnp.int32),
      nonfinite=jnp.zeros((k,), bool) if nonfinite is None else jnp.asarray(nonfinite, bool))


def report(healths=None, *, train=1.0, val=1.0, grad=0.5, drift=0.01, epoch=0):
  healths = healths or {}
  layers = {n: tamiyo.layer_report(s, healths.get(n, health(s.num_seeds)))
            for n, s in SPECS.items()}
  return tamiyo.EpochReport(layers=layers, train_loss=jnp.float32(train),
                            val_loss=jnp.float32(val), host_grad_norm=jnp.float32(grad),
                            host_drift=jnp.float32(drift), epoch=jnp.int32(epoch))


def fresh_seeds():
  return {n: lifecycle.init_seed_state(s.num_seeds) for n, s in SPECS.items()}


def set_seed(seeds, name, index, **fields):
  s = seeds[name]
  new = {f: getattr(s, f).at[index].set(v) for f, v in fields.items()}
  return {**seeds, name: s.replace(**new)}


@jax.jit
def apply_all(seeds, cmds, epoch=0):
  out, acc = {}, {}
  for n in seeds:
    out[n], acc[n] = lifecycle.apply_commands(seeds[n], cmds[n], LCFG, num_blueprints=NUM_BP[n],
                                              num_strategies=NUM_STRATEGIES, epoch=epoch)
  return out, acc


@jax.jit
def end_of_epoch(seeds, delta=None):
  """`tick_epoch` then `update_readiness` on every layer (`delta`: one float for all seeds)."""
  return {n: lifecycle.update_readiness(lifecycle.tick_epoch(s), delta=delta, config=LCFG)
          for n, s in seeds.items()}


@jax.jit
def readiness(seeds):
  return {n: lifecycle.update_readiness(s, config=LCFG) for n, s in seeds.items()}


def ops(cmds):
  return {n: np.asarray(c.op).tolist() for n, c in cmds.items()}


def assert_all_accepted(cmds, acc):
  for n in cmds:
    issued = np.asarray(cmds[n].op) != Op.NONE
    np.testing.assert_array_equal(np.asarray(acc[n]), issued, err_msg=f"layer {n}")


def plateaued_ctrl(config, seeds, epochs=None):
  """A controller that has seen a flat validation loss for `plateau_patience` epochs."""
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  for e in range(config.plateau_patience if epochs is None else epochs):
    cmds, ctrl = decide_jit(report(epoch=e), seeds, ctrl, config=config)
    assert not any(np.any(np.asarray(c.op) == Op.GERMINATE) for c in cmds.values())
  return ctrl


# ----------------------------------------------------------------------------- where / when


def test_plateau_germinates_worst_seed_and_only_it():
  config = BASE
  assert config.plateau_patience == 2
  seeds = fresh_seeds()
  sick = {"dec": health(5, dead=[0.0, 0.0, 0.9, 0.2, 0.0])}
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  # An improving validation loss never plateaus: no growth.
  for e, v in enumerate([1.0, 0.9, 0.8, 0.7]):
    cmds, ctrl_imp = decide_jit(report(sick, val=v, epoch=e), seeds,
                                ctrl if e == 0 else ctrl_imp, config=config)
    assert all(not np.any(np.asarray(c.op)) for c in cmds.values())
  # A flat one: the plateau after `plateau_patience` epochs without improvement.
  for e in range(3):
    cmds, ctrl = decide_jit(report(sick, epoch=e), seeds, ctrl, config=config)
    germ = {n: np.asarray(c.op) == Op.GERMINATE for n, c in cmds.items()}
    if e < 2:
      assert not any(g.any() for g in germ.values()), e
  assert not germ["enc"].any()
  np.testing.assert_array_equal(germ["dec"], [False, False, True, False, False])
  assert int(ctrl.plateau_epochs) == 2
  new, acc = apply_all(seeds, cmds, epoch=2)
  assert_all_accepted(cmds, acc)
  assert int(new["dec"].stage[2]) == Stage.GERMINATED
  assert 0 <= int(new["dec"].blueprint[2]) < NUM_BP["dec"]
  # The controller remembers the seed's health at germination.
  np.testing.assert_allclose(np.asarray(ctrl.layers["dec"].germ_health[2]), [1.0, 0.9, 0.1])
  assert float(ctrl.layers["dec"].bp_tries.sum()) == 1
  # Cooldown: no germination in the next epoch, even on a plateau.
  cmds, _ = decide_jit(report(sick, epoch=3), new, ctrl, config=config)
  assert not any(np.any(np.asarray(c.op) == Op.GERMINATE) for c in cmds.values())


def test_low_variance_and_correlation_rank_as_need():
  config = GROW
  seeds = fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  stuck = {"enc": health(3, var=[1.0, 0.05, 1.0])}
  cmds, _ = decide_jit(report(stuck), seeds, ctrl, config=config)
  assert ops(cmds) == {"enc": [0, Op.GERMINATE, 0], "dec": [0] * 5}
  redundant = {"dec": health(5, corr=[0.1, 0.1, 0.1, 0.95, 0.1])}
  cmds, _ = decide_jit(report(redundant), seeds, ctrl, config=config)
  assert ops(cmds) == {"enc": [0] * 3, "dec": [0, 0, 0, Op.GERMINATE, 0]}


def test_no_germination_during_embargo():
  config = GROW
  sick = {"enc": health(3, dead=[0.0, 0.9, 0.0]), "dec": health(5, dead=[0.0, 0.0, 0.0, 0.5, 0.0])}
  seeds = fresh_seeds()
  # The neediest seed is CULLED under embargo (ready stays False while the embargo runs).
  seeds = set_seed(seeds, "enc", 1, stage=Stage.CULLED, embargo_left=3, blueprint=0, strategy=0)
  seeds = end_of_epoch(seeds)
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  cmds, _ = decide_jit(report(sick), seeds, ctrl, config=config)
  assert ops(cmds) == {"enc": [0, 0, 0], "dec": [0, 0, 0, Op.GERMINATE, 0]}
  # Every seed embargoed (also a DORMANT seed carrying an embargo): nothing germinates.
  for n, s in seeds.items():
    seeds[n] = s.replace(embargo_left=jnp.full_like(s.embargo_left, 2))
  cmds, _ = decide_jit(report(sick), seeds, ctrl, config=config)
  assert all(not np.any(np.asarray(c.op)) for c in cmds.values())
  # Embargo over: the CULLED seed is ready and returns to DORMANT (no germination yet).
  seeds = set_seed(seeds, "enc", 1, embargo_left=0)
  seeds = readiness(seeds)
  cmds, _ = decide_jit(report(sick), seeds, ctrl, config=config)
  assert ops(cmds)["enc"] == [0, Op.ADVANCE, 0]
  new, acc = apply_all(seeds, cmds)
  assert_all_accepted(cmds, acc)
  assert int(new["enc"].stage[1]) == Stage.DORMANT


def test_no_germination_when_slots_full_and_queue_promotion():
  config = GROW
  assert (config.max_concurrent_training, config.max_queued_per_layer) == (1, 1)
  sick = {"enc": health(3, dead=[0.9, 0.8, 0.7]), "dec": health(5, dead=[0.5] * 5)}
  seeds = fresh_seeds()
  # enc: seed 0 TRAINING (not ready), seed 1 queued: its one training slot and its one queue
  # place are taken.
  seeds = set_seed(seeds, "enc", 0, stage=Stage.TRAINING, blueprint=0, strategy=0,
                   germinated_epoch=0)
  seeds = set_seed(seeds, "enc", 1, stage=Stage.GERMINATED, blueprint=0, strategy=0,
                   germinated_epoch=1)
  # dec: every seed busy.
  seeds["dec"] = seeds["dec"].replace(
      stage=jnp.asarray([Stage.GRAFTING, Stage.FOSSILIZED, Stage.STABILIZATION,
                         Stage.FOSSILIZED, Stage.EVALUATING], jnp.int32),
      blueprint=jnp.zeros((5,), jnp.int32), strategy=jnp.zeros((5,), jnp.int32))
  seeds = readiness(seeds)
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  cmds, _ = decide_jit(report(sick), seeds, ctrl, config=config)
  assert all(not np.any(np.asarray(c.op)) for c in cmds.values()), ops(cmds)
  # The training seed becomes ready: it advances to GRAFTING, and its freed slot goes to the
  # queued seed at once; the queue place is free again, so the DORMANT seed 2 germinates.
  seeds = set_seed(seeds, "enc", 0, ready=True)
  cmds, ctrl2 = decide_jit(report(sick), seeds, ctrl, config=config)
  assert ops(cmds) == {"enc": [Op.ADVANCE, Op.ADVANCE, Op.GERMINATE], "dec": [0] * 5}
  new, acc = apply_all(seeds, cmds)
  assert_all_accepted(cmds, acc)
  assert np.asarray(new["enc"].stage).tolist() == [Stage.GRAFTING, Stage.TRAINING,
                                                   Stage.GERMINATED]


def test_two_queued_seeds_promote_oldest_first():
  config = BASE
  seeds = fresh_seeds()
  seeds = set_seed(seeds, "dec", 1, stage=Stage.GERMINATED, blueprint=0, strategy=0,
                   germinated_epoch=4)
  seeds = set_seed(seeds, "dec", 3, stage=Stage.GERMINATED, blueprint=0, strategy=0,
                   germinated_epoch=2)
  seeds = readiness(seeds)
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  cmds, _ = decide_jit(report(), seeds, ctrl, config=config)
  assert ops(cmds)["dec"] == [0, 0, 0, Op.ADVANCE, 0]


def test_recovered_seed_is_cancelled():
  config = GROW
  assert config.recovery_margin == 0.2
  seeds = fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  sick = {"enc": health(3, dead=[0.0, 0.9, 0.0])}
  cmds, ctrl = decide_jit(report(sick), seeds, ctrl, config=config)
  assert ops(cmds)["enc"] == [0, Op.GERMINATE, 0]
  seeds, _ = apply_all(seeds, cmds)
  seeds = end_of_epoch(seeds)
  # Still sick: the queued seed is promoted into the free training slot.
  cmds, ctrl_sick = decide_jit(report(sick, epoch=1), seeds, ctrl, config=config)
  assert ops(cmds)["enc"] == [0, Op.ADVANCE, 0]
  # Recovered while queued: cancelled.
  healed = {"enc": health(3, dead=[0.0, 0.1, 0.0])}
  cmds, _ = decide_jit(report(healed, epoch=1), seeds, ctrl, config=config)
  assert ops(cmds)["enc"][1] == Op.CANCEL
  # Recovered while training (and not ready): cancelled too; a ready one goes on.
  seeds = set_seed(seeds, "enc", 1, stage=Stage.TRAINING, ready=False)
  cmds, _ = decide_jit(report(healed, epoch=2), seeds, ctrl, config=config)
  assert ops(cmds)["enc"][1] == Op.CANCEL
  new, acc = apply_all(seeds, cmds)
  assert_all_accepted(cmds, acc)
  assert int(new["enc"].stage[1]) == Stage.CANCELLED
  ready = set_seed(seeds, "enc", 1, ready=True)
  cmds, _ = decide_jit(report(healed, epoch=2), ready, ctrl, config=config)
  assert ops(cmds)["enc"][1] == Op.ADVANCE
  # The cancel yields a field report; CANCELLED reports leave the bandit alone.
  reports = field_reports_jit(seeds, new, report(healed, epoch=2), ctrl)
  assert np.asarray(reports["enc"].valid).tolist() == [False, True, False]
  assert int(reports["enc"].outcome[1]) == Stage.CANCELLED
  observed = observe_jit(ctrl, reports, config=config)
  chex.assert_trees_all_equal(observed, ctrl)


# ----------------------------------------------------------------------------- safety


def busy_seeds():
  seeds = fresh_seeds()
  seeds["enc"] = seeds["enc"].replace(
      stage=jnp.asarray([Stage.GERMINATED, Stage.TRAINING, Stage.FOSSILIZED], jnp.int32),
      blueprint=jnp.asarray([0, 1, 2], jnp.int32), strategy=jnp.zeros((3,), jnp.int32))
  seeds["dec"] = seeds["dec"].replace(
      stage=jnp.asarray([Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
                         Stage.FINE_TUNING, Stage.CULLED], jnp.int32),
      blueprint=jnp.asarray([0, 1, 2, 3, 4], jnp.int32), strategy=jnp.zeros((5,), jnp.int32),
      embargo_left=jnp.asarray([0, 0, 0, 0, 3], jnp.int32))
  return seeds


ROLLBACK_OPS = {"enc": [Op.CANCEL, Op.ROLLBACK, 0],
                "dec": [Op.ROLLBACK, Op.ROLLBACK, Op.ROLLBACK, Op.ROLLBACK, 0]}


@pytest.mark.parametrize("train", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_loss_rolls_back(train):
  config = GROW
  seeds = busy_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  cmds, ctrl1 = decide_jit(report(train=train), seeds, ctrl, config=config)
  assert bool(ctrl1.rollback_requested)
  assert ops(cmds) == ROLLBACK_OPS
  new, acc = apply_all(seeds, cmds)
  assert_all_accepted(cmds, acc)
  # The bad epoch does not enter the loss history; the helper issues the same commands.
  assert int(ctrl1.history_count) == 0
  chex.assert_trees_all_equal(tamiyo.rollback_commands(seeds), cmds)
  # Field reports for the rolled-back and cancelled seeds feed the bandit as failures.
  reports = field_reports_jit(seeds, new, report(train=train), ctrl1)
  assert np.asarray(reports["dec"].outcome).tolist() == [Stage.ROLLED_BACK] * 4 + [-1]
  ctrl2 = observe_jit(ctrl1, reports, config=config)
  np.testing.assert_array_equal(np.asarray(ctrl2.layers["dec"].bp_failures), [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(ctrl2.layers["enc"].bp_failures), [0, 1, 0, 0, 0])
  # The next good epoch clears the request.
  _, ctrl3 = decide_jit(report(), new, ctrl2, config=config)
  assert not bool(ctrl3.rollback_requested)


def test_exploding_loss_rolls_back():
  config = BASE
  assert config.rollback_factor == 10.0
  seeds = busy_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  for e, loss in enumerate([1.0, 2.0, 1.5]):
    cmds, ctrl = decide_jit(report(train=loss, epoch=e), seeds, ctrl, config=config)
    assert not bool(ctrl.rollback_requested)
  _, ok = decide_jit(report(train=14.9), seeds, ctrl, config=config)  # median 1.5
  assert not bool(ok.rollback_requested)
  cmds, bad = decide_jit(report(train=15.1), seeds, ctrl, config=config)
  assert bool(bad.rollback_requested)
  assert ops(cmds) == ROLLBACK_OPS


def test_nonfinite_child_rolls_back_that_seed_only():
  config = BASE
  seeds = busy_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  bad = {"enc": health(3, nonfinite=[True, False, False]),
         "dec": health(5, nonfinite=[False, True, False, False, False])}
  cmds, ctrl1 = decide_jit(report(bad), seeds, ctrl, config=config)
  assert not bool(ctrl1.rollback_requested)
  assert ops(cmds)["enc"][0] == Op.CANCEL
  assert ops(cmds)["dec"][:2] == [0, Op.ROLLBACK]
  # A FOSSILIZED child that went non-finite can only be undone by a restore.
  fossil = {"enc": health(3, nonfinite=[False, False, True])}
  cmds, ctrl2 = decide_jit(report(fossil), seeds, ctrl, config=config)
  assert bool(ctrl2.rollback_requested)
  assert ops(cmds) == ROLLBACK_OPS


def test_harmful_counterfactual_is_culled():
  config = BASE
  seeds = fresh_seeds()
  seeds["dec"] = seeds["dec"].replace(
      stage=jnp.asarray([Stage.EVALUATING, Stage.EVALUATING, Stage.EVALUATING,
                         Stage.FINE_TUNING, Stage.TRAINING], jnp.int32),
      blueprint=jnp.zeros((5,), jnp.int32), strategy=jnp.zeros((5,), jnp.int32),
      epochs_in_stage=jnp.asarray([0, 0, 0, 0, 0], jnp.int32),
      bad_epochs=jnp.asarray([0, 0, 0, LCFG.fine_tuning_patience - 1, 0], jnp.int32),
      steps_in_stage=jnp.asarray([0, 0, 0, LCFG.fine_tuning_steps, LCFG.max_training_steps],
                                 jnp.int32))
  # Seed 0 entered EVALUATING this epoch (not judged yet); 1 hurts, 2 helps; 3 hurts again in
  # FINE_TUNING (patience used up); 4 never got ready in TRAINING.
  delta = {"enc": jnp.zeros((3,)), "dec": jnp.asarray([-0.5, -0.1, 0.2, -0.01, -0.3])}
  seeds = {n: lifecycle.tick_epoch(s) for n, s in seeds.items()}
  seeds["dec"] = seeds["dec"].replace(epochs_in_stage=jnp.asarray([0, 1, 1, 1, 1], jnp.int32))
  seeds = {n: lifecycle.update_readiness(s, delta=delta[n], config=LCFG)
           for n, s in seeds.items()}
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  cmds, ctrl = decide_jit(report(epoch=7), seeds, ctrl, config=config)
  assert ops(cmds)["dec"] == [0, Op.CULL, Op.ADVANCE, Op.CULL, Op.CULL]
  new, acc = apply_all(seeds, cmds)
  assert_all_accepted(cmds, acc)
  reports = field_reports_jit(seeds, new, report(epoch=7), ctrl)
  r = reports["dec"]
  assert np.asarray(r.valid).tolist() == [False, True, False, True, True]
  assert np.asarray(r.outcome).tolist()[1] == Stage.CULLED
  np.testing.assert_allclose(float(r.delta[1]), -0.1)
  assert int(r.param_count[1]) == int(SPECS["dec"].catalog.param_count[0])
  assert int(r.epoch[1]) == 7


def test_bandit_moves_away_from_a_blueprint_that_keeps_getting_culled():
  # The growth stop would end this layer's growth after two culls; the bandit is tested here.
  config = dataclasses.replace(GROW, growth_patience=100)
  assert config.selection == tamiyo.SelectionStrategy.PERFORMANCE
  sick = {"enc": health(3, dead=[0.0, 0.9, 0.0])}
  ctrl = tamiyo.init_controller(fresh_seeds(), NUM_BP, config)
  chosen = []
  for round_ in range(6):
    seeds = fresh_seeds()
    cmds, ctrl = decide_jit(report(sick, epoch=round_), seeds, ctrl, config=config)
    assert ops(cmds)["enc"] == [0, Op.GERMINATE, 0]
    seeds, _ = apply_all(seeds, cmds)
    b = int(seeds["enc"].blueprint[1])
    chosen.append(b)
    # The child reaches EVALUATING and shows harm: Tamiyo culls it.
    seeds = set_seed(seeds, "enc", 1, stage=Stage.EVALUATING)
    seeds = end_of_epoch(seeds, -0.05)
    cmds, ctrl = decide_jit(report(sick, epoch=round_), seeds, ctrl, config=config)
    assert ops(cmds)["enc"][1] == Op.CULL
    new, _ = apply_all(seeds, cmds)
    ctrl = observe_jit(ctrl, field_reports_jit(seeds, new, report(sick), ctrl), config=config)
  first = chosen[0]
  assert chosen[1] != first, chosen
  stats = tamiyo.blueprint_statistics(ctrl)["enc"]
  assert sum(stats["count"]) == 6
  assert stats["failures"][first] >= 1
  assert all(m < 0 for m, n in zip(stats["mean_reward"], stats["count"]) if n)
  # A blueprint that fossilizes with a good counterfactual is preferred afterwards.
  good = (first + 1) % NUM_BP["enc"]
  seeds = fresh_seeds()
  old = set_seed(seeds, "enc", 1, stage=Stage.FINE_TUNING, blueprint=good, strategy=0)
  new = set_seed(old, "enc", 1, stage=Stage.FOSSILIZED, delta=0.05)
  for _ in range(3):
    ctrl = observe_jit(ctrl, field_reports_jit(old, new, report(sick), ctrl), config=config)
  cmds, _ = decide_jit(report(sick), fresh_seeds(), ctrl, config=config)
  assert int(cmds["enc"].blueprint[1]) == good


def test_selection_strategies():
  # One layer whose catalog has a parallel child; seed 1's chunk is dead, seed 4's redundant.
  spec = layer.KasminaSpec(dim=20, num_seeds=5, input_dim=8,
                           blueprints=blueprints.default_blueprints(parallel_hidden=4))
  names = spec.catalog.names
  seeds = {"dec": lifecycle.init_seed_state(5)}
  rep = tamiyo.EpochReport(
      layers={"dec": tamiyo.layer_report(spec, health(5, dead=[0, 0.95, 0, 0, 0],
                                                      corr=[0.1, 0.1, 0.1, 0.1, 0.99]))},
      train_loss=1.0, val_loss=1.0, host_grad_norm=0.5, host_drift=0.0, epoch=0)

  def choose(selection, **stats):
    config = dataclasses.replace(BASE, germinate_without_plateau=True, selection=selection,
                                 max_germinations_per_epoch=2, max_queued_per_layer=2)
    ctrl = tamiyo.init_controller(seeds, spec.num_blueprints, config)
    ctrl = ctrl.replace(layers={"dec": ctrl.layers["dec"].replace(
        **{k: jnp.asarray(v, jnp.float32) for k, v in stats.items()})})
    cmds, _ = decide_jit(rep, seeds, ctrl, config=config)
    assert np.asarray(cmds["dec"].op).tolist() == [0, Op.GERMINATE, 0, 0, Op.GERMINATE]
    return names[int(cmds["dec"].blueprint[1])], names[int(cmds["dec"].blueprint[4])]

  S = tamiyo.SelectionStrategy
  # Cold start: the health signature decides. The dead chunk gets the parallel MLP (it reads
  # the host's input, so it can revive the chunk); the redundant one too, or a bottleneck.
  dead, redundant = choose(S.PERFORMANCE)
  assert dead == "parallel_mlp"
  assert redundant in ("replacement_bottleneck", "parallel_mlp")
  # ACCURACY: the largest child.
  biggest = names[int(np.argmax(spec.catalog.param_count))]
  assert choose(S.ACCURACY) == (biggest, biggest)
  # STABILITY: cheap residual children, never the replacement bottleneck.
  assert set(choose(S.STABILITY)) <= {"low_rank_adapter", "chunk_scale"}
  # RISK: a blueprint with many culls and rollbacks is avoided.
  risky = names.index(choose(S.RISK)[1])
  count = np.zeros(len(names))
  count[risky] = 4
  assert names.index(choose(S.RISK, bp_count=count, bp_failures=count)[1]) != risky
  # NOVELTY: the least tried.
  tries = np.full(len(names), 3.0)
  tries[2] = 0
  assert choose(S.NOVELTY, bp_tries=tries) == (names[2], names[2])


@pytest.mark.parametrize("drift,grad,val,expected", [
    (0.5, 0.5, 1.0, tamiyo.DRIFT_CONTROLLED),
    (0.01, 5.0, 1.0, tamiyo.GRAD_NORM_GATED),
    (0.01, 0.01, 1.0, tamiyo.GRAD_NORM_GATED),
    (0.01, 0.5, 0.5, tamiyo.PERFORMANCE_LINKED),
    (0.01, 0.5, 1.0, tamiyo.FIXED_RAMP),
])
def test_grafting_strategy_follows_host_stability(drift, grad, val, expected):
  config = GROW
  seeds = fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  # The previous epoch had the same host trend (the strategy looks at a few epochs).
  _, ctrl = decide_jit(report(val=1.0, grad=grad, drift=drift, epoch=0), seeds, ctrl,
                       config=config)
  sick = {"enc": health(3, dead=[0.0, 0.9, 0.0])}
  cmds, _ = decide_jit(report(sick, val=val, grad=grad, drift=drift, epoch=1), seeds, ctrl,
                       config=config)
  assert int(cmds["enc"].strategy[1]) == expected


def test_grafting_strategy_ids_match_grafting_module():
  grafting = pytest.importorskip("kasmina_jax.grafting")
  for name, value in (("FIXED_RAMP", tamiyo.FIXED_RAMP),
                      ("PERFORMANCE_LINKED", tamiyo.PERFORMANCE_LINKED),
                      ("DRIFT_CONTROLLED", tamiyo.DRIFT_CONTROLLED),
                      ("GRAD_NORM_GATED", tamiyo.GRAD_NORM_GATED)):
    assert int(grafting.GraftingStrategy[name]) == value
  assert len(grafting.GraftingStrategy) == tamiyo.NUM_GRAFTING_STRATEGIES


def _report_with(names, healths=None, *, drift=0.01, grad=0.5, epoch=0):
  """`report` with each layer's grafting strategy names given by `names`."""
  healths = healths or {}
  layers = {n: tamiyo.layer_report(s, healths.get(n, health(s.num_seeds)), names[n])
            for n, s in SPECS.items()}
  return tamiyo.EpochReport(layers=layers, train_loss=jnp.float32(1.0), val_loss=jnp.float32(1.0),
                            host_grad_norm=jnp.float32(grad), host_drift=jnp.float32(drift),
                            epoch=jnp.int32(epoch))


def test_grafting_strategy_ranges_over_each_layers_strategies():
  # "enc" has a custom strategy only; "dec" a custom one beside the built-in drift-controlled.
  names = {"enc": ("my_ramp",), "dec": ("my_ramp", "drift_controlled")}
  sick = {"enc": health(3, dead=[0.0, 0.9, 0.0]), "dec": health(5, dead=[0.9, 0, 0, 0, 0])}
  seeds = fresh_seeds()
  counts = {n: len(v) for n, v in names.items()}
  for config, want in ((GROW, {"enc": 0, "dec": 1}),  # trend rule: drift -> drift_controlled
                       (dataclasses.replace(GROW, grafting_strategy="my_ramp"),
                        {"enc": 0, "dec": 0}),
                       (dataclasses.replace(GROW, grafting_selection="bandit"),
                        {"enc": 0, "dec": 0})):  # untried: lowest id
    ctrl = tamiyo.init_controller(seeds, NUM_BP, config, num_strategies=counts)
    cmds, new_ctrl = decide_jit(_report_with(names, sick, drift=0.5), seeds, ctrl,
                                config=dataclasses.replace(config, max_germinations_per_epoch=2))
    for n, k in (("enc", 1), ("dec", 0)):
      assert int(cmds[n].op[k]) == Op.GERMINATE, (config, n)
      assert int(cmds[n].strategy[k]) == want[n], (config, n)
      np.testing.assert_array_equal(
          np.asarray(new_ctrl.layers[n].sg_tries),
          np.eye(len(names[n]))[want[n]])
  # The bandit learns per strategy: a culled "my_ramp" child in "dec" makes the untried
  # built-in the bandit's pick.
  config = dataclasses.replace(GROW, grafting_selection="bandit")
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config, num_strategies=counts)
  old = set_seed(seeds, "dec", 0, stage=Stage.EVALUATING, blueprint=0, strategy=0)
  new = set_seed(seeds, "dec", 0, stage=Stage.CULLED, blueprint=0, strategy=0)
  fr = tamiyo.field_reports(old, new, _report_with(names), ctrl)
  ctrl = observe_jit(ctrl, fr, config=config)
  stats = tamiyo.strategy_statistics(ctrl)["dec"]
  assert stats["count"] == [1.0, 0.0] and stats["failures"] == [1.0, 0.0]
  recs = tamiyo.to_records(fr, strategy_names=names)
  assert [(r["layer"], r["strategy"]) for r in recs] == [("dec", "my_ramp")]
  cmds, _ = decide_jit(_report_with(names, sick), seeds, ctrl, config=config)
  assert int(cmds["dec"].strategy[0]) == 1


# ----------------------------------------------------------------------------- jit, records


def test_decide_is_the_same_eagerly_and_under_jit():
  config = GROW
  seeds = busy_seeds()
  seeds = set_seed(seeds, "dec", 4, embargo_left=0)
  seeds = end_of_epoch(seeds, 0.01)
  healths = {"enc": health(3, var=[0.2, 1.0, 3.0], dead=[0.1, 0.0, 0.3]),
             "dec": health(5, corr=[0.9, 0.2, 0.1, 0.4, 0.3], nonfinite=[0, 0, 0, 1, 0])}
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  for e in range(3):
    rep = report(healths, train=1.0 + e, val=1.0 - 0.1 * e, grad=0.3 * e, drift=0.05 * e,
                 epoch=e)
    eager = tamiyo.decide(rep, seeds, ctrl, config)
    jitted = decide_jit(rep, seeds, ctrl, config=config)
    chex.assert_trees_all_equal(eager, jitted)
    ctrl = eager[1]


def test_field_report_records_are_json_serialisable():
  config = BASE
  old = busy_seeds()
  old = set_seed(old, "dec", 3, ready=True)  # FINE_TUNING -> FOSSILIZED
  new = dict(old)
  new["enc"] = old["enc"].replace(stage=jnp.asarray([Stage.CANCELLED, Stage.ROLLED_BACK,
                                                     Stage.FOSSILIZED], jnp.int32))
  new["dec"] = old["dec"].replace(
      stage=jnp.asarray([Stage.GRAFTING, Stage.STABILIZATION, Stage.CULLED, Stage.FOSSILIZED,
                         Stage.CULLED], jnp.int32),
      delta=jnp.asarray([0, 0, jnp.nan, 0.02, 0], jnp.float32))
  ctrl = tamiyo.init_controller(old, NUM_BP, config)
  rep = report({"enc": health(3, var=[jnp.inf, 1.0, 1.0])}, epoch=4)
  reports = field_reports_jit(old, new, rep, ctrl)
  names = {n: s.catalog.names for n, s in SPECS.items()}
  records = tamiyo.to_records(reports, blueprint_names=names)
  text = json.dumps(records, allow_nan=False)
  assert json.loads(text) == records
  got = {(r["layer"], r["seed"]): r for r in records}
  assert sorted(got) == [("dec", 2), ("dec", 3), ("enc", 0), ("enc", 1)]
  assert got[("dec", 3)]["outcome"] == "FOSSILIZED"
  assert got[("dec", 3)]["blueprint"] == names["dec"][3]
  assert got[("dec", 3)]["strategy"] == "fixed_ramp"
  assert got[("dec", 2)]["delta"] is None
  assert got[("enc", 1)]["outcome"] == "ROLLED_BACK"
  assert got[("enc", 0)]["health_after"]["chunk_variance"] is None
  assert set(got[("enc", 0)]["stage_epochs"]) == {s.name for s in Stage}
  # Default names: dict keys for layers, ids for blueprints; a list of layer names works.
  plain = tamiyo.to_records(reports)
  assert {r["layer"] for r in plain} == {"enc", "dec"}
  assert {r["blueprint"] for r in plain} <= {str(i) for i in range(5)}
  # Renaming: by a dict, or one name per layer in pytree order (sorted keys: dec, enc); a list
  # of the keys themselves in any order renames nothing.
  renamed = tamiyo.to_records(reports, layer_names={"enc": "encoder"})
  assert {r["layer"] for r in renamed} == {"encoder", "dec"}
  renamed = tamiyo.to_records(reports, layer_names=["D", "E"])
  assert {(r["layer"], r["seed"]) for r in renamed} == {("D", 2), ("D", 3), ("E", 0), ("E", 1)}
  same = tamiyo.to_records(reports, layer_names=["enc", "dec"])
  assert same == plain


def test_layer_report_takes_the_catalog_from_the_spec():
  spec = layer.KasminaSpec(dim=16, num_seeds=4, input_dim=8,
                           blueprints=blueprints.default_blueprints(parallel_hidden=4))
  lr = tamiyo.layer_report(spec, health(4))
  names = spec.catalog.names
  assert np.asarray(lr.blueprint_replacement).tolist() == [
      n == "replacement_bottleneck" for n in names]
  assert np.asarray(lr.blueprint_parallel).tolist() == [n == "parallel_mlp" for n in names]
  np.testing.assert_array_equal(np.asarray(lr.blueprint_params), spec.catalog.param_count)
  with pytest.raises(ValueError, match="health.chunk_variance"):
    tamiyo.layer_report(spec, health(3))


def test_a_dead_chunk_measured_by_the_layer_is_germinated():
  # Real telemetry: a layer's forward pass over activations whose third chunk is dead.
  spec = layer.KasminaSpec(dim=16, num_seeds=4)
  seeds = lifecycle.init_seed_state(4)
  x = jax.random.normal(jax.random.key(0), (64, 16))
  x = x.at[:, 8:12].set(0.0)
  _, aux = layer.forward(spec, layer.init_children(spec), seeds, x,
                         telemetry=layer.init_telemetry(spec))
  h = layer.health_report(spec, aux.telemetry, seeds)
  np.testing.assert_allclose(np.asarray(h.dead_node_ratio), [0, 0, 1, 0])
  rep = tamiyo.EpochReport(layers={"hidden": tamiyo.layer_report(spec, h)}, train_loss=1.0,
                           val_loss=1.0, host_grad_norm=0.5, host_drift=0.0, epoch=0)
  ctrl = tamiyo.init_controller({"hidden": seeds}, spec.num_blueprints, GROW)
  cmds, _ = decide_jit(rep, {"hidden": seeds}, ctrl, config=GROW)
  assert np.asarray(cmds["hidden"].op).tolist() == [0, 0, Op.GERMINATE, 0]
  # The default catalog has no parallel child: a residual MLP-like child for dead nodes.
  name = spec.catalog.names[int(cmds["hidden"].blueprint[2])]
  assert name in ("residual_mlp", "glu_mlp"), name


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="plateau_patience"):
    tamiyo.TamiyoConfig(plateau_patience=0)
  with pytest.raises(ValueError, match="history"):
    tamiyo.TamiyoConfig(history=3)
  with pytest.raises(ValueError, match="grafting_strategy"):
    tamiyo.TamiyoConfig(grafting_strategy=-1)
  with pytest.raises(TypeError, match="grafting_strategy"):
    tamiyo.TamiyoConfig(grafting_strategy=1.5)
  with pytest.raises(ValueError, match="grafting_selection"):
    tamiyo.TamiyoConfig(grafting_selection="best")
  with pytest.raises(ValueError, match="selection"):
    tamiyo.TamiyoConfig(selection=9)
  seeds = fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP)
  with pytest.raises(ValueError, match="ctrl.layers"):
    tamiyo.decide(report(), seeds, tamiyo.init_controller(seeds, 3))
  with pytest.raises(ValueError, match="report.layers"):
    tamiyo.decide(report(), {"enc": seeds["enc"]}, ctrl)
  with pytest.raises(TypeError, match="config"):
    tamiyo.decide(report(), seeds, ctrl, {"plateau_patience": 2})
  with pytest.raises(ValueError, match="num_blueprints"):
    tamiyo.init_controller(seeds, 0)
  # A fixed strategy the layers do not have: named when `decide` sees the layers' strategies.
  for fixed in (NUM_STRATEGIES, "no_such_strategy"):
    with pytest.raises(ValueError, match="grafting_strategy"):
      tamiyo.decide(report(), seeds, ctrl, tamiyo.TamiyoConfig(grafting_strategy=fixed))
  with pytest.raises(ValueError, match="grafting strategies"):
    tamiyo.decide(report(), seeds, tamiyo.init_controller(seeds, NUM_BP, num_strategies=2))
  with pytest.raises(TypeError, match="strategy_names"):
    tamiyo.layer_report(SPECS["enc"], health(3), "fixed_ramp")


# ----------------------------------------------------------------------------- property


PROP_CONFIG = dataclasses.replace(BASE, germinate_without_plateau=True, max_germinations_per_epoch=2,
                                  germination_cooldown_epochs=0, max_concurrent_training=2,
                                  max_queued_per_layer=2,
                                  lifecycle=lifecycle.LifecycleConfig(max_training_steps=50))
FLOATS = st.one_of(st.floats(-2.0, 5.0, width=32), st.sampled_from([np.nan, np.inf, -np.inf]))
# Mostly sane losses and flags, so that the non-emergency paths get exercised too.
LOSSES = st.one_of(st.floats(0.125, 3.0, width=32), st.floats(0.125, 3.0, width=32),
                   st.sampled_from([np.nan, np.inf, -np.inf, 1e3]))
RARE = st.sampled_from([False, False, False, False, False, True])


@st.composite
def seed_states(draw, k):
  ints = lambda lo, hi: np.asarray(draw(st.lists(st.integers(lo, hi), min_size=k, max_size=k)),
                                   np.int32)
  bools = lambda elem=st.booleans(): np.asarray(draw(st.lists(elem, min_size=k, max_size=k)))
  s = lifecycle.init_seed_state(k)
  return s.replace(stage=ints(0, 10), blueprint=ints(-1, 4), strategy=ints(-1, 3),
                   steps_in_stage=ints(0, 100), epochs_in_stage=ints(0, 3),
                   embargo_left=ints(0, 2), ready=bools(), bad_epochs=ints(0, 3),
                   nonfinite=bools(RARE), germinated_epoch=ints(-1, 5),
                   delta=np.asarray(draw(st.lists(FLOATS, min_size=k, max_size=k)),
                                    np.float32))


@st.composite
def scenarios(draw):
  seeds = {n: draw(seed_states(s.num_seeds)) for n, s in SPECS.items()}
  vec = lambda k: np.asarray(draw(st.lists(FLOATS, min_size=k, max_size=k)), np.float32)
  healths = {n: health(s.num_seeds, var=vec(s.num_seeds), dead=vec(s.num_seeds),
                       corr=vec(s.num_seeds),
                       nonfinite=draw(st.lists(RARE, min_size=s.num_seeds,
                                               max_size=s.num_seeds)))
             for n, s in SPECS.items()}
  rep = report(healths, train=draw(LOSSES), val=draw(LOSSES), grad=draw(FLOATS),
               drift=draw(FLOATS), epoch=draw(st.integers(0, 9)))
  ctrl = tamiyo.init_controller(seeds, NUM_BP, PROP_CONFIG)
  h = PROP_CONFIG.history
  ring = lambda elem: np.asarray(draw(st.lists(elem, min_size=h, max_size=h)), np.float32)
  ctrl = ctrl.replace(train_history=ring(LOSSES), val_history=ring(LOSSES),
                      drift_history=ring(FLOATS), grad_history=ring(FLOATS),
                      history_count=np.int32(draw(st.integers(0, 20))),
                      plateau_epochs=np.int32(draw(st.integers(0, 3))),
                      cooldown_left=np.int32(draw(st.integers(0, 1))))
  ctrl = ctrl.replace(layers={
      n: lc.replace(germ_need=vec(SPECS[n].num_seeds), bp_count=vec(NUM_BP[n]) ** 2,
                    bp_reward_sum=vec(NUM_BP[n]))
      for n, lc in ctrl.layers.items()})
  return rep, seeds, ctrl


@jax.jit
def _decide_and_apply(rep, seeds, ctrl):
  cmds, new_ctrl = tamiyo.decide(rep, seeds, ctrl, PROP_CONFIG)
  new, acc = {}, {}
  for n in seeds:
    new[n], acc[n] = lifecycle.apply_commands(seeds[n], cmds[n], PROP_CONFIG.lifecycle,
                                              num_blueprints=NUM_BP[n],
                                              num_strategies=NUM_STRATEGIES)
  reports = tamiyo.field_reports(seeds, new, rep, new_ctrl)
  return cmds, new_ctrl, new, acc, tamiyo.observe(new_ctrl, reports, PROP_CONFIG)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_decide_only_emits_commands_apply_accepts(scenario):
  rep, seeds, ctrl = scenario
  cmds, new_ctrl, new, acc, observed = _decide_and_apply(rep, seeds, ctrl)
  for n in seeds:
    op = np.asarray(cmds[n].op)
    accepted = np.asarray(acc[n])
    # Everything emitted is accepted (and so, trivially, nothing is rejected with a change).
    np.testing.assert_array_equal(accepted, op != Op.NONE, err_msg=f"{n}: {op}")
    old_stage, new_stage = np.asarray(seeds[n].stage), np.asarray(new[n].stage)
    assert np.all((new_stage >= 0) & (new_stage < lifecycle.NUM_STAGES))
    moved = old_stage != new_stage
    assert np.all(LEGAL_TRANSITIONS[old_stage[moved], new_stage[moved]])
    # (assert_array_equal counts NaN == NaN.)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[~accepted],
                                                            np.asarray(b)[~accepted]),
                 seeds[n], new[n])
    germ = op == Op.GERMINATE
    assert np.all(np.asarray(cmds[n].blueprint)[germ] < NUM_BP[n])
    before = np.asarray(new_ctrl.layers[n].bp_count)
    after = np.asarray(observed.layers[n].bp_count)
    ok = np.isfinite(before)
    # XLA on CPU flushes subnormals to zero: compare counts at float32's smallest normal.
    tiny = np.finfo(np.float32).tiny
    assert np.all(after[ok] >= np.where(np.abs(before[ok]) < tiny, 0.0, before[ok]))
  assert int(sum((np.asarray(c.op) == Op.GERMINATE).sum() for c in cmds.values())) <= 2
  if bool(new_ctrl.rollback_requested):
    for n in seeds:
      chex.assert_trees_all_equal(cmds[n], tamiyo.rollback_commands(seeds)[n])


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_layer_stops_growing_after_children_that_do_not_pay(patience):
  config = dataclasses.replace(GROW, growth_patience=patience, pay_margin=0.01)
  sick = {"enc": health(3, dead=[0.0, 0.9, 0.0])}
  ctrl = tamiyo.init_controller(fresh_seeds(), NUM_BP, config)
  # A fossil below pay_margin and culls count as unpaid; each epoch one child ends.
  outcomes = [(Stage.FOSSILIZED, 0.005)] + [(Stage.CULLED, -0.05)] * 5
  for i, (outcome, delta) in enumerate(outcomes):
    seeds = fresh_seeds()
    cmds, _ = decide_jit(report(sick, epoch=i), seeds, ctrl, config=config)
    germinates = ops(cmds)["enc"][1] == Op.GERMINATE
    assert germinates == (i < patience), (i, ops(cmds))
    old = set_seed(seeds, "enc", 1, stage=Stage.EVALUATING if outcome == Stage.CULLED
                   else Stage.FINE_TUNING, blueprint=0, strategy=0)
    new = set_seed(old, "enc", 1, stage=outcome, delta=delta)
    ctrl = observe_jit(ctrl, field_reports_jit(old, new, report(sick), ctrl), config=config)
  assert int(ctrl.layers["enc"].unpaid_streak) == len(outcomes)
  # Another layer's growth is not stopped by this one's record.
  assert int(ctrl.layers["dec"].unpaid_streak) == 0


def test_a_child_that_pays_resets_the_growth_stop():
  config = dataclasses.replace(GROW, growth_patience=2, pay_margin=0.0)
  ctrl = tamiyo.init_controller(fresh_seeds(), NUM_BP, config)
  for outcome, delta in [(Stage.CULLED, -0.1), (Stage.FOSSILIZED, 0.02), (Stage.CULLED, -0.1)]:
    seeds = fresh_seeds()
    old = set_seed(seeds, "enc", 1, stage=Stage.FINE_TUNING, blueprint=0, strategy=0)
    new = set_seed(old, "enc", 1, stage=outcome, delta=delta)
    ctrl = observe_jit(ctrl, field_reports_jit(old, new, report(), ctrl), config=config)
  assert int(ctrl.layers["enc"].unpaid_streak) == 1
  cmds, _ = decide_jit(report({"enc": health(3, dead=[0.0, 0.9, 0.0])}), fresh_seeds(), ctrl,
                       config=config)
  assert ops(cmds)["enc"][1] == Op.GERMINATE


def test_defaults_grow_every_slot_on_health():
  config = tamiyo.TamiyoConfig()
  assert config.selection == tamiyo.SelectionStrategy.ACCURACY
  seeds = fresh_seeds()
  ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
  # No plateau yet (first epoch): every DORMANT seed of every layer germinates at once.
  cmds, ctrl = decide_jit(report(epoch=0), seeds, ctrl, config=config)
  assert all(op == Op.GERMINATE for ops_ in ops(cmds).values() for op in ops_), ops(cmds)
  seeds, acc = apply_all(seeds, cmds)
  assert_all_accepted(cmds, acc)
  seeds = {n: lifecycle.update_readiness(lifecycle.tick_epoch(s), config=LCFG)
           for n, s in seeds.items()}
  # ... and every queued seed is promoted into TRAINING at the next epoch end.
  cmds, _ = decide_jit(report(epoch=1), seeds, ctrl, config=config)
  assert all(op == Op.ADVANCE for ops_ in ops(cmds).values() for op in ops_), ops(cmds)
  with pytest.raises(ValueError, match="max_concurrent_training"):
    tamiyo.TamiyoConfig(max_concurrent_training=0)


def test_field_reports_carry_gradient_variance_memory_and_lifecycle_steps():
  old = busy_seeds()
  for _ in range(7):  # steps with a live child since germination: the latency in steps
    old = {n: lifecycle.tick_step(s) for n, s in old.items()}
  new = dict(old)
  new["dec"] = old["dec"].replace(stage=old["dec"].stage.at[3].set(Stage.FOSSILIZED))
  sick = health(5).replace(gradient_variance=jnp.asarray([0, 0, 0, 0.25, 0], jnp.float32))
  ctrl = tamiyo.init_controller(old, NUM_BP, BASE)
  reports = field_reports_jit(old, new, report({"dec": sick}, epoch=3), ctrl)
  r = reports["dec"]
  assert np.asarray(r.valid).tolist() == [False, False, False, True, False]
  np.testing.assert_allclose(float(r.gradient_variance[3]), 0.25)
  assert np.isnan(np.asarray(r.gradient_variance)[0])
  params = int(SPECS["dec"].catalog.param_count[3])
  assert int(r.param_bytes[3]) == 4 * params
  assert int(r.lifecycle_steps[3]) == 7
  (rec,) = tamiyo.to_records(reports)
  assert rec["gradient_variance"] == 0.25 and rec["lifecycle_steps"] == 7
  assert rec["param_bytes"] == 4 * params and rec["param_count"] == params
  assert rec["flops_per_row"] == int(SPECS["dec"].catalog.flops_per_row[3])
  # Germination restarts the lifecycle's step count.
  s, _ = lifecycle.request_germination(lifecycle.init_seed_state(2), 0, 0, 0, num_blueprints=1,
                                       num_strategies=1)
  s = lifecycle.tick_step(lifecycle.tick_step(s))
  assert np.asarray(s.lifecycle_steps).tolist() == [2, 0]
  s, _ = lifecycle.cancel_germination(s, 0)
  s = lifecycle.update_readiness(s)  # CANCELLED is ready to return to DORMANT
  s = lifecycle.apply_commands(s, lifecycle.make_commands(2, op=[lifecycle.Op.ADVANCE, 0]),
                               num_blueprints=1, num_strategies=1)[0]
  s, _ = lifecycle.request_germination(s, 0, 0, 0, num_blueprints=1, num_strategies=1)
  assert np.asarray(s.lifecycle_steps).tolist() == [0, 0]


def test_near_ties_in_need_do_not_flip_germination():
  # Two seeds whose need differs only in the last float bits (as sums reduced in another
  # order on another device count would): the lower index wins, whichever is a hair higher.
  config = dataclasses.replace(GROW, max_germinations_per_epoch=1)
  base = np.float32(0.6)
  chosen = []
  for nudge in (0.0, 1e-7, -1e-7, 3e-7):
    corr = np.array([0.1, base, base + np.float32(nudge)], np.float32)
    seeds = fresh_seeds()
    ctrl = tamiyo.init_controller(seeds, NUM_BP, config)
    cmds, _ = decide_jit(report({"enc": health(3, corr=corr)}), seeds, ctrl, config=config)
    chosen.append(ops(cmds)["enc"])
  assert all(c == [0, Op.GERMINATE, 0] for c in chosen), chosen
  # A real difference still decides.
  corr = np.array([0.1, 0.6, 0.7], np.float32)
  cmds, _ = decide_jit(report({"enc": health(3, corr=corr)}), fresh_seeds(),
                       tamiyo.init_controller(fresh_seeds(), NUM_BP, config), config=config)
  assert ops(cmds)["enc"] == [0, 0, Op.GERMINATE]
