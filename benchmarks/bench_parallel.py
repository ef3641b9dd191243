"""Parallel-wired children beside chunk-wired ones, on one GPU, in one run.

16384 rows, D = 4096, 64 seeds of 64 nodes, every seed GRAFTING (alpha 0.5) with a child of
hidden width 16: chunk-wired (`residual_mlp`: reads its chunk) or parallel-wired
(`parallel_mlp`: reads the wrapped host layer's 4096-wide input `u`; its first layer is one
GEMM `u @ W1u` over all seeds in XLA, the rest rides the fused kernel). Telemetry on,
Gram matrix off. Device-side medians (CUPTI) of the forward and of forward + backward
(gradients for `x`, `u` and every child parameter).

    python benchmarks/bench_parallel.py [--impls reference,pallas,triton] [--dtypes f32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kasmina_jax import blueprints, layer, lifecycle  # noqa: E402


def measure(fn, args, iterations=10, repeats=3):
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    _, t = profiler.measure(fn, aggregate=True, iterations=iterations)(*args)
    times.append(float(np.median(np.asarray(t))) if np.ndim(t) else float(t))
  return float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=16384)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--seeds", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=16)
  parser.add_argument("--impls", default="reference,pallas,triton")
  parser.add_argument("--dtypes", default="f32,bf16")
  parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  catalog = (blueprints.Blueprint("residual_mlp", hidden=args.hidden, activation="relu"),
             blueprints.Blueprint("parallel_mlp", hidden=args.hidden, activation="relu",
                                  wiring="parallel"))
  spec = layer.KasminaSpec(dim=args.dim, num_seeds=args.seeds, blueprints=catalog,
                           input_dim=args.dim, corr_rows=0)
  key = jax.random.key(0)
  records = []
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for dtype_name in args.dtypes.split(","):
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.rows, args.dim), dtype)
    u = jax.random.normal(jax.random.fold_in(key, 2), (args.rows, args.dim), dtype)
    for wiring, bp in (("chunk", 0), ("parallel", 1)):
      seeds = lifecycle.init_seed_state(args.seeds).replace(
          stage=jnp.full((args.seeds,), lifecycle.Stage.GRAFTING, jnp.int32),
          blueprint=jnp.full((args.seeds,), bp, jnp.int32),
          strategy=jnp.zeros((args.seeds,), jnp.int32),
          alpha=jnp.full((args.seeds,), 0.5, jnp.float32))
      params = layer.germinate_children(spec, layer.init_children(spec), True, bp,
                                        jax.random.fold_in(key, 3))
      # Non-zero last layers, so the blend is real work and checkable.
      params = params.replace(w2=jax.random.normal(jax.random.fold_in(key, 4), params.w2.shape) * 0.1)
      tel = layer.init_telemetry(spec)
      ref_out = None
      for impl in args.impls.split(","):
        def fwd(p, x, u, impl=impl, seeds=seeds):
          out, aux = layer.forward(spec, p, seeds, x, u=u, telemetry=tel, impl=impl)
          return out, aux.telemetry.sum

        def fwd_bwd(p, x, u, impl=impl, seeds=seeds):
          def loss(p, x, u):
            out, aux = layer.forward(spec, p, seeds, x, u=u, telemetry=tel, impl=impl)
            return 0.5 * jnp.sum(jnp.square(out.astype(jnp.float32))), aux.telemetry.sum
          return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(p, x, u)

        try:
          f1, f2 = jax.jit(fwd), jax.jit(fwd_bwd)
          out = f1(params, x, u)[0]
          if ref_out is None:
            ref_out = out
          err = float(jnp.linalg.norm((out - ref_out).astype(jnp.float32))
                      / jnp.linalg.norm(ref_out.astype(jnp.float32)))
          t_fwd = measure(f1, (params, x, u))
          t_bwd = measure(f2, (params, x, u))
        except Exception as e:  # noqa: BLE001  (an unavailable backend is reported, not fatal)
          print(f"  {impl:9s} {wiring:8s} {dtype_name}: skipped ({type(e).__name__}: {str(e)[:120]})")
          continue
        rec = {"impl": impl, "wiring": wiring, "dtype": dtype_name, "fwd_ms": t_fwd,
               "fwd_bwd_ms": t_bwd, "rel_err_vs_first": err}
        records.append(rec)
        print(f"  {impl:9s} {wiring:8s} {dtype_name}: fwd {t_fwd:.3f} ms  fwd+bwd {t_bwd:.3f} ms  err {err:.1e}",
              flush=True)
  with open(os.path.join(args.out, "bench_parallel.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "args": vars(args), "records": records}, fh, indent=1)
  print("\n| dtype | wiring | " + " | ".join(f"{i} fwd / fwd+bwd (ms)" for i in args.impls.split(",")) + " |")
  print("| --- | --- |" + " --- |" * len(args.impls.split(",")))
  for dtype_name in args.dtypes.split(","):
    for wiring in ("chunk", "parallel"):
      cells = []
      for impl in args.impls.split(","):
        r = [r for r in records if r["impl"] == impl and r["wiring"] == wiring and r["dtype"] == dtype_name]
        cells.append(f"{r[0]['fwd_ms']:.3f} / {r[0]['fwd_bwd_ms']:.3f}" if r else "–")
      print(f"| {dtype_name} | {wiring} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1:])
