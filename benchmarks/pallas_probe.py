"""GPU probe of the Pallas kernels: compile, check against the reference, time.

Run on the device machine (jax with CUDA):  python3 benchmarks/pallas_probe.py [case ...]
Cases: see CASES below. Prints one line a (case, dtype): errors against `forward_reference`
(forward, aux, telemetry, gradients) and device times (CUPTI, median) of the Pallas path, the
`jnp` reference under XLA and `x * 2` (the copy floor), forward and forward+backward.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Import the submodules without the package's __init__ (it pulls optax and friends).
_pkg = types.ModuleType("kasmina_jax")
_pkg.__path__ = [os.path.join(ROOT, "kasmina_jax")]
sys.modules.setdefault("kasmina_jax", _pkg)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kasmina_jax import blueprints as bp  # noqa: E402
from kasmina_jax import layer, lifecycle  # noqa: E402
from kasmina_jax.kernels import common  # noqa: E402
from kasmina_jax.kernels import pallas as kp  # noqa: E402

try:
  from jax.experimental.mosaic.gpu import profiler
except Exception:  # pylint: disable=broad-except
  profiler = None

ITER = int(os.environ.get("PROBE_ITERS", "50"))
MLP16 = (bp.Blueprint("residual_mlp16", hidden=16, activation="relu"),)

# name: (rows, dim, seeds, blueprints, stage mix)
CASES = {
    "64x64": (16384, 4096, 64, MLP16, "grafting"),
    "16x256": (16384, 4096, 16, MLP16, "grafting"),
    "node": (16384, 4096, 4096, MLP16, "grafting"),
    "mixed64": (16384, 4096, 64, bp.default_blueprints(), "mixed"),
    "dormant64": (16384, 4096, 64, MLP16, "dormant"),
    "small": (1000, 256, 4, bp.default_blueprints(), "mixed"),
    "uneven": (16384, 4000, 64, bp.default_blueprints(), "mixed"),
    "odd": (1000, 100, 3, bp.default_blueprints(), "mixed"),
}


def make(n, d, k, bps, mix, dtype, key):
  spec = layer.KasminaSpec(dim=d, num_seeds=k, blueprints=bps, corr_rows=256)
  ks = jax.random.split(key, 6)
  seeds = lifecycle.init_seed_state(k)
  if mix == "grafting":
    stage = jnp.full((k,), 3, jnp.int32)
  elif mix == "dormant":
    stage = jnp.zeros((k,), jnp.int32)
  else:
    stage = jax.random.randint(ks[0], (k,), 0, 11)
  bpid = jax.random.randint(ks[1], (k,), 0, len(bps))
  seeds = seeds.replace(stage=stage, blueprint=bpid, alpha=jax.random.uniform(ks[2], (k,)))
  params = layer.init_children(spec)
  params = layer.germinate_children(spec, params, jnp.ones((k,), bool), bpid, ks[3])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(ks[4], len(leaves))
  leaves = [p + 0.1 * jax.random.normal(kk, p.shape) for p, kk in zip(leaves, keys)]
  params = jax.tree.unflatten(tree, leaves)
  x = jax.random.normal(ks[5], (n, d), jnp.float32).astype(dtype)
  return spec, params, seeds, x


def rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.dtype == bool or b.dtype == bool:
    return float((a != b).any())
  ok = np.isfinite(b)
  if not np.array_equal(np.isfinite(a), ok):
    return float("inf")
  num = np.linalg.norm((a - b)[ok])
  den = np.linalg.norm(b[ok])
  return float(num / den) if den > 0 else float(num)


def timed(f, *args):
  if profiler is None or jax.default_backend() != "gpu":
    return float("nan")
  _, t = profiler.measure(f, aggregate=True, iterations=ITER)(*args)
  if t is None:
    return float("nan")
  return float(np.median(np.asarray(t)))


def run_case(name, dtype, out_rows):
  n, d, k, bps, mix = CASES[name]
  spec, params, seeds, x = make(n, d, k, bps, mix, dtype, jax.random.PRNGKey(0))
  tel = layer.init_telemetry(spec)
  ct = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float32).astype(dtype)
  fused = kp.fused_blend

  def fwd_ref(params, x):
    return layer.forward_reference(spec, params, seeds, x, telemetry=tel)

  def fwd_pl(params, x):
    return common.forward(spec, params, seeds, x, telemetry=tel, fused=fused)

  def loss(fwd):
    def f(params, x):
      out, aux = fwd(params, x)
      return jnp.vdot(out.astype(jnp.float32), ct.astype(jnp.float32)) + aux.child_loss
    return jax.jit(jax.grad(f, argnums=(0, 1)))

  row = {"case": name, "dtype": jnp.dtype(dtype).name}
  t0 = time.time()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = jax.block_until_ready(jax.jit(fwd_pl)(params, x))
  row["compile_fwd_s"] = round(time.time() - t0, 1)
  row["warnings"] = sorted({f"{w.category.__name__}@{os.path.basename(w.filename)}:{w.lineno}: "
                            f"{str(w.message)[:60]}" for w in caught})
  ref = jax.jit(fwd_ref)(params, x)
  row["err_out"] = rel(got[0], ref[0])
  row["nan_out"] = bool(np.isnan(np.asarray(got[0], np.float32)).any())
  aux_err = 0.0
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
    aux_err = max(aux_err, rel(a, b))
  row["err_aux"] = aux_err
  t0 = time.time()
  g_pl = jax.block_until_ready(loss(fwd_pl)(params, x))
  row["compile_bwd_s"] = round(time.time() - t0, 1)
  g_ref = loss(fwd_ref)(params, x)
  row["err_grad"] = max(rel(a, b) for a, b in zip(jax.tree.leaves(g_pl), jax.tree.leaves(g_ref)))
  row["err_dx"] = rel(g_pl[1], g_ref[1])
  floor = jax.jit(lambda x: x * 2)
  row["t_copy"] = timed(floor, x)
  row["t_pl_fwd"] = timed(jax.jit(fwd_pl), params, x)
  row["t_ref_fwd"] = timed(jax.jit(fwd_ref), params, x)
  row["t_pl_fb"] = timed(loss(fwd_pl), params, x)
  row["t_ref_fb"] = timed(loss(fwd_ref), params, x)
  row["frac_fwd"] = row["t_copy"] / row["t_pl_fwd"]
  out_rows.append(row)
  print(json.dumps(row), flush=True)


def main():
  names = [a for a in sys.argv[1:] if a in CASES] or list(CASES)
  dtypes = [jnp.float32, jnp.bfloat16]
  if "--f32" in sys.argv:
    dtypes = [jnp.float32]
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  rows = []
  for name in names:
    for dtype in dtypes:
      try:
        run_case(name, dtype, rows)
      except Exception as e:  # pylint: disable=broad-except
        msg = f"{type(e).__name__}: {e}"
        print(json.dumps({"case": name, "dtype": jnp.dtype(dtype).name, "error": msg[-3000:]}),
              flush=True)
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "probe.json"), "w") as fh:
      json.dump(rows, fh, indent=1)
  print(f"{'case':10s} {'dtype':8s} {'err_out':>8s} {'err_grad':>8s} {'copy':>7s} {'pl_fwd':>7s} "
        f"{'ref_fwd':>7s} {'frac':>5s} {'pl_fb':>7s} {'ref_fb':>7s}")
  for r in rows:
    print(f"{r['case']:10s} {r['dtype']:8s} {r['err_out']:8.1e} {r['err_grad']:8.1e} "
          f"{r['t_copy']:7.3f} {r['t_pl_fwd']:7.3f} {r['t_ref_fwd']:7.3f} {r['frac_fwd']:5.2f} "
          f"{r['t_pl_fb']:7.3f} {r['t_ref_fb']:7.3f}")


if __name__ == "__main__":
  main()
