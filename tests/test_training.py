"""The train step, the epoch transition, checkpoints and resumption, emergency rollback, and
the demo's growth end to end."""

import dataclasses
import os
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kasmina_jax import blueprints, checkpoint, datasets, experiments, grafting, lifecycle
from kasmina_jax import nn as knn
from kasmina_jax import tamiyo, training
from kasmina_jax.lifecycle import Stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = True):
    catalog = blueprints.default_blueprints(parallel_hidden=8)
    x = knn.KasminaDense(self.width, 4, blueprints=catalog, activation=nn.relu, corr_rows=32,
                         name="hidden0")(x, train=train)
    x = knn.KasminaLayer(2, corr_rows=32, name="seeds1")(x, train=train)
    return nn.Dense(2, name="head")(x)


def fast_config():
  life = lifecycle.LifecycleConfig(min_training_steps=10, max_training_steps=100,
                                   stabilization_steps=5, fine_tuning_steps=10,
                                   fine_tuning_patience=2, embargo_epochs=1)
  ctl = tamiyo.TamiyoConfig(plateau_patience=1, max_concurrent_training=2,
                            max_germinations_per_epoch=2, germinate_without_plateau=True,
                            lifecycle=life, selection=tamiyo.SelectionStrategy.ACCURACY)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=5), tamiyo=ctl)


TX = optax.adam(1e-2)
DATA = datasets.two_spirals(640, seed=1)
VAL = datasets.two_spirals(256, seed=2)


def make_state(seed=0):
  return training.create_train_state(TinyNet(), TX, jnp.asarray(DATA["x"][:2]),
                                     jax.random.key(seed), fast_config())


def test_train_step_updates_params_and_telemetry():
  state = make_state()
  batch = {k: v[:64] for k, v in DATA.items()}
  new, metrics = training.train_step(state, batch, training.cross_entropy_loss)
  assert np.isfinite(float(metrics["loss"]))
  assert int(new.step) == 1
  lv = knn.find_layers(new.kasmina)[("hidden0", "kasmina")]
  assert float(lv.telemetry.count) == 64.0
  # All seeds dormant: the children (zero, not learning) did not move.
  chex.assert_trees_all_equal(new.params["hidden0"]["kasmina"]["children"],
                              state.params["hidden0"]["kasmina"]["children"])
  assert not np.allclose(new.params["head"]["kernel"], state.params["head"]["kernel"])


def test_train_step_skips_nonfinite_update():
  state = make_state()
  batch = {"x": np.full((64, 2), np.nan, np.float32), "y": DATA["y"][:64]}
  new, _ = training.train_step(state, batch, training.cross_entropy_loss)
  chex.assert_trees_all_equal(new.params, state.params)
  assert float(new.stats.nonfinite_steps) == 1.0


def test_epoch_transition_germinates_and_reinitialises_children():
  state = make_state()
  for i in range(5):
    state, _ = training.train_step(state, {k: v[i * 64:(i + 1) * 64] for k, v in DATA.items()},
                                   training.cross_entropy_loss)
  new, out = training.epoch_transition(state, VAL, training.cross_entropy_loss)
  assert int(new.epoch) == 1
  stages = np.concatenate([np.asarray(v) for v in out.new_stage.values()])
  assert (stages == Stage.GERMINATED).sum() >= 1
  # Telemetry is reset for the next epoch.
  for lv in knn.find_layers(new.kasmina).values():
    assert float(lv.telemetry.count) == 0.0


def _run(state, epochs, seed=0):
  return training.fit(state, DATA, VAL, training.cross_entropy_loss, epochs=epochs,
                      batch_size=64, seed=seed, progress=False)


def _with(data, key, fn):
  out = {k: np.array(v) for k, v in data.items()}
  out[key] = fn(out[key])
  return out


def _set(row, value):
  def fn(a):
    a = a.copy()
    a[row] = value
    return a
  return fn


