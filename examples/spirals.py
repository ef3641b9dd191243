"""Two spirals: a small MLP that grows with Kasmina, beside fixed-small, fixed-large and the
ceiling (the same children present from the start). CPU: with the defaults (16 runs) about 8
minutes on 2 cores (7.7 minutes on 2026-12-07).

    python examples/spirals.py [--seeds 2] [--lrs 1e-2,3e-2] [--workers 2]

Each variant's learning rate is chosen on a validation split carved from the training points;
the test points are read once, for the report. Writes the results table (results.md,
results.json), the accuracy-vs-parameters plot, and the grown model's lifecycle timeline,
health heatmap and curves (from its event log).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn

from kasmina_jax import blueprints, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import datasets
from kasmina_jax import linen as knn


class SpiralNet(nn.Module):
  """2 -> width -> width -> 2; both hidden layers wrapped by Kasmina (parallel children)."""

  width: int
  num_seeds: int = 4
  child_width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = True):
    catalog = blueprints.default_blueprints(parallel_hidden=self.child_width)
    for i in range(2):
      x = knn.KasminaDense(self.width, self.num_seeds, blueprints=catalog, activation=nn.relu,
                           corr_rows=64, name=f"hidden{i}")(x, train=train)
    return nn.Dense(2, name="head")(x)


def demo_config(controller: dict | None = None, life: dict | None = None
                ) -> training.TrainConfig:
  """Lifecycle timings scaled to a short run (counts are in steps, 32 steps an epoch); the
  controller's defaults (optionally overridden by keyword dicts)."""
  life = lifecycle.LifecycleConfig(**{
      **dict(min_training_steps=40, max_training_steps=400, stabilization_steps=20,
             fine_tuning_steps=40, fine_tuning_patience=2, embargo_epochs=2),
      **(life or {})})
  ctl = tamiyo.TamiyoConfig(**(controller or {}), lifecycle=life)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=20), tamiyo=ctl,
                              max_judged=8)


@functools.lru_cache(maxsize=4)
def load_data(train: int, test: int, val_fraction: float):
  """`(train, val, test)` spiral points; validation carved from the training points."""
  fit, val = experiments.carve_validation(datasets.two_spirals(train, seed=1), val_fraction)
  return fit, val, datasets.two_spirals(test, seed=2)


def make_task(*, train: int = 2560, test: int = 2000, val_fraction: float = 0.2,
              small: int = 8, large: int = 64, child_width: int = 16, epochs: int = 16,
              batch_size: int = 64, steps: int | None = None, controller: dict | None = None,
              life: dict | None = None) -> experiments.Task:
  """The spirals growth task (module level, so worker processes can build it). `steps`, when
  given, sets the epochs from the step budget."""
  fit, _, _ = load_data(train, test, val_fraction)
  if steps is not None:
    epochs = max(1, steps // (len(fit["x"]) // batch_size))
  models = {"fixed_small": SpiralNet(small, child_width=child_width),
            "grown": SpiralNet(small, child_width=child_width),
            "ceiling": SpiralNet(small, child_width=child_width),
            "fixed_large": SpiralNet(large, child_width=child_width)}
  return experiments.Task(
      name="spirals", make_model=models.__getitem__,
      data=functools.partial(load_data, train, test, val_fraction), epochs=epochs,
      batch_size=batch_size, config=demo_config(controller, life))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=2, help="RNG seeds per variant and rate")
  parser.add_argument("--lrs", default="1e-2,3e-2", help="Adam rates swept per variant (the "
                      "README's table: --seeds 5 --lrs 3e-3,1e-2,3e-2)")
  parser.add_argument("--epochs", type=int, default=16)
  parser.add_argument("--train", type=int, default=2560, help="training points (validation "
                      "is carved from them)")
  parser.add_argument("--test", type=int, default=2000, help="held-out points")
  parser.add_argument("--small", type=int, default=8, help="hidden width of the small host")
  parser.add_argument("--large", type=int, default=64, help="hidden width of fixed-large")
  parser.add_argument("--workers", type=int, default=2, help="worker processes (one run each)")
  parser.add_argument("--out", default="runs/spirals")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  lrs = tuple(float(x) for x in args.lrs.split(","))
  result = experiments.run_protocol(
      make_task, dict(train=args.train, test=args.test, small=args.small, large=args.large,
                      epochs=args.epochs),
      lrs=lrs, seeds=args.seeds, workers=args.workers, log_dir=args.out)
  experiments.write_report(result, args.out, args=vars(args), metric="accuracy",
                           title="Two spirals: test accuracy against parameters",
                           plots=not args.no_plots)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
