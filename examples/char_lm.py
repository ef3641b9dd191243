"""A character-level transformer language model on the Python standard library's own source
(ships with every Python), with head seeds beside each attention, a block site after each
block and MLP-width seeds (`transformer.GrowableLM`); grown beside fixed-small, fixed-large
and the ceiling.

    python examples/char_lm.py [--seeds 3] [--lrs 1e-3,3e-3,1e-2] [--workers 4]

Each variant's learning rate is chosen on a validation slice of the corpus (after the training
slice); the held-out metric, next-character loss (nats per character), is read once on a
test slice of files seen by nothing before the report.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

from kasmina_jax import datasets, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import transformer


def make_lm(vocab: int, dim: int, context: int, *, layers: int = 2, heads: int = 4,
            child_width: int | None = None) -> transformer.GrowableLM:
  """The task's model: a pre-norm GPT-style LM with two head seeds beside each
  block's attention (head growth), one block seed after each block (depth growth) and four
  MLP-width seeds in each block's MLP (parallel children of `child_width` units)."""
  cats = transformer.default_catalogs(dim, heads, mlp_child=child_width)
  return transformer.GrowableLM(
      vocab, dim, context, layers=layers, heads=heads,
      head_seeds=2, block_seeds=1, mlp_seeds=4, mlp_blueprints=cats["mlp"])


def lm_config(controller: dict | None = None, life: dict | None = None, *,
              fixed_steps: int = 30) -> training.TrainConfig:
  """Lifecycle timings scaled to a 1500-step run (100 steps an epoch); the controller's
  defaults (optionally overridden by keyword dicts)."""
  life = lifecycle.LifecycleConfig(**{
      # training_margin: the isolated trust-region step of a head or block child changes the
      # validation loss by less than float noise (its delta reads 0), so the strict gate culled
      # every child at max_training_steps; grafted when it does not hurt, they learn from the
      # task gradient and face EVALUATING's strict gate instead.
      **dict(min_training_steps=50, max_training_steps=600, stabilization_steps=50,
             fine_tuning_steps=100, fine_tuning_patience=2, embargo_epochs=3,
             training_margin=-1e-3),
      **(life or {})})
  ctl = tamiyo.TamiyoConfig(**(controller or {}), lifecycle=life)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=fixed_steps),
                              tamiyo=ctl, max_judged=8, counterfactual_batch=2)


@functools.lru_cache(maxsize=4)
def load_data(context: int, train_bytes: int, val_bytes: int, test_bytes: int):
  """`(train, val, test, vocab)`: consecutive slices of the corpus (whole files shuffled),
  the validation slice right after the training one, the test slice last."""
  text = datasets.stdlib_corpus(train_bytes + val_bytes + test_bytes, seed=0)
  vocab = "".join(sorted(set(text)))
  cut1, cut2 = train_bytes, train_bytes + val_bytes
  as_batch = lambda w: {"x": w[:, :-1].astype(np.int32), "y": w[:, 1:].astype(np.int32)}
  parts = [datasets.char_windows(t, context, vocab=vocab)[0]
           for t in (text[:cut1], text[cut1:cut2], text[cut2:])]
  return tuple(as_batch(w) for w in parts) + (vocab,)


def make_task(*, steps: int = 1500, batch_size: int = 32, context: int = 64,
              train_bytes: int = 400_000, val_bytes: int = 16_448, test_bytes: int = 16_448,
              small: int = 32, large: int = 64, layers: int = 2,
              large_layers: int | None = None, heads: int = 4, child_width: int | None = 16,
              steps_per_epoch: int = 100, name: str = "char_lm",
              controller: dict | None = None, life: dict | None = None,
              fixed_steps: int = 30) -> experiments.Task:
  """The character-LM growth task (module level, so worker processes can build it).

  fixed-small, grown and the ceiling share `make_lm(dim=small, layers)` (with its head,
  block and MLP-width seeds); fixed-large is `make_lm(dim=large, large_layers)`, never grown.
  An epoch is a fixed slice of `steps_per_epoch` batches of the training windows (per RNG
  seed), so the controller sees steady telemetry at every epoch end."""
  train, val, test, vocab = load_data(context, train_bytes, val_bytes, test_bytes)
  steps_per_epoch = max(1, min(steps_per_epoch, len(train["x"]) // batch_size))
  small_lm = make_lm(len(vocab), small, context, layers=layers, heads=heads,
                     child_width=child_width)
  # (fixed-large holds dormant seeds too, never germinated: the loop trains models with
  # Kasmina layers, and a dormant layer is the identity, left out of the compiled step.)
  large_lm = make_lm(len(vocab), large, context, layers=large_layers or layers, heads=heads,
                     child_width=child_width)
  models = {"fixed_small": small_lm, "grown": small_lm, "ceiling": small_lm,
            "fixed_large": large_lm}
  return experiments.Task(
      name=name, make_model=models.__getitem__,
      data=lambda: (train, val, test), epochs=max(1, steps // steps_per_epoch),
      batch_size=batch_size, config=lm_config(controller, life, fixed_steps=fixed_steps),
      metric="loss", higher_is_better=False, select_on="loss",
      epoch_rows=steps_per_epoch * batch_size, eval_batch=256,
      ceiling_blueprint=CEILING_BLUEPRINTS, tokens_per_row=context, reach_tolerance=0.01)


# Every seed of the ceiling holds the largest child of its site's catalog.
CEILING_BLUEPRINTS = ("transformer_block", "attention_heads_2", "parallel_mlp")


def make_gpu_task(**overrides) -> experiments.Task:
  """The GPU-scale task on the same corpus: context 128, width 128, 2 blocks (fixed-large:
  4 blocks of the same width, the depth the block seeds can grow into), 6000 steps of 64
  windows (500 steps an epoch), lifecycle timings scaled to the longer epochs."""
  kwargs = dict(steps=6000, batch_size=64, context=128, train_bytes=4_128_000,
                val_bytes=129 * 512, test_bytes=129 * 512, small=128, large=128, layers=2,
                large_layers=4, heads=4, child_width=64, steps_per_epoch=500,
                name="char_lm_gpu", fixed_steps=100,
                life=dict(min_training_steps=100, max_training_steps=2000,
                          stabilization_steps=100, fine_tuning_steps=200))
  kwargs.update(overrides)
  return make_task(**kwargs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3, help="RNG seeds per variant and rate")
  parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="Adam rates swept per variant")
  parser.add_argument("--gpu", action="store_true",
                      help="the GPU-scale task (make_gpu_task) instead of the CPU one")
  parser.add_argument("--steps", type=int, default=None, help="default: the task's")
  parser.add_argument("--variants", default=",".join(experiments.VARIANTS))
  parser.add_argument("--workers", type=int, default=1, help="worker processes (one run each)")
  parser.add_argument("--out", default="runs/char_lm")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  lrs = tuple(float(x) for x in args.lrs.split(","))
  kwargs = {} if args.steps is None else {"steps": args.steps}
  result = experiments.run_protocol(
      make_gpu_task if args.gpu else make_task, kwargs, lrs=lrs, seeds=args.seeds,
      workers=args.workers, log_dir=args.out, variants=tuple(args.variants.split(",")))
  experiments.write_report(result, args.out, args=vars(args), metric="loss",
                           title=("Char LM (GPU task)" if args.gpu else "Char LM")
                           + ": test loss (nats/char) against parameters",
                           plots=not args.no_plots)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