@pytest.mark.parametrize("train,val,exc,match", [
    (_with(DATA, "x", _set(17, np.nan)), VAL, ValueError,
     r"^train_data\['x'\]: row 17 of 640 holds a non-finite value \(nan\)"),
    (_with(DATA, "x", _set(5, np.inf)), VAL, ValueError, r"^train_data\['x'\]: row 5 of 640"),
    (DATA, _with(VAL, "x", _set(200, -np.inf)), ValueError,
     r"^val_data\['x'\]: row 200 of 256 holds a non-finite"),
    (_with(DATA, "y", _set(3, 2)), VAL, ValueError,
     r"^train_data\['y'\]: row 3 of 640 holds label 2, outside \[0, 2\)"),
    (_with(DATA, "y", _set(9, -1)), VAL, ValueError,
     r"^train_data\['y'\]: row 9 of 640 holds label -1"),
    (DATA, _with(VAL, "y", _set(0, 7)), ValueError, r"^val_data\['y'\]: row 0 of 256"),
    (_with(DATA, "y", lambda y: y.astype(np.float32)), VAL, TypeError,
     r"^train_data\['y'\]: expected integer class labels, got dtype float32"),
    (_with(DATA, "y", lambda y: y[:-1]), VAL, ValueError,
     r"^train_data\['y'\]: 639 rows, but train_data\['x'\] has 640"),
    ({"x": DATA["x"]}, VAL, ValueError, r"^train_data: expected a key 'y'"),
    ({"inputs": DATA["x"], "y": DATA["y"]}, VAL, ValueError, r"^train_data: expected a key 'x'"),
    ([DATA["x"], DATA["y"]], VAL, TypeError, r"^train_data: expected a dict"),
])
def test_fit_refuses_bad_data_before_training(train, val, exc, match):
  state = make_state()
  with pytest.raises(exc, match=match):
    training.fit(state, train, val, training.cross_entropy_loss, epochs=1, batch_size=64,
                 progress=False)


def test_fit_label_check_follows_num_classes():
  state = make_state()

  def squared_loss(logits, batch):  # float targets: no class count, no label check
    return jnp.mean((logits[:, 0] - batch["y"]) ** 2), {}

  targets = _with(DATA, "y", lambda y: y.astype(np.float32) * 3.0)
  training.check_fit_args(targets, 1, 64, val_data=targets, state=state, loss_fn=squared_loss)
  # For any loss an int `num_classes` checks the labels; None skips the check.
  labels = _with(DATA, "y", _set(4, 5))
  training.check_fit_args(labels, 1, 64, state=state, loss_fn=squared_loss)
  with pytest.raises(ValueError, match=r"row 4 of 640 holds label 5, outside \[0, 3\)"):
    training.check_fit_args(labels, 1, 64, state=state, loss_fn=squared_loss, num_classes=3)
  training.check_fit_args(labels, 1, 64, state=state, loss_fn=training.cross_entropy_loss,
                          num_classes=None)
  with pytest.raises(TypeError, match="num_classes"):
    training.check_fit_args(DATA, 1, 64, state=state, loss_fn=squared_loss, num_classes="two")
  # The keys the loss reads are found by tracing it once on two rows.
  weighted = lambda logits, batch: squared_loss(logits * batch["w"][:, None], batch)
  with pytest.raises(ValueError, match=r"^val_data: the loss reads key 'w'"):
    training.check_fit_args({**targets, "w": np.ones(640, np.float32)}, 1, 64, val_data=targets,
                            state=state, loss_fn=weighted)


def _poisoned_loss(logits, batch):
  # Finite data, a loss that cannot be computed: every step is skipped.
  loss, metrics = training.cross_entropy_loss(logits, batch)
  return loss * jnp.nan, metrics


