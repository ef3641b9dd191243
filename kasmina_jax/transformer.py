"""A growable decoder-only transformer LM (Flax Linen) with the three places a transformer
grows: extra attention heads (`linen.KasminaAttention`), extra blocks between blocks
(`linen.KasminaBlocks`) and extra MLP width (`linen.KasminaDense` with a parallel child).

    model = GrowableLM(vocab=96, dim=64, context=128, layers=2, heads=4,
                       head_seeds=2, block_seeds=2, mlp_seeds=4)

With every seed dormant it is a plain pre-norm GPT-style model (learned positions, causal
multi-head attention, GELU MLP, a final LayerNorm): `head_seeds=block_seeds=mlp_seeds=0`
builds exactly that with no Kasmina layer at all (a fixed baseline). `export.export` folds a
grown `GrowableLM` into `export_model.GrownLM`, a plain Flax transformer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import linen as knn
from kasmina_jax import sequence as seq_lib

__all__ = ["GrowableLM", "TransformerBlock", "default_catalogs"]


def default_catalogs(dim: int, heads: int, mlp_ratio: int = 4, mlp_child: int | None = None
                     ) -> dict[str, tuple]:
  """The catalogs a `GrowableLM` of this shape uses by default: head children of the host's
  head width (1 or 2 heads), a whole block as wide as a host block (and an MLP-only one),
  parallel MLP width of `mlp_child` units a seed (default `dim // 2`)."""
  head_dim = max(1, dim // heads)
  return {
      "heads": seq_lib.head_blueprints(head_dim=head_dim, heads=(1, 2)),
      "blocks": seq_lib.block_blueprints(heads=heads, head_dim=head_dim,
                                         mlp_hidden=mlp_ratio * dim),
      "mlp": (bp_lib.Blueprint("parallel_mlp", hidden=mlp_child or max(1, dim // 2),
                               activation="gelu", wiring="parallel"),),
  }


class TransformerBlock(nn.Module):
  """A pre-norm block: `x + Attn(LN(x))`, then `x + MLP(LN(x))`, with optional head seeds
  beside the attention and width seeds in the MLP."""

  dim: int
  heads: int
  mlp_ratio: int = 4
  head_seeds: int = 0
  mlp_seeds: int = 0
  head_blueprints: tuple | None = None
  mlp_blueprints: tuple | None = None
  context: int = 0
  trust_penalty: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
    cats = default_catalogs(self.dim, self.heads, self.mlp_ratio)
    h = nn.LayerNorm(name="ln1")(x)
    if self.head_seeds:
      h = knn.KasminaAttention(self.heads, self.head_seeds,
                               blueprints=self.head_blueprints or cats["heads"],
                               trust_penalty=self.trust_penalty, context=self.context,
                               name="attn")(h, train=train)
    else:
      mask = nn.make_causal_mask(jnp.ones(h.shape[:-1], jnp.int32))
      h = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm(name="ln2")(x)
    if self.mlp_seeds:
      h = knn.KasminaDense(self.mlp_ratio * self.dim, self.mlp_seeds,
                           blueprints=self.mlp_blueprints or cats["mlp"],
                           activation=jax.nn.gelu, trust_penalty=self.trust_penalty,
                           name="mlp_in")(h, train=train)
    else:
      h = jax.nn.gelu(nn.Dense(self.mlp_ratio * self.dim, name="mlp_in")(h))
    return x + nn.Dense(self.dim, name="mlp_out")(h)


class GrowableLM(nn.Module):
  """A causal LM over `vocab` tokens: `tokens` `(..., T)` int -> logits `(..., T, vocab)`.

  `head_seeds` per block (extra heads), `block_seeds` per growth site (a site after every
  host block; each seed may grow one block there), `mlp_seeds` per block (MLP width).
  Catalogs default to `default_catalogs(dim, heads, mlp_ratio)`.
  """

  vocab: int
  dim: int
  context: int
  layers: int = 2
  heads: int = 4
  mlp_ratio: int = 4
  head_seeds: int = 0
  block_seeds: int = 0
  mlp_seeds: int = 0
  head_blueprints: tuple | None = None
  block_blueprints: tuple | None = None
  mlp_blueprints: tuple | None = None
  trust_penalty: float = 1.0

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = True) -> jax.Array:
    cats = default_catalogs(self.dim, self.heads, self.mlp_ratio)
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.dim))
    x = x + pos[: tokens.shape[-1]]
    for i in range(self.layers):
      x = TransformerBlock(self.dim, self.heads, self.mlp_ratio, self.head_seeds,
                           self.mlp_seeds, self.head_blueprints, self.mlp_blueprints,
                           context=self.context, trust_penalty=self.trust_penalty,
                           name=f"block{i}")(x, train=train)
      if self.block_seeds:
        x = knn.KasminaBlocks(self.block_seeds,
                              blueprints=self.block_blueprints or cats["blocks"],
                              trust_penalty=self.trust_penalty, context=self.context,
                              name=f"grow{i}")(x, train=train)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab, name="head")(x)

  def config(self) -> dict[str, Any]:
    """The constructor's arguments (what `export` records)."""
    return {f: getattr(self, f) for f in ("vocab", "dim", "context", "layers", "heads",
                                          "mlp_ratio", "head_seeds", "block_seeds",
                                          "mlp_seeds")}
