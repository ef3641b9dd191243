"""MNIST-1D (generated procedurally, never downloaded): an MLP that starts too small grows
with Kasmina, beside fixed-small, fixed-large and its own ceiling.

    python examples/mnist1d_mlp.py [--seeds 3] [--steps 6000] [--out runs/mnist1d]

The model is 40 -> w -> w -> 10 with both hidden layers wrapped by `KasminaDense`; the grown
and ceiling variants hold parallel-wired children (4 seeds a layer, hidden 64 each), which
behave like added width (DESIGN.md, "Wiring").
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn

from kasmina_jax import blueprints, datasets, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import nn as knn


class MLP(nn.Module):
  width: int
  num_seeds: int = 4
  child_width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True):
    catalog = blueprints.default_blueprints(parallel_hidden=self.child_width)
    for i in range(2):
      x = knn.KasminaDense(self.width, self.num_seeds, blueprints=catalog, activation=nn.relu,
                           corr_rows=128, name=f"hidden{i}")(x, train=train)
    return nn.Dense(10, name="head")(x)


def growth_config(steps_per_epoch: int) -> training.TrainConfig:
  """Lifecycle defaults of DESIGN.md, with the controller free to grow every slot."""
  del steps_per_epoch
  life = lifecycle.LifecycleConfig(min_training_steps=100, max_training_steps=2000,
                                   stabilization_steps=100, fine_tuning_steps=300,
                                   fine_tuning_patience=3, embargo_epochs=5)
  ctl = tamiyo.TamiyoConfig(plateau_patience=1, plateau_min_delta=1e-3,
                            max_concurrent_training=1, max_germinations_per_epoch=1,
                            germinate_without_plateau=False, lifecycle=life,
                            selection=tamiyo.SelectionStrategy.ACCURACY)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=30), tamiyo=ctl,
                              max_judged=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--seeds", type=int, default=3, help="RNG seeds per variant")
  parser.add_argument("--steps", type=int, default=6000, help="training steps per run")
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples (train+test)")
  parser.add_argument("--train-split", type=float, default=0.8)
  parser.add_argument("--noise", type=float, default=None, help="MNIST-1D correlated noise scale")
  parser.add_argument("--data-seed", type=int, default=42, help="MNIST-1D generator seed")
  parser.add_argument("--small", type=int, default=32, help="hidden width of the small host")
  parser.add_argument("--large", type=int, default=128, help="hidden width of fixed-large")
  parser.add_argument("--child-width", type=int, default=64, help="hidden width of a child")
  parser.add_argument("--seeds-per-layer", type=int, default=4)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--variants", default=",".join(experiments.VARIANTS))
  parser.add_argument("--progress", action="store_true")


def run(args, out_dir: str | None = None):
  train, test = datasets.mnist1d(num_samples=args.samples, train_split=args.train_split,
                                 noise=args.noise, seed=args.data_seed)
  steps_per_epoch = len(train["x"]) // args.batch_size
  epochs = max(1, args.steps // steps_per_epoch)
  small = MLP(args.small, args.seeds_per_layer, args.child_width)
  models = {"fixed_small": small, "grown": small, "ceiling": small,
            "fixed_large": MLP(args.large, args.seeds_per_layer, args.child_width)}
  config = growth_config(steps_per_epoch)
  results = []
  for seed in range(args.seeds):
    for variant in args.variants.split(","):
      r = experiments.run_variant(
          variant, models.__getitem__, train, test, training.cross_entropy_loss,
          epochs=epochs, batch_size=args.batch_size, seed=seed, learning_rate=args.lr,
          config=config, log_dir=out_dir, progress=args.progress)
      results.append(r)
      print(r.summary("mnist1d"), flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(parser)
  parser.add_argument("--out", default="runs/mnist1d")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = run(args, args.out)
  experiments.write_report(results, args.out, config=vars(args), plots=not args.no_plots)

if __name__ == "__main__":
  main(sys.argv[1:])
