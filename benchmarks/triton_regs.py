"""Compiles the Triton kernels ahead of time for a GPU on the CPU (no GPU, no jax-triton) and
prints each tiling's registers per thread, stack frame (where ptxas puts the registers it
spills) and shared memory, and the occupancy
those allow on an sm_90 multiprocessor (the H100 / H200).

Why: `ncu` on the H100 (2026-12-06) showed the tuned coarse forward at 255 registers a
thread, 12.5% theoretical occupancy (4 programs of 2 warps per multiprocessor) and half its
stalls waiting on global loads: too few loads in flight to cover HBM's latency. Registers
are a property of the compiled kernel, so they can be ranked here, at no GPU time, before a
sweep on the device (`tune_triton.py`) times the promising tilings.

  python benchmarks/triton_regs.py --classes small --kinds fwd --dtypes f32,bf16
  python benchmarks/triton_regs.py --classes small --kinds fwd --configs '[{"BR":32,...}]'
  python benchmarks/triton_regs.py --defaults-only    # what CI runs: every kernel compiles

It also reports a digest of the PTX without its line records (a refactor that leaves it
unchanged left the generated code as it was) and, for the coarse forward, how many folded
column sums cross threads in the compiler's actual layouts (`fold_exchanges`, 0 by design).

A stand-in `jax_triton.triton_call` captures each launch (kernel, pointer dtypes, constexprs,
warps, stages) inside `jax.eval_shape`, compiles it with `triton.compile` for
`GPUTarget("cuda", 90, 32)` (the pointers marked 16-byte aligned, as jax-triton does) and reads
the cubin's resource usage with the `cuobjdump` bundled with Triton.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int32": "*i32",
        "bool": "*i1"}
CAPTURED: list[dict] = []

# sm_90 limits per multiprocessor (CUDA occupancy calculator): registers are allocated per warp
# in units of 256, shared memory per program includes 1 KiB reserved by the driver.
SM90 = dict(regs=65536, warps=64, programs=32, smem=228 * 1024, reg_unit=256, smem_reserved=1024)


def _triton_call(*args, kernel, out_shape, grid, num_warps=4, num_stages=2,
                 input_output_aliases=None, **constexprs):
  del input_output_aliases
  outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
  pointers = [_PTR[jnp.dtype(a.dtype).name] for a in args + tuple(outs)]
  signature, consts = {}, {}
  for i, name in enumerate(kernel.arg_names):
    if i < len(pointers):
      signature[name] = pointers[i]
    else:
      signature[name] = "constexpr"
      consts[name] = constexprs[name]
  CAPTURED.append(dict(kernel=kernel, signature=signature, constexprs=consts,
                       num_warps=num_warps, num_stages=num_stages, n_pointers=len(pointers),
                       grid=tuple(int(g) for g in grid)))
  zeros = [jnp.zeros(o.shape, o.dtype) for o in outs]
  return zeros if isinstance(out_shape, (list, tuple)) else zeros[0]


def install_stand_in():
  sys.modules["jax_triton"] = types.SimpleNamespace(triton_call=_triton_call)


def occupancy(regs: int, warps: int, smem: int) -> dict:
  per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
  by_regs = SM90["regs"] // (per_warp * warps)
  by_warps = SM90["warps"] // warps
  by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
  programs = min(by_regs, by_warps, by_smem, SM90["programs"])
  limit = min((("registers", by_regs), ("warps", by_warps), ("shared memory", by_smem)),
              key=lambda t: t[1])[0]
  return dict(programs_per_sm=programs, occupancy=programs * warps / SM90["warps"], limit=limit)


def compile_launch(launch: dict) -> dict:
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.compiler import ASTSource  # pylint: disable=g-import-not-at-top
  attrs = {(i,): [["tt.divisibility", 16]] for i in range(launch["n_pointers"])}
  src = ASTSource(launch["kernel"], signature=launch["signature"],
                  constexprs=launch["constexprs"], attrs=attrs)
  compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=launch["num_warps"],
                                         num_stages=launch["num_stages"]))
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
  with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
    fh.write(compiled.asm["cubin"])
    fh.flush()
    usage = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True,
                           check=True).stdout
  m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
  regs, stack, static_smem, local = (int(v) for v in m.groups())
  smem = static_smem + int(compiled.metadata.shared)
  # Static counts in the PTX: warp shuffles and barriers are the exchanges between threads
  # and warps a reduction costs (a loop's count is its body's).
  ptx = compiled.asm["ptx"]
  return dict(regs=regs, stack=stack, local=local, smem=smem, shfl=ptx.count("shfl.sync"),
              bar=ptx.count("bar.sync"), ptx_sha256=ptx_digest(ptx),
              # the folded column sums exist in the coarse forward only (the per-node kernels
              # reduce (rows, nodes, hidden) tensors over their rows, not a fold)
              fold_exchanges=(fold_exchanges(compiled.asm["ttgir"])
                              if launch["kernel"].__name__ == "fwd_coarse" else 0),
              **occupancy(regs, launch["num_warps"], smem))


_LAYOUT_DEF = re.compile(r"^(#[\w.]+) = #ttg\.(blocked|linear)<\{(.*)\}>", re.M)
_REDUCE_TYPE = re.compile(r"^\s*\}\) : \(tensor<(\d+)x\d+x\d+x\w+, (#[\w.]+)>\)")


def fold_exchanges(ttgir: str) -> int:
  """How many of the kernel's folded column sums (`_acc` with ACC2D > 1: a (n, rows/n,
  columns) view of a tile reduced over its first axis) cross threads: the reduced axis of
  the view's layout has lanes or warps along it (a blocked layout with threadsPerWarp[0] or
  warpsPerCTA[0] above 1, a linear layout with a lane or warp basis vector along axis 0).
  `triton.fold_rows` picks the fold so that this is 0 with Triton 3.6's layouts; the count
  checks the pick against the compiler's actual layouts."""
  layouts = {}
  for name, kind, body in _LAYOUT_DEF.findall(ttgir):
    if kind == "blocked":
      tpw = [int(v) for v in re.search(r"threadsPerWarp = \[([\d, ]+)\]", body)[1].split(",")]
      wpc = [int(v) for v in re.search(r"warpsPerCTA = \[([\d, ]+)\]", body)[1].split(",")]
      layouts[name] = tpw[0] > 1 or wpc[0] > 1
    else:
      crossing = False
      for key in ("lane", "warp"):
        m = re.search(key + r" = \[(.*?)\]\]", body)
        if m:
          vectors = re.findall(r"\[([\d, ]+)\]", m[1] + "]")
          crossing |= any(int(v.split(",")[0]) != 0 for v in vectors)
      layouts[name] = crossing
  count = 0
  lines = ttgir.splitlines()
  for i, line in enumerate(lines):
    if '"tt.reduce"(' in line and "axis = 0 " in line:
      for follow in lines[i + 1:i + 12]:
        m = _REDUCE_TYPE.match(follow)
        if m:
          count += bool(layouts.get(m[2], True))
          break
        if follow.lstrip().startswith("})"):
          break
  return count


