"""The fused primitive as hand-written Triton kernels, called through `jax_triton.triton_call`.

Implements `common.fused_blend_reference` (forward, with the telemetry sums in the same pass)
and `common.fused_blend_backward_reference` (input, child-parameter and `pre_u` cotangents)
on NVIDIA GPUs. jax-triton and triton are imported lazily: importing this module never needs
them (`available()` says whether they are there); calling `fused_blend` does.

Kernels (one program = one strip of rows x one seed, or a block of nodes in per-node mode):

* coarse (`chunk_width >= 2`, chunk padded to a power of two `CP >= 16` in registers): a
  program owns one strip of `TILES` x `BR` rows of `SPP` seeds (one after the other), loads a
  seed's child once, runs it with `tl.dot` and blends, writing the output once and keeping
  the telemetry sums of the strip in registers (XLA adds the strips), folded inside each
  thread to the rows one pass of its threads covers (`fold_rows`: no exchange between
  threads per tile, a fraction of a register per element). Dots: float32
  operands at the caller's `precision` (`tf32` for HIGH; for HIGHEST, the exact path,
  `tf32x3` or `ieee`, whichever the tuning sweep found faster), and at JAX's DEFAULT
  precision `tf32` for float32 activations and bfloat16 operands for bfloat16 ones (as XLA's
  dots of those arrays); float32 accumulation always. A seed that is not live runs a loop
  with no child work (its chunk costs its read and its write); the live loop has no branch
  per tile. Where every chunk is a power of two wide and the rows fill whole strips
  (`EVEN_C`, not `MASKED`), tiles load and store unmasked at aligned offsets (vectorised).
* per-node (`chunk_width == 1`): a program owns `BR` rows x `BN` nodes (one node = one seed)
  and evaluates every node's child element-wise: the forward one hidden unit at a time on
  `(BR, BN)` tiles, its weights passed hidden-major `(H, D)` and read every tile (from L1),
  its per-node sums folded like the coarse forward's; the backward on `(BR, BN, H)` tensors,
  the weights loaded once per program.
* backward: the same tiling; it loads the child as the forward does (`_load_child`) and
  recomputes it (no residual but `x`), accumulates the
  parameter gradients per strip, and writes the input gradient only for chunks whose child
  is in the gradient path (STABILIZATION on), in a loop of its own: the input gradient is
  aliased to the output cotangent, which *is* the input gradient of every other chunk (no
  write: the four-pass floor while seeds only blend, docs/design.md, "Performance model").

Chunks wider than `MAX_FUSED_CHUNK_BACKWARD` nodes run the backward in two launches, each
recomputing the child and holding half the gradient accumulators (`bwd_coarse`'s PART): in
one, they spilled. Chunks wider than `MAX_INLINE_CHUNK` nodes do not fit one program's
registers, and weight tiles over `MAX_WEIGHT_SMEM_BYTES` not its shared memory; for those the
primitive falls back to the `jnp` contract under XLA (correct, not fused).

`triton_call` has no batching or differentiation rules: the implementations are wrapped in
`jax.custom_batching.custom_vmap` (sequential over the batch) and `common.make_fused_blend`
adds the `jax.custom_vjp`.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import jax
import jax.numpy as jnp

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import chunks
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.kernels import common
from kasmina_jax.kernels import select

MAX_INLINE_CHUNK = 256
# The backward's per-program gradient accumulators of chunks wider than this spill (2026-12-06,
# H100: 2.5 ms for 16 seeds of 256 nodes against 0.49 ms for 64 of 64): those run the
# backward in two launches, each holding half the accumulators (`bwd_coarse`'s PART).
MAX_FUSED_CHUNK_BACKWARD = select.FUSED_BACKWARD_MAX_CHUNK

# A coarse program keeps its seed's weight tiles (w1, w2 and a GLU gate's wg, padded to powers
# of two) in shared memory as the dots' operands. Past this the tiles and the pipelining
# buffers no longer fit the 227 KiB a program may take on sm_90 and the kernel cannot launch:
# `benchmarks/triton_regs.py` compiled 256-node chunks with a GLU child at 238 KiB in float32
# (2026-12-06). Such layers run the `jnp` contract under XLA.
MAX_WEIGHT_SMEM_BYTES = 160 * 1024

# Tiling per shape class (see `_config`); `CONFIG_OVERRIDES[(kind, class)]` or
# `[(kind, class, dtype name)]` (kind "fwd" or "bwd") replaces an entry, for tuning runs.
CONFIG_OVERRIDES: dict[tuple[str, str], dict[str, int]] = {}


def available() -> bool:
  """jax-triton and triton are importable and the default backend is an NVIDIA GPU."""
  if importlib.util.find_spec("jax_triton") is None or importlib.util.find_spec("triton") is None:
    return False
  return select.cuda_device_kind() is not None


# ----------------------------------------------------------------------------- the kernels


@functools.cache
def _kernels():
  """The `@triton.jit` kernels, imported on first use (triton is needed only then)."""
  from kasmina_jax.kernels import _triton_kernels as tk  # pylint: disable=g-import-not-at-top
  return dict(fwd_coarse=tk.fwd_coarse, bwd_coarse=tk.bwd_coarse, fwd_node=tk.fwd_node,
              bwd_node=tk.bwd_node)


# ----------------------------------------------------------------------------- configuration


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _dot_dim(n: int) -> int:
  """n padded for a `tl.dot` operand: a power of two, at least 16 (a coarse program's chunk
  width `CP` and hidden width `HP`)."""
  return max(16, _pow2(n))


def shape_class(spec) -> str:
  c = spec.chunk_width
  if c == 1:
    return "node"
  cp = _dot_dim(c)
  if cp <= 64:
    return "small"
  if cp <= 128:
    return "medium"
  return "wide"


# Measured on an H100 (benchmarks/tune_triton.py, 2026-11-25; the small and wide forward and
# the small backward re-swept on an H100 on 2026-12-06 after the unmasked-tile rewrite, and
# again with the folded column sums; see benchmarks/RESULTS.md). Keys (kind, class) or (kind,
# class, dtype name); the latter wins. Besides the tiling (BR rows a tile, TILES tiles a
# strip, BN nodes a block, warps, stages), forward switches: ACC2D (column sums per tile (0),
# kept per element (1), folded to n rows or to `fold_rows` ("fold"); see `acc_rows`), JOINT
# (one multi-operand reduction a tile), SPP (seeds a program). "PREC" is the exact path's
# `tl.dot` input precision (precision="highest"): "tf32x3" unless given ("ieee" where the sweep
# found it faster); JAX's default precision always runs "tf32".
_DEFAULT_CONFIGS = {
    ("fwd", "node"): dict(BR=32, BN=32, TILES=8, num_warps=2, num_stages=2, ACC2D="fold"),
    ("fwd", "small"): dict(BR=32, TILES=16, num_warps=2, num_stages=2, ACC2D="fold"),
    ("fwd", "medium"): dict(BR=16, TILES=32, num_warps=4, num_stages=2),
    ("fwd", "medium", "float32"): dict(BR=16, TILES=32, num_warps=4, num_stages=2, PREC="ieee"),
    ("fwd", "wide"): dict(BR=16, TILES=32, num_warps=4, num_stages=2, ACC2D="fold"),
    ("bwd", "node"): dict(BR=8, BN=32, TILES=32, num_warps=4, num_stages=2),
    ("bwd", "node", "float32"): dict(BR=4, BN=64, TILES=64, num_warps=4, num_stages=2),
    ("bwd", "small"): dict(BR=32, TILES=32, num_warps=2, num_stages=2),
    ("bwd", "medium"): dict(BR=16, TILES=32, num_warps=2, num_stages=2),
    ("bwd", "medium", "float32"): dict(BR=16, TILES=32, num_warps=4, num_stages=2, PREC="ieee"),
    ("bwd", "wide"): dict(BR=16, TILES=32, num_warps=4, num_stages=2),
}


def fold_rows(cfg: dict[str, Any], cp: int, itemsize: int) -> int:
  """The rows one pass of a coarse forward program's threads covers in a (BR, cp) tile, as
  Triton 3.6 lays out a row-major load: 16-byte vectors along the columns, a warp's 32
  threads across the columns first (up to cp / vector of them), the warps down the rows.
  Every thread's elements of a tile repeat every that many rows, so column sums folded to a
  multiple of it stay inside each thread (`_acc`); folded to fewer, they cross threads every
  tile (measured 2-4x slower on an H100)."""
  vec = min(cp, 16 // itemsize)
  return min(cfg["BR"], cfg["num_warps"] * max(1, 32 * vec // cp))


def acc_rows(cfg: dict[str, Any], cp: int, itemsize: int) -> int:
  """The forward's ACC2D switch as the kernel takes it (see `_acc`): 0 (column sums every
  tile), 1 (kept per element of a tile), n > 1 (folded to n rows). "fold" (the default of
  the coarse forward): folded to `fold_rows`, the fewest registers that need no exchange
  between threads. A given n must be a power of two <= BR."""
  n = cfg.get("ACC2D", 0)
  if n == "fold":
    n = fold_rows(cfg, cp, itemsize)
  n = int(n)
  if n > 1 and (n & (n - 1) or n > cfg["BR"]):
    raise ValueError(f"ACC2D={n}: folded column sums need a power of two <= BR={cfg['BR']}")
  return 1 if n == cfg["BR"] else n


def _config(kind: str, spec, dtype) -> dict[str, Any]:
  cls = shape_class(spec)
  cfg = dict(_DEFAULT_CONFIGS[(kind, cls)])
  cfg.update(_DEFAULT_CONFIGS.get((kind, cls, jnp.dtype(dtype).name), {}))
  cfg.update(CONFIG_OVERRIDES.get((kind, cls), {}))
  cfg.update(CONFIG_OVERRIDES.get((kind, cls, jnp.dtype(dtype).name), {}))
  return cfg


def low_precision_dots(dtype, precision) -> bool:
  """bfloat16 activations at JAX's DEFAULT precision: the child's dots take bfloat16
  operands (accumulating in float32), as XLA's dot of bfloat16 arrays does; HIGH and HIGHEST
  (and every other dtype) keep float32 operands."""
  return (jnp.dtype(dtype) == jnp.bfloat16
          and chunks.effective_precision(precision) == jax.lax.Precision.DEFAULT)


def _geometry(spec, n: int, rows_per_strip: int) -> dict[str, Any]:
  """EVEN_C: every chunk is `chunk_width` wide, a power of two (no column mask, aligned
  offsets); MASKED: some tile needs a mask (uneven chunks, or a partial last strip)."""
  k, c = spec.num_seeds, spec.chunk_width
  even_c = spec.dim % k == 0 and c == _dot_dim(c)
  return dict(EVEN_C=even_c, MASKED=not (even_c and n % rows_per_strip == 0))


def _seeds_per_program(cfg: dict[str, Any], k: int) -> int:
  spp = int(cfg.get("SPP", 1))
  while spp > 1 and k % spp:
    spp //= 2
  return max(1, spp)


def input_precision(cfg: dict[str, Any], precision) -> str:
  """The `tl.dot` input precision for the caller's `precision` (None: JAX's default matmul
  precision at trace time): "tf32" for DEFAULT and HIGH (what XLA's dots use on these GPUs),
  the exact path for HIGHEST (`cfg["PREC"]`, "tf32x3" unless the tuning chose "ieee")."""
  if chunks.effective_precision(precision) == jax.lax.Precision.HIGHEST:
    return cfg.get("PREC", "tf32x3")
  return "tf32"


def _statics(spec, dtype) -> dict[str, Any]:
  del dtype
  cat = spec.catalog
  acts = 0
  for i in set(int(a) for a in cat.act_id):
    acts |= 1 << i
  h = cat.hidden
  # The coarse kernels' dots need 16 or more hidden units; per-node mode evaluates its children
  # element-wise on (rows, nodes, hidden) tensors, where padding to 16 multiplied the work and
  # the registers (node catalogs have 2-3 hidden units: a 6.7 KB spill stack per thread in the
  # per-node backward at 16, benchmarks/triton_regs.py).
  hp = _pow2(h) if spec.chunk_width == 1 else _dot_dim(h)
  return dict(ACTS=acts, HAS_GLU=bool(cat.any_glu), HAS_DIAG=bool(cat.any_diagonal),
              H=h, HP=hp)


def _seed_arrays(seed_in: common.SeedInputs):
  t = seed_in.tables
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (f32(t.act), f32(t.glu), f32(t.diagonal), f32(t.residual), f32(t.hidden_mask))


def _param_arrays(spec, params: bp_lib.ChildParams):
  """Child parameters as float32 arrays the kernels can index (absent parts as 1-element
  dummies: a kernel never reads them)."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  dummy = jnp.zeros((1,), jnp.float32)
  wg = f32(params.wg) if params.wg.shape[-1] else dummy
  bg = f32(params.bg) if params.bg.shape[-1] else dummy
  s = f32(params.s) if params.s.shape[-1] else dummy
  return f32(params.w1), f32(params.b1), wg, bg, f32(params.w2), f32(params.b2), s


def _inline(spec, lowp: bool = False) -> bool:
  """Whether kernels run this layer, forward and backward (else the `jnp` contract under
  XLA). `lowp`: the dots take bfloat16 operands (`low_precision_dots`), half the weight
  tiles' shared memory."""
  if spec.chunk_width > MAX_INLINE_CHUNK:
    return False
  return spec.chunk_width == 1 or weight_smem_bytes(spec, lowp) <= MAX_WEIGHT_SMEM_BYTES


def weight_smem_bytes(spec, lowp: bool = False) -> int:
  """Shared memory a coarse program's weight tiles take (see MAX_WEIGHT_SMEM_BYTES)."""
  st = _statics(spec, None)
  matrices = 3 if st["HAS_GLU"] else 2
  return matrices * _dot_dim(spec.chunk_width) * st["HP"] * (2 if lowp else 4)


# ----------------------------------------------------------------------------- forward


def _forward_impl(spec, telemetry: bool, x2d, params, seed_in, pre_u, shift, precision=None):
  lowp = low_precision_dots(x2d.dtype, precision)
  if not _inline(spec, lowp):
    return common.fused_blend_reference(spec, telemetry, x2d, params, seed_in, pre_u, shift,
                                        precision)
  import jax_triton as jt  # pylint: disable=g-import-not-at-top
  kern = _kernels()
  n, d = x2d.shape
  k, c = spec.num_seeds, spec.chunk_width
  st = _statics(spec, x2d.dtype)
  node = c == 1
  cfg = _config("fwd", spec, x2d.dtype)
  rows_per_strip = cfg["BR"] * cfg["TILES"]
  strips = -(-n // rows_per_strip)
  w1, b1, wg, bg, w2, b2, s = _param_arrays(spec, params)
  act, glu, diag, res, hmask = _seed_arrays(seed_in)
  has_preu = pre_u is not None
  preu = pre_u.astype(jnp.float32) if has_preu else jnp.zeros((1,), jnp.float32)
  shift_arr = shift.astype(jnp.float32) if telemetry else jnp.zeros((k, c), jnp.float32)
  f32 = jax.ShapeDtypeStruct
  tel_shape = (strips, k, c) if telemetry else (1,)
  out_shape = [f32((n, d), x2d.dtype), f32(tel_shape, jnp.float32), f32(tel_shape, jnp.float32),
               f32(tel_shape, jnp.float32), f32((strips, k), jnp.float32),
               f32((strips, k), jnp.float32), f32((strips, k), jnp.float32)]
  common_kw = dict(N=n, D=d, H=st["H"], HP=st["HP"], BR=cfg["BR"], TILES=cfg["TILES"],
                   ACTS=st["ACTS"], HAS_GLU=st["HAS_GLU"], HAS_DIAG=st["HAS_DIAG"],
                   HAS_PREU=has_preu, TELEMETRY=bool(telemetry),
                   DEAD_EPS=float(spec.dead_eps), JOINT=bool(cfg.get("JOINT", 0)))
  if node:
    # (H, D) weights: one hidden unit's weights over a block of nodes are contiguous; w2 with
    # its hidden mask applied
    hidden_major = lambda a: a.reshape(k, -1).T if a.ndim > 1 else a  # (1,): absent
    w1, b1, wg, bg = (hidden_major(a) for a in (w1, b1, wg, bg))
    w2 = (w2.reshape(k, -1) * hmask.reshape(k, -1)).T
  args = (x2d, w1, b1, wg, bg, w2, b2, s, preu, shift_arr, seed_in.live.astype(jnp.float32),
          seed_in.blend.astype(jnp.float32), act, glu, diag, res, hmask)
  if node:
    grid = (strips, -(-d // cfg["BN"]))
    outs = jt.triton_call(*args, kernel=kern["fwd_node"], out_shape=out_shape, grid=grid,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          BN=cfg["BN"], MASKED=bool(d % cfg["BN"] or n % rows_per_strip),
                          ACC2D=acc_rows(cfg, cfg["BN"], x2d.dtype.itemsize), **common_kw)
  else:
    q, r = divmod(d, k)
    spp = _seeds_per_program(cfg, k)
    cp = _dot_dim(c)
    coarse_kw = dict(K=k, Q=q, R=r, C=c, CP=cp, SPP=spp,
                     PREC=input_precision(cfg, precision), LOWP=lowp,
                     **_geometry(spec, n, rows_per_strip), **common_kw)
    outs = jt.triton_call(*args, kernel=kern["fwd_coarse"], out_shape=out_shape,
                          grid=(strips, k // spp), num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"],
                          ACC2D=acc_rows(cfg, cp, x2d.dtype.itemsize),
                          # the MMA layout's warps split only the rows (16 a warp): see
                          # `_zero_sums` for where the residual's squares are summed
                          R2ROWS=cfg["BR"] >= 16 * cfg["num_warps"], **coarse_kw)
  out, tsum, tsq, tdead, r2, x2, bad = outs
  ok = jnp.sum(bad, axis=0) == 0
  out = common.apply_guard(spec, x2d, out, ok)
  partials = None
  if telemetry:
    s1, s2 = tsum.sum(0).reshape(k, c), tsq.sum(0).reshape(k, c)
    partials = _partials(spec, x2d, shift_arr, s1, s2, tdead.sum(0))
    # sum over rows of x^2 = sum (x - shift)^2 + 2 shift sum (x - shift) + n shift^2 per node
    # (padded nodes: all three 0); the kernels skip that reduction when they take telemetry.
    sum_x2 = jnp.sum(s2 + shift_arr * (2.0 * s1 + n * shift_arr), axis=1)
  else:
    sum_x2 = x2.sum(0)
  return common.FusedOutputs(out=out, sum_r2=r2.sum(0), sum_x2=sum_x2, ok=ok,
                             partials=partials)


def _partials(spec, x2d, shift, s1, s2, dead) -> tel_lib.TelemetryPartials:
  """The kernel's per-node sums plus the correlation Gram matrix, which XLA takes on the
  first `corr_rows` rows (a small GEMM; the kernel does not carry it)."""
  n = x2d.shape[0]
  k, c = spec.num_seeds, spec.chunk_width
  if spec.correlation:
    m = min(spec.corr_rows, n)
    node = jnp.asarray(spec.node_mask, jnp.float32)[None]
    dm = (chunks.to_blocks(spec, x2d[:m]).astype(jnp.float32) - shift[None]) * node
    gram = jnp.einsum("nki,nkj->kij", dm, dm, precision=jax.lax.Precision.HIGHEST)
    corr_sum, corr_count = dm.sum(0), jnp.asarray(m, jnp.float32)
  else:
    gram = jnp.zeros((k, 0, 0), jnp.float32)
    corr_sum, corr_count = jnp.zeros((k, c), jnp.float32), jnp.zeros((), jnp.float32)
  return tel_lib.TelemetryPartials(
      count=jnp.asarray(n, jnp.float32), sum=s1.reshape(k, c), sumsq=s2.reshape(k, c),
      dead=dead.reshape(k, c), corr_count=corr_count, corr_sum=corr_sum, gram=gram)


# ----------------------------------------------------------------------------- backward


def _backward_impl(spec, x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2, precision=None):
  lowp = low_precision_dots(x2d.dtype, precision)
  if not _inline(spec, lowp):
    return _backward_xla(spec, x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2, precision)
  import jax_triton as jt  # pylint: disable=g-import-not-at-top
  kern = _kernels()
  n, d = x2d.shape
  k, c = spec.num_seeds, spec.chunk_width
  st = _statics(spec, x2d.dtype)
  h = st["H"]
  node = c == 1
  cfg = _config("bwd", spec, x2d.dtype)
  strips = -(-n // (cfg["BR"] * cfg["TILES"]))
  w1, b1, wg, bg, w2, b2, s = _param_arrays(spec, params)
  act, glu, diag, res, hmask = _seed_arrays(seed_in)
  has_preu = pre_u is not None
  preu = pre_u.astype(jnp.float32) if has_preu else jnp.zeros((1,), jnp.float32)
  ct_out = ct_out.astype(x2d.dtype)
  sds = jax.ShapeDtypeStruct
  g = h if st["HAS_GLU"] else 0
  one = sds((1,), jnp.float32)
  if node:
    gshapes = [sds((strips, k, h), jnp.float32), sds((strips, k, h), jnp.float32),
               sds((strips, k, h), jnp.float32) if g else one,
               sds((strips, k, h), jnp.float32) if g else one,
               sds((strips, k, h), jnp.float32), sds((strips, k), jnp.float32),
               sds((strips, k), jnp.float32) if st["HAS_DIAG"] else one]
  else:
    gshapes = [sds((strips, k, c, h), jnp.float32), sds((strips, k, h), jnp.float32),
               sds((strips, k, c, h), jnp.float32) if g else one,
               sds((strips, k, h), jnp.float32) if g else one,
               sds((strips, k, h, c), jnp.float32), sds((strips, k, c), jnp.float32),
               sds((strips, k, c), jnp.float32) if st["HAS_DIAG"] else one]
  out_shape = ([sds((n, d), x2d.dtype)] + gshapes
               + [sds((n, k, h), jnp.float32) if has_preu else one])
  args = (x2d, ct_out, w1, b1, wg, bg, w2, b2, s, preu, seed_in.live.astype(jnp.float32),
          seed_in.blend.astype(jnp.float32), seed_in.grad_blend.astype(jnp.float32),
          seed_in.host_grad.astype(jnp.float32), ok.astype(jnp.float32),
          ct_sum_r2.astype(jnp.float32), act, glu, diag, res, hmask)
  common_kw = dict(N=n, D=d, H=h, HP=st["HP"], BR=cfg["BR"], TILES=cfg["TILES"],
                   ACTS=st["ACTS"], HAS_GLU=st["HAS_GLU"], HAS_DIAG=st["HAS_DIAG"],
                   HAS_PREU=has_preu)
  # The input gradient is the output cotangent except where a child is in the gradient path:
  # alias the two buffers and write only those chunks.
  aliases = {1: 0}
  if node:
    grid = (strips, -(-d // cfg["BN"]))
    outs = jt.triton_call(*args, kernel=kern["bwd_node"], out_shape=out_shape, grid=grid,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          input_output_aliases=aliases, BN=cfg["BN"], **common_kw)
  else:
    q, r = divmod(d, k)
    launch = functools.partial(
        jt.triton_call, kernel=kern["bwd_coarse"], out_shape=out_shape, grid=(strips, k),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], input_output_aliases=aliases,
        K=k, Q=q, R=r, C=c, CP=_dot_dim(c), PREC=input_precision(cfg, precision), LOWP=lowp,
        **_geometry(spec, n, cfg["BR"] * cfg["TILES"]), **common_kw)
    if c <= MAX_FUSED_CHUNK_BACKWARD:
      outs = launch(*args, PART=0)
    else:
      # Two launches (see `bwd_coarse`): the output side reads the cotangent and leaves it
      # as it is (aliased to its dx output), the input side then overwrites it with dx.
      out_side = launch(*args, PART=2)
      in_side = launch(*((x2d, out_side[0]) + args[2:]), PART=1)
      outs = in_side[:5] + out_side[5:8] + in_side[8:]
  dx, dw1, db1, dwg, dbg, dw2, db2, ds, dpreu = outs
  if node:
    dw1 = dw1.sum(0).reshape(k, 1, h)
    dw2 = dw2.sum(0).reshape(k, h, 1)
    db1 = db1.sum(0)
    db2 = db2.sum(0).reshape(k, 1)
    dwg = dwg.sum(0).reshape(k, 1, h) if g else jnp.zeros(params.wg.shape, jnp.float32)
    dbg = dbg.sum(0) if g else jnp.zeros(params.bg.shape, jnp.float32)
    ds = ds.sum(0).reshape(k, 1) if st["HAS_DIAG"] else jnp.zeros(params.s.shape, jnp.float32)
  else:
    dw1, db1, dw2, db2 = dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0)
    dwg = dwg.sum(0) if g else jnp.zeros(params.wg.shape, jnp.float32)
    dbg = dbg.sum(0) if g else jnp.zeros(params.bg.shape, jnp.float32)
    ds = ds.sum(0) if st["HAS_DIAG"] else jnp.zeros(params.s.shape, jnp.float32)
  dparams = bp_lib.ChildParams(
      w1=dw1.astype(params.w1.dtype), w1u=jnp.zeros_like(params.w1u), b1=db1.astype(params.b1.dtype),
      wg=dwg.astype(params.wg.dtype), bg=dbg.astype(params.bg.dtype),
      w2=dw2.astype(params.w2.dtype), b2=db2.astype(params.b2.dtype), s=ds.astype(params.s.dtype))
  return dx, dparams, (dpreu if has_preu else None)


def _backward_xla(spec, x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2, precision):
  """The `jnp` contract's backward under XLA (layers no kernel runs: `_inline`), behind
  one device-side branch: with no seed on (live and ok), the input gradient is the output
  cotangent and every other cotangent is zero, which the contract would spend the child's
  recomputation to find. The kernels skip dormant seeds themselves; without the branch a
  dormant layer of 16 seeds of 256 nodes took 1.80 ms forward+backward against the
  reference's 0.82 (H100, 2026-12-06)."""
  def child_path(args):
    return common.fused_blend_backward_reference(spec, *args, precision)

  def no_child(args):
    x, p, _, u, _, ct, _ = args
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    return ct, zeros(p), None if u is None else zeros(u).astype(jnp.float32)

  on = (seed_in.live > 0) & ok
  return jax.lax.cond(jnp.any(on), child_path, no_child,
                      (x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2))


# ----------------------------------------------------------------------------- the primitive


@functools.lru_cache(maxsize=None)
def _batched_forward(spec, telemetry, precision):
  return jax.custom_batching.sequential_vmap(
      lambda x2d, params, seed_in, pre_u, shift: _forward_impl(spec, telemetry, x2d, params,
                                                               seed_in, pre_u, shift, precision))


@functools.lru_cache(maxsize=None)
def _batched_backward(spec, precision):
  return jax.custom_batching.sequential_vmap(
      lambda *a: _backward_impl(spec, *a, precision))


def forward_impl(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision=None):
  """`common.fused_blend_reference` in Triton (vmap: sequential over the batch axis)."""
  return _batched_forward(spec, bool(telemetry), chunks.canonical_precision(precision))(
      x2d, params, seed_in, pre_u, shift)


def backward_impl(spec, x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2, precision=None):
  """`common.fused_blend_backward_reference` in Triton (vmap: sequential over the batch)."""
  return _batched_backward(spec, chunks.canonical_precision(precision))(
      x2d, params, seed_in, pre_u, ok, ct_out, ct_sum_r2)


fused_blend = common.make_fused_blend(forward_impl, backward_impl)
"""The differentiable fused primitive (see `common.make_fused_blend`)."""


__all__ = ["CONFIG_OVERRIDES", "MAX_INLINE_CHUNK", "available", "backward_impl", "forward_impl",
           "fused_blend", "input_precision", "shape_class"]
