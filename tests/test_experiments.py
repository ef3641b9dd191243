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


def test_protocol_per_variant_rates_choose_on_validation_and_tune_without_test():
  grids = {"fixed_small": (3e-2,), "grown": (1e-2, 3e-2)}
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
  # The report: the test split is read for the chosen rate's runs only.
  report = experiments.run_protocol(_tiny_task, {"poison_test": False},
                                    variants=("fixed_small", "grown"), lrs=grids, seeds=1,
                                    verbose=False)
  for r in report["runs"]:
    read = not math.isnan(r["test_metric"])
    assert read == (report["chosen"][r["variant"]] == r["lr"]), r
  for row in report["rows"]:
    assert 0.0 <= row["test_mean"] <= 1.0 and row["seeds"] == 1
    for key in ("variant", "lr", "seeds", "test_mean", "test_std", "val_mean", "params",
                "train_flops"):
      assert key in row
