"""The plain Flax model that `kasmina_jax.export` produces (Linen and NNX).

This file imports only `jax` and `flax`, never `kasmina_jax`: `export.save` copies it next
to the exported parameters, so a grown model loads and runs where the training library is
not installed. It holds no lifecycle, no seeds and no blending: each folded child is an
ordinary small network on its chunk of a layer's output.

A model is a chain of layers (`ModelSpec.layers`), each `act(dense(x))` with, where children
were folded in:

- a chunk-wired child: a small branch on its chunk of the dense output, `x_c + f(x_c)`
  (residual) or `f(x_c)` (replacement), `f = down(act(up(x_c)) [* sigmoid(gate(x_c))])
  [+ scale * x_c]`;
- a parallel-wired child: extra hidden width of the layer: the dense layer is wider by the
  child's hidden units, which go through the child's activation and a `Dense` onto its chunk,
  added to the layer's activations (KasminaDense's children act after the host's activation).

Parameter names: a layer without children is a plain `Dense` (`{"kernel", "bias"}`); a layer
with children holds `dense` (the widened host) and `child<seed>` per folded child.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "leaky_relu": jax.nn.leaky_relu,
}


def activate(name: str | None, x: jax.Array) -> jax.Array:
  return x if name is None else ACTIVATIONS[name](x)


@dataclasses.dataclass(frozen=True)
class ChildSpec:
  """One folded child: it writes nodes `[offset, offset + width)` of its layer's dense output.

  `wiring`: "chunk" (a branch reading its chunk) or "parallel" (extra hidden width reading the
  layer's input); `hidden`: its hidden units (0: no hidden layer, only `shift` and `scale`);
  `residual`: the branch returns `x_c + f` (else `f`); `glu`: hidden units gated by
  `sigmoid(gate(x_c))`; `diagonal`: `f` has a per-node `scale * x_c` term.
  """

  seed: int
  offset: int
  width: int
  wiring: str
  hidden: int
  activation: str
  residual: bool = True
  glu: bool = False
  diagonal: bool = False


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer: `activation(dense(x))`, widened and branched by `children` (which act on the
  activations)."""

  name: str
  in_features: int
  features: int
  activation: str | None = None
  use_bias: bool = True
  children: tuple[ChildSpec, ...] = ()

  @property
  def parallel(self) -> tuple[ChildSpec, ...]:
    return tuple(c for c in self.children if c.wiring == "parallel")

  @property
  def extra_width(self) -> int:
    return sum(c.hidden for c in self.parallel)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  layers: tuple[LayerSpec, ...]

  @property
  def input_dim(self) -> int:
    return self.layers[0].in_features

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "ModelSpec":
    d = json.loads(text)
    return cls(layers=tuple(
        LayerSpec(**{**layer, "children": tuple(ChildSpec(**c) for c in layer["children"])})
        for layer in d["layers"]))


def _pieces(layer: LayerSpec, h: jax.Array, p: jax.Array | None, child_fn) -> jax.Array:
  """`h` with each child's chunk replaced by `child_fn(child, chunk, its hidden slice)`."""
  out, pos, start = [], 0, 0
  for c in sorted(layer.children, key=lambda c: c.offset):
    if c.offset > pos:
      out.append(h[..., pos:c.offset])
    a = None
    if c.wiring == "parallel":
      a = p[..., start:start + c.hidden]
      start += c.hidden
    out.append(child_fn(c, h[..., c.offset:c.offset + c.width], a))
    pos = c.offset + c.width
  if pos < layer.features:
    out.append(h[..., pos:])
  return jnp.concatenate(out, axis=-1) if len(out) > 1 else out[0]


# ------------------------------------------------------------------------------------ Linen


class ChunkBranch(nn.Module):
  """A chunk-wired child on its chunk `x` (width `child.width`)."""

  child: ChildSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.child
    if c.hidden:
      a = activate(c.activation, nn.Dense(c.hidden, name="up")(x))
      if c.glu:
        a = a * jax.nn.sigmoid(nn.Dense(c.hidden, name="gate")(x))
      f = nn.Dense(c.width, name="down")(a)
    else:
      f = self.param("shift", nn.initializers.zeros, (c.width,))
    if c.diagonal:
      f = f + self.param("scale", nn.initializers.zeros, (c.width,)) * x
    return x + f if c.residual else f


class GrownDense(nn.Module):
  """A layer with folded children (see the module docstring)."""

  layer: LayerSpec

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    layer = self.layer
    z = nn.Dense(layer.features + layer.extra_width, use_bias=layer.use_bias, name="dense")(u)
    h, p = z[..., :layer.features], z[..., layer.features:]

    def child_fn(c, x, a):
      if c.wiring == "parallel":
        return x + nn.Dense(c.width, name=f"child{c.seed}")(activate(c.activation, a))
      return ChunkBranch(c, name=f"child{c.seed}")(x)

    # KasminaDense applies the host's activation first; children act on the activations.
    return _pieces(layer, activate(layer.activation, h), p, child_fn)


class GrownModel(nn.Module):
  """The exported model: the layers of `spec` in order."""

  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.spec.layers:
      if layer.children:
        x = GrownDense(layer, name=layer.name)(x)
      else:
        x = activate(layer.activation,
                     nn.Dense(layer.features, use_bias=layer.use_bias, name=layer.name)(x))
    return x


# -------------------------------------------------------------------------------------- NNX


class ChunkBranchNNX(nnx.Module):
  def __init__(self, child: ChildSpec, *, rngs: nnx.Rngs):
    self.child = child
    if child.hidden:
      self.up = nnx.Linear(child.width, child.hidden, rngs=rngs)
      if child.glu:
        self.gate = nnx.Linear(child.width, child.hidden, rngs=rngs)
      self.down = nnx.Linear(child.hidden, child.width, rngs=rngs)
    else:
      self.shift = nnx.Param(jnp.zeros((child.width,), jnp.float32))
    if child.diagonal:
      self.scale = nnx.Param(jnp.zeros((child.width,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.child
    if c.hidden:
      a = activate(c.activation, self.up(x))
      if c.glu:
        a = a * jax.nn.sigmoid(self.gate(x))
      f = self.down(a)
    else:
      f = self.shift[...]
    if c.diagonal:
      f = f + self.scale[...] * x
    return x + f if c.residual else f


class GrownDenseNNX(nnx.Module):
  def __init__(self, layer: LayerSpec, *, rngs: nnx.Rngs):
    self.layer = layer
    self.dense = nnx.Linear(layer.in_features, layer.features + layer.extra_width,
                            use_bias=layer.use_bias, rngs=rngs)
    for c in layer.children:
      setattr(self, f"child{c.seed}",
              nnx.Linear(c.hidden, c.width, rngs=rngs) if c.wiring == "parallel"
              else ChunkBranchNNX(c, rngs=rngs))

  def __call__(self, u: jax.Array) -> jax.Array:
    layer = self.layer
    z = self.dense(u)
    h, p = z[..., :layer.features], z[..., layer.features:]

    def child_fn(c, x, a):
      mod = getattr(self, f"child{c.seed}")
      return x + mod(activate(c.activation, a)) if c.wiring == "parallel" else mod(x)

    # KasminaDense applies the host's activation first; children act on the activations.
    return _pieces(layer, activate(layer.activation, h), p, child_fn)


class GrownModelNNX(nnx.Module):
  """The NNX twin of `GrownModel` (same parameter names, so `load_nnx` fills it from the
  Linen parameter tree)."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    for layer in spec.layers:
      setattr(self, layer.name,
              GrownDenseNNX(layer, rngs=rngs) if layer.children
              else nnx.Linear(layer.in_features, layer.features, use_bias=layer.use_bias,
                              rngs=rngs))

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.spec.layers:
      x = getattr(self, layer.name)(x)
      if not layer.children:
        x = activate(layer.activation, x)
    return x


def load_nnx(spec: ModelSpec, params: Any) -> GrownModelNNX:
  """A `GrownModelNNX` holding `params` (the Linen parameter tree of `GrownModel(spec)`)."""
  # Built abstractly (no random initialisation to compute), then filled.
  model = nnx.eval_shape(lambda: GrownModelNNX(spec, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ transformer LM
#
# The plain counterpart of `kasmina_jax.transformer.GrowableLM`: a pre-norm GPT-style LM whose
# blocks may hold extra attention heads (folded head children), a wider MLP (folded MLP-width
# children) and, after a block, extra parallel blocks `x + Attn(LN(x)) + MLP(LN(x))` (folded
# block children).


@dataclasses.dataclass(frozen=True)
class HeadGroupSpec:
  """Extra causal heads beside a block's attention (one folded head child)."""

  heads: int
  head_dim: int


@dataclasses.dataclass(frozen=True)
class ParallelBlockSpec:
  """A grown block, `Attn(LN1(x)) + MLP(LN2(x))` added to its stream (attention when
  `heads`, MLP when `mlp_hidden`)."""

  heads: int
  head_dim: int
  mlp_hidden: int
  activation: str = "gelu"


@dataclasses.dataclass(frozen=True)
class LMBlockSpec:
  """One host block: `extra_heads` beside its attention, `mlp_width` hidden units in its MLP
  (the host's and folded children's), and the blocks grown after it (side by side: each
  reads the block's output, their branches are summed onto it)."""

  extra_heads: tuple[HeadGroupSpec, ...] = ()
  mlp_width: int = 0
  grown: tuple[ParallelBlockSpec, ...] = ()


@dataclasses.dataclass(frozen=True)
class LMSpec:
  vocab: int
  dim: int
  context: int
  heads: int
  blocks: tuple[LMBlockSpec, ...]

  def to_json(self) -> str:
    return json.dumps({"kind": "lm", **dataclasses.asdict(self)})

  @classmethod
  def from_json(cls, text: str) -> "LMSpec":
    raw = json.loads(text)
    raw.pop("kind", None)
    blocks = tuple(LMBlockSpec(
        extra_heads=tuple(HeadGroupSpec(**h) for h in b["extra_heads"]),
        mlp_width=b["mlp_width"], grown=tuple(ParallelBlockSpec(**g) for g in b["grown"]))
        for b in raw.pop("blocks"))
    return cls(blocks=blocks, **raw)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`(..., T, H, d)` each -> `(..., T, H, d)`, causal, scaled by `1/sqrt(d)`."""
  t = q.shape[-3]
  scores = jnp.einsum("...thd,...shd->...hts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
  return jnp.einsum("...hts,...shd->...thd", jax.nn.softmax(scores, axis=-1), v)


class ExtraHeads(nn.Module):
  """Causal heads without biases whose output projection adds to the block's attention."""

  spec: HeadGroupSpec
  dim: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    shape = (h.shape[-1], self.spec.heads, self.spec.head_dim)
    init = nn.initializers.lecun_normal()
    q, k, v = (jnp.einsum("...td,dhe->...the", h, self.param(n, init, shape))
               for n in ("query", "key", "value"))
    out = self.param("out", nn.initializers.zeros,
                     (self.spec.heads, self.spec.head_dim, self.dim))
    return jnp.einsum("...the,hed->...td", causal_attention(q, k, v), out)


class ParallelBlock(nn.Module):
  """A grown block's residual branch `Attn(LN1(x)) + MLP(LN2(x))` (the caller adds `x`)."""

  spec: ParallelBlockSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    out = jnp.zeros_like(x)
    if self.spec.heads:
      h = nn.LayerNorm(epsilon=1e-6, name="ln1")(x)
      out = out + ExtraHeads(HeadGroupSpec(self.spec.heads, self.spec.head_dim), d,
                             name="attn")(h)
    if self.spec.mlp_hidden:
      h = nn.LayerNorm(epsilon=1e-6, name="ln2")(x)
      h = activate(self.spec.activation, nn.Dense(self.spec.mlp_hidden, name="mlp_in")(h))
      out = out + nn.Dense(d, name="mlp_out")(h)
    return out


class LMBlock(nn.Module):
  spec: LMBlockSpec
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = nn.LayerNorm(name="ln1")(x)
    mask = nn.make_causal_mask(jnp.ones(h.shape[:-1], jnp.int32))
    a = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h, mask=mask)
    for i, group in enumerate(self.spec.extra_heads):
      a = a + ExtraHeads(group, d, name=f"heads{i}")(h)
    x = x + a
    h = nn.LayerNorm(name="ln2")(x)
    h = jax.nn.gelu(nn.Dense(self.spec.mlp_width, name="mlp_in")(h))
    return x + nn.Dense(d, name="mlp_out")(h)


class GrownLM(nn.Module):
  """`tokens` `(..., T)` int -> logits `(..., T, vocab)`."""

  spec: LMSpec

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    s = self.spec
    x = nn.Embed(s.vocab, s.dim, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (s.context, s.dim))
    x = x + pos[: tokens.shape[-1]]
    for i, block in enumerate(s.blocks):
      x = LMBlock(block, s.heads, name=f"block{i}")(x)
      # The blocks grown at one site sit side by side: each reads the stream as it enters.
      branches = [ParallelBlock(grown, name=f"grown{i}_{j}")(x)
                  for j, grown in enumerate(block.grown)]
      x = x + sum(branches) if branches else x
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(s.vocab, name="head")(x)
