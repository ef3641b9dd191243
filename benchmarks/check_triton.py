"""Checks the Triton path (`impl="triton"`) against the `jnp` reference, on the GPU.

The Triton kernels cannot run in CI (no GPU), so this script is their test: on fresh random
inputs, for several shapes (uneven splits, per-node mode, a wide chunk), every stage mixed in
one layer, every blueprint of the default catalog (+ a parallel one), float32 and bfloat16,
it compares the output, the telemetry sums, the aux fields and every gradient (`x`, every
child parameter, the host input `u`), under `jit`, and once under `vmap` and with a
non-finite child. Prints the max relative error per case and a verdict; exits 1 on failure.

  python benchmarks/check_triton.py                # on the GPU (needs jax-triton)
  python benchmarks/check_triton.py --interpret    # on the CPU, Triton's interpreter
                                                   # (needs triton; small shapes only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--interpret", action="store_true")
  p.add_argument("--out", default=os.environ.get("OUT") or "")
  p.add_argument("--only", default="", help="comma list of case names")
  return p.parse_args(argv)


ARGS = parse_args()
if ARGS.interpret:
  import triton_interpret  # pylint: disable=g-import-not-at-top
  triton_interpret.install()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kasmina_jax import blueprints as bp_lib  # noqa: E402
from kasmina_jax import layer as layer_lib  # noqa: E402
from kasmina_jax import lifecycle  # noqa: E402
from kasmina_jax.kernels import common  # noqa: E402
from kasmina_jax.kernels import triton as ktriton  # noqa: E402

# (name, rows, dim, num_seeds, dtype, parallel)
GPU_CASES = [
    ("even_64x64_f32", 4096, 4096, 64, "f32", False),
    ("even_64x64_bf16", 4096, 4096, 64, "bf16", False),
    ("uneven_1000_7_f32", 1000, 1000, 7, "f32", True),
    ("uneven_1000_7_bf16", 1000, 1000, 7, "bf16", True),
    ("uneven_130_3_f32", 777, 130, 3, "f32", False),
    ("small_chunks_96_24_f32", 512, 96, 24, "f32", False),
    ("wide_1024_4_f32", 2048, 1024, 4, "f32", False),
    ("wide_4096_4_f32_fallback", 512, 4096, 2, "f32", False),
    ("pernode_512_f32", 1000, 512, 512, "f32", True),
    ("pernode_512_bf16", 1000, 512, 512, "bf16", False),
    ("pernode_4096_f32", 4096, 4096, 4096, "f32", False),
]
INTERPRET_CASES = [
    ("uneven_70_3_f32", 40, 70, 3, "f32", True),
    ("even_64_4_f32", 33, 64, 4, "f32", False),
    ("pernode_40_f32", 20, 40, 40, "f32", True),
]
DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}
TOL = {"f32": 1e-5, "bf16": 1e-2}


def make_case(rows, dim, k, dtype, parallel, seed):
  rng = np.random.default_rng(seed)
  din = 24 if parallel else None
  bps = bp_lib.default_blueprints(parallel_hidden=8 if parallel else None)
  spec = layer_lib.KasminaSpec(dim=dim, num_seeds=k, blueprints=bps, input_dim=din,
                               corr_rows=64)
  nb = len(bps)
  params = layer_lib.init_children(spec)
  params = jax.tree.map(
      lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), jnp.float32), params)
  stages = rng.integers(0, len(lifecycle.Stage), size=k)
  stages[: min(k, len(lifecycle.Stage))] = np.arange(min(k, len(lifecycle.Stage)))  # all stages
  seeds = lifecycle.init_seed_state(k).replace(
      stage=jnp.asarray(stages, jnp.int32),
      blueprint=jnp.asarray(rng.integers(0, nb, size=k), jnp.int32),
      alpha=jnp.asarray(rng.uniform(0.05, 0.95, size=k), jnp.float32))
  x = jnp.asarray(rng.standard_normal((rows, dim)), DT[dtype])
  # a few exact zeros so the dead counts are exercised
  x = x.at[:3, :5].set(0)
  u = jnp.asarray(rng.standard_normal((rows, din)), DT[dtype]) if parallel else None
  ct = jnp.asarray(rng.standard_normal((rows, dim)), DT[dtype])
  return spec, params, seeds, x, u, ct


def run_layer(spec, params, seeds, x, u, ct, fused, tel, eval_alpha=None):
  def loss_fn(x_, p_, u_):
    if fused is None:  # the layer's own reference: the contract
      out, aux = layer_lib.forward_reference(spec, p_, seeds, x_, u=u_, telemetry=tel,
                                             eval_alpha=eval_alpha)
    else:
      out, aux = common.forward(spec, p_, seeds, x_, u=u_, telemetry=tel,
                                eval_alpha=eval_alpha, fused=fused)
    val = jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)) + aux.child_loss
    return val, (out, aux)
  (val, (out, aux)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
      x, params, u)
  return out, aux, grads


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if a.shape != b.shape:
    return float("inf")
  fin = np.isfinite(b)
  if not np.array_equal(np.isfinite(a), fin):
    return float("inf")
  a, b = np.where(fin, a, 0), np.where(fin, b, 0)
  nb = np.linalg.norm(b)
  na = np.linalg.norm(a - b)
  return float(na / nb) if nb > 0 else float(na)


def compare(got, ref):
  (o1, a1, g1), (o2, a2, g2) = got, ref
  errs = {"out": rel(o1, o2), "child_loss": rel(a1.child_loss, a2.child_loss),
          "objective": rel(a1.objective, a2.objective),
          "recon_ratio": rel(a1.recon_ratio, a2.recon_ratio),
          "nonfinite": float(not np.array_equal(np.asarray(a1.nonfinite), np.asarray(a2.nonfinite)))}
  if a2.telemetry is not None:
    for f in ("sum", "sumsq", "dead", "corr_sum", "gram", "count"):
      errs["tel_" + f] = rel(getattr(a1.telemetry, f), getattr(a2.telemetry, f))
  errs["dx"] = rel(g1[0], g2[0])
  for f in ("w1", "w1u", "b1", "wg", "bg", "w2", "b2", "s"):
    errs["d_" + f] = rel(getattr(g1[1], f), getattr(g2[1], f))
  if g2[2] is not None:
    errs["du"] = rel(g1[2], g2[2])
  return errs


def main():
  cases = INTERPRET_CASES if ARGS.interpret else GPU_CASES
  if ARGS.only:
    keep = set(ARGS.only.split(","))
    cases = [c for c in cases if c[0] in keep]
  fused_t = ktriton.fused_blend
  fused_r = None  # layer.forward_reference
  results = {}
  ok_all = True
  for i, (name, rows, dim, k, dtype, parallel) in enumerate(cases):
    spec, params, seeds, x, u, ct = make_case(rows, dim, k, dtype, parallel, seed=i)
    tel = layer_lib.init_telemetry(spec)
    variants = {"train": dict(tel=tel), "eval": dict(tel=None, eval_alpha=0.7)}
    for vname, kw in variants.items():
      f_t = jax.jit(lambda x_, p_, u_, kw=kw: run_layer(spec, p_, seeds, x_, u_, ct, fused_t, **kw))
      f_r = jax.jit(lambda x_, p_, u_, kw=kw: run_layer(spec, p_, seeds, x_, u_, ct, fused_r, **kw))
      errs = compare(f_t(x, params, u), f_r(x, params, u))
      worst = max(errs.values())
      passed = worst <= TOL[dtype] * (5 if dtype == "f32" else 1)
      ok_all &= passed
      key = f"{name}/{vname}"
      results[key] = {"max": worst, "pass": bool(passed), "errors": errs}
      top = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
      print(f"{key:<40} max rel err {worst:.2e} {'PASS' if passed else 'FAIL'}  worst: "
            + ", ".join(f"{kk}={v:.1e}" for kk, v in top), flush=True)

  # vmap over a batch of inputs (stacked steps) and a non-finite child.
  name, rows, dim, k, dtype, parallel = cases[0]
  spec, params, seeds, x, u, ct = make_case(rows, dim, k, dtype, parallel, seed=99)
  tel = layer_lib.init_telemetry(spec)
  xs = jnp.stack([x, x * 0.5 + 0.1])
  us = None if u is None else jnp.stack([u, u])

  def batched(fused):
    if fused is None:
      f = lambda xx, uu: layer_lib.forward_reference(spec, params, seeds, xx, u=uu,
                                                     telemetry=tel)[0]
    else:
      f = lambda xx, uu: common.forward(spec, params, seeds, xx, u=uu, telemetry=tel,
                                        fused=fused)[0]
    return jax.jit(jax.vmap(f))(xs, us)
  e = rel(batched(fused_t), batched(fused_r))
  passed = e <= TOL[dtype] * 5
  ok_all &= passed
  results["vmap"] = {"max": e, "pass": bool(passed)}
  print(f"{'vmap over 2 inputs':<40} max rel err {e:.2e} {'PASS' if passed else 'FAIL'}")

  live = np.asarray(common.seed_inputs(spec, seeds).live) > 0
  bad = int(np.argmax(live))
  params_bad = params.replace(b2=params.b2.at[bad].set(jnp.inf))
  got = jax.jit(lambda: run_layer(spec, params_bad, seeds, x, u, ct, fused_t, tel))()
  ref = jax.jit(lambda: run_layer(spec, params_bad, seeds, x, u, ct, fused_r, tel))()
  errs = compare(got, ref)
  finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(got[2]))
  flagged = bool(got[1].nonfinite[bad])
  e = max(errs.values())
  passed = e <= TOL[dtype] * 5 and finite and flagged
  ok_all &= passed
  results["nonfinite_child"] = {"max": e, "pass": bool(passed), "grads_finite": finite,
                                "flagged": flagged}
  if e > TOL[dtype]:
    print({kk: v for kk, v in errs.items() if v > TOL[dtype]})
  print(f"{'non-finite child (seed %d)' % bad:<40} max rel err {e:.2e} grads finite {finite} "
        f"flagged {flagged} {'PASS' if passed else 'FAIL'}")

  if ARGS.out:
    os.makedirs(ARGS.out, exist_ok=True)
    with open(os.path.join(ARGS.out, "check_triton.json"), "w") as fh:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "results": results}, fh, indent=1)
  print("ALL PASS" if ok_all else "SOME FAILED")
  sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
  main()