def ptx_digest(ptx: str) -> str:
  """A digest of the PTX's instructions, without its source-line records (`.loc`, `.file`,
  the `$L__tmp` labels that mark inlined functions, debug sections): equal digests before and
  after a change to the kernels' source mean the change left the generated code as it was (a
  refactor checked without a GPU)."""
  keep = []
  for line in ptx.splitlines():
    t = line.strip()
    if t.startswith(".section"):  # the debug sections, to the end
      break
    if t.startswith((".loc", ".file", "//", "$L__tmp")) or not t:
      continue
    keep.append(t)
  return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


def full_catalog_problem(spec, rows: int, kt):
  """`spec`'s shape with a catalog holding every kind of child, so every constexpr branch of
  the kernels (GLU gate, diagonal scale, the activations, `pre_u` of parallel wiring) is
  compiled."""
  from kasmina_jax import blueprints as bp  # pylint: disable=g-import-not-at-top
  from kasmina_jax import layer as layer_lib  # pylint: disable=g-import-not-at-top
  from kasmina_jax import lifecycle  # pylint: disable=g-import-not-at-top
  from kasmina_jax.kernels import common  # pylint: disable=g-import-not-at-top
  if spec.chunk_width == 1:
    catalog = (bp.Blueprint("node_relu", hidden=3, activation="relu"),
               bp.Blueprint("node_glu", hidden=2, activation="gelu", glu=True),
               bp.Blueprint("node_scale", hidden=0, diagonal=True),
               bp.Blueprint("node_tanh_repl", hidden=2, activation="tanh", kind="replacement"),
               bp.Blueprint("node_parallel", hidden=2, activation="relu", wiring="parallel"))
  else:
    catalog = bp.default_blueprints(parallel_hidden=8)
  k = spec.num_seeds
  spec = layer_lib.KasminaSpec(dim=spec.dim, num_seeds=k, blueprints=catalog, input_dim=32,
                               corr_rows=0)
  params = layer_lib.init_children(spec)
  seeds = lifecycle.init_seed_state(k).replace(
      stage=jnp.full((k,), int(lifecycle.Stage.GRAFTING), jnp.int32),
      blueprint=jnp.arange(k, dtype=jnp.int32) % len(catalog))
  h = kt._statics(spec, jnp.float32)["H"]  # pylint: disable=protected-access
  return spec, params, common.seed_inputs(spec, seeds), jax.ShapeDtypeStruct((rows, k, h),
                                                                               jnp.float32)


