"""MNIST-1D (generated procedurally, never downloaded): an MLP that starts too small grows
with Kasmina, beside fixed-small, fixed-large and its own ceiling, under the fair protocol
(each variant's learning rate chosen on a validation split carved from the training data; the
test split read once, for the report).

    python examples/mnist1d_mlp.py [--seeds 5] [--lrs 1e-3,3e-3,1e-2] [--workers 4] [--export DIR]

The model is 40 -> w -> w -> 10 with both hidden layers wrapped by `KasminaDense`; the grown
and ceiling variants hold parallel-wired children (4 seeds a layer, hidden 64 each), which
behave like added width (docs/design.md, "Blueprints and wiring").

`--export DIR` writes the grown model (seed 0, at its validation-chosen rate) as plain Flax
(`kasmina_jax.export`): `model.json`, `params.msgpack`, `grown_model.py`, `apply.stablehlo`,
and `cost.md` (parameters, FLOPs and CPU time against the Kasmina model's evaluation pass);
see the README, "Export".
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn

from kasmina_jax import blueprints, datasets, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import linen as knn


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


def growth_config(controller: dict | None = None, life: dict | None = None
                  ) -> training.TrainConfig:
  """The library's lifecycle and controller defaults, with optional overrides (keyword
  dicts of `TamiyoConfig` / `LifecycleConfig` fields)."""
  cfg = tamiyo.TamiyoConfig(**(controller or {}),
                            lifecycle=lifecycle.LifecycleConfig(**(life or {})))
  return training.TrainConfig(grafting=grafting.GraftingConfig(), tamiyo=cfg, max_judged=8)


@functools.lru_cache(maxsize=4)
def load_data(samples: int, noise: float | None, data_seed: int, val_fraction: float):
  """`(train, val, test)`: MNIST-1D's own train/test split, validation carved from train."""
  train, test = datasets.mnist1d(num_samples=samples, noise=noise, seed=data_seed)
  fit, val = experiments.carve_validation(train, val_fraction, seed=data_seed)
  return fit, val, test


def make_task(*, samples: int = 5000, noise: float | None = None, data_seed: int = 42,
              val_fraction: float = 0.2, small: int = 32, large: int = 128,
              child_width: int = 64, seeds_per_layer: int = 4, steps: int = 6000,
              batch_size: int = 100, name: str = "mnist1d", controller: dict | None = None,
              life: dict | None = None) -> experiments.Task:
  """The MNIST-1D growth task (module level, so worker processes can build it)."""
  fit, _, _ = load_data(samples, noise, data_seed, val_fraction)
  steps_per_epoch = len(fit["x"]) // batch_size
  small_mlp = MLP(small, seeds_per_layer, child_width)
  models = {"fixed_small": small_mlp, "grown": small_mlp, "ceiling": small_mlp,
            "fixed_large": MLP(large, seeds_per_layer, child_width)}
  return experiments.Task(
      name=name, make_model=models.__getitem__,
      data=functools.partial(load_data, samples, noise, data_seed, val_fraction),
      epochs=max(1, steps // steps_per_epoch), batch_size=batch_size,
      config=growth_config(controller, life))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--seeds", type=int, default=5, help="RNG seeds per variant and rate")
  parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="Adam rates swept per variant")
  parser.add_argument("--steps", type=int, default=6000, help="training steps per run")
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples (train+test)")
  parser.add_argument("--noise", type=float, default=None, help="MNIST-1D correlated noise scale")
  parser.add_argument("--data-seed", type=int, default=42, help="MNIST-1D generator seed")
  parser.add_argument("--val-fraction", type=float, default=0.2,
                      help="share of the training split held out for validation")
  parser.add_argument("--small", type=int, default=32, help="hidden width of the small host")
  parser.add_argument("--large", type=int, default=128, help="hidden width of fixed-large")
  parser.add_argument("--child-width", type=int, default=64, help="hidden width of a child")
  parser.add_argument("--seeds-per-layer", type=int, default=4)
  parser.add_argument("--variants", default=",".join(experiments.VARIANTS))
  parser.add_argument("--workers", type=int, default=1, help="worker processes (one run each)")
  parser.add_argument("--export", default=None, metavar="DIR",
                      help="write the grown seed-0 model as plain Flax + StableHLO to DIR")
  parser.add_argument("--export-include", default="auto", choices=("auto", "fossilized", "live"),
                      help="auto: fossilized children only, or the evaluation pass as it is "
                           "(include='live') when seeds are still in flight")


def task_kwargs(args) -> dict:
  return dict(samples=args.samples, noise=args.noise, data_seed=args.data_seed,
              val_fraction=args.val_fraction, small=args.small, large=args.large,
              child_width=args.child_width, seeds_per_layer=args.seeds_per_layer,
              steps=args.steps, batch_size=args.batch_size)


def parse_lrs(text: str) -> tuple[float, ...] | dict[str, tuple[float, ...]]:
  """`--lrs`: one grid for every variant ("1e-3,3e-3") or a grid per variant
  ("fixed_small=1e-2,grown=3e-3:1e-2", rates of a variant separated by colons)."""
  def rates(part: str) -> tuple[float, ...]:
    try:
      out = tuple(float(x) for x in part.split(":" if "=" in text else ",") if x.strip())
    except ValueError:
      raise ValueError(f"--lrs: expected comma-separated numbers or variant=rate[:rate] "
                       f"pairs, got {text!r}") from None
    if not out or any(not lr > 0 for lr in out):
      raise ValueError(f"--lrs: expected positive learning rates, got {text!r}")
    return out
  if "=" not in text:
    return rates(text)
  grids = {}
  for item in text.split(","):
    variant, sep, part = item.partition("=")
    if not sep or not variant.strip():
      raise ValueError(f"--lrs: expected variant=rate[:rate] pairs, got {item!r} in {text!r}")
    grids[variant.strip()] = rates(part)
  return grids


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
  result = experiments.run_protocol(make_task, task_kwargs(args),
                                    variants=args.variants.split(","), lrs=parse_lrs(args.lrs),
                                    seeds=args.seeds, workers=args.workers, log_dir=args.out)
  experiments.write_report(result, args.out, args=vars(args), metric="accuracy",
                           title="MNIST-1D: test accuracy against parameters",
                           plots=not args.no_plots)
  if args.export and "grown" in result["chosen"]:
    lr = result["chosen"]["grown"]
    (run,) = [r for r in result["results"]
              if r.variant == "grown" and r.lr == lr and r.seed == 0]
    task = make_task(**task_kwargs(args))
    state = experiments.restore_state(task, "grown", run.variables, learning_rate=lr)
    export_grown(state, task.data()[2], args.export, args.export_include)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
