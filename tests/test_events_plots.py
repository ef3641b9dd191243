"""Tests of `kasmina_jax.events` (the JSONL event log) and `kasmina_jax.plots` (its PNGs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kasmina_jax import events
from kasmina_jax.lifecycle import Op, Stage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A lifecycle that walks the success path, and one that is culled and comes back.
_SUCCESS = [Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.TRAINING, Stage.GRAFTING,
            Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING, Stage.FINE_TUNING,
            Stage.FOSSILIZED]
_CULLED = [Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.GRAFTING,
           Stage.STABILIZATION, Stage.EVALUATING, Stage.CULLED, Stage.CULLED, Stage.DORMANT]


def _stage_at(seed: int, epoch: int) -> Stage:
  start = 2 * seed  # seeds germinate one after another
  if epoch < start:
    return Stage.DORMANT
  path = _SUCCESS if seed % 3 != 1 else _CULLED
  if seed == 5:
    path = [Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.GRAFTING, Stage.ROLLED_BACK]
  if seed == 6:
    path = [Stage.DORMANT, Stage.GERMINATED, Stage.CANCELLED, Stage.DORMANT]
  return path[min(epoch - start, len(path) - 1)]


def write_synthetic_log(path, *, layers=(("encoder", 8), ("decoder", 4)), epochs=16,
                        rollback_epoch=9) -> None:
  """A run's log as the training loop writes it: epochs, commands, transitions, reports."""
  rng = np.random.default_rng(0)
  with events.EventLog(path, run={"description": "synthetic", "metric": "accuracy",
                                  "layers": dict(layers)}) as log:
    prev = {name: [Stage.DORMANT] * k for name, k in layers}
    for epoch in range(epochs):
      step = (epoch + 1) * 50
      stages = {name: [_stage_at(s, epoch) for s in range(k)] for name, k in layers}
      for name, k in layers:
        ops = [int(Op.GERMINATE) if stages[name][s] == Stage.GERMINATED
               and prev[name][s] == Stage.DORMANT else int(Op.NONE) for s in range(k)]
        log.commands(epoch=epoch, step=step, layer=name, ops=np.asarray(ops, np.int32),
                     accepted=jnp.asarray([o != 0 for o in ops]))
        for s in range(k):
          if stages[name][s] != prev[name][s]:
            log.transition(epoch=epoch, step=step, layer=name, seed=np.int32(s),
                           from_stage=prev[name][s], to_stage=stages[name][s].name,
                           blueprint="residual_mlp")
            if stages[name][s] in (Stage.FOSSILIZED, Stage.CULLED, Stage.ROLLED_BACK):
              log.field_report({"layer": name, "seed": s, "outcome": stages[name][s].name,
                                "epoch": epoch, "delta": float("nan"),
                                "health_after": {"chunk_variance": np.float32(0.5)}})
      health = {name: {
          "chunk_variance": (rng.lognormal(size=k) * (1 + epoch)).astype(np.float32),
          "dead_node_ratio": jnp.clip(jnp.linspace(0, 1, k) - 0.02 * epoch, 0, 1),
          "avg_inter_node_correlation": [float("nan")] + rng.uniform(size=k - 1).tolist(),
      } for name, k in layers}
      active = sum(100 * sum(st in (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION,
                                    Stage.EVALUATING, Stage.FINE_TUNING, Stage.FOSSILIZED)
                             for st in stages[name]) for name, _ in layers)
      log.epoch(epoch=epoch, step=step, train_loss=jnp.float32(2.0 / (1 + epoch)),
                val_loss=np.float64(2.2 / (1 + epoch)) if epoch != 3 else float("inf"),
                val_metric=0.5 + 0.03 * epoch, params_active=10_000 + active,
                params_allocated=np.int64(12_000 + 1_200), stages={
                    name: jnp.asarray(v, jnp.int32) for name, v in stages.items()},
                health=health, alpha={name: np.linspace(0, 1, k) for name, k in layers},
                extra={"rolled_back": epoch == rollback_epoch})
      prev = stages


# ------------------------------------------------------------------------------------ events


