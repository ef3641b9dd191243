"""The fused primitive (`kernels.common`) as Pallas kernels.

On an NVIDIA GPU `pl.pallas_call` lowers through Triton; on any other platform the kernels run
in interpret mode (that is how CI checks them, on CPU). Newer JAX versions warn that the
Triton lowering of Pallas is deprecated: the warning is filtered and explained once in the
log; `impl="triton"` (jax-triton) is the maintained GPU path.

Layout. `x` stays in its natural `(N, D)` layout. A launch covers chunks of one width `cs`
(an uneven split, `D % K != 0`, takes two launches: the `D % K` wide chunks, then the narrow
ones, the second writing into the first's output through `input_output_aliases`). On GPU a
chunk width that is not a power of two is computed on a tile padded to one, with masked loads
and stores (Triton tensors have power-of-two sizes); so is the hidden width.

* Chunk kernels (`cs > 1`): grid (row strips, seed groups). A program owns `G` seeds and a
  strip of rows; for each of its seeds it walks the strip in tiles of `tile_rows` rows,
  evaluates the child on the `(tile_rows, cs)` tile (`jnp.dot` where every dimension is at
  least `min_dot`, broadcast-and-reduce otherwise), blends, writes the output tile and keeps
  the telemetry sums of the strip in registers; the per-strip partial sums are written once
  and reduced by XLA. A seed without a live child runs a loop without any child work
  (`lax.cond` on its stage): it reads `x`, takes the telemetry and writes `x` back.
* The per-node kernel (`cs == 1`, per-node mode): grid (row strips, node blocks). A program
  owns a block of nodes (one seed each) and evaluates every child element-wise, unrolled over
  the hidden units: no tiny per-seed tiles.

The output is written before the pass knows whether a child's output is finite on every row;
`common.apply_guard` rewrites the chunks of non-finite seeds afterwards, only when one exists.
The backward kernels recompute the children (they are small) from `x` and read the output
cotangent once; they write the input cotangent and per-strip partial parameter cotangents
(reduced by XLA).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import chunks
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.kernels import common

_LOG = logging.getLogger(__name__)
_F32 = jnp.float32
_FLT_MAX = float(np.finfo(np.float32).max)

# Columns of the per-seed scalar table handed to the kernels.
_LIVE, _BLEND, _GBLEND, _HOST, _RES, _GLU, _DIAG, _ACT0, _OK, _CTR2 = 0, 1, 2, 3, 4, 5, 6, 7, 11, 12
_NSC = 16


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static tile sizes of the Pallas kernels (powers of two on GPU).

  strip_rows: rows a program owns; tile_rows: rows per inner iteration; max_seeds and
  max_cols: bounds on the seeds (and their columns) a chunk-kernel program owns; nodes: the
  node block of the per-node kernel; min_dot: a matmul whose every dimension reaches this uses
  `jnp.dot` (Triton needs 16), smaller ones broadcast and reduce; dot_precision: the dot
  algorithm of the exact path (`precision="highest"`): "highest" (IEEE float32) or "tf32x3"
  (GPU only; other precisions go to `jnp.dot` as given: None and DEFAULT / HIGH lower to TF32
  on GPU, as XLA's dots); num_warps / num_stages: Triton compiler parameters;
  bwd_strip_rows / bwd_max_seeds: the same for the backward kernels (longer strips there keep
  the per-strip partial parameter gradients small; fewer seeds a program keep the grid full);
  pad_chunks: compute on chunk widths padded to a power of two with masked loads and stores
  (None: on GPU, where Triton needs it).
  """

  strip_rows: int = 256
  tile_rows: int = 32
  max_seeds: int = 2
  max_cols: int = 512
  nodes: int = 128
  min_dot: int = 16
  dot_precision: str = "highest"
  num_warps: int | None = 4
  num_stages: int | None = None
  bwd_strip_rows: int = 1024
  bwd_max_seeds: int = 2
  pad_chunks: bool | None = None


GPU_TILING = Tiling()
INTERPRET_TILING = Tiling(strip_rows=8, tile_rows=4, max_seeds=2, max_cols=64, nodes=4,
                          bwd_strip_rows=8, bwd_max_seeds=2)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


_NOTED = []


def _note_gpu_path():
  """On GPU (jax >= 0.11) `pallas_call`'s Triton lowering warns that it is deprecated; the
  warning is raised when the caller's `jit` lowers, so it is filtered here by message, once,
  and explained by one log line."""
  if _NOTED:
    return
  _NOTED.append(True)
  warnings.filterwarnings("ignore", message=r".*Pallas Triton backend is deprecated.*")
  _LOG.info("kasmina_jax: impl='pallas' runs Pallas kernels through JAX's Triton lowering, "
            "which newer JAX versions mark deprecated (that warning is silenced here); the "
            "maintained GPU path is impl='triton' (hand-written Triton kernels via jax-triton).")


# ----------------------------------------------------------------------------- static geometry


class _Launch(NamedTuple):
  k0: int  # first seed
  ks: int  # seeds
  cs: int  # chunk width
  col0: int  # first column


def _launches(spec) -> list[_Launch]:
  q, r = divmod(spec.dim, spec.num_seeds)
  out = []
  if r:
    out.append(_Launch(0, r, q + 1, 0))
  out.append(_Launch(r, spec.num_seeds - r, q, r * (q + 1)))
  return out


