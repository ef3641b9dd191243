"""The growth protocol (`kasmina_jax.experiments`): validation carved from training data, a rate
grid per variant, choice on validation, and a test split that tuning never reads."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np
import pytest

from kasmina_jax import experiments
from kasmina_jax import training

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import spirals  # noqa: E402  pylint: disable=g-import-not-at-top


def test_carve_validation_splits_training_rows_once():
  data = {"x": np.arange(100)[:, None] * 1.0, "y": np.arange(100)}
  fit, val = experiments.carve_validation(data, 0.25, seed=3)
  assert len(val["y"]) == 25 and len(fit["y"]) == 75
  assert not set(fit["y"]) & set(val["y"])
  assert sorted(np.concatenate([fit["y"], val["y"]])) == list(range(100))
  np.testing.assert_array_equal(fit["x"][:, 0], fit["y"])  # rows stay whole
  again, _ = experiments.carve_validation(data, 0.25, seed=3)
  np.testing.assert_array_equal(again["y"], fit["y"])
  other, _ = experiments.carve_validation(data, 0.25, seed=4)
  assert not np.array_equal(other["y"], fit["y"])
  for bad in (0.0, 1.0, -0.1, 0.001):
    with pytest.raises(ValueError, match="fraction"):
      experiments.carve_validation(data, bad)


def test_variant_rates_shared_grid_and_per_variant_map():
  assert experiments.variant_rates(["a", "b"], (1e-3, 1e-2)) == {
      "a": (1e-3, 1e-2), "b": (1e-3, 1e-2)}
  assert experiments.variant_rates(["a", "b"], {"a": [1e-2], "b": (3e-3, 1e-2)}) == {
      "a": (1e-2,), "b": (3e-3, 1e-2)}
  with pytest.raises(ValueError, match="missing"):
    experiments.variant_rates(["a", "b"], {"a": [1e-2]})
  with pytest.raises(ValueError, match="unexpected"):
    experiments.variant_rates(["a"], {"a": [1e-2], "c": [1e-2]})
  with pytest.raises(ValueError, match="at least one"):
    experiments.variant_rates(["a"], {"a": []})
  for bad in (0.0, -1e-3, math.inf, math.nan):
    with pytest.raises(ValueError, match="positive finite"):
      experiments.variant_rates(["a"], (1e-3, bad))


class _UnreadableSplit(dict):
  """A test split that fails the moment anything reads it."""

  def _refuse(self, *args, **kwargs):
    raise AssertionError("the test split was read")

  __getitem__ = __iter__ = __len__ = keys = values = items = get = _refuse


def _tiny_task(poison_test: bool) -> experiments.Task:
  task = spirals.make_task(train=320, test=200, small=4, large=8, child_width=4, epochs=2,
                           batch_size=64)
  if not poison_test:
    return task
  fit, val, _ = task.data()
  return dataclasses.replace(task, data=lambda: (fit, val, _UnreadableSplit()))


_GRIDS = {"fixed_small": (3e-2,), "fixed_large": (3e-2,), "grown": (1e-2, 3e-2)}


@pytest.fixture(scope="module")
def tiny_report():
  """One protocol run of the tiny spirals task that reads the test split (shared by the
  tests that read a report, so the runs train once)."""
  return experiments.run_protocol(_tiny_task, {"poison_test": False},
                                  variants=("fixed_small", "fixed_large", "grown"),
                                  lrs=_GRIDS, seeds=1, verbose=False)


def test_protocol_per_variant_rates_choose_on_validation_and_tune_without_test(tiny_report):
  grids = {"fixed_small": _GRIDS["fixed_small"], "grown": _GRIDS["grown"]}
  # Tuning (`read_test=False`): every run of every grid, and the test split never read.
  tuned = experiments.run_protocol(_tiny_task, {"poison_test": True},
                                   variants=("fixed_small", "grown"), lrs=grids, seeds=1,
                                   verbose=False, read_test=False)
  runs = sorted((r["variant"], r["lr"]) for r in tuned["runs"])
  assert runs == [("fixed_small", 3e-2), ("grown", 1e-2), ("grown", 3e-2)]
  assert tuned["chosen"]["fixed_small"] == 3e-2
  grown_vals = {r["lr"]: r["val_metric"] for r in tuned["runs"] if r["variant"] == "grown"}
  assert tuned["chosen"]["grown"] == max(grown_vals, key=lambda lr: (grown_vals[lr], -lr))
  assert all(math.isnan(r["test_metric"]) for r in tuned["runs"])
  rows = {r["variant"]: r for r in tuned["rows"]}
  assert set(rows["grown"]["val_by_lr"]) == {"0.01", "0.03"}
  # Without fixed-large there is nothing to reach: no target, and the table says so.
  assert tuned["reach"] == {} and rows["grown"]["reach_target"] is None
  assert "flops_to_large" not in str(tuned["verdict"])
  assert experiments.markdown_table(tuned["rows"]).splitlines()[-1].endswith("| — |")
  # The report: the test split is read for the chosen rate's runs only.
  report = tiny_report
  for r in report["runs"]:
    read = not math.isnan(r["test_metric"])
    assert read == (report["chosen"][r["variant"]] == r["lr"]), r
  for row in report["rows"]:
    assert 0.0 <= row["test_mean"] <= 1.0 and row["seeds"] == 1
    for key in ("variant", "lr", "seeds", "test_mean", "test_std", "val_mean", "params",
                "train_flops", "reach_target", "reached_large", "flops_to_large",
                "flops_to_large_fraction"):
      assert key in row


# ----------------------------------------------------------------------------- compute


def _history(params, vals, *, metric="accuracy", rolled_back=()):
  """A `fit` history of the given per-epoch end parameter counts and validation figures."""
  return [{"epoch": i, "params": p, "val_loss": 1.0 - v if metric == "accuracy" else v,
           **({"val_accuracy": v} if metric == "accuracy" else {}),
           "rolled_back": i in rolled_back} for i, (p, v) in enumerate(zip(params, vals))]


def test_flops_curve_is_cumulative_with_each_epoch_at_its_starting_count():
  # The model grows at the ends of epochs 1 and 2: epoch 2 runs at 150 params, epoch 3 at 400.
  history = _history([100, 150, 400, 400], [0.1, 0.2, 0.3, 0.4])
  steps, batch = 5, 8
  per_epoch = [6.0 * c * steps * batch for c in (100, 100, 150, 400)]
  curve = experiments.flops_curve(history, 100, steps, batch)
  np.testing.assert_allclose(curve, np.cumsum(per_epoch))
  assert experiments.train_flops(history, 100, steps, batch) == pytest.approx(sum(per_epoch))
  # A row of T tokens costs T times a row of one.
  np.testing.assert_allclose(experiments.flops_curve(history, 100, steps, batch, 64),
                             64 * curve)
  assert experiments.train_flops([], 100, steps, batch) == 0.0
  assert experiments.Task.tokens_per_row == 1 and experiments.Task.reach_tolerance == 0.0


def test_validation_curve_reads_the_metric_and_drops_rolled_back_epochs():
  history = _history([1, 1, 1], [0.5, 0.9, 0.6], rolled_back=(1,))
  acc = experiments.validation_curve(history, "accuracy")
  np.testing.assert_allclose(acc, [0.5, np.nan, 0.6])
  np.testing.assert_allclose(experiments.validation_curve(history, "loss"), [0.5, np.nan, 0.4])
  # A metric the history lacks falls back to the loss, as a run's final `val_metric` does.
  lm = _history([1, 1], [2.0, 1.5], metric="loss")
  np.testing.assert_allclose(experiments.validation_curve(lm, "loss"), [2.0, 1.5])


def test_flops_to_reach_directions_tolerance_first_epoch_and_never():
  flops = [10.0, 20.0, 30.0, 40.0]
  acc = [0.50, 0.70, 0.69, 0.80]
  reach = experiments.flops_to_reach
  assert reach(flops, acc, 0.70, higher_is_better=True) == 20.0  # the first, not the best
  assert reach(flops, acc, 0.75, higher_is_better=True) == 40.0
  assert reach(flops, acc, 0.81, higher_is_better=True) is None  # never
  assert reach(flops, acc, 0.40, higher_is_better=True) == 10.0  # at the first epoch end
  assert reach(flops, acc, 0.81, higher_is_better=True, tolerance=0.02) == 40.0
  assert reach(flops, acc, 0.72, higher_is_better=True, tolerance=0.02) == 20.0
  # A loss: lower is better, so the same numbers reach a different epoch.
  loss = [2.0, 1.6, 1.7, 1.5]
  assert reach(flops, loss, 1.6, higher_is_better=False) == 20.0
  assert reach(flops, loss, 1.55, higher_is_better=False) == 40.0
  assert reach(flops, loss, 1.55, higher_is_better=False, tolerance=0.05) == 20.0
  assert reach(flops, loss, 1.4, higher_is_better=False) is None
  assert reach(flops, loss, 2.5, higher_is_better=False) == 10.0
  assert reach(flops, loss, 1.6, higher_is_better=True) == 10.0  # the direction matters
  # A rolled-back (NaN) epoch reaches nothing; a NaN target is never reached.
  assert reach(flops, [0.5, np.nan, 0.6, 0.9], 0.8, higher_is_better=True) == 40.0
  assert reach(flops, [np.nan] * 4, 0.0, higher_is_better=False) is None
  assert reach(flops, acc, float("nan"), higher_is_better=True) is None
  with pytest.raises(ValueError, match="one value per epoch"):
    reach(flops, acc[:3], 0.5, higher_is_better=True)


def _run(variant, seed, vals, flops, *, metric_final=None):
  return experiments.RunResult(
      variant=variant, seed=seed, lr=1e-2,
      val_metric=vals[-1] if metric_final is None else metric_final, val_loss=0.0,
      params=100, train_flops=flops[-1], wall_time=1.0, history=[], fossilized=0,
      test_metric=0.5, test_loss=1.0, flops_curve=list(flops), val_curve=list(vals))


def _synthetic_runs():
  """Accuracy runs: fixed-large's two seeds end at 0.70 and 0.74 (target 0.72)."""
  large = [10.0, 20.0, 30.0, 40.0]
  grown = [2.0, 5.0, 12.0, 24.0]
  return [
      _run("fixed_large", 0, [0.50, 0.65, 0.70, 0.70], large),
      _run("fixed_large", 1, [0.60, 0.72, 0.73, 0.74], large),
      _run("fixed_small", 0, [0.40, 0.50, 0.55, 0.60], [1.0, 2.0, 3.0, 4.0]),
      _run("fixed_small", 1, [0.40, 0.50, 0.56, 0.61], [1.0, 2.0, 3.0, 4.0]),
      _run("grown", 1, [0.50, 0.60, 0.75, 0.78], grown),  # reaches at 12
      _run("grown", 0, [0.73, 0.60, 0.65, 0.70], grown),  # reaches at its first epoch end
      _run("grown", 2, [0.50, 0.60, 0.65, 0.71], grown),  # never (0.71 < 0.72)
  ]