def test_fit_stops_a_run_whose_steps_are_all_skipped():
  state = make_state()
  with pytest.raises(training.NonFiniteTrainingError, match="last 3 epochs") as info:
    training.fit(state, DATA, VAL, _poisoned_loss, epochs=10, batch_size=320, progress=False)
  err = info.value
  assert isinstance(err, RuntimeError)
  assert err.epoch == 2 and len(err.history) == 3
  assert all(h["rolled_back"] for h in err.history)
  # The last good state is the one the run started from (no step was taken).
  chex.assert_trees_all_equal(err.state.params, state.params)
  with pytest.raises(training.NonFiniteTrainingError, match="last 1 epochs"):
    training.fit(state, DATA, VAL, _poisoned_loss, epochs=10, batch_size=320, progress=False,
                 max_skipped_epochs=1)
  # None: the loop runs every epoch, as before.
  _, history = training.fit(state, DATA, VAL, _poisoned_loss, epochs=2, batch_size=320,
                            progress=False, max_skipped_epochs=None)
  assert len(history) == 2
  with pytest.raises(ValueError, match="max_skipped_epochs"):
    training.fit(state, DATA, VAL, _poisoned_loss, epochs=1, batch_size=320, progress=False,
                 max_skipped_epochs=0)


def test_checkpoint_resume_continues_identically(tmp_path):
  uninterrupted, hist_a = _run(make_state(), 6)
  half, _ = _run(make_state(), 3)
  checkpoint.save(str(tmp_path), half, step=int(half.step))
  restored = checkpoint.restore(str(tmp_path), make_state())
  resumed, hist_b = _run(restored, 3)
  chex.assert_trees_all_equal(resumed.params, uninterrupted.params)
  chex.assert_trees_all_equal(resumed.kasmina, uninterrupted.kasmina)
  chex.assert_trees_all_equal(resumed.ctrl, uninterrupted.ctrl)
  chex.assert_trees_all_equal(resumed.opt_state, uninterrupted.opt_state)
  assert [h["stages"] for h in hist_a[3:]] == [h["stages"] for h in hist_b]
  # The run actually exercised the lifecycle.
  seen = {s for h in hist_a for layer in h["stages"].values() for s in layer}
  assert "TRAINING" in seen or "GRAFTING" in seen


def test_emergency_rollback_restores_last_good_state():
  state, _ = _run(make_state(), 3)
  good = checkpoint.InMemoryCheckpoint()
  good.save(state)
  inflight_before = {k: np.asarray(v.stage) for k, v in training.seeds_tree(state.kasmina).items()}
  # One poisoned epoch: the mean training loss is non-finite.
  bad = {"x": np.full((64, 2), np.nan, np.float32), "y": DATA["y"][:64]}
  poisoned, _ = training.train_step(state, bad, training.cross_entropy_loss)
  new, out, rolled_back = training.end_of_epoch(poisoned, VAL, training.cross_entropy_loss,
                                                last_good=good)
  assert rolled_back
  assert bool(out.rollback_requested)
  # Params are the last good ones (children of rolled-back seeds zeroed).
  chex.assert_trees_all_equal(new.params["head"], state.params["head"])
  for name, stage in training.seeds_tree(new.kasmina).items():
    before = inflight_before[name]
    stage = np.asarray(stage.stage)
    in_flight = (before >= Stage.TRAINING) & (before <= Stage.FINE_TUNING)
    assert np.all(stage[in_flight] == Stage.ROLLED_BACK)
    assert np.all(stage[before == Stage.GERMINATED] == Stage.CANCELLED)
  assert not bool(new.ctrl.rollback_requested)