def test_log_round_trip_with_numpy_jax_and_nan(tmp_path):
  path = tmp_path / "run" / "events.jsonl"
  with events.EventLog(path, run={"seed": np.int64(3), "lr": jnp.float32(0.5)}) as log:
    log.log("custom", epoch=np.int32(2), step=jnp.asarray(7), values=jnp.asarray([1.0, jnp.nan]),
            matrix=np.array([[1, 2], [3, 4]], np.int8), flag=np.bool_(True),
            inf=float("inf"), nested={("enc", 0): [np.float32(-np.inf), 1.5]},
            stage=Stage.GRAFTING, bf16=jnp.asarray([0.25], jnp.bfloat16))
    log.epoch(epoch=2, step=7, train_loss=jnp.float32(float("nan")), val_loss=1.25,
              params_active=np.int64(10), params_allocated=20,
              stages={"enc": jnp.asarray([0, 2, 7], jnp.int32)},
              health={"enc": {"chunk_variance": np.array([0.5, np.nan, 1.0], np.float32)}})
    log.transition(epoch=2, step=7, layer="enc", seed=1, from_stage=Stage.TRAINING,
                   to_stage=3, blueprint=None)
    log.commands(epoch=2, step=7, layer="enc", ops=jnp.asarray([0, 2, 4]),
                 accepted=np.array([False, True, False]))
    log.field_report({"layer": "enc", "seed": 1, "outcome": "CULLED", "epoch": 2,
                      "delta": np.float32(np.nan)})
  assert log.closed
  # Every line is strict JSON (no NaN / Infinity tokens).
  for line in path.read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
  recs = events.read_events(path)
  assert [r["type"] for r in recs] == ["run", "custom", "epoch", "transition", "commands",
                                       "field_report"]
  for r in recs:
    assert set(events.RECORD_KEYS) <= set(r) and isinstance(r["time"], float)
  run, custom, epoch, transition, commands, report = recs
  assert run["seed"] == 3 and run["lr"] == 0.5 and run["epoch"] is None
  assert custom["epoch"] == 2 and custom["step"] == 7
  assert custom["values"] == [1.0, None] and custom["matrix"] == [[1, 2], [3, 4]]
  assert custom["flag"] is True and custom["inf"] is None
  assert custom["nested"] == {"enc/0": [None, 1.5]} and custom["stage"] == "GRAFTING"
  assert custom["bf16"] == [0.25]
  assert epoch["train_loss"] is None and epoch["val_loss"] == 1.25 and epoch["val_metric"] is None
  assert epoch["stages"] == {"enc": [0, 2, 7]}
  assert epoch["health"]["enc"]["chunk_variance"] == [0.5, None, 1.0]
  assert epoch["params_active"] == 10 and epoch["extra"] == {}
  assert transition["from_stage"] == "TRAINING" and transition["to_stage"] == "GRAFTING"
  assert commands["op_names"] == ["NONE", "ADVANCE", "CULL"]
  assert commands["accepted"] == [False, True, False]
  assert report["outcome"] == "CULLED" and report["delta"] is None and report["step"] is None


def test_log_appends_and_reader_tolerates_a_cut_last_line(tmp_path):
  path = tmp_path / "events.jsonl"
  with events.EventLog(path) as log:
    log.log("a", epoch=0)
  with events.EventLog(path, run={"resumed": True}) as log:
    log.log("b", epoch=1)
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"type": "epoch", "epoch": 2, "train_')  # the run died mid-write
  recs = events.read_events(path)
  assert [r["type"] for r in recs] == ["run", "a", "run", "b"]
  assert recs[2]["resumed"] is True
  lines = path.read_text().splitlines()
  lines.insert(1, "{broken")
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"events.jsonl:2: not a JSON record"):
    events.read_events(path)


def test_log_rejects_bad_input(tmp_path):
  with events.EventLog(tmp_path / "e.jsonl") as log:
    with pytest.raises(TypeError, match=r"custom\['thing'\]: cannot write a object"):
      log.log("custom", thing=object())
    with pytest.raises(ValueError, match="stage: unknown name 'SPROUTING'"):
      log.transition(epoch=0, step=0, layer="l", seed=0, from_stage="DORMANT",
                     to_stage="SPROUTING")
    with pytest.raises(ValueError, match="accepted: expected 2 entries"):
      log.commands(epoch=0, step=0, layer="l", ops=[0, 1], accepted=[True])
    with pytest.raises(TypeError, match="stages: expected a dict"):
      log.epoch(epoch=0, step=0, train_loss=1.0, val_loss=1.0, params_active=1,
                params_allocated=1, stages=[0, 1], health={})
  with pytest.raises(ValueError, match="closed"):
    log.log("late")


