"""The catalog of child networks ("blueprints") a seed can germinate.

Every blueprint is a member of one family, so that any seed of a layer can hold any blueprint
under static shapes, and the fused kernel can run all of them:

    pre  = x_chunk @ W1 + u @ W1u + b1            (W1 for chunk wiring, W1u for parallel)
    a    = act(pre) * sigmoid(x_chunk @ Wg + bg)   (the gate only for GLU blueprints)
    f    = (a * hidden_mask) @ W2 + b2 + s * x_chunk  (s only for diagonal blueprints)
    g(x) = x + f   (residual kind)   or   f   (replacement kind)

The layer holds one max-capacity layout (`ChildParams`, leaves shaped `(num_seeds, ...)`);
a seed's blueprint id selects the activation, the live hidden units and the terms used.
Residual children start with `W2 = 0, b2 = 0, s = 0` (so `f = 0`): germination preserves the
function. Replacement children start from a random bottleneck and must learn to reproduce
their chunk (the reconstruction gate) before they may replace it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from kasmina_jax import _struct as struct

ACTIVATIONS = ("identity", "relu", "gelu", "tanh")
KINDS = ("residual", "replacement")
WIRINGS = ("chunk", "parallel")


@dataclasses.dataclass(frozen=True)
class Blueprint:
  """A child network over one chunk.

  `hidden`: an int (absolute width) or a float (fraction of the chunk width, at least 1).
  `activation`: one of `ACTIVATIONS`; `glu`: gate the hidden units; `diagonal`: add a
  per-node scale `s * x` (with `hidden=0` this is the per-chunk scale/shift child).
  `kind`: "residual" (`g = x + f`) or "replacement" (`g = f`); `wiring`: "chunk" (reads its
  chunk) or "parallel" (reads the wrapped host layer's input `u`).
  """

  name: str
  hidden: int | float = 0.25
  activation: str = "relu"
  glu: bool = False
  diagonal: bool = False
  kind: str = "residual"
  wiring: str = "chunk"
  init_scale: float = 1.0

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Blueprint.name: expected a non-empty str, got {self.name!r}")
    if isinstance(self.hidden, bool) or not isinstance(self.hidden, (int, float)) or self.hidden < 0:
      raise ValueError(f"Blueprint.hidden: expected an int or float >= 0, got {self.hidden!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Blueprint.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
    if self.kind not in KINDS:
      raise ValueError(f"Blueprint.kind: expected one of {KINDS}, got {self.kind!r}")
    if self.wiring not in WIRINGS:
      raise ValueError(f"Blueprint.wiring: expected one of {WIRINGS}, got {self.wiring!r}")
    if self.glu and self.wiring == "parallel":
      raise ValueError(f"Blueprint {self.name!r}: glu is only supported with chunk wiring")
    if self.diagonal and self.wiring == "parallel":
      raise ValueError(f"Blueprint {self.name!r}: diagonal is only supported with chunk wiring")
    if self.kind == "replacement" and self.wiring == "parallel":
      raise ValueError(f"Blueprint {self.name!r}: parallel children are residual (added to the host)")
    if self.hidden_width(1) == 0 and not self.diagonal:
      raise ValueError(f"Blueprint {self.name!r}: hidden=0 needs diagonal=True (no parameters otherwise)")

  def hidden_width(self, chunk_width: int) -> int:
    if isinstance(self.hidden, float):
      return 0 if self.hidden == 0 else max(1, int(math.floor(self.hidden * chunk_width)))
    return int(self.hidden)

  def cost(self, chunk_width: int, input_width: int | None = None) -> tuple[int, int]:
    """(parameter count, FLOPs per row) of this child on a chunk of `chunk_width` nodes."""
    c, h = chunk_width, self.hidden_width(chunk_width)
    fan_in = (input_width or 0) if self.wiring == "parallel" else c
    params = fan_in * h + h + h * c + c
    flops = 2 * fan_in * h + 2 * h * c
    if self.glu:
      params += c * h + h
      flops += 2 * c * h + 3 * h
    if self.diagonal:
      params += c
      flops += 2 * c
    return params, flops


def default_blueprints(*, parallel_hidden: int | float | None = None) -> tuple[Blueprint, ...]:
  """The default catalog: five chunk-wired children (+ a parallel one when asked).

  Hidden widths are fractions of the chunk width chosen so that the layer's allocation
  (the widest child, GLU gate included) stays within 20% of a square host layer's parameters
  at 4 or more seeds.
  """
  catalog = [
      Blueprint("residual_mlp", hidden=0.2, activation="relu"),
      Blueprint("low_rank_adapter", hidden=0.125, activation="identity"),
      Blueprint("glu_mlp", hidden=0.125, activation="gelu", glu=True),
      Blueprint("chunk_scale", hidden=0, diagonal=True),
      Blueprint("replacement_bottleneck", hidden=0.2, activation="identity", kind="replacement"),
  ]
  if parallel_hidden is not None:
    catalog.append(Blueprint("parallel_mlp", hidden=parallel_hidden, activation="relu",
                             wiring="parallel"))
  return tuple(catalog)


@struct.dataclass
class ChildParams:
  """One layer's children, max-capacity layout. Absent parts have a zero-sized axis."""

  w1: jax.Array  # (K, c, H)
  w1u: jax.Array  # (K, Din, H) parallel wiring, else (K, 0, H)
  b1: jax.Array  # (K, H)
  wg: jax.Array  # (K, c, H) if any GLU blueprint, else (K, c, 0)
  bg: jax.Array  # (K, H) or (K, 0)
  w2: jax.Array  # (K, H, c)
  b2: jax.Array  # (K, c)
  s: jax.Array  # (K, c) if any diagonal blueprint, else (K, 0)


@dataclasses.dataclass(frozen=True)
class Catalog:
  """Static per-blueprint tables for one layer (numpy, so they become jit constants)."""

  blueprints: tuple[Blueprint, ...]
  chunk_width: int
  input_width: int
  hidden: int  # max hidden width over the catalog
  act_id: np.ndarray  # (B,) int32 index into ACTIVATIONS
  glu: np.ndarray  # (B,) bool
  diagonal: np.ndarray  # (B,) bool
  residual: np.ndarray  # (B,) bool
  parallel: np.ndarray  # (B,) bool
  hidden_mask: np.ndarray  # (B, H) float32
  param_count: np.ndarray  # (B,) int32, at the widest chunk
  flops_per_row: np.ndarray  # (B,) int32, at the widest chunk

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(b.name for b in self.blueprints)

  @property
  def any_glu(self) -> bool:
    return bool(self.glu.any())

  @property
  def any_diagonal(self) -> bool:
    return bool(self.diagonal.any())

  @property
  def any_parallel(self) -> bool:
    return bool(self.parallel.any())

  def __hash__(self):
    return hash((self.blueprints, self.chunk_width, self.input_width))

  def __eq__(self, other):
    return (isinstance(other, Catalog) and self.blueprints == other.blueprints
            and self.chunk_width == other.chunk_width and self.input_width == other.input_width)


def build_catalog(blueprints: Sequence[Blueprint], chunk_width: int,
                  input_width: int | None = None) -> Catalog:
  blueprints = tuple(blueprints)
  if not blueprints:
    raise ValueError("blueprints: expected at least one Blueprint, got an empty tuple")
  for i, bp in enumerate(blueprints):
    if not isinstance(bp, Blueprint):
      raise TypeError(f"blueprints[{i}]: expected a Blueprint, got {type(bp).__name__}")
  names = [b.name for b in blueprints]
  if len(set(names)) != len(names):
    raise ValueError(f"blueprints: names must be unique, got {names}")
  has_parallel = any(b.wiring == "parallel" for b in blueprints)
  if has_parallel and not input_width:
    raise ValueError("input_dim: parallel-wired blueprints need the wrapped host layer's "
                     "input width (input_dim), got None")
  hidden = max(1, max(b.hidden_width(chunk_width) for b in blueprints))
  hmask = np.zeros((len(blueprints), hidden), np.float32)
  for i, b in enumerate(blueprints):
    hmask[i, :b.hidden_width(chunk_width)] = 1.0
  costs = [b.cost(chunk_width, input_width) for b in blueprints]
  return Catalog(
      blueprints=blueprints, chunk_width=chunk_width,
      input_width=int(input_width or 0) if has_parallel else 0, hidden=hidden,
      act_id=np.array([ACTIVATIONS.index(b.activation) for b in blueprints], np.int32),
      glu=np.array([b.glu for b in blueprints]),
      diagonal=np.array([b.diagonal for b in blueprints]),
      residual=np.array([b.kind == "residual" for b in blueprints]),
      parallel=np.array([b.wiring == "parallel" for b in blueprints]),
      hidden_mask=hmask,
      param_count=np.array([c[0] for c in costs], np.int32),
      flops_per_row=np.array([c[1] for c in costs], np.int32),
  )


def zeros_like_layout(catalog: Catalog, num_seeds: int, dtype=jnp.float32) -> ChildParams:
  k, c, h = num_seeds, catalog.chunk_width, catalog.hidden
  g = h if catalog.any_glu else 0
  return ChildParams(
      w1=jnp.zeros((k, c, h), dtype),
      w1u=jnp.zeros((k, catalog.input_width, h), dtype),
      b1=jnp.zeros((k, h), dtype),
      wg=jnp.zeros((k, c, g), dtype),
      bg=jnp.zeros((k, g), dtype),
      w2=jnp.zeros((k, h, c), dtype),
      b2=jnp.zeros((k, c), dtype),
      s=jnp.zeros((k, c if catalog.any_diagonal else 0), dtype),
  )


def _fresh_child(catalog: Catalog, blueprint: jax.Array, chunk_mask: jax.Array,
                 key: jax.Array, dtype) -> ChildParams:
  """One seed's freshly germinated child (leaves without the seed axis)."""
  c, h, din = catalog.chunk_width, catalog.hidden, catalog.input_width
  b = jnp.clip(blueprint, 0, len(catalog.blueprints) - 1)
  hm = jnp.asarray(catalog.hidden_mask)[b]
  width = jnp.maximum(chunk_mask.astype(jnp.float32).sum(), 1.0)
  is_par = jnp.asarray(catalog.parallel)[b]
  is_res = jnp.asarray(catalog.residual)[b]
  is_glu = jnp.asarray(catalog.glu)[b]
  scale = jnp.asarray([bp.init_scale for bp in catalog.blueprints], jnp.float32)[b]
  k1, k2, k3 = jax.random.split(key, 3)
  cm = chunk_mask.astype(jnp.float32)
  # LeCun-normal first layers over the real fan-in; masked to the live hidden units.
  w1 = jax.random.normal(k1, (c, h)) * scale / jnp.sqrt(width)
  w1 = w1 * cm[:, None] * hm[None, :] * (~is_par)
  w1u = jax.random.normal(k2, (din, h)) * scale / math.sqrt(max(din, 1))
  w1u = w1u * hm[None, :] * is_par
  wg = jax.random.normal(k3, (c, h if catalog.any_glu else 0)) * scale / jnp.sqrt(width)
  wg = wg * cm[:, None] * (hm[None, :] if catalog.any_glu else 1.0) * is_glu
  # Replacement children start as a random bottleneck that must learn its chunk; residual
  # children start with f = 0 (the last layer is zero).
  hwidth = jnp.maximum(hm.sum(), 1.0)
  w2_repl = jax.random.normal(jax.random.fold_in(k1, 1), (h, c)) / jnp.sqrt(hwidth)
  w2 = jnp.where(is_res, 0.0, w2_repl * hm[:, None] * cm[None, :])
  return ChildParams(
      w1=w1.astype(dtype), w1u=w1u.astype(dtype), b1=jnp.zeros((h,), dtype),
      wg=wg.astype(dtype), bg=jnp.zeros((h if catalog.any_glu else 0,), dtype),
      w2=w2.astype(dtype), b2=jnp.zeros((c,), dtype),
      s=jnp.zeros((c if catalog.any_diagonal else 0,), dtype))


def germinate_children(catalog: Catalog, params: ChildParams, mask: jax.Array,
                       blueprint: jax.Array, key: jax.Array, chunk_mask: jax.Array) -> ChildParams:
  """Fresh children for the seeds in `mask` (blueprint ids per seed), others unchanged."""
  k = mask.shape[0]
  keys = jax.random.split(key, k)
  fresh = jax.vmap(lambda b, m, kk: _fresh_child(catalog, b, m, kk, params.w1.dtype))(
      blueprint, chunk_mask, keys)
  return jax.tree.map(
      lambda new, old: jnp.where(mask.reshape((k,) + (1,) * (old.ndim - 1)), new, old),
      fresh, params)


def zero_children(params: ChildParams, mask: jax.Array) -> ChildParams:
  """Zeroes the children of the seeds in `mask` (cull, cancel, rollback)."""
  k = mask.shape[0]
  return jax.tree.map(
      lambda p: jnp.where(mask.reshape((k,) + (1,) * (p.ndim - 1)), jnp.zeros_like(p), p), params)