def test_emergency_rollback_without_checkpoint_reports_and_counts_the_seeds(tmp_path):
  from kasmina_jax import events  # pylint: disable=g-import-not-at-top
  state, _ = _run(make_state(), 3)
  before = {k: np.asarray(v.stage) for k, v in training.seeds_tree(state.kasmina).items()}
  inflight = {k: (v >= Stage.TRAINING) & (v <= Stage.FINE_TUNING) for k, v in before.items()}
  queued = {k: v == Stage.GERMINATED for k, v in before.items()}
  assert sum(int(m.sum()) for m in inflight.values()) >= 1  # the run has something to roll back
  counted = sum(float(np.sum(lc.bp_count)) for lc in state.ctrl.layers.values())
  bad = {"x": np.full((64, 2), np.nan, np.float32), "y": DATA["y"][:64]}
  poisoned, _ = training.train_step(state, bad, training.cross_entropy_loss)
  log = events.EventLog(str(tmp_path / "events.jsonl"))
  new, out, rolled_back = training.end_of_epoch(poisoned, VAL, training.cross_entropy_loss,
                                                log=log)  # no last_good: nothing to restore
  log.close()
  assert rolled_back
  assert not bool(new.ctrl.rollback_requested)
  expected = set()
  for name, seeds in training.seeds_tree(new.kasmina).items():
    stage = np.asarray(seeds.stage)
    assert np.all(stage[inflight[name]] == Stage.ROLLED_BACK)
    assert np.all(stage[queued[name]] == Stage.CANCELLED)
    fr = out.field_reports[name]
    valid = np.asarray(fr.valid)
    np.testing.assert_array_equal(valid, inflight[name] | queued[name])
    np.testing.assert_array_equal(np.asarray(fr.outcome)[inflight[name]], Stage.ROLLED_BACK)
    label = training.layer_name(name)
    expected |= {(label, int(k), "ROLLED_BACK") for k in np.nonzero(inflight[name])[0]}
    expected |= {(label, int(k), "CANCELLED") for k in np.nonzero(queued[name])[0]}
  logged = {(r["layer"], r["seed"], r["outcome"])
            for r in events.read_events(tmp_path / "events.jsonl") if r["type"] == "field_report"}
  assert logged == expected
  # The bandit counted every rollback (cancels say nothing about the blueprint).
  n_rolled = sum(int(m.sum()) for m in inflight.values())
  after = sum(float(np.sum(lc.bp_count)) for lc in new.ctrl.layers.values())
  assert after == counted + n_rolled
  failures = sum(float(np.sum(lc.bp_failures)) for lc in new.ctrl.layers.values())
  assert failures >= n_rolled


def test_fit_shows_progress_without_tqdm(monkeypatch, capsys):
  # tqdm is an optional extra: without it `fit` draws a plain progress line.
  monkeypatch.setitem(sys.modules, "tqdm", None)
  monkeypatch.setitem(sys.modules, "tqdm.auto", None)
  _, history = training.fit(make_state(), DATA, VAL, training.cross_entropy_loss, epochs=1,
                            batch_size=64, progress=True, rollback=False, description="bare")
  assert len(history) == 1
  err = capsys.readouterr().err
  assert "bare: 10/10 steps" in err and "loss=" in err


def test_param_counts_separate_allocated_and_active():
  state = make_state()
  counts = training.param_counts(state)
  assert counts["active"] == 0
  assert counts["model"] == counts["host"]
  assert counts["allocated"] > 0
  ceiling = experiments.children_from_start(state, ("parallel_mlp", "residual_mlp"),
                                             jax.random.key(1))
  c2 = training.param_counts(ceiling)
  assert c2["active"] > 0 and c2["model"] == c2["host"] + c2["active"]


@pytest.mark.slow
def test_spirals_demo_grows_and_beats_fixed_small(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "examples"))
  try:
    import spirals  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  result = spirals.main(["--seeds", "1", "--lrs", "1e-2", "--epochs", "16", "--workers", "1",
                         "--out", str(tmp_path)])
  by = {r["variant"]: r for r in result["rows"]}
  grown = [r for r in result["runs"] if r["variant"] == "grown"][0]
  assert grown["fossilized"] >= 1
  assert by["grown"]["test_mean"] > by["fixed_small"]["test_mean"]
  # The protocol: validation drove the choice, the test split was read for the report only.
  assert result["chosen"] == {v: 1e-2 for v in by}
  for name in ("lifecycle.png", "health.png", "curves.png", "accuracy_vs_params.png"):
    assert os.path.getsize(tmp_path / name) > 1000


def _with_layer(state, path, seeds, children=None):
  lv = knn.find_layers(state.kasmina)[path]
  kasmina = knn.set_path(state.kasmina, path + ("state",), lv.replace(seeds=seeds))
  params = state.params
  if children is not None:
    params = knn.set_path(params, knn.children_path(path), children)
  return state.replace(kasmina=kasmina, params=params)


