"""The reference probe of docs/design.md ("Performance model"): a 60-line Triton forward
of the chunked layer with a residual ReLU MLP child on every seed (alpha-blended, TF32 dots),
with per-node sum, sum of squares and dead counts, no stage logic. `bench_layer.py` times it
beside the library as the bar to beat (`--impls probe`).
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import triton
import triton.language as tl


@triton.jit
def chunk_fwd(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, a_ptr, o_ptr, ps_ptr, pq_ptr, pd_ptr,
              M: tl.constexpr, D: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
              BM: tl.constexpr, RB: tl.constexpr, SPP: tl.constexpr):
  pid_m = tl.program_id(0)
  pid_s = tl.program_id(1)
  cn = tl.arange(0, N)
  hs = tl.arange(0, H)
  for j in tl.static_range(SPP):
    s = pid_s * SPP + j
    col = s * N + cn
    a = tl.load(a_ptr + s)
    w1 = tl.load(w1_ptr + s * N * H + cn[:, None] * H + hs[None, :])
    b1 = tl.load(b1_ptr + s * H + hs).to(tl.float32)
    w2 = tl.load(w2_ptr + s * H * N + hs[:, None] * N + cn[None, :])
    b2 = tl.load(b2_ptr + s * N + cn).to(tl.float32)
    acc_s = tl.zeros((N,), tl.float32)
    acc_q = tl.zeros((N,), tl.float32)
    acc_d = tl.zeros((N,), tl.float32)
    for r in range(RB):
      rows = (pid_m * RB + r) * BM + tl.arange(0, BM)
      xt = tl.load(x_ptr + rows[:, None] * D + col[None, :])
      h = tl.dot(xt, w1) + b1[None, :]
      h = tl.maximum(h, 0.0)
      y = tl.dot(h.to(w2.dtype), w2) + b2[None, :]
      o = xt.to(tl.float32) + a * y
      tl.store(o_ptr + rows[:, None] * D + col[None, :], o.to(xt.dtype))
      acc_s += tl.sum(o, 0)
      acc_q += tl.sum(o * o, 0)
      acc_d += tl.sum(tl.where(o <= 0.0, 1.0, 0.0), 0)
    tl.store(ps_ptr + pid_m * D + col, acc_s)
    tl.store(pq_ptr + pid_m * D + col, acc_q)
    tl.store(pd_ptr + pid_m * D + col, acc_d)


def make(M, D, K, H, BM, RB, SPP, warps, stages):
  import jax_triton as jt  # pylint: disable=g-import-not-at-top
  N = D // K
  MB = M // (BM * RB)

  def f(x, w1, b1, w2, b2, a):
    o, ps, pq, pd = jt.triton_call(
        x, w1, b1, w2, b2, a, kernel=chunk_fwd,
        out_shape=[jax.ShapeDtypeStruct((M, D), x.dtype)]
        + [jax.ShapeDtypeStruct((MB, D), jnp.float32)] * 3,
        grid=(MB, K // SPP), num_warps=warps, num_stages=stages,
        M=M, D=D, N=N, H=H, BM=BM, RB=RB, SPP=SPP)
    return o, ps.sum(0), pq.sum(0), pd.sum(0)

  return jax.jit(f)


# (BM, RB, SPP, num_warps, num_stages): the probe's own sweep with PROBE_FULL=1, else a short
# one around its best configurations.
FULL_SWEEP = [c for c in itertools.product((32, 64, 128), (4, 16), (1, 2), (4, 8), (2, 3))
              if not ((c[0] == 32 and c[3] == 8) or (c[0] == 128 and c[3] == 4))]
SHORT_SWEEP = [(64, 16, 1, 4, 2), (64, 4, 1, 4, 2), (64, 16, 2, 4, 3), (32, 16, 1, 4, 2),
               (32, 16, 2, 4, 3), (128, 4, 1, 8, 2), (128, 16, 1, 8, 3), (64, 4, 2, 8, 2)]
CONFIGS = FULL_SWEEP if os.environ.get("PROBE_FULL") else SHORT_SWEEP