def main():
  import tune_triton as tt  # pylint: disable=g-import-not-at-top
  from kasmina_jax.kernels import triton as kt  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=16384)
  p.add_argument("--dtypes", default="f32,bf16")
  p.add_argument("--classes", default="small,node")
  p.add_argument("--kinds", default="fwd,bwd")
  p.add_argument("--configs", default="", help="a JSON list of configurations (default: "
                 "tune_triton.py's sweep, with the current default first)")
  p.add_argument("--catalog", choices=("residual", "full"), default="residual",
                 help="the children compiled for: tune_triton's residual MLP, or every kind "
                 "(GLU gate, diagonal scale, replacement, parallel wiring: each branch of the "
                 "kernels)")
  p.add_argument("--defaults-only", action="store_true",
                 help="only each class's default tiling (what the library launches)")
  p.add_argument("--out", default="")
  a = p.parse_args()
  install_stand_in()
  rows = []
  for dname in a.dtypes.split(","):
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dname]
    for cls in a.classes.split(","):
      dim, k = tt.CLASSES[cls]
      shape_cls = tt.SHAPE_CLASS.get(cls, cls)
      # the problem's parameters and stages; x itself is only a shape here
      spec, params, seed_in, _, _, shift = tt.problem(256, dim, k, dtype)
      pre_u = None
      if a.catalog == "full":
        spec, params, seed_in, pre_u = full_catalog_problem(spec, a.rows, kt)
      for kind in a.kinds.split(","):
        kt.CONFIG_OVERRIDES.clear()
        if not kt._inline(spec, kt.low_precision_dots(dtype, None)):  # pylint: disable=protected-access
          print(f"{dname:4} {cls:6} {kind}: no kernel (the contract's XLA fallback)")
          continue
        default = kt._config(kind, spec, dtype)  # pylint: disable=protected-access
        configs = json.loads(a.configs) if a.configs else [default] + [
            c for c in tt.SWEEP.get((kind, shape_cls), [])
            if c != default and not a.defaults_only]
        for cfg in configs:
          kt.CONFIG_OVERRIDES.clear()
          kt.CONFIG_OVERRIDES[(kind, shape_cls)] = tt.full_config(cfg)
          del CAPTURED[:]
          xs = jax.ShapeDtypeStruct((a.rows, dim), dtype)
          if kind == "fwd":
            jax.eval_shape(lambda x_, u_: kt._forward_impl(spec, True, x_, params, seed_in, u_,  # pylint: disable=protected-access
                                                           shift), xs, pre_u)
          else:
            ok = jnp.ones((k,), bool)
            r2 = jnp.full((k,), 0.01, jnp.float32)
            jax.eval_shape(lambda x_, c_, u_: kt._backward_impl(spec, x_, params, seed_in, u_,  # pylint: disable=protected-access
                                                                ok, c_, r2), xs, xs, pre_u)
          tag = " (default)" if cfg == default and not a.configs else ""
          print(f"{dname:4} {cls:6} {kind} {json.dumps(cfg)}{tag}", flush=True)
          for launch in CAPTURED:
            name = launch["kernel"].__name__
            try:
              res = compile_launch(launch)
              msg = (f"{res['regs']:3d} regs  spill stack {res['stack']:4d} B  "
                     f"smem {res['smem']:6d} B  shfl {res['shfl']:3d} bar {res['bar']:3d}  "
                     f"fold exchanges {res['fold_exchanges']}  "
                     f"{res['programs_per_sm']:2d} programs/SM  occupancy "
                     f"{100 * res['occupancy']:5.1f}% ({res['limit']})  grid {launch['grid']}")
            except Exception as e:  # pylint: disable=broad-except
              res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
              msg = f"FAILED {res['error']}"
            print(f"     {name}: {msg}", flush=True)
            rows.append(dict(dtype=dname, cls=cls, kind=kind, cfg=cfg, kernel=name, **res))
  kt.CONFIG_OVERRIDES.clear()
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(rows, fh, indent=1)
  failed = [r for r in rows if "error" in r]
  if failed:
    sys.exit(f"{len(failed)} of {len(rows)} kernels failed to compile")


if __name__ == "__main__":
  main()
