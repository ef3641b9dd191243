"""A character-level transformer language model on the Python standard library's own source
(ships with every Python), with Kasmina layers after the attention output and in the MLP
blocks; grown beside fixed-small, fixed-large and the ceiling.

    python examples/char_lm.py [--seeds 2] [--steps 1500] [--out runs/char_lm]

Held-out metric: next-character accuracy and loss (nats per character) on files not seen in
training.
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kasmina_jax import blueprints, datasets, experiments, grafting, lifecycle, tamiyo, training
from kasmina_jax import nn as knn


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


def lm_config() -> training.TrainConfig:
  life = lifecycle.LifecycleConfig(min_training_steps=50, max_training_steps=600,
                                   stabilization_steps=50, fine_tuning_steps=100,
                                   fine_tuning_patience=2, embargo_epochs=3)
  ctl = tamiyo.TamiyoConfig(plateau_patience=1, plateau_min_delta=1e-3,
                            max_concurrent_training=2, max_germinations_per_epoch=2,
                            germinate_without_plateau=True, lifecycle=life,
                            selection=tamiyo.SelectionStrategy.ACCURACY)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=30), tamiyo=ctl,
                              max_judged=8, counterfactual_batch=2)


def load_data(context: int, train_bytes: int, val_bytes: int, seed: int = 0):
  text = datasets.stdlib_corpus(train_bytes + val_bytes, seed=seed)
  vocab = "".join(sorted(set(text)))
  train_w, _ = datasets.char_windows(text[:train_bytes], context, vocab=vocab)
  val_w, _ = datasets.char_windows(text[train_bytes:], context, vocab=vocab)
  as_batch = lambda w: {"x": w[:, :-1].astype(np.int32), "y": w[:, 1:].astype(np.int32)}
  return as_batch(train_w), as_batch(val_w), vocab


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--train-bytes", type=int, default=400_000)
  parser.add_argument("--val-bytes", type=int, default=16_448)
  parser.add_argument("--small", type=int, default=32, help="model width of the small model")
  parser.add_argument("--large", type=int, default=64, help="model width of fixed-large")
  parser.add_argument("--child-width", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--variants", default=",".join(experiments.VARIANTS))
  parser.add_argument("--progress", action="store_true")


def run(args, out_dir: str | None = None):
  train, val, vocab = load_data(args.context, args.train_bytes, args.val_bytes)
  steps_per_epoch = max(1, min(100, len(train["x"]) // args.batch_size))
  epochs = max(1, args.steps // steps_per_epoch)
  # Epochs here are fixed-size slices of the stream, so the controller sees steady telemetry.
  rng = np.random.default_rng(0)
  small = CharLM(len(vocab), args.small, args.context, child_width=args.child_width)
  models = {"fixed_small": small, "grown": small, "ceiling": small,
            "fixed_large": CharLM(len(vocab), args.large, args.context, child_width=args.child_width)}
  results = []
  for seed in range(args.seeds):
    idx = rng.permutation(len(train["x"]))[: steps_per_epoch * args.batch_size]
    epoch_train = {k: v[idx] for k, v in train.items()}
    for variant in args.variants.split(","):
      r = experiments.run_variant(
          variant, models.__getitem__, epoch_train, val, training.cross_entropy_loss,
          epochs=epochs, batch_size=args.batch_size, seed=seed, learning_rate=args.lr,
          config=lm_config(), log_dir=out_dir, progress=args.progress)
      results.append(r)
      print(r.summary("char-lm"), flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(parser)
  parser.add_argument("--out", default="runs/char_lm")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = run(args, args.out)
  experiments.write_report(results, args.out, config=vars(args), plots=not args.no_plots)

if __name__ == "__main__":
  main(sys.argv[1:])