def _pow2_floor(n: int) -> int:
  return 1 << (max(int(n), 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _largest_divisor(n: int, cap: int, pow2: bool) -> int:
  for g in range(min(n, max(cap, 1)), 0, -1):
    if n % g == 0 and (not pow2 or _is_pow2(g)):
      return g
  return 1


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Everything static about one launch."""

  n: int
  ks: int
  cs: int
  cw: int  # width the kernel computes on: cs, or cs padded to a power of two (GPU)
  k0: int
  col0: int
  h: int
  acts: tuple[int, ...]
  glu: bool
  diag: bool
  par: bool
  telemetry: bool
  corr: bool
  corr_rows: int
  dead_eps: float
  strip: int
  tile: int
  group: int
  min_dot: int
  precision: object
  interpret: bool

  @property
  def num_strips(self) -> int:
    return -(-self.n // self.strip)

  @property
  def gram_strips(self) -> int:
    return max(1, -(-self.corr_rows // self.strip))

  @property
  def row_mask(self) -> bool:
    return self.n % self.strip != 0

  @property
  def node(self) -> bool:
    return self.cs == 1


def _dot_precision(tiling: Tiling, precision, interpret: bool):
  """What the kernels' `jnp.dot`s get: the caller's precision (None: JAX's default matmul
  precision, read by `jnp.dot` when the kernel is traced), the exact path (HIGHEST) as
  `tiling.dot_precision` says (interpret mode: always plain HIGHEST)."""
  if tiling.dot_precision not in ("highest", "tf32x3"):
    raise ValueError(f"Tiling.dot_precision: expected 'highest' or 'tf32x3', got "
                     f"{tiling.dot_precision!r}")
  precision = chunks.canonical_precision(precision)
  if (precision == jax.lax.Precision.HIGHEST and tiling.dot_precision == "tf32x3"
      and not interpret):
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return precision


def _make_cfg(spec, launch: _Launch, n: int, h: int, tiling: Tiling, telemetry: bool,
              par: bool, interpret: bool, backward: bool, precision=None) -> _Cfg:
  cat = spec.catalog
  tile = min(tiling.tile_rows, _pow2_ceil(n))
  strip_rows = tiling.bwd_strip_rows if backward else tiling.strip_rows
  strip = tile * max(1, min(strip_rows // tile, -(-n // tile)))
  if launch.cs == 1:
    group = _largest_divisor(launch.ks, tiling.nodes, pow2=True)
  else:
    max_seeds = tiling.bwd_max_seeds if backward else tiling.max_seeds
    group = _largest_divisor(launch.ks, min(max_seeds, max(1, tiling.max_cols // launch.cs)),
                             pow2=False)
  precision = _dot_precision(tiling, precision, interpret)
  acts = tuple(sorted(set(int(a) for a in np.asarray(cat.act_id))))
  pad = tiling.pad_chunks if tiling.pad_chunks is not None else not interpret
  cw = _pow2_ceil(launch.cs) if pad and launch.cs > 1 else launch.cs
  return _Cfg(n=n, ks=launch.ks, cs=launch.cs, cw=cw, k0=launch.k0, col0=launch.col0, h=h, acts=acts,
              glu=cat.any_glu, diag=cat.any_diagonal, par=par, telemetry=telemetry,
              corr=telemetry and spec.correlation, corr_rows=min(spec.corr_rows, n),
              dead_eps=float(spec.dead_eps), strip=strip, tile=tile, group=group,
              min_dot=tiling.min_dot, precision=precision, interpret=interpret)


def _blocked(size: int, offset: int):
  """(block dim, index fn) for blocks of `size` elements starting at `offset + j * size`."""
  if offset % size == 0:
    base = offset // size
    return size, lambda j: base + j
  return pl.Element(size), lambda j: offset + j * size


# ----------------------------------------------------------------------------- in-kernel math


def _use_dot(cfg, *dims) -> bool:
  return min(dims) >= cfg.min_dot


def _mm(a, b, cfg):
  """a (M, K) @ b (K, N)."""
  if _use_dot(cfg, a.shape[0], a.shape[1], b.shape[1]):
    return jnp.dot(a, b, precision=cfg.precision, preferred_element_type=_F32)
  return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _mm_tn(a, b, cfg):
  """a (M, K), b (M, N) -> a^T b (K, N)."""
  if _use_dot(cfg, a.shape[0], a.shape[1], b.shape[1]):
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=cfg.precision,
                               preferred_element_type=_F32)
  return jnp.sum(a[:, :, None] * b[:, None, :], axis=0)


def _mm_nt(a, b, cfg):
  """a (M, K), b (N, K) -> a b^T (M, N)."""
  if _use_dot(cfg, a.shape[0], a.shape[1], b.shape[0]):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=cfg.precision,
                               preferred_element_type=_F32)
  return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act_fns(pre):
  """Value and derivative of each activation of `bp_lib.ACTIVATIONS` (as `chunks._activate`
  computes them: GELU is the tanh approximation)."""
  def identity():
    return pre, jnp.ones_like(pre)

  def relu():
    return jnp.maximum(pre, 0.0), jnp.where(pre > 0, 1.0, 0.0)

  def gelu():
    inner = _SQRT_2_OVER_PI * (pre + 0.044715 * (pre * pre * pre))
    t = jnp.tanh(inner)
    cdf = 0.5 * (1.0 + t)
    d = cdf + pre * 0.5 * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * pre * pre)
    return pre * cdf, d

  def tanh():
    t = jnp.tanh(pre)
    return t, 1.0 - t * t

  return (identity, relu, gelu, tanh)


def _activate(pre, weights, acts, grad=False):
  """sum_i weights[i] * act_i(pre) (weights: scalars or lane vectors), and the derivative."""
  fns = _act_fns(pre)
  val = der = None
  for i in acts:
    v, d = fns[i]()
    val = weights[i] * v if val is None else val + weights[i] * v
    if grad:
      der = weights[i] * d if der is None else der + weights[i] * d
  return val, der


def _sigmoid(z):
  return 1.0 / (1.0 + jnp.exp(-z))


def _finite(v):
  return jnp.abs(v) <= _FLT_MAX


def _int_idx(idx):
  # Masked loads / stores want array scalars, not Python ints, as integer indices.
  return tuple(jnp.asarray(i, jnp.int32) if isinstance(i, int) else i for i in idx)


def _ld(ref, idx, mask):
  if mask is None:
    return ref[idx]
  return plgpu.load(ref.at[_int_idx(idx)], mask=mask, other=0)


def _st(ref, idx, val, mask):
  if mask is None:
    ref[idx] = val
  else:
    plgpu.store(ref.at[_int_idx(idx)], val, mask=mask)


def _row_valid(cfg, t, strip_id):
  """(rows index, (R, 1) bool valid-row mask or None) of tile `t` of strip `strip_id`."""
  start = t * cfg.tile
  rows = pl.ds(pl.multiple_of(start, cfg.tile), cfg.tile)
  if not cfg.row_mask:
    return rows, None
  ids = strip_id * cfg.strip + start + jax.lax.broadcasted_iota(jnp.int32, (cfg.tile, 1), 0)
  return rows, ids < cfg.n


def _tile_mask(cfg, valid):
  """(R, cw) bool mask of the tile's valid rows and real chunk columns, or None (all)."""
  colm = None
  if cfg.cw != cfg.cs:
    colm = jax.lax.broadcasted_iota(jnp.int32, (1, cfg.cw), 1) < cfg.cs
  if valid is None and colm is None:
    return None
  if colm is None:
    return jnp.broadcast_to(valid, (cfg.tile, cfg.cw))
  if valid is None:
    return jnp.broadcast_to(colm, (cfg.tile, cfg.cw))
  return valid & colm


def _chunk_cols(cfg, g, strip_id):
  if cfg.cw == cfg.cs:
    return slice(g * cfg.cs, (g + 1) * cfg.cs)
  # The padded tile of the group's last seed reaches past the block (masked): a traced start
  # keeps the static bounds check of ref slices out of the way.
  return pl.ds(strip_id * 0 + g * cfg.cs, cfg.cw)


def _tel_init(cfg, width):
  z = jnp.zeros((width,), _F32)
  acc = {"x2": z}
  if cfg.telemetry:
    acc.update(tsum=z, tsumsq=z, tdead=z)
  if cfg.corr:
    acc.update(csum=z)
    acc["gram"] = jnp.zeros((width, width) if not cfg.node else (width,), _F32)
  return acc


def _tel_update(cfg, acc, xv, valid, shift, t, strip_id, mask=None):
  """Adds one tile's telemetry sums (xv: (R, W) float32, 0 on invalid rows)."""
  acc = dict(acc)
  acc["x2"] = acc["x2"] + jnp.sum(xv * xv, axis=0)
  if not cfg.telemetry:
    return acc
  d = xv - shift[None, :]
  dead = jnp.abs(xv) <= cfg.dead_eps
  if valid is not None:
    d = jnp.where(valid, d, 0.0)
  if mask is not None:
    dead = dead & mask
  acc["tsum"] = acc["tsum"] + jnp.sum(d, axis=0)
  acc["tsumsq"] = acc["tsumsq"] + jnp.sum(d * d, axis=0)
  acc["tdead"] = acc["tdead"] + jnp.sum(jnp.where(dead, 1.0, 0.0), axis=0)
  if cfg.corr:
    start = strip_id * cfg.strip + t * cfg.tile

    def add(cs_gram):
      csum, gram = cs_gram
      ids = start + jax.lax.broadcasted_iota(jnp.int32, (cfg.tile, 1), 0)
      dm = jnp.where(ids < cfg.corr_rows, d, 0.0)
      if cfg.node:
        return csum + jnp.sum(dm, axis=0), gram + jnp.sum(dm * dm, axis=0)
      return csum + jnp.sum(dm, axis=0), gram + _mm_tn(dm, dm, cfg)

    acc["csum"], acc["gram"] = jax.lax.cond(start < cfg.corr_rows, add, lambda v: v,
                                            (acc["csum"], acc["gram"]))
  return acc


def _tel_store(cfg, r, acc, g, strip_id):
  """Writes a seed's (chunk kernel: g an int) or a node block's (g None) strip partials."""
  idx = (g,) if g is not None else (slice(None),)
  r["x2"][idx] = acc["x2"]
  if cfg.telemetry:
    for k in ("tsum", "tsumsq", "tdead"):
      r[k][idx] = acc[k]
  if cfg.corr:
    @pl.when(strip_id < cfg.gram_strips)
    def _():
      r["csum"][idx] = acc["csum"]
      r["gram"][idx] = acc["gram"]


# ----------------------------------------------------------------------------- chunk kernels


def _chunk_child(cfg, p, sc, xv, pu, grad=False):
  """The child of one seed on a tile: returns (pre, a0, gate, a, f)."""
  pre = _mm(xv, p["w1"], cfg) + p["b1"][None, :]
  if pu is not None:
    pre = pre + pu
  a0, dact = _activate(pre, {i: sc(_ACT0 + i) for i in cfg.acts}, cfg.acts, grad=grad)
  gate = None
  a = a0
  if cfg.glu:
    gate = _sigmoid(_mm(xv, p["wg"], cfg) + p["bg"][None, :])
    glu = sc(_GLU)
    a = a * (glu * gate + (1.0 - glu))
  a = a * p["hm"][None, :]
  f = _mm(a, p["w2"], cfg) + p["b2"][None, :]
  if cfg.diag:
    f = f + sc(_DIAG) * p["s"][None, :] * xv
  return pre, dact, a0, gate, a, f


def _load_params(cfg, r, g):
  names = ["w1", "b1", "w2", "b2", "hm"]
  if cfg.glu:
    names += ["wg", "bg"]
  if cfg.diag:
    names += ["s"]
  return {n: r[n][g].astype(_F32) for n in names}


def _chunk_fwd_kernel(cfg: _Cfg, r):
  cs, steps = cfg.cw, cfg.strip // cfg.tile
  strip_id = pl.program_id(0)
  for g in range(cfg.group):
    cols = _chunk_cols(cfg, g, strip_id)
    sc = lambda j, g=g: r["sc"][g, j]
    shift = r["shift"][g] if cfg.telemetry else None

    def run(with_child, g=g, cols=cols, sc=sc, shift=shift):
      p = _load_params(cfg, r, g) if with_child else None
      acc0 = _tel_init(cfg, cs)
      if with_child:
        acc0.update(r2=jnp.zeros((cs,), _F32), bad=jnp.zeros((cs,), _F32))

      def tile(t, acc):
        rows, valid = _row_valid(cfg, t, strip_id)
        mask = _tile_mask(cfg, valid)
        xt = _ld(r["x"], (rows, cols), mask).astype(_F32)
        xv = xt if valid is None else jnp.where(valid, xt, 0.0)
        acc = dict(acc)
        if with_child:
          pu = None
          if cfg.par:
            pmask = None if valid is None else jnp.broadcast_to(valid, (cfg.tile, cfg.h))
            pu = _ld(r["pu"], (rows, g, slice(None)), pmask).astype(_F32)
          *_, f = _chunk_child(cfg, p, sc, xv, pu)
          if valid is not None:
            f = jnp.where(valid, f, 0.0)
          res = sc(_RES)
          rr = f - (1.0 - res) * xv
          out = xv + sc(_BLEND) * rr
          acc["r2"] = acc["r2"] + jnp.sum(rr * rr, axis=0)
          acc["bad"] = acc["bad"] + jnp.sum(jnp.where(_finite(f), 0.0, 1.0), axis=0)
        else:
          out = xv
        _st(r["out"], (rows, cols), out.astype(r["out"].dtype), mask)
        return _tel_update(cfg, acc, xv, valid, shift, t, strip_id, mask)

      acc = jax.lax.fori_loop(0, steps, tile, acc0)
      _tel_store(cfg, r, acc, g, strip_id)
      zero = jnp.zeros((cs,), _F32)
      r["r2"][g] = acc["r2"] if with_child else zero
      r["bad"][g] = acc["bad"] if with_child else zero

    jax.lax.cond(sc(_LIVE) > 0, lambda: run(True), lambda: run(False))


def _chunk_bwd_kernel(cfg: _Cfg, r):
  cs, h, steps = cfg.cw, cfg.h, cfg.strip // cfg.tile
  strip_id = pl.program_id(0)
  for g in range(cfg.group):
    cols = _chunk_cols(cfg, g, strip_id)
    sc = lambda j, g=g: r["sc"][g, j]

    def grads_init():
      z = lambda *s: jnp.zeros(s, _F32)
      acc = {"dw1": z(cs, h), "db1": z(h), "dw2": z(h, cs), "db2": z(cs)}
      if cfg.glu:
        acc.update(dwg=z(cs, h), dbg=z(h))
      if cfg.diag:
        acc.update(ds=z(cs))
      return acc

    def run(with_child, g=g, cols=cols, sc=sc):
      p = _load_params(cfg, r, g) if with_child else None

      def tile(t, acc):
        rows, valid = _row_valid(cfg, t, strip_id)
        mask = _tile_mask(cfg, valid)
        pmask = None if valid is None else jnp.broadcast_to(valid, (cfg.tile, h))
        ct = _ld(r["ct"], (rows, cols), mask).astype(_F32)
        if not with_child:
          _st(r["dx"], (rows, cols), ct.astype(r["dx"].dtype), mask)
          if cfg.par:
            _st(r["dpu"], (rows, g, slice(None)), jnp.zeros((cfg.tile, h), r["dpu"].dtype), pmask)
          return acc
        ct = ct if valid is None else jnp.where(valid, ct, 0.0)
        xt = _ld(r["x"], (rows, cols), mask).astype(_F32)
        xv = xt if valid is None else jnp.where(valid, xt, 0.0)
        pu = _ld(r["pu"], (rows, g, slice(None)), pmask).astype(_F32) if cfg.par else None
        pre, dact, a0, gate, a, f = _chunk_child(cfg, p, sc, xv, pu, grad=True)
        res, blend = sc(_RES), sc(_BLEND)
        rr = f - (1.0 - res) * xv
        ct_f = sc(_GBLEND) * ct + 2.0 * sc(_CTR2) * rr
        if valid is not None:
          ct_f = jnp.where(valid, ct_f, 0.0)
        acc = dict(acc)
        acc["db2"] = acc["db2"] + jnp.sum(ct_f, axis=0)
        acc["dw2"] = acc["dw2"] + _mm_tn(a, ct_f, cfg)
        da = _mm_nt(ct_f, p["w2"], cfg) * p["hm"][None, :]
        dxc = None
        if cfg.glu:
          glu = sc(_GLU)
          da0 = da * (glu * gate + (1.0 - glu))
          dz = glu * da * a0 * gate * (1.0 - gate)
          acc["dwg"] = acc["dwg"] + _mm_tn(xv, dz, cfg)
          acc["dbg"] = acc["dbg"] + jnp.sum(dz, axis=0)
          dxc = _mm_nt(dz, p["wg"], cfg)
        else:
          da0 = da
        dpre = da0 * dact
        acc["db1"] = acc["db1"] + jnp.sum(dpre, axis=0)
        acc["dw1"] = acc["dw1"] + _mm_tn(xv, dpre, cfg)
        dxw = _mm_nt(dpre, p["w1"], cfg)
        dxc = dxw if dxc is None else dxc + dxw
        if cfg.diag:
          diag = sc(_DIAG)
          acc["ds"] = acc["ds"] + diag * jnp.sum(ct_f * xv, axis=0)
          dxc = dxc + diag * p["s"][None, :] * ct_f
        dx = ct + sc(_HOST) * (dxc - (1.0 - res) * blend * ct)
        _st(r["dx"], (rows, cols), dx.astype(r["dx"].dtype), mask)
        if cfg.par:
          _st(r["dpu"], (rows, g, slice(None)), dpre.astype(r["dpu"].dtype), pmask)
        return acc

      acc = jax.lax.fori_loop(0, steps, tile, grads_init())
      for k, v in acc.items():
        r[k][g] = v

    on = (sc(_LIVE) > 0) & (sc(_OK) > 0)
    jax.lax.cond(on, lambda: run(True), lambda: run(False))


# ----------------------------------------------------------------------------- per-node kernels


def _node_hidden(cfg, r, rows, valid, xv, vec, row, j, grad=False):
  """Hidden unit `j` of every child of a node block on a tile, element-wise:
  (pre, dact, a0, gate, a), each (R, B)."""
  pre = xv * row("w1", j) + row("b1", j)
  if cfg.par:
    pmask = None if valid is None else jnp.broadcast_to(valid, xv.shape)
    pre = pre + _ld(r["pu"], (rows, slice(None), j), pmask).astype(_F32)
  a0, dact = _activate(pre, {i: vec(_ACT0 + i) for i in cfg.acts}, cfg.acts, grad=grad)
  a = a0
  gate = None
  if cfg.glu:
    glu = vec(_GLU)
    gate = _sigmoid(xv * row("wg", j) + row("bg", j))
    a = a * (glu * gate + (1.0 - glu))
  a = a * row("hm", j)
  return pre, dact, a0, gate, a


def _node_child(cfg, r, rows, valid, xv, vec, row):
  """f of every child of a node block on a tile, (R, B). The hidden units are not kept (the
  backward recomputes them one at a time: keeping H of them would spill registers)."""
  f = None
  for j in range(cfg.h):
    term = _node_hidden(cfg, r, rows, valid, xv, vec, row, j)[4] * row("w2", j)
    f = term if f is None else f + term
  f = f + vec("b2")
  if cfg.diag:
    f = f + vec(_DIAG) * vec("s") * xv
  return f


def _node_accessors(cfg, r):
  def vec(key):
    if isinstance(key, str):
      return r["nv"][{"b2": 0, "s": 1}[key], :].astype(_F32)[None, :]
    return r["sc"][key, :][None, :]

  def row(name, j):
    return r[name][j, :].astype(_F32)[None, :]

  return vec, row


def _node_fwd_kernel(cfg: _Cfg, r):
  steps, b = cfg.strip // cfg.tile, cfg.group
  strip_id = pl.program_id(0)
  vec, row = _node_accessors(cfg, r)
  shift = r["shift"][0, :] if cfg.telemetry else None

  def run(with_child):
    acc0 = _tel_init(cfg, b)
    if with_child:
      acc0.update(r2=jnp.zeros((b,), _F32), bad=jnp.zeros((b,), _F32))

    def tile(t, acc):
      rows, valid = _row_valid(cfg, t, strip_id)
      mask = None if valid is None else jnp.broadcast_to(valid, (cfg.tile, b))
      xt = _ld(r["x"], (rows, slice(None)), mask).astype(_F32)
      xv = xt if valid is None else jnp.where(valid, xt, 0.0)
      acc = dict(acc)
      if with_child:
        f = _node_child(cfg, r, rows, valid, xv, vec, row)
        live = vec(_LIVE) > 0
        keep = live if valid is None else live & valid
        f = jnp.where(keep, f, 0.0)
        rr = f - (1.0 - vec(_RES)) * jnp.where(live, xv, 0.0)
        out = xv + vec(_BLEND) * rr
        acc["r2"] = acc["r2"] + jnp.sum(rr * rr, axis=0)
        acc["bad"] = acc["bad"] + jnp.sum(jnp.where(_finite(f), 0.0, 1.0), axis=0)
      else:
        out = xv
      _st(r["out"], (rows, slice(None)), out.astype(r["out"].dtype), mask)
      return _tel_update(cfg, acc, xv, valid, shift, t, strip_id, mask)

    acc = jax.lax.fori_loop(0, steps, tile, acc0)
    _tel_store(cfg, r, acc, None, strip_id)
    zero = jnp.zeros((b,), _F32)
    r["r2"][...] = acc["r2"] if with_child else zero
    r["bad"][...] = acc["bad"] if with_child else zero

  any_live = jnp.max(r["sc"][_LIVE, :]) > 0
  jax.lax.cond(any_live, lambda: run(True), lambda: run(False))


def _node_bwd_kernel(cfg: _Cfg, r):
  steps, b, h = cfg.strip // cfg.tile, cfg.group, cfg.h
  strip_id = pl.program_id(0)
  vec, row = _node_accessors(cfg, r)

  def init():
    z = jnp.zeros((b,), _F32)
    acc = {"dw1": [z] * h, "db1": [z] * h, "dw2": [z] * h, "db2": z}
    if cfg.glu:
      acc.update(dwg=[z] * h, dbg=[z] * h)
    if cfg.diag:
      acc.update(ds=z)
    return acc

  def run(with_child):
    def tile(t, acc):
      rows, valid = _row_valid(cfg, t, strip_id)
      mask = None if valid is None else jnp.broadcast_to(valid, (cfg.tile, b))
      ct = _ld(r["ct"], (rows, slice(None)), mask).astype(_F32)
      if not with_child:
        _st(r["dx"], (rows, slice(None)), ct.astype(r["dx"].dtype), mask)
        if cfg.par:
          for j in range(h):
            _st(r["dpu"], (rows, slice(None), j), jnp.zeros((cfg.tile, b), r["dpu"].dtype), mask)
        return acc
      ct = ct if valid is None else jnp.where(valid, ct, 0.0)
      xt = _ld(r["x"], (rows, slice(None)), mask).astype(_F32)
      xv = xt if valid is None else jnp.where(valid, xt, 0.0)
      f = _node_child(cfg, r, rows, valid, xv, vec, row)
      on = (vec(_LIVE) > 0) & (vec(_OK) > 0)
      res, blend = vec(_RES), vec(_BLEND)
      rr = f - (1.0 - res) * xv
      keep = on if valid is None else on & valid
      ct_f = jnp.where(keep, vec(_GBLEND) * ct + 2.0 * vec(_CTR2) * rr, 0.0)
      acc = {k: (list(v) if isinstance(v, list) else v) for k, v in acc.items()}
      acc["db2"] = acc["db2"] + jnp.sum(ct_f, axis=0)
      dxc = None
      for j in range(h):
        _, dact, a0, gate, a = _node_hidden(cfg, r, rows, valid, xv, vec, row, j, grad=True)
        acc["dw2"][j] = acc["dw2"][j] + jnp.sum(a * ct_f, axis=0)
        da = ct_f * row("w2", j) * row("hm", j)
        if cfg.glu:
          glu = vec(_GLU)
          da0 = da * (glu * gate + (1.0 - glu))
          dz = glu * da * a0 * gate * (1.0 - gate)
          acc["dwg"][j] = acc["dwg"][j] + jnp.sum(xv * dz, axis=0)
          acc["dbg"][j] = acc["dbg"][j] + jnp.sum(dz, axis=0)
          term = dz * row("wg", j)
          dxc = term if dxc is None else dxc + term
        else:
          da0 = da
        dpre = da0 * dact
        acc["db1"][j] = acc["db1"][j] + jnp.sum(dpre, axis=0)
        acc["dw1"][j] = acc["dw1"][j] + jnp.sum(xv * dpre, axis=0)
        term = dpre * row("w1", j)
        dxc = term if dxc is None else dxc + term
        if cfg.par:
          _st(r["dpu"], (rows, slice(None), j), dpre.astype(r["dpu"].dtype), mask)
      if cfg.diag:
        diag = vec(_DIAG)
        acc["ds"] = acc["ds"] + jnp.sum(ct_f * xv, axis=0) * diag[0]
        dxc = dxc + diag * vec("s") * ct_f
      host = jnp.where(on, vec(_HOST), 0.0)
      dx = ct + host * (dxc - (1.0 - res) * blend * ct)
      _st(r["dx"], (rows, slice(None)), dx.astype(r["dx"].dtype), mask)
      return acc

    acc = jax.lax.fori_loop(0, steps, tile, init())
    for k, v in acc.items():
      if isinstance(v, list):
        for j, vj in enumerate(v):
          r[k][j, :] = vj
      else:
        r[k][0, :] = v

  any_on = jnp.max(jnp.where(r["sc"][_OK, :] > 0, r["sc"][_LIVE, :], 0.0)) > 0
  jax.lax.cond(any_on, lambda: run(True), lambda: run(False))


# ----------------------------------------------------------------------------- pallas_call plumbing


def _call(kernel, cfg: _Cfg, tiling: Tiling, grid, ins, outs, aliases=None, name="kasmina"):
  """`ins`/`outs`: lists of (name, array or ShapeDtypeStruct, BlockSpec)."""
  names = [n for n, _, _ in ins] + [n for n, _, _ in outs]

  def body(*refs):
    kernel(cfg, dict(zip(names, refs)))

  kwargs = {}
  if not cfg.interpret:
    _note_gpu_path()
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=tiling.num_warps,
                                                     num_stages=tiling.num_stages)
  call = pl.pallas_call(
      body, grid=grid, in_specs=[s for _, _, s in ins], out_specs=[s for _, _, s in outs],
      out_shape=[o for _, o, _ in outs], input_output_aliases=aliases or {},
      interpret=cfg.interpret, name=name, **kwargs)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*Pallas Triton backend is deprecated.*")
    result = call(*[a for _, a, _ in ins])
  return dict(zip([n for n, _, _ in outs], result))


def _seed_scalars(seed_in: common.SeedInputs, ok=None, ct_r2=None) -> jax.Array:
  t = seed_in.tables
  k = seed_in.live.shape[0]
  cols = [seed_in.live, seed_in.blend, seed_in.grad_blend, seed_in.host_grad, t.residual,
          t.glu, t.diagonal, *jnp.moveaxis(t.act, -1, 0)]
  cols.append(jnp.ones((k,), _F32) if ok is None else ok.astype(_F32))
  cols.append(jnp.zeros((k,), _F32) if ct_r2 is None else ct_r2.astype(_F32))
  cols += [jnp.zeros((k,), _F32)] * (_NSC - len(cols))
  return jnp.stack([c.astype(_F32) for c in cols], axis=-1)  # (K, NSC)


def _launch_params(cfg: _Cfg, params: bp_lib.ChildParams, hm: jax.Array):
  """The launch's seeds' parameters, chunk width cut to `cs` and hidden width padded to
  `cfg.h`, float32 (small arrays: XLA slices them)."""
  sl = slice(cfg.k0, cfg.k0 + cfg.ks)
  hp = cfg.h - params.b1.shape[-1]
  cp = cfg.cw - cfg.cs
  padh = lambda a, axis: a if hp == 0 else jnp.pad(
      a, [(0, 0)] * axis + [(0, hp)] + [(0, 0)] * (a.ndim - axis - 1))
  padc = lambda a, axis: a if cp == 0 else jnp.pad(
      a, [(0, 0)] * axis + [(0, cp)] + [(0, 0)] * (a.ndim - axis - 1))
  out = {"w1": padc(padh(params.w1[sl, :cfg.cs], 2), 1), "b1": padh(params.b1[sl], 1),
         "w2": padc(padh(params.w2[sl, :, :cfg.cs], 1), 2), "b2": padc(params.b2[sl, :cfg.cs], 1),
         "hm": padh(hm[sl], 1)}
  if cfg.glu:
    out.update(wg=padc(padh(params.wg[sl, :cfg.cs], 2), 1), bg=padh(params.bg[sl], 1))
  if cfg.diag:
    out["s"] = padc(params.s[sl, :cfg.cs], 1)
  return {k: v.astype(_F32) for k, v in out.items()}


def _param_specs(cfg: _Cfg, p):
  g, cs, h = cfg.group, cfg.cw, cfg.h
  shapes = {"w1": (g, cs, h), "wg": (g, cs, h), "w2": (g, h, cs), "b1": (g, h), "bg": (g, h),
            "b2": (g, cs), "s": (g, cs), "hm": (g, h)}
  return [(k, v, pl.BlockSpec(shapes[k], lambda i, j, n=len(shapes[k]): (j,) + (0,) * (n - 1)))
          for k, v in p.items()]


def _node_params(cfg: _Cfg, p):
  """Per-node layout: hidden-major (H, ks) rows, and (2, ks) [b2; s]."""
  out = {k: jnp.transpose(p[k][:, 0, :]) for k in ("w1", "wg") if k in p}
  out["w2"] = jnp.transpose(p["w2"][:, :, 0])
  for k in ("b1", "bg", "hm"):
    if k in p:
      out[k] = jnp.transpose(p[k])
  s = p["s"][:, 0] if "s" in p else jnp.zeros_like(p["b2"][:, 0])
  out["nv"] = jnp.stack([p["b2"][:, 0], s])
  return out


def _node_param_specs(cfg: _Cfg, p):
  b = cfg.group
  return [(k, v, pl.BlockSpec((v.shape[0], b), lambda i, j: (0, j))) for k, v in p.items()]


def _x_spec(cfg: _Cfg):
  width = cfg.group * cfg.cs
  dim, idx = _blocked(width, cfg.col0)
  return pl.BlockSpec((cfg.strip, dim), lambda i, j: (i, idx(j)))


def _pu_spec(cfg: _Cfg, h):
  dim, idx = _blocked(cfg.group, cfg.k0)
  return pl.BlockSpec((cfg.strip, dim, h), lambda i, j: (i, idx(j), 0))


def _partial_spec(cfg: _Cfg, extra=(), gram=False):
  w = cfg.group
  if cfg.node:
    if gram:
      return pl.BlockSpec((None, w), lambda i, j: (jnp.minimum(i, cfg.gram_strips - 1), j))
    return pl.BlockSpec((None, w) + extra, lambda i, j: (i, j) + (0,) * len(extra))
  tail = (cfg.cw,) + extra
  if gram:
    tail = (cfg.cw, cfg.cw)
    return pl.BlockSpec((None, w) + tail,
                        lambda i, j: (jnp.minimum(i, cfg.gram_strips - 1), j, 0, 0))
  return pl.BlockSpec((None, w) + tail, lambda i, j: (i, j) + (0,) * len(tail))


# ----------------------------------------------------------------------------- forward / backward


def _pad_hidden(h: int, interpret: bool) -> int:
  return h if interpret else _pow2_ceil(h)


def _forward(tiling: Tiling | None, spec, telemetry, x2d, params, seed_in, pre_u, shift,
             precision=None):
  interpret = not _on_gpu()
  tiling = tiling or (INTERPRET_TILING if interpret else GPU_TILING)
  n = x2d.shape[0]
  h = _pad_hidden(params.b1.shape[-1], interpret)
  sc_all = _seed_scalars(seed_in)
  if pre_u is not None and h != pre_u.shape[-1]:
    pre_u = jnp.pad(pre_u, [(0, 0), (0, 0), (0, h - pre_u.shape[-1])])
  out = None
  parts = []
  for launch in _launches(spec):
    cfg = _make_cfg(spec, launch, n, h, tiling, telemetry, pre_u is not None, interpret,
                    backward=False, precision=precision)
    sl = slice(cfg.k0, cfg.k0 + cfg.ks)
    p = _launch_params(cfg, params, seed_in.tables.hidden_mask)
    s_n, s_g, grid = cfg.num_strips, cfg.gram_strips, None
    ins = [("x", x2d, _x_spec(cfg))]
    if cfg.node:
      grid = (s_n, cfg.ks // cfg.group)
      ins.append(("sc", jnp.transpose(sc_all[sl]), pl.BlockSpec((_NSC, cfg.group),
                                                                lambda i, j: (0, j))))
      ins += _node_param_specs(cfg, _node_params(cfg, p))
      kernel = _node_fwd_kernel
      part_shape = lambda s: (s, cfg.ks)
      gram_shape = (s_g, cfg.ks)
    else:
      grid = (s_n, cfg.ks // cfg.group)
      ins.append(("sc", sc_all[sl], pl.BlockSpec((cfg.group, _NSC), lambda i, j: (j, 0))))
      ins += _param_specs(cfg, p)
      kernel = _chunk_fwd_kernel
      part_shape = lambda s: (s, cfg.ks, cfg.cw)
      gram_shape = (s_g, cfg.ks, cfg.cw, cfg.cw)
    if cfg.par:
      ins.append(("pu", pre_u, _pu_spec(cfg, h)))
    if cfg.telemetry:
      sh = shift[sl, :cfg.cs]
      if cfg.cw != cfg.cs:
        sh = jnp.pad(sh, [(0, 0), (0, cfg.cw - cfg.cs)])
      if cfg.node:
        ins.append(("shift", jnp.transpose(sh), pl.BlockSpec((1, cfg.group), lambda i, j: (0, j))))
      else:
        ins.append(("shift", sh, pl.BlockSpec((cfg.group, cfg.cw), lambda i, j: (j, 0))))
    aliases = None
    if out is not None:
      ins.append(("out_in", out, _x_spec(cfg)))
      aliases = {len(ins) - 1: 0}
    sds = lambda shape: jax.ShapeDtypeStruct(shape, _F32)
    outs = [("out", jax.ShapeDtypeStruct(x2d.shape, x2d.dtype), _x_spec(cfg))]
    part_names = ["r2", "bad", "x2"] + (["tsum", "tsumsq", "tdead"] if cfg.telemetry else [])
    outs += [(k, sds(part_shape(s_n)), _partial_spec(cfg)) for k in part_names]
    if cfg.corr:
      outs.append(("csum", sds(part_shape(s_g)), _partial_spec(cfg, gram=cfg.node)
                   if cfg.node else pl.BlockSpec((None, cfg.group, cfg.cw),
                                                 lambda i, j: (jnp.minimum(i, s_g - 1), j, 0))))
      outs.append(("gram", sds(gram_shape), _partial_spec(cfg, gram=True)))
    res = _call(kernel, cfg, tiling, grid, ins, outs, aliases, name="kasmina_fwd")
    out = res["out"]
    parts.append((cfg, {k: v for k, v in res.items() if k != "out"}))

  c = spec.chunk_width
  def gather(key, reduce_axis=0):
    pieces = []
    for cfg, res in parts:
      v = jnp.sum(res[key], axis=reduce_axis)
      if cfg.cw != cfg.cs:
        v = v[:, :cfg.cs, :cfg.cs] if key == "gram" else v[:, :cfg.cs]
      if cfg.node:
        v = v[:, None] if key != "gram" else v[:, None, None]
      pad = c - cfg.cs
      if pad:
        v = jnp.pad(v, [(0, 0)] + [(0, pad)] * (v.ndim - 1))
      pieces.append(v)
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)

  ok = jnp.sum(gather("bad"), axis=-1) == 0
  live = seed_in.live > 0
  ok = ok | ~live
  out = common.apply_guard(spec, x2d, out, ok)
  partials = None
  if telemetry:
    k = spec.num_seeds
    m = min(spec.corr_rows, n) if spec.correlation else 0
    partials = tel_lib.TelemetryPartials(
        count=jnp.asarray(n, _F32), sum=gather("tsum"), sumsq=gather("tsumsq"),
        dead=gather("tdead"), corr_count=jnp.asarray(m, _F32),
        corr_sum=gather("csum") if spec.correlation else jnp.zeros((k, c), _F32),
        gram=gather("gram") if spec.correlation else jnp.zeros((k, 0, 0), _F32))
  return common.FusedOutputs(out=out, sum_r2=jnp.sum(gather("r2"), axis=-1),
                             sum_x2=jnp.sum(gather("x2"), axis=-1), ok=ok, partials=partials)


def _backward(tiling: Tiling | None, spec, x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2,
              precision=None):
  interpret = not _on_gpu()
  tiling = tiling or (INTERPRET_TILING if interpret else GPU_TILING)
  n = x2d.shape[0]
  h0 = params.b1.shape[-1]
  h = _pad_hidden(h0, interpret)
  sc_all = _seed_scalars(seed_in, ok=ok, ct_r2=ct_sum_r2)
  pu_in = pre_u
  if pre_u is not None and h != h0:
    pu_in = jnp.pad(pre_u, [(0, 0), (0, 0), (0, h - h0)])
  dx = dpu = None
  grads = []
  for launch in _launches(spec):
    cfg = _make_cfg(spec, launch, n, h, tiling, False, pre_u is not None, interpret,
                    backward=True, precision=precision)
    sl = slice(cfg.k0, cfg.k0 + cfg.ks)
    p = _launch_params(cfg, params, seed_in.tables.hidden_mask)
    s_n = cfg.num_strips
    grid = (s_n, cfg.ks // cfg.group)
    ins = [("x", x2d, _x_spec(cfg)), ("ct", ct_out, _x_spec(cfg))]
    gnames = ["dw1", "db1", "dw2", "db2"] + (["dwg", "dbg"] if cfg.glu else []) + (
        ["ds"] if cfg.diag else [])
    sds = lambda shape: jax.ShapeDtypeStruct(shape, _F32)
    if cfg.node:
      ins.append(("sc", jnp.transpose(sc_all[sl]), pl.BlockSpec((_NSC, cfg.group),
                                                                lambda i, j: (0, j))))
      ins += _node_param_specs(cfg, _node_params(cfg, p))
      kernel = _node_bwd_kernel
      gshape = {k: ((s_n, h, cfg.ks) if k in ("dw1", "db1", "dw2", "dwg", "dbg")
                    else (s_n, 1, cfg.ks)) for k in gnames}
      gspec = lambda k: pl.BlockSpec((None, gshape[k][1], cfg.group), lambda i, j: (i, 0, j))
    else:
      ins.append(("sc", sc_all[sl], pl.BlockSpec((cfg.group, _NSC), lambda i, j: (j, 0))))
      ins += _param_specs(cfg, p)
      kernel = _chunk_bwd_kernel
      cw = cfg.cw
      per = {"dw1": (cw, h), "dwg": (cw, h), "dw2": (h, cw), "db1": (h,), "dbg": (h,),
             "db2": (cw,), "ds": (cw,)}
      gshape = {k: (s_n, cfg.ks) + per[k] for k in gnames}
      gspec = lambda k: pl.BlockSpec((None, cfg.group) + per[k],
                                     lambda i, j, n=len(per[k]): (i, j) + (0,) * n)
    if cfg.par:
      ins.append(("pu", pu_in, _pu_spec(cfg, h)))
    outs = [("dx", jax.ShapeDtypeStruct(ct_out.shape, ct_out.dtype), _x_spec(cfg))]
    aliases = {}
    if dx is not None:
      ins.append(("dx_in", dx, _x_spec(cfg)))
      aliases[len(ins) - 1] = 0
    if cfg.par:
      outs.append(("dpu", sds(pu_in.shape), _pu_spec(cfg, h)))
      if dpu is not None:
        ins.append(("dpu_in", dpu, _pu_spec(cfg, h)))
        aliases[len(ins) - 1] = 1
    outs += [(k, sds(gshape[k]), gspec(k)) for k in gnames]
    res = _call(kernel, cfg, tiling, grid, ins, outs, aliases, name="kasmina_bwd")
    dx = res["dx"]
    dpu = res.get("dpu")
    grads.append((cfg, {k: jnp.sum(res[k], axis=0) for k in gnames}))

  c = spec.chunk_width

  def assemble(name, like):
    """Per-launch gradients back into the (K, ...) padded layout of `like`."""
    if like.size == 0 or (name == "w1u"):
      return jnp.zeros_like(like)
    key = "d" + name
    pieces = []
    for cfg, g in grads:
      v = g[key]
      if cfg.node:  # (H or 1, ks) -> (ks, 1, H) / (ks, H, 1) / (ks, H) / (ks, 1)
        v = jnp.transpose(v)
        if name in ("w1", "wg"):
          v = v[:, None, :]
        elif name == "w2":
          v = v[:, :, None]
      # kernel padding off, the layout's chunk padding on
      if name in ("w1", "wg"):
        v = jnp.pad(v[:, :cfg.cs, :h0], [(0, 0), (0, c - cfg.cs), (0, 0)])
      elif name == "w2":
        v = jnp.pad(v[:, :h0, :cfg.cs], [(0, 0), (0, 0), (0, c - cfg.cs)])
      elif name in ("b1", "bg"):
        v = v[:, :h0]
      else:  # b2, s
        v = jnp.pad(v[:, :cfg.cs], [(0, 0), (0, c - cfg.cs)])
      pieces.append(v)
    v = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)
    return v.reshape(like.shape).astype(like.dtype)

  dparams = bp_lib.ChildParams(**{f.name: assemble(f.name, getattr(params, f.name))
                                  for f in dataclasses.fields(bp_lib.ChildParams)})
  if pre_u is not None:
    dpu = dpu[..., :h0] if h != h0 else dpu
  else:
    dpu = None
  return dx, dparams, dpu


def make_fused_blend(tiling: Tiling | None = None):
  """The Pallas fused primitive with the given tiling (None: `GPU_TILING` on GPU,
  `INTERPRET_TILING` elsewhere)."""
  fwd = lambda *a: _forward(tiling, *a)
  bwd = lambda *a: _backward(tiling, *a)
  return common.make_fused_blend(fwd, bwd)


fused_blend = make_fused_blend()