def _live_children(spec, key, blueprint=0):
  from kasmina_jax import layer as layer_lib  # pylint: disable=g-import-not-at-top
  children = layer_lib.germinate_children(spec, layer_lib.init_children(spec),
                                          jnp.ones((spec.num_seeds,), bool), blueprint, key)
  leaves, treedef = jax.tree.flatten(children)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


def _state_judging_one_seed():
  """A fresh TinyNet state whose epoch end judges one seed (`max_judged=1`), with its first
  Kasmina layer's path and record."""
  config = fast_config()
  config = training.TrainConfig(grafting=config.grafting, tamiyo=config.tamiyo, max_judged=1)
  state = training.create_train_state(TinyNet(), TX, jnp.asarray(DATA["x"][:2]),
                                      jax.random.key(0), config)
  path = ("hidden0", "kasmina")
  return state, path, knn.find_layers(state.kasmina)[path]


def test_unjudged_seeds_keep_their_stage():
  """More judged-stage seeds than `max_judged`: the ones left without a counterfactual are
  neither culled (EVALUATING not ready, TRAINING past max steps, FINE_TUNING at patience - 1)
  nor advanced; only the judged one moves."""
  state, path, lv = _state_judging_one_seed()
  stage = jnp.array([Stage.EVALUATING, Stage.EVALUATING, Stage.TRAINING, Stage.FINE_TUNING],
                    jnp.int32)
  seeds = lv.seeds.replace(
      stage=stage, blueprint=jnp.zeros((4,), jnp.int32), strategy=jnp.zeros((4,), jnp.int32),
      alpha=jnp.where(stage == Stage.TRAINING, 0.0, 1.0),
      epochs_in_stage=jnp.array([1, 1, 3, 3], jnp.int32),
      steps_in_stage=jnp.array([50, 50, 1000, 50], jnp.int32),
      bad_epochs=jnp.array([0, 0, 0, 1], jnp.int32))
  state = _with_layer(state, path, seeds, _live_children(lv.spec, jax.random.key(3)))
  new, out = training.epoch_transition(state, VAL, training.cross_entropy_loss)
  delta = np.asarray(out.delta[path])
  assert np.isfinite(delta[0]) and np.all(np.isnan(delta[1:]))
  new_stage = np.asarray(out.new_stage[path])
  assert new_stage[0] in (Stage.FINE_TUNING, Stage.CULLED)  # judged: it moves either way
  np.testing.assert_array_equal(new_stage[1:], np.asarray(stage[1:]))
  kept = knn.find_layers(new.kasmina)[path].seeds
  np.testing.assert_array_equal(np.asarray(kept.unjudged), [False, True, True, True])
  np.testing.assert_array_equal(np.asarray(kept.bad_epochs)[3], 1)


def test_judged_window_moves_on_every_epoch():
  """More judged-stage seeds than `max_judged`: the window of judged seeds moves on each
  epoch, so every seed gets a counterfactual within `ceil(K / max_judged)` epochs (a fixed
  lowest-index-first choice left the same seeds unjudged for good)."""
  state, path, lv = _state_judging_one_seed()
  stage = jnp.full((4,), Stage.TRAINING, jnp.int32)
  # No steps in TRAINING: no seed is ready or due for a cull, so all four stay judged-stage.
  seeds = lv.seeds.replace(stage=stage, blueprint=jnp.zeros((4,), jnp.int32),
                           strategy=jnp.zeros((4,), jnp.int32))
  state = _with_layer(state, path, seeds, _live_children(lv.spec, jax.random.key(3)))
  judged = []
  for _ in range(4):
    state, out = training.epoch_transition(state, VAL, training.cross_entropy_loss)
    np.testing.assert_array_equal(np.asarray(out.new_stage[path]), np.asarray(stage))
    finite = np.isfinite(np.asarray(out.delta[path]))
    assert finite.sum() == 1
    judged.append(int(np.argmax(finite)))
  assert sorted(judged) == [0, 1, 2, 3]