# ------------------------------------------------------------------------------------- plots


@pytest.fixture(scope="module")
def synthetic_log(tmp_path_factory):
  pytest.importorskip("matplotlib")
  path = tmp_path_factory.mktemp("log") / "events.jsonl"
  write_synthetic_log(path)
  return path


def _assert_png(path):
  assert os.path.isfile(path) and os.path.getsize(path) > 1000
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_stage_matrix_from_epochs_and_from_transitions(synthetic_log):
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  recs = events.read_events(synthetic_log)
  rows, epochs, stages = plots.stage_matrix(recs)
  assert rows[:2] == [("encoder", 0), ("encoder", 1)] and len(rows) == 12
  assert epochs == list(range(16))
  assert stages[0, -1] == Stage.FOSSILIZED and stages[1, 8] == Stage.CULLED
  assert stages[rows.index(("encoder", 5)), -1] == Stage.ROLLED_BACK
  # Without epoch records the timeline is replayed from the transitions, and agrees.
  only_transitions = [r for r in recs if r["type"] != "epoch"]
  rows_t, epochs_t, stages_t = plots.stage_matrix(only_transitions)
  for row in rows_t:
    i, i_t = rows.index(row), rows_t.index(row)
    for j_t, epoch in enumerate(epochs_t):
      assert stages_t[i_t, j_t] == stages[i, epochs.index(epoch)]


def test_epoch_records_keep_the_last_of_a_resumed_epoch():
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  recs = [{"type": "epoch", "epoch": 0, "val_metric": 0.1},
          {"type": "epoch", "epoch": 1, "val_metric": 0.2},
          {"type": "run"},
          {"type": "epoch", "epoch": 1, "val_metric": 0.3}]
  assert [r["val_metric"] for r in plots.epoch_records(recs)] == [0.1, 0.3]


def test_plot_run_writes_pngs(synthetic_log, tmp_path):
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  paths = plots.plot_run(synthetic_log, tmp_path / "figs")
  assert [os.path.basename(p) for p in paths] == ["lifecycle.png", "health.png", "curves.png"]
  for p in paths:
    _assert_png(p)
  # From records too, and from a log with nothing to draw.
  _assert_png(plots.plot_run(events.read_events(synthetic_log), tmp_path, prefix="b_")[0])
  for p in plots.plot_run([{"type": "run", "epoch": None}], tmp_path / "empty"):
    _assert_png(p)


def test_plot_run_many_seeds(tmp_path):
  pytest.importorskip("matplotlib")
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  path = tmp_path / "wide.jsonl"
  write_synthetic_log(path, layers=(("a", 64), ("b", 32)), epochs=12)
  for p in plots.plot_run(path, tmp_path):
    _assert_png(p)


def test_plot_comparison(tmp_path):
  pytest.importorskip("matplotlib")
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  rows = [{"name": "fixed-small", "params": 2_500, "metric_mean": 0.58, "metric_std": 0.01},
          {"name": "grown", "params": 4_100, "metric_mean": 0.64, "metric_std": 0.02,
           "params_std": 300},
          {"name": "fixed-large", "params": 79_000, "metric_mean": 0.69, "metric_std": 0.005},
          {"name": "no std", "params": 10_000, "metric_mean": 0.6}]
  out = plots.plot_comparison(rows, tmp_path / "cmp" / "comparison.png", metric="accuracy")
  _assert_png(out)
  with pytest.raises(ValueError, match=r"rows\[0\]: missing \['params'\]"):
    plots.plot_comparison([{"name": "x", "metric_mean": 1.0}], tmp_path / "x.png")
  with pytest.raises(ValueError, match="at least one row"):
    plots.plot_comparison([], tmp_path / "x.png")


