"""Where the train step's time goes: host dispatch against device time, per kernel, with a trace.

For the plain Flax step and the Kasmina step (all dormant, and 10% blending) of
`overhead.py`'s model, at each `--rows`:

- `wall_ms`: per step, `--steps` consecutive calls until the last state is ready;
- `dispatch_ms`: per step, the same loop until the last call returns (before waiting): the
  host's own cost of a step. When `dispatch_ms` is close to `wall_ms` the host, not the GPU,
  sets the pace;
- `kernels`: every kernel of one step with its CUPTI time (GPU only), grouped by name, and the
  op names / source lines that the optimized HLO gives each fusion;
- `--trace DIR`: a `jax.profiler` trace of a few steps of each (TensorBoard / Perfetto).

Writes `<device>_<date>_profile_step.json` under `--out`.

    python benchmarks/profile_step.py --rows 1024,8192 --trace $OUT/trace --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import overhead  # noqa: E402


def host_and_wall(step, state, batches, steps: int, repeats: int, carry: bool = True):
  out = state
  for i in range(3):
    out, _ = step(out if carry else state, batches[i % len(batches)])
  jax.block_until_ready(jax.tree.leaves(out))
  disp, wall = [], []
  s = out if carry else state
  for _ in range(repeats):
    t0 = time.perf_counter()
    for i in range(steps):
      o, _ = step(s, batches[i % len(batches)])
      if carry:
        s = o
    t1 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(o))
    t2 = time.perf_counter()
    disp.append(1e3 * (t1 - t0) / steps)
    wall.append(1e3 * (t2 - t0) / steps)
  disp.sort(), wall.sort()
  return {"dispatch_ms": disp[len(disp) // 2], "wall_ms": wall[len(wall) // 2],
          "dispatch_all": disp, "wall_all": wall}


def fusion_sources(hlo_text: str) -> dict:
  """{instruction name: 'op_name @ file:line'} from the optimized HLO's metadata."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}", line)
    if not m:
      continue
    meta = m.group(2)
    op = re.search(r'op_name="([^"]*)"', meta)
    src = re.search(r'source_file="([^"]*)" source_line=(\d+)', meta)
    out[m.group(1)] = ((op.group(1)[-90:] if op else "") +
                       (f" @ {os.path.basename(src.group(1))}:{src.group(2)}" if src else ""))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", default="1024,8192")
  p.add_argument("--impl", default="reference")
  p.add_argument("--blending", default="0,0.1")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--trace", default="")
  p.add_argument("--small", action="store_true")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  a = p.parse_args(argv)
  args = overhead.parse_args((["--small"] if a.small else []) + ["--rows", a.rows])
  dev = jax.devices()[0]
  print(f"# {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
  model, tx, pst = overhead.plain_state(args)
  plain = overhead.make_plain_step(model, tx)
  kstep = overhead.kasmina_step
  records, traces = [], []
  for rows in args.rows:
    batches = [overhead.synthetic(rows, args.d_in, args.classes, seed=100 + i) for i in range(2)]
    cases = [("plain", plain, pst)]
    for b in (float(x) for x in a.blending.split(",")):
      cases.append((f"kasmina {a.impl} blending {b:g}", kstep,
                    overhead.kasmina_state(args, a.impl, b)))
    for name, step, st in cases:
      rec = {"rows": rows, "case": name, "leaves": len(jax.tree.leaves(st)),
             **host_and_wall(step, st, batches, a.steps, a.repeats)}
      rec["kernels"] = overhead.kernel_times(step, st, batches[0], top=400)
      if dev.platform == "gpu" and rows == args.rows[0]:
        text = jax.jit(step).lower(st, batches[0]).compile().as_text()
        srcs = fusion_sources(text)
        for k in (rec["kernels"] or {}).get("top", []):
          # A kernel is named after its fusion, with "_N" where the HLO name has ".N".
          hlo_name = re.sub(r"_(\d+)$", r".\1", k["name"])
          k["source"] = srcs.get(k["name"]) or srcs.get(hlo_name, "")
        rec["hlo_chars"] = len(text)
        with open(os.path.join(a.out, f"hlo_{rows}_{name.replace(' ', '_')}.txt"), "w") as fh:
          fh.write(text)
      if a.trace and rows == args.rows[0]:
        traces.append((name, step, st, batches))
      kt = rec["kernels"]
      print(f"rows {rows:5d} {name:32s} leaves {rec['leaves']:4d} wall {rec['wall_ms']:.3f} ms "
            f"dispatch {rec['dispatch_ms']:.3f} ms"
            + (f" device {kt['total_ms']:.3f} ms in {kt['launches']} kernels" if kt else ""),
            flush=True)
      if kt:
        for k in kt["top"][:40]:
          print(f"    {k['ms']:8.4f} x{k['count']:<3d} {k['name'][:40]:40s} {k.get('source', '')[:110]}")
      records.append(rec)
  # Traces last: CUPTI serves one client at a time, and the kernel timings above use it.
  for name, step, st, batches in traces:
    d = os.path.join(a.trace, name.replace(" ", "_"))
    s = st
    for i in range(3):
      s, _ = step(s, batches[i % 2])
    jax.block_until_ready(jax.tree.leaves(s))
    with jax.profiler.trace(d):
      for i in range(8):
        s, _ = step(s, batches[i % 2])
      jax.block_until_ready(jax.tree.leaves(s))
  os.makedirs(a.out, exist_ok=True)
  name = f"{overhead.device_name()}_{datetime.date.today().isoformat()}_profile_step.json"
  with open(os.path.join(a.out, name), "w") as fh:
    json.dump({"records": records, "jax": jax.__version__, "device": dev.device_kind}, fh,
              indent=1, default=str)
  print("wrote", name)


if __name__ == "__main__":
  main()