def test_train_step_reports_the_whole_trust_region_objective():
  """Residual children: grafting sees `<dL/dout, f> + lambda mean_rows ||f||^2`, the linear
  term taken against the task gradient, in TRAINING (STE) and in GRAFTING (alpha 0.5)."""
  from kasmina_jax import layer as layer_lib  # pylint: disable=g-import-not-at-top
  state = make_state()
  path = ("hidden0", "kasmina")
  lv = knn.find_layers(state.kasmina)[path]
  stage = jnp.array([Stage.TRAINING, Stage.GRAFTING, Stage.DORMANT, Stage.DORMANT], jnp.int32)
  alpha = jnp.array([0.0, 0.5, 0.0, 0.0])
  seeds = lv.seeds.replace(stage=stage, blueprint=jnp.array([0, 0, -1, -1], jnp.int32),
                           strategy=jnp.zeros((4,), jnp.int32), alpha=alpha)
  children = _live_children(lv.spec, jax.random.key(5))
  state = _with_layer(state, path, seeds, children)
  batch = {k: v[:64] for k, v in DATA.items()}
  loss_fn = training.cross_entropy_loss

  # By hand: <dL/dout, f> is the derivative of the task loss along the seed's blend weight
  # (TRAINING taken at a vanishing weight, where the training pass's value is), f from the
  # layer's own evaluation pass on the host activations.
  def task_loss(ea):
    tree = knn.eval_alpha_tree(
        state.kasmina, lambda p, v: ea if p == path else knn.current_eval_alpha(v.seeds))
    return training.evaluate(state, batch, loss_fn, tree)[0]

  lin = jax.grad(task_loss)(jnp.array([1e-7, 0.5, 0.0, 0.0]))[:2]
  host = state.params["hidden0"]["host"]
  x = jax.nn.relu(jnp.asarray(batch["x"]) @ host["kernel"] + host["bias"])
  on, _ = layer_lib.forward(lv.spec, children, seeds, x, u=jnp.asarray(batch["x"]),
                           eval_alpha=jnp.ones((4,)))
  f = (on - x).reshape(64, 4, 2)[:, :2]
  penalty = lv.spec.trust_penalty * jnp.sum(f * f, axis=(0, 2)) / 64
  # The linear term is far outside the tolerance below (the penalty alone would fail).
  assert np.all(np.abs(np.asarray(lin)) > 0.05 * np.abs(np.asarray(lin + penalty)))

  new, _ = training.train_step(state, batch, loss_fn)
  got = knn.find_layers(new.kasmina)[path].seeds
  np.testing.assert_array_equal(np.asarray(got.objective_count)[:2], [1, 1])
  np.testing.assert_allclose(np.asarray(got.objective)[:2], np.asarray(lin + penalty),
                             rtol=2e-3, atol=1e-6)