def test_cli(synthetic_log, tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run([sys.executable, "-m", "kasmina_jax.plots", str(synthetic_log),
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 0, result.stderr
  printed = result.stdout.split()
  assert printed == [str(out / n) for n in ("lifecycle.png", "health.png", "curves.png")]
  for p in printed:
    _assert_png(p)
  missing = subprocess.run([sys.executable, "-m", "kasmina_jax.plots", str(tmp_path / "no.jsonl")],
                           capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode != 0 and "no such file" in missing.stderr


def test_nan_metric_is_finite_json():
  assert events.to_json({"x": np.array([math.nan, 1.0])}) == {"x": [None, 1.0]}
  assert events.to_json(np.float32(np.inf)) is None


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(ImportError, match=r"kasmina_jax\[examples\]"):
    plots.plot_run([{"type": "run"}], tmp_path)


def _protocol_result(metric="accuracy"):
  """A `run_protocol` result as its JSON holds it: two seeds a variant at the chosen rate
  (grown's second with an epoch lost to a rollback, as NaN), one run of another rate."""
  def run(variant, seed, lr, flops, vals):
    return {"variant": variant, "seed": seed, "lr": lr, "flops_curve": flops,
            "val_curve": vals, "train_flops": flops[-1]}
  small = [1e6, 2e6, 3e6, 4e6]
  large = [1e7, 2e7, 3e7, 4e7]
  grown = [1e6, 3e6, 8e6, 1.5e7]
  return {
      "task": "synthetic", "metric": metric, "chosen": {"fixed_small": 0.01,
                                                        "fixed_large": 0.01, "grown": 0.003},
      "runs": [run("fixed_small", 0, 0.01, small, [0.4, 0.5, 0.55, 0.6]),
               run("fixed_small", 1, 0.01, small, [0.42, 0.5, 0.56, 0.61]),
               run("fixed_large", 0, 0.01, large, [0.5, 0.65, 0.70, 0.70]),
               run("fixed_large", 1, 0.01, large, [0.6, 0.72, 0.73, 0.74]),
               run("grown", 0, 0.003, grown, [0.5, 0.6, 0.75, 0.78]),
               run("grown", 1, 0.003, grown, [0.5, None, 0.73, 0.76]),
               run("grown", 0, 0.01, grown, [0.1, 0.1, 0.1, 0.1])],
      "reach": {"target": 0.72, "tolerance": 0.01, "threshold": 0.71,
                "variants": {"grown": {"flops": 8e6}, "fixed_small": {"flops": None},
                             "fixed_large": {"flops": 2e7}}},
  }


def test_metric_flops_curves_keep_the_chosen_rate_in_seed_order():
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  curves = plots.metric_flops_curves(_protocol_result())
  assert sorted(curves) == ["fixed_large", "fixed_small", "grown"]
  assert len(curves["grown"]) == 2  # the lr 0.01 run of grown is not its chosen rate
  flops, vals = curves["grown"][1]
  np.testing.assert_allclose(flops, [1e6, 3e6, 8e6, 1.5e7])
  assert math.isnan(vals[1]) and vals[3] == 0.76
  np.testing.assert_allclose(curves["fixed_large"][0][1], [0.5, 0.65, 0.70, 0.70])


def test_plot_metric_vs_flops(tmp_path):
  pytest.importorskip("matplotlib")
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  result = _protocol_result()
  _assert_png(plots.plot_metric_vs_flops(result, tmp_path / "flops.png"))
  # From the JSON file; and from rows when the result kept no `reach` (loss direction).
  path = tmp_path / "results.json"
  path.write_text(json.dumps(result))
  _assert_png(plots.plot_metric_vs_flops(str(path), tmp_path / "from_json.png"))
  no_reach = {k: v for k, v in _protocol_result("loss").items() if k != "reach"}
  no_reach["rows"] = [{"variant": "grown", "reach_target": 0.72, "reach_threshold": 0.73,
                       "flops_to_large": None}]
  assert plots._reach_line(no_reach) == (0.72, 0.73, {"grown": None})
  _assert_png(plots.plot_metric_vs_flops(no_reach, tmp_path / "rows.png", title="t"))
  # Without any target at all the curves are still drawn.
  bare = {k: v for k, v in result.items() if k != "reach"}
  assert plots._reach_line(bare) == (None, None, {})
  _assert_png(plots.plot_metric_vs_flops(bare, tmp_path / "bare.png"))
  old = {**result, "runs": [{k: v for k, v in r.items() if k not in ("flops_curve", "val_curve")}
                            for r in result["runs"]]}
  with pytest.raises(ValueError, match="flops_curve"):
    plots.plot_metric_vs_flops(old, tmp_path / "old.png")
  with pytest.raises(TypeError, match="result"):
    plots.plot_metric_vs_flops([1, 2], tmp_path / "bad.png")