def test_reach_summary_counts_seeds_and_takes_the_median_of_those_that_reached():
  runs = _synthetic_runs()
  summary = experiments.reach_summary(runs, higher_is_better=True)
  assert summary["target"] == pytest.approx(0.72) and summary["threshold"] == summary["target"]
  assert summary["fixed_large_flops"] == 40.0
  large, small, grown = (summary["variants"][v] for v in ("fixed_large", "fixed_small", "grown"))
  assert large["runs"] == [None, 20.0] and large["reached"] == 1 and large["flops"] == 20.0
  assert small == {"seeds": 2, "reached": 0, "runs": [None, None], "flops": None,
                   "fraction": None}
  assert grown["runs"] == [2.0, 12.0, None]  # in seed order
  assert grown["reached"] == 2 and grown["flops"] == pytest.approx(7.0)
  assert grown["fraction"] == pytest.approx(7.0 / 40.0)
  # A tolerance of 0.025 (2.5 points) lets grown's third seed and fixed-large's first in.
  loose = experiments.reach_summary(runs, higher_is_better=True, tolerance=0.025)
  assert loose["threshold"] == pytest.approx(0.695)
  assert loose["variants"]["grown"]["runs"] == [2.0, 12.0, 24.0]
  assert loose["variants"]["fixed_large"]["runs"] == [30.0, 20.0]
  assert loose["variants"]["grown"]["flops"] == 12.0
  # Without fixed-large there is no target.
  assert experiments.reach_summary([r for r in runs if r.variant != "fixed_large"],
                                   higher_is_better=True) == {}


