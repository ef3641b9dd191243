"""What a Kasmina model costs over plain Flax: the jitted Adam train step, dormant and blending.

Model (default, issue 19): an MLP 1024 -> 4096 -> 4096 -> 1000. The plain model has Flax
`Dense` + ReLU hidden layers, trained by a plain jitted step (`value_and_grad`, `optax.adam`,
`apply_updates`). The Kasmina model has two `KasminaDense(4096, 64 seeds)` hidden layers
(default blueprint catalog, correlation Gram on 256 rows a step) trained by
`training.train_step` (Adam through `optim.kasmina_optimizer`). Seeds: all DORMANT, 10% or
100% of each layer's seeds blending a fresh `residual_mlp` child (GRAFTING, alpha 0.5), for
each `impl` in ("reference", "pallas", "triton", "auto") that runs on this backend (the
others are recorded as skipped, with the reason). `--small`: 128 -> 512 -> 512 -> 100, 8
seeds of 64 nodes, 256 and 1024 rows (a CPU run).

Timing (as `scaling.py`): after compilation and `--warmup` steps, `--repeats` timings of
`--steps` consecutive steps each (wall clock until the last step's state is ready,
`block_until_ready`); the median over repeats is reported. Plain and Kasmina steps of one
row count are timed in alternation (A B A B ...) so that drift of the machine (other jobs,
clocks) hits both. `overhead = ms / plain_ms - 1`.

`--telemetry-every N` sets `KasminaDense(telemetry_every=N)` (default: the library's, 4: each
step measures the health telemetry on a moving quarter of its rows, at least 256).

Writes `<device>_<date>_overhead[_small].json` (one record per measurement: `rows`, `impl`,
`resolved_impl`, `blending`, `telemetry`, `ms`, `plain_ms`, `overhead`, or `skipped` with its
reason) under `--out` (default `benchmarks/results`) and prints a markdown table.

    python benchmarks/overhead.py                     # on the GPU
    python benchmarks/overhead.py --telemetry-every 4 --impls reference   # the schedule
    JAX_PLATFORMS=cpu python benchmarks/overhead.py --small --impls reference,auto
    python benchmarks/overhead.py --small --account   # also the cost account of the step

`--account` prints what the dormant Kasmina step adds over the plain one: jaxpr primitive
counts, optimized-HLO instruction counts, XLA's FLOP / byte estimates (`cost_analysis`) of
the whole step and of its parts (layer forward + backward without telemetry, the telemetry
update, the seeds' per-step update, the stage-masked optimizer, drift + snapshot).

The cost account of the dormant step (issue 19; read against docs/design.md, "Performance
model"), what the code did per Kasmina layer and step before the dormant-path change, and
what it does now:

1. Child compute of dormant seeds. Before: every seed's child ran on every row whatever its
   stage (`_guarded_child`: three `HIGHEST`-precision einsums `nkc,kch` / `nkh,khc` over all
   K seeds, four activations blended by one-hot, GLU gate, non-finite checks, the STE /
   blend `select`, the reconstruction sums), and in the backward the same again plus the
   parameter einsums (`_gc_bwd` recomputes the child): about 20 (N, K, c)- or (N, K, H)-
   sized intermediates a layer. Now: one `lax.cond` on "any seed live" around the whole
   child path (a `custom_vjp` whose residuals are its inputs, so the dormant branch writes
   no zero residuals); dormant, the layer's value is `x` and its backward is the identity.
2. Per-step telemetry: sums of (a - shift), (a - shift)^2 and dead counts over every row
   (one read of the activations), the Gram matrix on `corr_rows` rows (a (K, c, c) batched
   einsum at `HIGHEST`), finiteness checks of every partial and the merge. Now: each step
   measures a moving block of about one row in `telemetry_every` (default 4, at least 256
   rows; `telemetry.rows_for_pass`), with no `lax.cond` (whose predicate a GPU reads on the
   host); the Gram matrix keeps each step's first `corr_rows` rows.
3. The seeds' per-step update (`orchestration.step_update`): `whole_objective` (child
   params x grads, K-sized), `tick_step`, `grafting_step` (four strategies, K-sized),
   the child gradient norms and `record_gradients` - all small (K or child-parameter
   sized), a handful of fused kernels - and the wrapped host layer's drift
   `||W - W_snap|| / ||W_snap||` (reads the host weights and their snapshot). Now the
   per-layer drift is computed only when a GRAFTING seed of that layer follows
   DRIFT_CONTROLLED (the only reader), else 0 (unread).
4. The optimizer's stage masks (`stage_masked`): `where(mask, g, 0)` on gradients and
   updates, `where(mask, new, old)` on the Adam moments, and the per-seed finiteness of the
   child gradients. Host leaves have a constant True mask; they are now passed through
   untouched (no `select` at all, not even one for XLA to fold). Child leaves are small.
   Per-partition norms: only with `max_grad_norm` (not in the default step).
5. The train step's own extras (training.py): the host gradient norm (one read of every
   gradient; it feeds the non-finite skip, the epoch's mean grad norm and GRAD_NORM_GATED),
   the whole-model drift for the epoch report and the snapshot refresh, and the non-finite
   `keep` selects (fused into Adam's update). Now the drift and the snapshot cover at most
   `orchestration.DRIFT_ROWS` rows of each leaf (1/16 of a 4096-row kernel) instead of a
   pass over every parameter each step.
6. The outputs: every state leaf a jitted step returns is a fresh buffer, the unchanged ones
   included (78 copies a step). Now `train_step` forwards the leaves it did not change
   (`_forwarding.ForwardingJit`), and a dormant layer's seeds, children and moments are among
   them. `profile_step.py` has the host's side of this (dispatch against wall clock).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import os
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from kasmina_jax import layer as layer_lib  # noqa: E402
from kasmina_jax import lifecycle  # noqa: E402
from kasmina_jax import linen as knn  # noqa: E402
from kasmina_jax import training  # noqa: E402

LOSS = training.cross_entropy_loss
IMPLS = ("reference", "pallas", "triton", "auto")


class PlainMLP(nn.Module):
  width: int
  classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    for i in range(2):
      x = nn.relu(nn.Dense(self.width, name=f"hidden{i}")(x))
    return nn.Dense(self.classes, name="head")(x)


class KasminaMLP(nn.Module):
  width: int
  classes: int
  num_seeds: int
  impl: str = "reference"
  corr_rows: int = 256
  telemetry_every: int | None = None  # None: the layer's default

  @nn.compact
  def __call__(self, x, train: bool = True):
    kw = {} if self.telemetry_every is None else {"telemetry_every": self.telemetry_every}
    for i in range(2):
      x = knn.KasminaDense(self.width, self.num_seeds, activation=nn.relu, impl=self.impl,
                           corr_rows=self.corr_rows, name=f"hidden{i}", **kw)(x, train=train)
    return nn.Dense(self.classes, name="head")(x)


def with_blending_seeds(state, count: int, key):
  """The first `count` seeds of every layer blend a fresh child (GRAFTING, alpha 0.5)."""
  import scaling  # pylint: disable=g-import-not-at-top  (benchmarks/ is on sys.path)
  return scaling.with_blending_seeds(state, count, key)


def synthetic(rows: int, d_in: int, classes: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, d_in), dtype=np.float32)
  teacher = np.random.default_rng(12345).standard_normal((d_in, classes), dtype=np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(np.argmax(x @ teacher, -1).astype(np.int32))}


# ------------------------------------------------------------------------------ the steps


def plain_state(args):
  model = PlainMLP(args.width, args.classes)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, args.d_in)))["params"]
  tx = optax.adam(args.lr)
  return model, tx, {"params": params, "opt_state": tx.init(params)}


def make_plain_step(model, tx):
  @jax.jit
  def step(st, batch):
    def loss(p):
      return LOSS(model.apply({"params": p}, batch["x"]), batch)[0]
    l, g = jax.value_and_grad(loss)(st["params"])
    updates, opt_state = tx.update(g, st["opt_state"], st["params"])
    return {"params": optax.apply_updates(st["params"], updates), "opt_state": opt_state}, l
  return step


def kasmina_state(args, impl: str, blending: float, telemetry_every=None):
  model = KasminaMLP(args.width, args.classes, args.seeds, impl=impl, corr_rows=args.corr_rows,
                     telemetry_every=telemetry_every)
  state = training.create_train_state(model, optax.adam(args.lr), jnp.zeros((2, args.d_in)),
                                      jax.random.key(0))
  count = int(round(blending * args.seeds))
  if count:
    state = with_blending_seeds(state, count, jax.random.key(1))
  # As `fit` does after every epoch end: the step compiles on the stages it will see.
  return training.refresh_liveness(state)


def kasmina_step(state, batch):
  return training.train_step(state, batch, LOSS)


def telemetry_every_of(state) -> int:
  specs = [lv.spec for lv in knn.find_layers(state.kasmina).values()]
  return int(getattr(specs[0], "telemetry_every", 1))


def _block(tree):
  jax.block_until_ready(jax.tree.leaves(tree))


def time_pair(steps: dict, states: dict, batches, args) -> dict:
  """Median ms per step of each `steps[name](state, batch)`, timed in alternation."""
  cur = dict(states)
  for name, step in steps.items():
    for i in range(args.warmup):
      cur[name], _ = step(cur[name], batches[i % len(batches)])
    _block(cur[name])
  times = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, step in steps.items():
      s = cur[name]
      t0 = time.perf_counter()
      for i in range(args.steps):
        s, _ = step(s, batches[i % len(batches)])
      _block(s)
      times[name].append(1e3 * (time.perf_counter() - t0) / args.steps)
      cur[name] = s
  return {name: (statistics.median(t), t) for name, t in times.items()}


def impl_status(impl: str, spec) -> tuple[str | None, str | None]:
  """(resolved impl, None) when `impl` runs here, else (None, reason)."""
  from kasmina_jax import kernels  # pylint: disable=g-import-not-at-top
  try:
    resolved = kernels.resolve_impl(impl, spec)
  except ValueError as e:
    return None, str(e)
  if resolved == "pallas" and jax.default_backend() != "gpu":
    return None, ("impl='pallas' runs in interpret mode off the GPU (a correctness path, not "
                  "a timing)")
  return resolved, None


def kernel_times(step, state, batch, top: int = 30) -> dict:
  """The device kernels of one call of the jitted `step` and their times (ms, CUPTI through
  JAX's Mosaic GPU profiler), grouped by name, largest first; None off the GPU."""
  if jax.devices()[0].platform != "gpu":
    return None
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  _, per_kernel = profiler.measure(step, aggregate=False)(state, batch)
  grouped = collections.defaultdict(lambda: [0.0, 0])
  for name, ms in per_kernel:
    grouped[name][0] += float(ms)
    grouped[name][1] += 1
  rows = sorted(grouped.items(), key=lambda kv: -kv[1][0])
  return {"total_ms": sum(v[0] for v in grouped.values()),
          "launches": sum(v[1] for v in grouped.values()),
          "top": [{"name": n[:120], "ms": v[0], "count": v[1]} for n, v in rows[:top]]}


def print_kernels(label: str, kt) -> None:
  if kt is None:
    return
  print(f"  kernels of {label}: {kt['launches']} launches, {kt['total_ms']:.3f} ms device time",
        flush=True)
  for r in kt["top"][:15]:
    print(f"    {r['ms']:8.4f} ms  x{r['count']:<3d} {r['name'][:100]}", flush=True)


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return "cpu"
  kind = dev.device_kind.lower()
  m = re.search(r"([a-z]\d{2,4})", kind.replace("nvidia ", ""))
  return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", kind).strip("-")


# ------------------------------------------------------------------------------ cost account


def _prims(jaxpr, counter):
  for eqn in jaxpr.eqns:
    counter[eqn.primitive.name] += 1
    for v in eqn.params.values():
      for j in (v if isinstance(v, (tuple, list)) else [v]):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          _prims(inner, counter)
        elif hasattr(j, "eqns"):
          _prims(j, counter)
  return counter


def _hlo_counts(text: str) -> collections.Counter:
  c = collections.Counter()
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?\S+\s*=\s*\S+\s+([a-z\-]+)\(", line)
    if m:
      c[m.group(1)] += 1
  return c


def _cost(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", float("nan"))),
          "bytes": float(ca.get("bytes accessed", float("nan")))}


def _entry_ops(text: str) -> int:
  """Instructions in the optimized module's ENTRY computation (~ kernels and copies)."""
  m = re.search(r"\nENTRY [^\n]*\{\n(.*?)\n\}", text, re.S)
  return len(m.group(1).splitlines()) if m else -1


def account(args) -> dict:
  """The dormant step's extra work over the plain step (see the module docstring)."""
  rows = args.rows[0]
  batch = synthetic(rows, args.d_in, args.classes, seed=100)
  model, tx, pst = plain_state(args)
  plain = make_plain_step(model, tx)
  kst = kasmina_state(args, "reference", 0.0)
  kjit = jax.jit(kasmina_step)
  out = {}
  for name, fn, st in (("plain", plain, pst), ("kasmina", kjit, kst)):
    lowered = fn.lower(st, batch)
    compiled = lowered.compile()
    text = compiled.as_text()
    jaxpr = jax.make_jaxpr(fn)(st, batch)
    out[name] = {"jaxpr_eqns": sum(_prims(jaxpr.jaxpr, collections.Counter()).values()),
                 "hlo_entry_ops": _entry_ops(text), **_cost(compiled),
                 "hlo_ops": _hlo_counts(text), "prims": _prims(jaxpr.jaxpr, collections.Counter())}
  # The parts: one layer at the model's shape, N rows.
  lv = next(iter(knn.find_layers(kst.kasmina).values()))
  spec = lv.spec
  children = knn.get_path(kst.params, ("hidden0", "kasmina", "children"))
  x = jax.random.normal(jax.random.key(3), (rows, spec.dim))

  def fwdbwd(tel):
    def f(x_, p_):
      o, aux = layer_lib.forward(spec, p_, lv.seeds, x_, telemetry=tel)
      return jnp.sum(o * o) + aux.child_loss, aux.telemetry
    return jax.grad(f, argnums=(0, 1), has_aux=True)

  parts = {
      "layer fwd+bwd, no telemetry": (lambda x_, p_: fwdbwd(None)(x_, p_), (x, children)),
      "layer fwd+bwd, telemetry": (lambda x_, p_: fwdbwd(lv.telemetry)(x_, p_), (x, children)),
      "identity fwd+bwd (the floor)": (jax.grad(lambda x_: jnp.sum(x_ * x_)), (x,)),
  }
  out["parts"] = {}
  for name, (fn, a) in parts.items():
    c = jax.jit(fn).lower(*a).compile()
    out["parts"][name] = {**_cost(c), "hlo_entry_ops": _entry_ops(c.as_text())}
  return out


def print_account(acc: dict) -> None:
  p, k = acc["plain"], acc["kasmina"]
  print("\n## Cost account of the dormant step (XLA's estimates on this backend)\n")
  print("| step | jaxpr eqns | entry ops | GFLOP | MB accessed |")
  print("| --- | --- | --- | --- | --- |")
  for name, r in (("plain", p), ("kasmina, all dormant", k)):
    print(f"| {name} | {r['jaxpr_eqns']} | {r['hlo_entry_ops']} | {r['flops'] / 1e9:.3f} "
          f"| {r['bytes'] / 1e6:.1f} |")
  print("\n| part (one layer) | entry ops | GFLOP | MB accessed |\n| --- | --- | --- | --- |")
  for name, r in acc["parts"].items():
    print(f"| {name} | {r['hlo_entry_ops']} | {r['flops'] / 1e9:.4f} | {r['bytes'] / 1e6:.1f} |")
  diff = {op: k["prims"][op] - p["prims"].get(op, 0) for op in k["prims"]}
  top = sorted(((v, op) for op, v in diff.items() if v > 0), reverse=True)[:25]
  print("\nextra jaxpr primitives (kasmina - plain):",
        ", ".join(f"{op} {v}" for v, op in top))
  hd = {op: k["hlo_ops"][op] - p["hlo_ops"].get(op, 0) for op in k["hlo_ops"]}
  top = sorted(((v, op) for op, v in hd.items() if v > 0), reverse=True)[:25]
  print("extra optimized-HLO instructions:", ", ".join(f"{op} {v}" for v, op in top))


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--small", action="store_true",
                 help="128 -> 512 -> 512 -> 100, 8 seeds, rows 256,1024 (a CPU run)")
  p.add_argument("--rows", default=None, help="comma list (default 1024,8192)")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--blending", default="0,0.1,1", help="fractions of seeds blending")
  p.add_argument("--d-in", type=int, default=1024)
  p.add_argument("--width", type=int, default=4096)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--seeds", type=int, default=64)
  p.add_argument("--corr-rows", type=int, default=256)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--telemetry-every", type=int, default=None,
                 help="KasminaDense(telemetry_every=N) (default: the layer's default)")
  p.add_argument("--account", action="store_true", help="print the dormant step's cost account")
  p.add_argument("--account-only", action="store_true", help="the account, no timing")
  p.add_argument("--label", default="", help="added to the output file name")
  p.add_argument("--kernels", action="store_true",
                 help="GPU: also each step's kernels with their device times (CUPTI)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  args = p.parse_args(argv)
  if args.small:
    args.d_in, args.width, args.classes, args.seeds = 128, 512, 100, 8
    args.rows = args.rows or "256,1024"
    args.steps, args.repeats = min(args.steps, 10), min(args.repeats, 5)
  args.rows = [int(r) for r in (args.rows or "1024,8192").split(",")]
  args.impls = [i for i in args.impls.split(",") if i]
  args.blending = [float(b) for b in args.blending.split(",")]
  return args


def main(argv=None):
  args = parse_args(argv)
  dev = jax.devices()[0]
  meta = {"date": datetime.date.today().isoformat(), "platform": dev.platform,
          "device_kind": dev.device_kind, "jax": jax.__version__,
          "config": {k: v for k, v in vars(args).items()}}
  print(f"# {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
  model, tx, pst = plain_state(args)
  plain = make_plain_step(model, tx)
  kjit = kasmina_step
  records = []
  spec0 = layer_lib.KasminaSpec(dim=args.width, num_seeds=args.seeds, corr_rows=args.corr_rows)
  for rows in ([] if args.account_only else args.rows):
    batches = [synthetic(rows, args.d_in, args.classes, seed=100 + i) for i in range(2)]
    for impl in args.impls:
      for blending in args.blending:
        resolved, reason = impl_status(impl, spec0)
        base = {"rows": rows, "impl": impl, "blending": blending}
        if reason is not None:
          records.append({**base, "skipped": reason})
          print(f"rows {rows} {impl:9s} blending {blending:4.2f}: skipped ({reason})", flush=True)
          continue
        same = [r for r in records if r.get("resolved_impl") == resolved and r["rows"] == rows
                and r["blending"] == blending and "skipped" not in r]
        if same:  # e.g. "auto" resolving to an impl already timed: the same program
          for r in [r for r in same if r["impl"] == same[0]["impl"]]:
            records.append({**r, "impl": impl, "same_program_as": r["impl"]})
          print(f"rows {rows} {impl:9s} blending {blending:4.2f}: resolves to {resolved}, "
                f"timed above", flush=True)
          continue
        state = kasmina_state(args, impl, blending, args.telemetry_every)
        every = telemetry_every_of(state)
        steps = {"plain": plain, "kasmina": kjit}
        states = {"plain": pst, "kasmina": state}
        t = time_pair(steps, states, batches, args)
        plain_ms = t["plain"][0]
        kt = {}
        if args.kernels:
          if not any(r.get("rows") == rows and "kernels_plain" in r for r in records):
            kt["kernels_plain"] = kernel_times(plain, pst, batches[0])
            print_kernels(f"plain, rows {rows}", kt["kernels_plain"])
          kt["kernels"] = kernel_times(kjit, state, batches[0])
          print_kernels(f"kasmina {impl} blending {blending}, rows {rows}", kt["kernels"])
        kinds = [("default", t["kasmina"])]
        for tel, (ms, all_ms) in kinds:
          rec = {**base, "resolved_impl": resolved, "telemetry": tel,
                 "telemetry_every": every, "ms": ms, "plain_ms": plain_ms,
                 "overhead": ms / plain_ms - 1.0, "ms_all": all_ms,
                 "plain_ms_all": t["plain"][1]}
          rec.update(kt)
          records.append(rec)
          print(f"rows {rows} {impl:9s} blending {blending:4.2f} telemetry {tel:9s}: "
                f"{ms:8.3f} ms vs plain {plain_ms:8.3f} ms  overhead {100 * rec['overhead']:+6.1f}%",
                flush=True)
  lines = ["| rows | impl | blending | telemetry | plain ms | kasmina ms | overhead |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in records:
    if "skipped" in r:
      lines.append(f"| {r['rows']} | {r['impl']} | {r['blending']:.0%} | | | skipped: "
                   f"{r['skipped'][:60]} | |")
    else:
      impl = r["impl"] if r["resolved_impl"] == r["impl"] else f"{r['impl']} ({r['resolved_impl']})"
      lines.append(f"| {r['rows']} | {impl} | {r['blending']:.0%} | {r['telemetry']} "
                   f"(1/{r['telemetry_every']}) | {r['plain_ms']:.3f} | {r['ms']:.3f} "
                   f"| {100 * r['overhead']:+.1f}% |")
  table = "\n".join(lines)
  acc = None
  if args.account or args.account_only:
    acc = account(args)
    print_account(acc)
    acc = {k: ({kk: (dict(vv) if isinstance(vv, collections.Counter) else vv)
                for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in acc.items()}
  print()
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    name = f"{device_name()}_{meta['date']}_overhead{'_small' if args.small else ''}"
    name += f"_{args.label}" if args.label else ""
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as fh:
      json.dump({"meta": meta, "records": records, "account": acc, "table": table}, fh,
                indent=1, default=str)
    print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
