"""A character-level transformer language model on the Python standard library's own source
(ships with every Python), with Kasmina layers after the attention output and in the MLP
blocks; grown beside fixed-small, fixed-large and the ceiling.

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

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kasmina_jax import blueprints, datasets, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import linen as knn


class Block(nn.Module):
  dim: int
  heads: int
  num_seeds: int
  child_width: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    t = x.shape[-2]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    h = nn.LayerNorm(name="ln1")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h, mask=mask)
    # A chunk-wired Kasmina layer after the attention output projection.
    h = knn.KasminaLayer(self.num_seeds, blueprints=blueprints.default_blueprints(),
                         name="attn_seeds")(h, train=train)
    x = x + h
    h = nn.LayerNorm(name="ln2")(x)
    # The MLP's first Dense wrapped by Kasmina: parallel children add hidden width.
    catalog = blueprints.default_blueprints(parallel_hidden=self.child_width)
    h = knn.KasminaDense(4 * self.dim, self.num_seeds, blueprints=catalog,
                         activation=nn.gelu, name="mlp_in")(h, train=train)
    h = nn.Dense(self.dim, name="mlp_out")(h)
    del t
    return x + h


class CharLM(nn.Module):
  vocab: int
  dim: int
  context: int
  layers: int = 2
  heads: int = 4
  num_seeds: int = 4
  child_width: int = 32

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.dim))
    x = x + pos[: tokens.shape[-1]]
    for i in range(self.layers):
      x = Block(self.dim, self.heads, self.num_seeds, self.child_width, name=f"block{i}")(
          x, train=train)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab, name="head")(x)


def lm_config(controller: dict | None = None, life: dict | None = None
              ) -> training.TrainConfig:
  """Lifecycle timings scaled to a 1500-step run (100 steps an epoch); the controller's
  defaults (optionally overridden by keyword dicts)."""
  life = lifecycle.LifecycleConfig(**{
      **dict(min_training_steps=50, max_training_steps=600, stabilization_steps=50,
             fine_tuning_steps=100, fine_tuning_patience=2, embargo_epochs=3),
      **(life or {})})
  ctl = tamiyo.TamiyoConfig(**(controller or {}), lifecycle=life)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=30), tamiyo=ctl,
                              max_judged=8, counterfactual_batch=2)


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
              small: int = 32, large: int = 64, child_width: int = 32,
              controller: dict | None = None, life: dict | None = None) -> experiments.Task:
  """The character-LM growth task (module level, so worker processes can build it).

  An epoch is a fixed slice of 100 batches of the training windows (per RNG seed), so the
  controller sees steady telemetry at every epoch end."""
  train, val, test, vocab = load_data(context, train_bytes, val_bytes, test_bytes)
  steps_per_epoch = max(1, min(100, len(train["x"]) // batch_size))
  small_lm = CharLM(len(vocab), small, context, child_width=child_width)
  models = {"fixed_small": small_lm, "grown": small_lm, "ceiling": small_lm,
            "fixed_large": CharLM(len(vocab), large, context, child_width=child_width)}
  return experiments.Task(
      name="char_lm", make_model=models.__getitem__,
      data=lambda: (train, val, test), epochs=max(1, steps // steps_per_epoch),
      batch_size=batch_size, config=lm_config(controller, life), metric="loss",
      higher_is_better=False, select_on="loss", epoch_rows=steps_per_epoch * batch_size,
      eval_batch=256)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3, help="RNG seeds per variant and rate")
  parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="Adam rates swept per variant")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--small", type=int, default=32, help="model width of the small model")
  parser.add_argument("--large", type=int, default=64, help="model width of fixed-large")
  parser.add_argument("--workers", type=int, default=1, help="worker processes (one run each)")
  parser.add_argument("--out", default="runs/char_lm")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  lrs = tuple(float(x) for x in args.lrs.split(","))
  result = experiments.run_protocol(
      make_task, dict(steps=args.steps, small=args.small, large=args.large), lrs=lrs,
      seeds=args.seeds, workers=args.workers, log_dir=args.out)
  experiments.write_report(result, args.out, args=vars(args), metric="loss",
                           title="Char LM: test loss (nats/char) against parameters",
                           plots=not args.no_plots)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
