"""MNIST-1D (generated procedurally, never downloaded): an MLP that starts too small grows
with Kasmina, beside fixed-small, fixed-large and its own ceiling.

    python examples/mnist1d_mlp.py [--seeds 3] [--steps 6000] [--out runs/mnist1d] [--export DIR]

The model is 40 -> w -> w -> 10 with both hidden layers wrapped by `KasminaDense`; the grown
and ceiling variants hold parallel-wired children (4 seeds a layer, hidden 64 each), which
behave like added width (DESIGN.md, "Wiring").

`--export DIR` writes the grown seed-0 model as plain Flax (`kasmina_jax.export`):
`model.json`, `params.msgpack`, `grown_model.py`, `apply.stablehlo`, and `cost.md` (parameters,
FLOPs and CPU time against the Kasmina model's evaluation pass); see the README, "Export".
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
  parser.add_argument("--export", default=None, metavar="DIR",
                      help="write the grown seed-0 model as plain Flax + StableHLO to DIR")
  parser.add_argument("--export-include", default="auto", choices=("auto", "fossilized", "live"),
                      help="auto: fossilized children only, or the evaluation pass as it is "
                           "(include='live') when seeds are still in flight")


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
  export_dir = getattr(args, "export", None)
  for seed in range(args.seeds):
    for variant in args.variants.split(","):
      keep = bool(export_dir) and variant == "grown" and seed == 0
      r = experiments.run_variant(
          variant, models.__getitem__, train, test, training.cross_entropy_loss,
          epochs=epochs, batch_size=args.batch_size, seed=seed, learning_rate=args.lr,
          config=config, log_dir=out_dir, progress=args.progress, keep_state=keep)
      if keep:
        export_grown(r.state, test, export_dir, args.export_include)
        r.state = None
      results.append(r)
      print(r.summary("mnist1d"), flush=True)
  return results


def export_grown(state: training.TrainState, test: dict, directory: str, include: str) -> None:
  """Writes the grown model as plain Flax (+ StableHLO) and its cost against the Kasmina
  evaluation pass; checks that both compute the same outputs on the test set."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kasmina_jax import export as kex  # pylint: disable=g-import-not-at-top
  if include == "auto":
    try:
      exported = kex.export(state)
    except ValueError as err:
      print(f"export: {err}; exporting include='live'", flush=True)
      exported = kex.export(state, include="live")
  else:
    exported = kex.export(state, include=include)
  paths = exported.save(directory)
  x = jnp.asarray(test["x"], jnp.float32)
  ref = np.asarray(kex.kasmina_eval_fn(state)(x))
  gap = float(np.max(np.abs(np.asarray(exported.apply(x)) - ref)))
  gap_text = f"{gap:.2e} (largest |output| {float(np.max(np.abs(ref))):.1f})"
  report = kex.cost_report(state, exported, x[:1000])
  table = kex.format_cost(report)
  with open(os.path.join(directory, "cost.md"), "w") as fh:
    fh.write(table + f"\n\nmax |exported - kasmina| on the test set: {gap_text}\n")
  print(f"export: wrote {', '.join(sorted(paths))} to {directory}; max |exported - kasmina| "
        f"{gap_text}\n{table}", flush=True)


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