def test_reach_summary_of_a_loss_looks_down():
  runs = [_run("fixed_large", 0, [2.0, 1.8, 1.6], [10.0, 20.0, 30.0]),
          _run("grown", 0, [2.1, 1.65, 1.58], [3.0, 6.0, 12.0]),
          _run("fixed_small", 0, [2.2, 1.9, 1.7], [1.0, 2.0, 3.0])]
  exact = experiments.reach_summary(runs, higher_is_better=False)
  assert exact["target"] == 1.6
  assert exact["variants"]["grown"]["runs"] == [12.0]
  assert exact["variants"]["fixed_small"]["runs"] == [None]
  nats = experiments.reach_summary(runs, higher_is_better=False, tolerance=0.05)
  assert nats["threshold"] == pytest.approx(1.65)
  assert nats["variants"]["grown"]["runs"] == [6.0]
  assert nats["variants"]["grown"]["fraction"] == pytest.approx(0.2)
  assert nats["variants"]["fixed_large"]["runs"] == [30.0]


def _bare_task(**overrides):
  return experiments.Task(name="synthetic", make_model=lambda v: None,
                          data=lambda: ({}, {}, {}), epochs=4, batch_size=8,
                          config=training.TrainConfig(), **overrides)


def test_rows_table_and_verdict_report_flops_to_fixed_large():
  runs = _synthetic_runs()
  chosen = {"fixed_large": 1e-2, "fixed_small": 1e-2, "grown": 1e-2}
  rows = experiments.report_rows(_bare_task(), runs, chosen, runs)
  by = {r["variant"]: r for r in rows}
  assert by["grown"]["reached_large"] == 2 and by["grown"]["flops_to_large"] == 7.0
  assert by["grown"]["flops_to_large_fraction"] == pytest.approx(7.0 / 40.0)
  assert by["grown"]["flops_to_large_runs"] == [2.0, 12.0, None]
  assert by["fixed_small"]["flops_to_large"] is None
  assert all(r["reach_target"] == pytest.approx(0.72) for r in rows)
  table = experiments.markdown_table(rows, "accuracy")
  header, _, *lines = table.splitlines()
  assert "FLOPs to fixed-large's val accuracy 72.00%" in header
  cells = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in lines}
  assert cells == {"fixed_small": "never (0/2 seeds)", "fixed_large": "20 (50%, 1/2 seeds)",
                   "grown": "7 (18%, 2/3 seeds)"}
  v = experiments.verdict(rows, higher_is_better=True)
  assert v["grown_flops_to_large"] == 7.0 and v["grown_reached_large"] == 2
  assert v["grown_seeds"] == 3 and v["reach_tolerance"] == 0.0
  assert v["grown_flops_to_large_fraction"] == pytest.approx(0.175)
  assert v["grown_train_flops_fraction"] == pytest.approx(24.0 / 40.0)
  # The task's tolerance, or the caller's over it.
  loose = experiments.report_rows(_bare_task(reach_tolerance=0.015), runs, chosen, runs)
  assert {r["variant"]: r["reached_large"] for r in loose}["grown"] == 3
  exact = experiments.report_rows(_bare_task(reach_tolerance=0.015), runs, chosen, runs,
                                  reach_tolerance=0.0)
  assert {r["variant"]: r["reached_large"] for r in exact}["grown"] == 2
  assert "70.50%" in experiments.markdown_table(loose).splitlines()[0]
  # Every grown seed short of the target: "never" in the table and None in the verdict.
  stuck = [r for r in runs if r.variant != "grown" or r.seed == 2]
  rows = experiments.report_rows(_bare_task(), stuck, chosen, stuck)
  assert experiments.verdict(rows)["grown_flops_to_large"] is None
  assert experiments.markdown_table(rows).splitlines()[-1].endswith("| never (0/1 seeds) |")


