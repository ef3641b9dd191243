"""The per-step telemetry pass of a Kasmina layer: formulations of the same sums, timed.

The pass reads the layer's activations (N, K, c) once a step for the per-node sums of
`a - shift`, of its square and of the dead-node counts, plus the Gram matrix on the first
`corr_rows` rows. How XLA fuses those decides whether it reads the activations once or
materialises `a - shift` and the dead mask first (issue 19's profile). Each variant is timed
on the device (CUPTI kernel times, `overhead.kernel_times`) with a ReLU producer in the same
program (as in the layer), checked against the library's `telemetry.partials_reference`.

    python benchmarks/bench_telemetry.py --rows 1024,8192 --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kasmina_jax import telemetry as tel_lib  # noqa: E402
import overhead  # noqa: E402

HI = jax.lax.Precision.HIGHEST
EPS = tel_lib.DEAD_EPS


def v_library(a, shift, m):
  p = tel_lib.partials_reference(a, shift, corr_rows=m, correlation=True)
  return p.sum, p.sumsq, p.dead, p.corr_sum, p.gram


def v_split_gram(a, shift, m):
  """The Gram's rows shifted on their own: `a - shift` has one consumer (the sums)."""
  d = a - shift[None]
  ds = a[:m] - shift[None]
  gram = jnp.einsum("nki,nkj->kij", ds, ds, precision=HI)
  dead = jnp.where(jnp.abs(a) <= EPS, 1.0, 0.0)
  return d.sum(0), (d * d).sum(0), dead.sum(0), ds.sum(0), gram


def v_split_2d(a, shift, m):
  """As `split_gram`, the sums over a 2-D (N, K*c) view."""
  n, k, c = a.shape
  a2 = a.reshape(n, k * c)
  s2 = shift.reshape(1, k * c)
  d = a2 - s2
  ds = a[:m] - shift[None]
  gram = jnp.einsum("nki,nkj->kij", ds, ds, precision=HI)
  dead = jnp.where(jnp.abs(a2) <= EPS, 1.0, 0.0)
  r = lambda x: x.sum(0).reshape(k, c)
  return r(d), r(d * d), r(dead), ds.sum(0), gram


def v_stacked(a, shift, m):
  """One reduction over a stacked (N, K, c, 3) operand."""
  d = a - shift[None]
  ds = a[:m] - shift[None]
  gram = jnp.einsum("nki,nkj->kij", ds, ds, precision=HI)
  dead = jnp.where(jnp.abs(a) <= EPS, 1.0, 0.0)
  s = jnp.stack([d, d * d, dead], -1).sum(0)
  return s[..., 0], s[..., 1], s[..., 2], ds.sum(0), gram


def v_row_blocks(a, shift, m, block=32):
  """Two-stage: sums over blocks of `block` rows, then over the blocks."""
  n, k, c = a.shape
  d = a - shift[None]
  ds = a[:m] - shift[None]
  gram = jnp.einsum("nki,nkj->kij", ds, ds, precision=HI)
  dead = jnp.where(jnp.abs(a) <= EPS, 1.0, 0.0)
  if n % block:
    return d.sum(0), (d * d).sum(0), dead.sum(0), ds.sum(0), gram
  r = lambda x: x.reshape(n // block, block, k, c).sum(1).sum(0)
  return r(d), r(d * d), r(dead), ds.sum(0), gram


VARIANTS = {"library": v_library, "split_gram": v_split_gram, "split_2d": v_split_2d,
            "stacked": v_stacked, "row_blocks": v_row_blocks}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", default="1024,8192")
  p.add_argument("--seeds", type=int, default=64)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--corr-rows", type=int, default=256)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  k, c, m = a.seeds, a.chunk, a.corr_rows
  records = []
  for n in [int(r) for r in a.rows.split(",")]:
    h = jax.random.normal(jax.random.key(0), (n, k * c), jnp.float32)
    shift = jax.random.normal(jax.random.key(1), (k, c), jnp.float32) * 0.1
    want = None
    for name, fn in [("relu only", None)] + list(VARIANTS.items()):
      def prog(h_, s_, fn=fn):
        act = jax.nn.relu(h_)  # the producer, as the layer's activation
        if fn is None:
          return act, ()
        return act, fn(act.reshape(n, k, c), s_, min(m, n))
      step = jax.jit(prog)
      out = step(h, shift)
      if fn is not None:
        got = [np.asarray(x, np.float64) for x in out[1]]
        if want is None:
          want = got
        err = max(float(np.max(np.abs(g - w) / (1.0 + np.abs(w)))) for g, w in zip(got, want))
      else:
        err = 0.0
      kt = overhead.kernel_times(step, h, shift)
      rec = {"rows": n, "variant": name, "max_rel_err": err,
             "ms": kt["total_ms"] if kt else None, "kernels": kt["launches"] if kt else None,
             "top": kt["top"][:8] if kt else None}
      records.append(rec)
      print(f"rows {n:5d} {name:12s} "
            + (f"{rec['ms'] * 1e3:8.1f} us in {rec['kernels']:2d} kernels" if kt else "(no GPU)")
            + f"  max rel err vs library {err:.1e}", flush=True)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{overhead.device_name()}_{datetime.date.today().isoformat()}"
                        "_bench_telemetry.json")
    with open(path, "w") as fh:
      json.dump({"records": records, "jax": jax.__version__}, fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
  main()
