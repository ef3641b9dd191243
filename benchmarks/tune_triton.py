"""Sweeps the Triton kernels' tiling (rows a tile, tiles a strip, nodes a block, warps,
stages) per shape class on the GPU, in one run, and prints the best configuration of each.

Times the fused primitive alone (`kernels.triton.forward_impl` / `backward_impl`, telemetry
on, every seed GRAFTING so every child runs), device-side (CUPTI, median), on
`--rows` x D activations. The winners go into `_DEFAULT_CONFIGS` in `kernels/triton.py`.

  python benchmarks/tune_triton.py --dtypes f32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# XLA runs a `lax.cond`'s branches as CUDA-graph conditional nodes, whose kernels CUPTI
# reports as 0 ms: time without command buffers (every kernel a plain launch).
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kasmina_jax import blueprints as bp_lib  # noqa: E402
from kasmina_jax import layer as layer_lib  # noqa: E402
from kasmina_jax import lifecycle  # noqa: E402
from kasmina_jax.kernels import common  # noqa: E402
from kasmina_jax.kernels import triton as kt  # noqa: E402

# class -> (D, K) used to tune it
CLASSES = {"small": (4096, 64), "medium": (8192, 64), "wide": (4096, 16), "node": (4096, 4096),
           "narrow": (4096, 512)}
# a problem timed under another class's tiling: 512 seeds of 8 nodes take the small class's
SHAPE_CLASS = {"narrow": "small"}


def _c(br, t, w, s, prec=None, bn=None, spp=None, acc2d=None, joint=None):
  cfg = dict(BR=br, TILES=t, num_warps=w, num_stages=s)
  if acc2d:
    cfg["ACC2D"] = acc2d
  if joint:
    cfg["JOINT"] = joint
  if spp:
    cfg["SPP"] = spp
  if prec:
    cfg["PREC"] = prec
  if bn:
    cfg["BN"] = bn
  return cfg


# JOINT: the forward's per-tile column sums in one multi-operand reduction (one exchange
# between warps); ACC2D: 1 kept per element, n > 1 folded to n rows, "fold" to the rows one
# pass of the threads covers (`triton.fold_rows`), reduced once per strip. The H100 sweep of
# 2026-12-06 with the folded sums: at 2 warps, f32 0.213 -> 0.205 ms all blending, bf16
# 0.215 -> 0.203 and, a tenth blending, 0.127 -> 0.108; bf16 folded to fewer rows than a pass
# (4 at 2 warps, 8 at 4) ran 2-4x slower. SPLIT (the dormant seeds in a kernel of their own)
# lost at every blending fraction in both dtypes and is gone.
SWEEP = {
    ("fwd", "small"): [_c(32, 16, 2, 2, acc2d=1), _c(32, 16, 2, 2, acc2d="fold"),
                       _c(32, 16, 2, 3, acc2d="fold"), _c(16, 32, 2, 2, acc2d="fold"),
                       _c(32, 8, 2, 2, acc2d="fold"), _c(32, 16, 4, 2, acc2d="fold"),
                       _c(64, 16, 2, 3, joint=1)],
    ("fwd", "medium"): [_c(16, 16, 4, 2), _c(32, 16, 2, 2), _c(32, 16, 4, 2), _c(64, 8, 2, 3)],
    ("fwd", "wide"): [_c(32, 16, 4, 2), _c(16, 32, 4, 2, acc2d=1), _c(16, 32, 4, 2, acc2d="fold"),
                      _c(16, 32, 4, 2, acc2d=8), _c(16, 16, 4, 2, acc2d="fold")],
    # per node, 2-D tiles and one hidden unit at a time (sm_90 registers, f32 / bf16: 80 / 80
    # at (8, 32) nodes and 2 warps, 128 / 174 at (32, 32), ~250 at 64 nodes and 4 warps)
    ("fwd", "node"): [_c(32, 8, 2, 2, bn=32, acc2d="fold"), _c(32, 16, 2, 2, bn=32, acc2d="fold"),
                      _c(64, 4, 4, 2, bn=64, acc2d="fold"), _c(32, 8, 4, 2, bn=64, acc2d="fold"),
                      _c(64, 8, 2, 2, bn=32, acc2d="fold"), _c(16, 16, 2, 2, bn=32, acc2d="fold"),
                      _c(32, 8, 2, 2, bn=32)],
    # sm_90 spill stack in f32: 208 B at (32, 32, 2 warps), 152 B at (16, 64, 2), none at
    # (16, 64, 4); on the H100 (2026-12-06) the spill-free tilings ran 2.8x slower (0.86 ms
    # against 0.31): the 4-warp programs hold the same gradient accumulators at half the
    # programs per multiprocessor. bf16 at (64, 16, 2) ran 0.163 ms against 0.188 with the
    # residual MLP children timed here, but with a catalog of every kind of child
    # (`triton_regs.py --catalog full`) ptxas spills 4984 B a thread there (672 B at
    # (32, 32, 2)), so the default stays (32, 32, 2).
    ("bwd", "small"): [_c(32, 32, 2, 2), _c(64, 16, 2, 2), _c(32, 16, 4, 2), _c(16, 64, 4, 2),
                       _c(16, 64, 2, 2), _c(16, 32, 4, 2)],
    ("bwd", "medium"): [_c(16, 32, 4, 2), _c(16, 32, 2, 2), _c(32, 16, 2, 2)],
    # 256-node chunks, two launches (input and output side); sm_90 f32: the input side spills
    # 248 B at (16, 32, 4 warps), 160 B at 8 warps; the output side nothing
    ("bwd", "wide"): [_c(16, 32, 4, 2), _c(16, 32, 8, 2), _c(16, 16, 8, 2), _c(32, 16, 8, 2),
                      _c(16, 16, 4, 2)],
    ("bwd", "node"): [_c(8, 32, 4, 2, bn=32), _c(4, 64, 4, 2, bn=64), _c(8, 16, 4, 2, bn=64),
                      _c(4, 64, 2, 2, bn=32)],
}


def full_config(cfg):
  """A sweep's configuration as an override: it replaces the default's switches (ACC2D,
  JOINT, SPP), not only its tiling."""
  return {"ACC2D": 0, "JOINT": 0, "SPP": 1, **cfg}


def problem(rows, dim, k, dtype, active=1.0):
  """Every seed GRAFTING (its child blends), or with `active` < 1 the first round(k * active)
  of them and the rest DORMANT."""
  rng = np.random.default_rng(0)
  bp = bp_lib.Blueprint("residual_mlp", hidden=16, activation="relu")
  spec = layer_lib.KasminaSpec(dim=dim, num_seeds=k, blueprints=(bp,), corr_rows=0)
  params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32),
                        layer_lib.init_children(spec))
  n_live = int(round(k * active))
  stage = jnp.where(jnp.arange(k) < n_live, int(lifecycle.Stage.GRAFTING),
                    int(lifecycle.Stage.DORMANT)).astype(jnp.int32)
  seeds = lifecycle.init_seed_state(k).replace(
      stage=stage,
      blueprint=jnp.zeros((k,), jnp.int32), alpha=jnp.full((k,), 0.5, jnp.float32))
  seed_in = common.seed_inputs(spec, seeds)
  x = jnp.asarray(rng.standard_normal((rows, dim)), dtype)
  ct = jnp.asarray(rng.standard_normal((rows, dim)), dtype)
  shift = jnp.zeros((k, spec.chunk_width), jnp.float32)
  return spec, params, seed_in, x, ct, shift


def measure(fn, args, iterations=10, repeats=3, warmup_s=0.05):
  """Median device time (ms) over repeats x iterations calls, and the (min, max) spread.
  Each configuration first runs for `warmup_s` seconds: an idle GPU clocks down (345 MHz
  SM clock seen at rest), and the first calls of a cold configuration ran 2-3x slower."""
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  t_end = time.time() + warmup_s
  while time.time() < t_end:
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    _, t = profiler.measure(fn, aggregate=True, iterations=iterations)(*args)
    samples.extend(t)
  kernel = []
  for _ in range(repeats):
    _, per_kernel = profiler.measure(fn, aggregate=False)(*args)
    kernel.append(sum(t for name, t in per_kernel if name.startswith(("fwd_", "bwd_"))))
  return (float(np.median(samples)), (float(np.min(samples)), float(np.max(samples))),
          float(np.median(kernel)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=16384)
  p.add_argument("--dtypes", default="f32,bf16")
  p.add_argument("--classes", default="small,wide,node,medium")
  p.add_argument("--kinds", default="fwd,bwd")
  p.add_argument("--active", type=float, default=1.0,
                 help="fraction of seeds blending; the rest dormant")
  p.add_argument("--out", default=os.environ.get("OUT") or "")
  p.add_argument("--configs", default="",
                 help="a JSON list of configurations to run instead of the sweep's")
  p.add_argument("--plain-calls", type=int, default=0,
                 help="only call each configuration this many times, untimed (under ncu)")
  a = p.parse_args()
  results = []
  winners = {}  # "kind/class/dtype" -> the fastest configuration (bench_layer --triton-configs)
  t0 = time.time()
  for dname in a.dtypes.split(","):
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dname]
    for cls in a.classes.split(","):
      dim, k = CLASSES[cls]
      spec, params, seed_in, x, ct, shift = problem(a.rows, dim, k, dtype, a.active)
      shape_cls = SHAPE_CLASS.get(cls, cls)  # the class whose tiling (and sweep) it takes
      assert kt.shape_class(spec) == shape_cls, (cls, kt.shape_class(spec))
      nbytes = x.size * x.dtype.itemsize
      for kind in a.kinds.split(","):
        best = None
        if not a.configs and (kind, shape_cls) not in SWEEP:
          print(f"{dname} {cls} {kind}: no sweep (no Triton kernel: the jnp contract runs)")
          continue
        for cfg in (json.loads(a.configs) if a.configs else SWEEP[(kind, shape_cls)]):
          kt.CONFIG_OVERRIDES.clear()
          kt.CONFIG_OVERRIDES[(kind, shape_cls)] = full_config(cfg)
          try:
            if kind == "fwd":
              fn = jax.jit(lambda x_, p_: kt._forward_impl(spec, True, x_, p_, seed_in, None, shift))  # pylint: disable=protected-access
              args = (x, params)
              passes = 2
            else:
              ok = jnp.ones((k,), bool)
              r2 = jnp.full((k,), 0.01, jnp.float32)
              fn = jax.jit(lambda x_, p_, c_: kt._backward_impl(spec, x_, p_, seed_in, None, ok, c_, r2))  # pylint: disable=protected-access
              args = (x, params, ct)
              passes = 2  # read x, read ct; no dx write (blending seeds)
            if a.plain_calls:
              for _ in range(a.plain_calls):
                jax.block_until_ready(fn(*args))
              print(f"{dname} {cls} {kind} {json.dumps(cfg)}: {a.plain_calls} calls", flush=True)
              continue
            # The backward's input gradient aliases the cotangent, a live argument here, so
            # XLA copies it first: `kernel_ms` (the Triton kernel alone) is the figure to rank.
            ms, spread, kernel_ms = measure(fn, args)
            if not kernel_ms:
              raise RuntimeError("no Triton kernel ran: this class takes the jnp contract "
                                 "under XLA (triton.MAX_INLINE_CHUNK)")
            gbps = passes * nbytes / kernel_ms / 1e6
            msg = (f"{ms:.4f} ms ({spread[0]:.4f}..{spread[1]:.4f}), kernel {kernel_ms:.4f} ms "
                   f"{gbps:.0f} GB/s")
          except Exception as e:  # pylint: disable=broad-except
            ms, gbps, spread, kernel_ms, msg = None, None, None, None, f"FAILED {type(e).__name__}: {str(e)[:200]}"
          rec = dict(dtype=dname, cls=cls, kind=kind, cfg=cfg, ms=ms, spread=spread,
                     kernel_ms=kernel_ms, gbps=gbps)
          results.append(rec)
          print(f"{dname} {cls:<6} {kind} {json.dumps(cfg)} {msg}  [{time.time() - t0:.0f}s]",
                flush=True)
          if ms is not None and (best is None or kernel_ms < best["kernel_ms"]):
            best = rec
        if best:
          winners[f"{kind}/{cls}/{jnp.dtype(dtype).name}"] = best["cfg"]
          if a.out:  # after every class: a run cut short keeps what it found
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "tune_triton_best.json"), "w") as fh:
              json.dump(winners, fh, indent=1)
          print(f"BEST {dname} {cls} {kind}: {json.dumps(best['cfg'])} {best['kernel_ms']:.4f} ms "
                f"{best['gbps']:.0f} GB/s", flush=True)
  kt.CONFIG_OVERRIDES.clear()
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "tune_triton.json"), "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