def test_protocol_records_flops_curves_and_writes_the_flops_figure(tiny_report, tmp_path):
  report = tiny_report
  task = _tiny_task(False)
  for r in report["runs"]:
    assert len(r["flops_curve"]) == len(r["val_curve"]) == len(r["history"]) == task.epochs
    assert r["flops_curve"][-1] == pytest.approx(r["train_flops"])
    assert np.all(np.diff(r["flops_curve"]) > 0)
    assert r["val_curve"][-1] == pytest.approx(r["val_metric"])
  large = [r for r in report["runs"] if r["variant"] == "fixed_large"]
  assert report["reach"]["target"] == pytest.approx(np.mean([r["val_metric"] for r in large]))
  by = {r["variant"]: r for r in report["rows"]}
  # fixed-large's one seed is its own target: it reaches it, at the latest at its end.
  assert by["fixed_large"]["reached_large"] == 1
  assert by["fixed_large"]["flops_to_large_fraction"] <= 1.0
  for row in report["rows"]:
    run = next(r for r in report["runs"]
               if r["variant"] == row["variant"] and r["lr"] == report["chosen"][r["variant"]])
    expected = experiments.flops_to_reach(run["flops_curve"], run["val_curve"],
                                          report["reach"]["target"], higher_is_better=True)
    assert row["flops_to_large"] == expected
  pytest.importorskip("matplotlib")
  import json  # pylint: disable=g-import-not-at-top
  from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
  paths = experiments.write_report(report, str(tmp_path), metric="accuracy")
  figure = tmp_path / "val_accuracy_vs_flops.png"
  assert str(figure) in paths
  with open(figure, "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["reach"]["target"] == pytest.approx(report["reach"]["target"])
  assert all("flops_curve" in r and "val_curve" in r for r in saved["runs"])
  assert "FLOPs to fixed-large's val accuracy" in (tmp_path / "results.md").read_text()
  # The figure again from the saved file, and from a copy without histories or `reach`
  # (what benchmarks/growth.py keeps).
  again = plots.plot_metric_vs_flops(tmp_path / "results.json", tmp_path / "again.png")
  assert os.path.getsize(again) > 1000
  slim = {k: v for k, v in saved.items() if k not in ("reach", "metric")}
  slim["runs"] = [{k: v for k, v in r.items() if k != "history"} for r in saved["runs"]]
  assert os.path.getsize(plots.plot_metric_vs_flops(slim, tmp_path / "slim.png")) > 1000


def test_a_sweep_saved_in_parts_summarizes_like_the_whole(tiny_report, tmp_path):
  """`save_results` / `load_results` carry a sweep over sittings: the runs saved in two
  files and summarized together choose the same rates and report the same figures; a run
  given twice, or variables restored into another model, are refused by name."""
  results = tiny_report["results"]
  parts = [[r for r in results if r.variant == "grown"],
           [r for r in results if r.variant != "grown"]]
  paths = [str(tmp_path / f"part{i}.pkl") for i in range(2)]
  for part, path in zip(parts, paths):
    experiments.save_results(part, path)
  loaded = [r for path in paths for r in experiments.load_results(path)]
  assert sorted((r.variant, r.lr, r.seed) for r in loaded) == sorted(
      (r.variant, r.lr, r.seed) for r in results)
  merged = experiments.summarize_protocol(_tiny_task(False), loaded)
  assert merged["chosen"] == tiny_report["chosen"]
  for a, b in zip(merged["rows"], tiny_report["rows"]):
    assert a["variant"] == b["variant"]
    np.testing.assert_allclose(a["test_mean"], b["test_mean"], rtol=1e-6)
    np.testing.assert_allclose(a["val_mean"], b["val_mean"], rtol=1e-6)
  with pytest.raises(ValueError, match="more than once"):
    experiments.summarize_protocol(_tiny_task(False), loaded + loaded[:1], read_test=False)
  large = next(r for r in loaded if r.variant == "fixed_large")
  task = _tiny_task(False)
  with pytest.raises(ValueError, match="saved leaf .* has shape"):
    experiments.evaluate_variables(task, "fixed_small", large.variables, task.data()[1])