class TwoDense(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    for name in ("a", "b"):
      x = knn.KasminaDense(8, 2, activation=nn.relu, corr_rows=8, name=name)(x, train=train)
    return nn.Dense(2, name="head")(x)


def test_drift_controlled_reads_its_own_layers_host_weights():
  """Only layer "a"'s host weights drifted: its DRIFT_CONTROLLED seed pauses, layer "b"'s
  (same strategy, no drift of its own) ramps on."""
  state = training.create_train_state(TwoDense(), optax.sgd(0.0), jnp.asarray(DATA["x"][:2]),
                                      jax.random.key(0), fast_config())
  for i, name in enumerate(("a", "b")):
    path = (name, "kasmina")
    lv = knn.find_layers(state.kasmina)[path]
    seeds = lv.seeds.replace(
        stage=jnp.array([Stage.GRAFTING, Stage.DORMANT], jnp.int32),
        blueprint=jnp.array([0, -1], jnp.int32),
        strategy=jnp.full((2,), grafting.GraftingStrategy.DRIFT_CONTROLLED, jnp.int32),
        alpha=jnp.array([0.2, 0.0]))
    state = _with_layer(state, path, seeds, _live_children(lv.spec, jax.random.key(i)))
  snap = state.host_snapshot
  snap = {**snap, "a": {**snap["a"], "host": {**snap["a"]["host"],
                                                "kernel": 3.0 * snap["a"]["host"]["kernel"]}}}
  state = state.replace(host_snapshot=snap)
  np.testing.assert_allclose(float(training.layer_host_drift(state.params, snap, ("a", "kasmina"))),
                             2 / 3, rtol=1e-5)
  assert float(training.layer_host_drift(state.params, snap, ("b", "kasmina"))) == 0.0

  new, _ = training.train_step(state, {k: v[:64] for k, v in DATA.items()},
                               training.cross_entropy_loss)
  a = knn.find_layers(new.kasmina)[("a", "kasmina")].seeds
  b = knn.find_layers(new.kasmina)[("b", "kasmina")].seeds
  np.testing.assert_allclose(float(a.alpha[0]), 0.2)
  assert int(a.pause_steps[0]) == 1
  np.testing.assert_allclose(float(b.alpha[0]), 0.4, rtol=1e-6)
  assert int(b.pause_steps[0]) == 0


@pytest.mark.parametrize("fossil", lifecycle.FOSSIL_MODES)
def test_fossils_follow_the_mode_and_have_left_the_lifecycle(fossil, tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  pytest.importorskip("orbax.checkpoint")
  base = fast_config()
  life = dataclasses.replace(base.lifecycle, fossil=fossil)
  cfg = dataclasses.replace(base, tamiyo=dataclasses.replace(base.tamiyo, lifecycle=life))
  state = training.create_train_state(TinyNet(), TX, jnp.asarray(DATA["x"][:2]),
                                      jax.random.key(3), cfg)
  state = experiments.children_from_start(state, ("parallel_mlp", "residual_mlp"),
                                          jax.random.key(4), stage=Stage.FOSSILIZED)
  batch = {k: v[:64] for k, v in DATA.items()}
  new, _ = training.train_step(state, batch, training.cross_entropy_loss)

  def children(s):
    return [np.asarray(x) for p in knn.find_layers(s.kasmina)
            for x in jax.tree.leaves(knn.get_path(s.params, knn.children_path(p)))]

  moved = any(np.any(a != b) for a, b in zip(children(new), children(state)))
  assert moved == (fossil == "integrated")  # integrated fossils keep learning with the host
  host = np.asarray(new.params["head"]["kernel"]) != np.asarray(state.params["head"]["kernel"])
  assert host.any()
  # A checkpoint round trip continues bit for bit.
  checkpoint.save(tmp_path, new)
  restored = checkpoint.restore(tmp_path, new)
  a, _ = training.train_step(restored, batch, training.cross_entropy_loss)
  b, _ = training.train_step(new, batch, training.cross_entropy_loss)
  chex.assert_trees_all_equal(a.params, b.params)
  # No gate, cull or per-seed rollback touches a fossil: even a useless or harmful fossil (its
  # counterfactual is whatever it is) stays FOSSILIZED through the epoch end.
  after, out = training.epoch_transition(new, VAL, training.cross_entropy_loss)
  for name, stage in out.new_stage.items():
    assert np.all(np.asarray(stage) == Stage.FOSSILIZED), name
  for name, c in out.commands.items():
    assert np.all(np.asarray(c.op) == lifecycle.Op.NONE), name
  # Explicit commands are rejected and change nothing.
  seeds = training.seeds_tree(after.kasmina)
  for name, s in seeds.items():
    k = s.num_seeds
    for op in (lifecycle.Op.CULL, lifecycle.Op.ROLLBACK, lifecycle.Op.ADVANCE, lifecycle.Op.CANCEL):
      ns, acc = lifecycle.apply_commands(s, lifecycle.make_commands(k, op=[int(op)] * k),
                                         life, num_blueprints=8, num_strategies=4)
      assert not np.any(np.asarray(acc)), (name, op)
      chex.assert_trees_all_equal(ns, s)


# ------------------------------------------------------------------ user grafting strategies


def crawl(seeds, signals, config):
  """A user grafting strategy: alpha += 1e-3 a step (the built-ins here finish in 5 steps)."""
  del signals, config
  return jnp.full(seeds.stage.shape, 1e-3, jnp.float32), jnp.zeros(seeds.stage.shape, bool)


class CrawlNet(nn.Module):
  """TinyNet with `crawl` as the only strategy of "hidden0" and beside the built-ins in
  "seeds1" (its id there: 4)."""

  strategies: tuple = (crawl,)

  @nn.compact
  def __call__(self, x, train: bool = True):
    catalog = blueprints.default_blueprints(parallel_hidden=8)
    x = knn.KasminaDense(8, 4, blueprints=catalog, activation=nn.relu, corr_rows=32,
                         grafting_strategies=self.strategies, name="hidden0")(x, train=train)
    x = knn.KasminaLayer(2, corr_rows=32, name="seeds1",
                         grafting_strategies=grafting.DEFAULT_STRATEGIES + (crawl,))(x, train=train)
    return nn.Dense(2, name="head")(x)


def crawl_config(**tamiyo_fields):
  cfg = fast_config()
  return dataclasses.replace(cfg, tamiyo=dataclasses.replace(cfg.tamiyo, **tamiyo_fields))


def test_user_strategy_grafts_through_fit_and_layer_keys_agree():
  state = training.create_train_state(CrawlNet(), TX, jnp.asarray(DATA["x"][:2]),
                                      jax.random.key(0), crawl_config(grafting_strategy="crawl"))
  state, history = training.fit(state, DATA, VAL, training.cross_entropy_loss, epochs=3,
                                batch_size=64, progress=False)
  slots = knn.layer_slots(state.kasmina)
  ids = {("hidden0", "kasmina"): 0, ("seeds1",): 4}
  assert {p: s.strategy_names.index("crawl") for p, s in slots.items()} == ids
  grafting_seeds = 0
  for path, slot in slots.items():
    seeds = jax.tree.map(np.asarray, slot.seeds)
    germinated = seeds.stage != Stage.DORMANT
    np.testing.assert_array_equal(seeds.strategy[germinated], ids[path])
    g = seeds.stage == Stage.GRAFTING
    grafting_seeds += int(g.sum())
    # The ramp is crawl's: 1e-3 a step in GRAFTING, not a built-in's 1/5.
    np.testing.assert_allclose(seeds.alpha[g], 1e-3 * seeds.steps_in_stage[g], rtol=1e-4)
  assert grafting_seeds >= 1
  # One convention: every per-layer map is keyed by the layer paths of `layer_slots`; the
  # history (plain Python, JSON) by their names.
  _, out = training.epoch_transition(state, VAL, training.cross_entropy_loss)
  for tree in (out.report.layers, out.commands, out.accepted, out.delta, out.old_stage,
               out.new_stage, out.field_reports, state.ctrl.layers):
    assert set(tree) == set(slots)
  assert {k for h in history for k in h["stages"]} == {training.layer_name(p) for p in slots}
  stats = tamiyo.strategy_statistics(state.ctrl)
  assert stats[("hidden0", "kasmina")]["tries"][0] >= 1


def test_bad_grafting_strategies_are_named():
  x = jnp.asarray(DATA["x"][:2])
  unnamed = lambda seeds, signals, config: (0.0, False)
  for strategies, error in (((unnamed,), TypeError), (("fixed_ramp",), TypeError),
                            ((crawl, crawl), ValueError), ((), ValueError),
                            (crawl, TypeError)):
    with pytest.raises(error, match="grafting_strategies"):
      training.create_train_state(CrawlNet(strategies), TX, x, jax.random.key(0), fast_config())
  state = training.create_train_state(CrawlNet(), TX, x, jax.random.key(0),
                                      crawl_config(grafting_strategy="fixed_ramp"))
  with pytest.raises(ValueError, match="grafting_strategy"):  # "hidden0" has crawl only
    training.epoch_transition(state, VAL, training.cross_entropy_loss)
