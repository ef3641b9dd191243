"""Two spirals: a small MLP that grows with Kasmina, beside fixed-small, fixed-large and the
ceiling (the same children present from the start). CPU, about a minute.

    python examples/spirals.py [--seeds 3] [--epochs 30] [--out runs/spirals]

Writes the results table (results.md, results.json), the accuracy-vs-parameters plot, and the
grown model's lifecycle timeline, health heatmap and curves (from its event log).
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn

from kasmina_jax import blueprints, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import datasets
from kasmina_jax import nn as knn


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


def demo_config(epochs: int) -> training.TrainConfig:
  """Lifecycle timings scaled to a short run (counts are in steps, 40 steps an epoch)."""
  life = lifecycle.LifecycleConfig(min_training_steps=40, max_training_steps=400,
                                   stabilization_steps=20, fine_tuning_steps=40,
                                   fine_tuning_patience=2, embargo_epochs=2,
                                   improvement_margin=0.0)
  ctl = tamiyo.TamiyoConfig(plateau_patience=1, plateau_min_delta=1e-3,
                            max_concurrent_training=2, max_germinations_per_epoch=2,
                            germinate_without_plateau=True, lifecycle=life,
                            selection=tamiyo.SelectionStrategy.ACCURACY)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=20), tamiyo=ctl,
                              max_judged=8)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3, help="RNG seeds per variant")
  parser.add_argument("--epochs", type=int, default=16)
  parser.add_argument("--train", type=int, default=2560, help="training points")
  parser.add_argument("--test", type=int, default=2000, help="held-out points")
  parser.add_argument("--small", type=int, default=8, help="hidden width of the small host")
  parser.add_argument("--large", type=int, default=64, help="hidden width of fixed-large")
  parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  parser.add_argument("--out", default="runs/spirals")
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--progress", action="store_true", help="progress bar per run")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  train = datasets.two_spirals(args.train, seed=1)
  test = datasets.two_spirals(args.test, seed=2)
  models = {"fixed_small": SpiralNet(args.small), "grown": SpiralNet(args.small),
            "ceiling": SpiralNet(args.small), "fixed_large": SpiralNet(args.large)}
  config = demo_config(args.epochs)
  results = []
  for seed in range(args.seeds):
    for variant in experiments.VARIANTS:
      r = experiments.run_variant(
          variant, models.__getitem__, train, test, training.cross_entropy_loss,
          epochs=args.epochs, batch_size=64, seed=seed, learning_rate=args.lr, config=config,
          log_dir=args.out, progress=args.progress)
      results.append(r)
      print(r.summary("spirals"), flush=True)
  rows = experiments.write_report(results, args.out, config=vars(args),
                                  plots=not args.no_plots)
  return rows, results


if __name__ == "__main__":
  main(sys.argv[1:])
