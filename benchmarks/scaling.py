"""Data-parallel scaling of Kasmina training (`kasmina_jax.distributed`) over 1, 2, 4, ...
devices: steps per second, rows per second and scaling efficiency, plus a check that every
device count takes the same lifecycle decisions as the single-device run.

Model (default): an MLP 1024 -> 4096 -> 4096 -> 1000 whose two hidden layers are
`KasminaDense` layers of 64 seeds (64 nodes each, default blueprint catalog, `jnp`
reference layer), a quarter of each layer's seeds blending a `residual_mlp` child
(GRAFTING, alpha 0.5) so that child compute is in the step; telemetry on, correlation Gram
on 256 rows a step. Adam, fp32 parameters, softmax cross-entropy on synthetic data.

Timing (weak scaling): `--batch-per-device` rows on each device, so N devices run a global
batch N times larger. After compilation and warm-up, `--repeats` timings of `--steps`
steps each (wall clock, waiting for the last step's state); the median is reported.
Efficiency = rows/s on N devices / (N x rows/s on 1 device, same data-parallel program).
The single-device program of `training.train_step` is timed beside it (`plain`).

Decision check: `--check-epochs` epochs of `--check-steps` steps at one fixed global batch
(`--check-batch` rows, the same data and order for every device count) with short lifecycle
timings, so that Tamiyo germinates and advances seeds; per epoch the stages, commands and
acceptances must equal those of the single-device run exactly, the losses within 1e-4
(relative), and every device's copy of the state and of the epoch output must be bitwise
the same (`distributed.replicas_agree`).

    python benchmarks/scaling.py                             # every visible device: 1, 2, 4, ...
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/scaling.py --small                 # CPU: decisions, not speed

On forced host devices the "devices" share the same CPU cores: the throughput figures there
say nothing about scaling; only the decision check counts.

Prints a markdown table; writes `<machine>_<date>_scaling.json` (e.g.
`h200x2_2026-12-01_scaling.json`) under `--out` (default `$OUT` when set) with a summary
(one-device data-parallel overhead over the plain step, efficiency per device count, whether
the decision check passed), every timing (with the host's enqueue time per step,
`dispatch_ms`) and the check's per-epoch stages. On one device the plain and the
data-parallel step are timed in alternation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from kasmina_jax import distributed, grafting, lifecycle, tamiyo, training  # noqa: E402
from kasmina_jax import layer as layer_lib  # noqa: E402
from kasmina_jax import linen as knn  # noqa: E402

LOSS = training.cross_entropy_loss


class ScalingNet(nn.Module):
  """d_in -> width -> width -> classes; both hidden layers KasminaDense."""

  width: int
  classes: int
  num_seeds: int
  corr_rows: int = 256

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(2):
      x = knn.KasminaDense(self.width, self.num_seeds, activation=nn.relu,
                           corr_rows=self.corr_rows, name=f"hidden{i}")(x, train=train)
    return nn.Dense(self.classes, name="head")(x)


def check_config() -> training.TrainConfig:
  """Short lifecycle timings: seeds germinate, train and graft within a few short epochs."""
  life = lifecycle.LifecycleConfig(min_training_steps=4, max_training_steps=200,
                                   stabilization_steps=4, fine_tuning_steps=8,
                                   fine_tuning_patience=2, embargo_epochs=2)
  ctl = tamiyo.TamiyoConfig(plateau_patience=1, max_concurrent_training=2,
                            max_germinations_per_epoch=4, germinate_without_plateau=True,
                            lifecycle=life)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=4), tamiyo=ctl,
                              max_judged=4, counterfactual_batch=4)


def with_blending_seeds(state: training.TrainState, count: int, key: jax.Array,
                        blueprint: str = "residual_mlp") -> training.TrainState:
  """The first `count` seeds of every layer hold a fresh child and blend it (GRAFTING,
  alpha 0.5). Sets stages directly: a benchmark fixture, not a training path."""
  params, kasmina = state.params, state.kasmina
  for i, (path, lv) in enumerate(knn.find_layers(state.kasmina).items()):
    spec = lv.spec
    mask = jnp.arange(spec.num_seeds) < count
    b = spec.blueprint_id(blueprint)
    cpath = knn.children_path(path)
    children = layer_lib.germinate_children(spec, knn.get_path(params, cpath), mask, b,
                                            jax.random.fold_in(key, i))
    params = knn.set_path(params, cpath, children)
    s = lv.seeds
    seeds = s.replace(
        stage=jnp.where(mask, int(lifecycle.Stage.GRAFTING), s.stage),
        blueprint=jnp.where(mask, b, s.blueprint), strategy=jnp.where(mask, 0, s.strategy),
        alpha=jnp.where(mask, 0.5, s.alpha), germinated_epoch=jnp.where(mask, 0, s.germinated_epoch))
    kasmina = knn.set_path(kasmina, path + ("state",), lv.replace(seeds=seeds))
  return state.replace(params=params, kasmina=kasmina, opt_state=state.tx.init(params))


def synthetic(rows: int, d_in: int, classes: int, seed: int) -> dict:
  """Inputs and labels from a fixed random linear teacher (learnable, not trivial)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, d_in), dtype=np.float32)
  teacher = np.random.default_rng(12345).standard_normal((d_in, classes), dtype=np.float32)
  return {"x": x, "y": np.argmax(x @ teacher, axis=-1).astype(np.int32)}


def new_state(args, config: training.TrainConfig) -> training.TrainState:
  model = ScalingNet(args.width, args.classes, args.seeds, args.corr_rows)
  state = training.create_train_state(model, optax.adam(args.lr), jnp.zeros((2, args.d_in)),
                                      jax.random.key(0), config)
  return with_blending_seeds(state, args.seeds * args.blending // 100, jax.random.key(1))


def _block(tree):
  jax.block_until_ready(jax.tree.leaves(tree))


def time_steps(step, state, batches, args):
  """Median seconds per step over `args.repeats` timings of `args.steps` steps."""
  for i in range(args.warmup):
    state, _ = step(state, batches[i % len(batches)])
  _block(state)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for i in range(args.steps):
      state, _ = step(state, batches[i % len(batches)])
    _block(state)
    times.append((time.perf_counter() - t0) / args.steps)
  return statistics.median(times), times


def dispatch_ms(step, state, batch, steps: int) -> float:
  """Host time to enqueue one step (no wait for the device): where it approaches the step
  time, the step is host-bound and Python overhead shows in the throughput."""
  _block(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, batch)
  enqueue = time.perf_counter() - t0
  _block(state)
  return 1e3 * enqueue / steps


def _record(n, program, rows, sec, times, dispatch):
  return {"devices": n, "program": program, "global_batch": rows, "step_ms": 1e3 * sec,
          "steps_per_s": 1 / sec, "rows_per_s": rows / sec,
          "step_ms_all": [1e3 * t for t in times], "dispatch_ms": dispatch}


def throughput(args, n: int, base: training.TrainState) -> list[dict]:
  rows = args.batch_per_device * n
  host = [synthetic(rows, args.d_in, args.classes, seed=100 + i) for i in range(2)]
  mesh = distributed.data_mesh(jax.devices()[:n])
  state, dp = distributed.data_parallel(base, mesh)
  batches = [dp.shard_batch(b) for b in host]
  dp_step = lambda s, b: dp.train_step(s, b, LOSS)
  if n != 1:
    sec, times = time_steps(dp_step, state, batches, args)
    return [_record(n, "data_parallel", rows, sec, times,
                    dispatch_ms(dp_step, state, batches[0], args.steps))]
  # One device: the plain step and the data-parallel one timed in alternation (ABAB...), so
  # that clocks, allocator state and order do not bias the overhead figure.
  plain_state = jax.device_put(base, jax.devices()[0])
  plain_batches = [jax.device_put(b, jax.devices()[0]) for b in host]
  plain_step = lambda s, b: training.train_step(s, b, LOSS)
  runs = {"plain": [], "data_parallel": []}
  one_repeat = argparse.Namespace(**{**vars(args), "repeats": 1})
  for _ in range(args.repeats):
    runs["plain"] += time_steps(plain_step, plain_state, plain_batches, one_repeat)[1]
    runs["data_parallel"] += time_steps(dp_step, state, batches, one_repeat)[1]
  return [
      _record(1, "plain", rows, statistics.median(runs["plain"]), runs["plain"],
              dispatch_ms(plain_step, plain_state, plain_batches[0], args.steps)),
      _record(1, "data_parallel", rows, statistics.median(runs["data_parallel"]),
              runs["data_parallel"], dispatch_ms(dp_step, state, batches[0], args.steps))]


def decisions(args, n: int) -> dict:
  """A short growth run; n = 0: the single-device functions of `training`."""
  state = new_state(args, check_config())
  dp = None
  if n:
    state, dp = distributed.data_parallel(state, distributed.data_mesh(jax.devices()[:n]))
  step = dp.train_step if dp else training.train_step
  end = dp.end_of_epoch if dp else training.end_of_epoch
  data = synthetic(args.check_batch * args.check_steps, args.d_in, args.classes, seed=7)
  val = synthetic(args.check_batch, args.d_in, args.classes, seed=8)
  epochs, agree = [], True
  for epoch in range(args.check_epochs):
    rng = np.random.default_rng([0, epoch])
    losses = []
    for batch in training._batches(data, args.check_batch, rng):  # pylint: disable=protected-access
      state, metrics = step(state, batch, LOSS)
      losses.append(float(metrics["loss"]))
    state, out, rolled_back = end(state, val, LOSS)
    if dp:
      agree &= distributed.is_replicated((state, out)) and distributed.replicas_agree((state, out))
    epochs.append({
        "losses": losses, "val_loss": float(out.val_loss), "rolled_back": rolled_back,
        "stages": {training.layer_name(k): np.asarray(v).tolist()
                   for k, v in out.new_stage.items()},
        "commands": {training.layer_name(k): np.asarray(v.op).tolist()
                     for k, v in out.commands.items()},
        "accepted": {training.layer_name(k): np.asarray(v).tolist()
                     for k, v in out.accepted.items()},
    })
  return {"devices": n, "epochs": epochs, "replicas_agree": bool(agree)}


def compare(ref: dict, got: dict) -> list[str]:
  """Differences between a run's decisions and the single-device run's (empty: the same)."""
  problems = []
  if not got["replicas_agree"]:
    problems.append("a device's copy of the state or epoch output differs")
  for e, (a, b) in enumerate(zip(ref["epochs"], got["epochs"])):
    for key in ("stages", "commands", "accepted", "rolled_back"):
      if a[key] != b[key]:
        problems.append(f"epoch {e}: {key} differ: {a[key]} vs {b[key]}")
    la = np.array(a["losses"] + [a["val_loss"]])
    lb = np.array(b["losses"] + [b["val_loss"]])
    if not np.allclose(la, lb, rtol=1e-4, atol=1e-6):
      problems.append(f"epoch {e}: losses differ by up to {np.max(np.abs(la - lb)):.3g}")
  return problems


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default=None,
                      help="comma-separated device counts (default 1, 2, 4, ... up to all)")
  parser.add_argument("--small", action="store_true",
                      help="a small model for CPU runs (256 -> 1024 -> 1024 -> 100, 16 seeds, "
                           "64 rows a device)")
  parser.add_argument("--d-in", type=int, default=1024)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--seeds", type=int, default=64)
  parser.add_argument("--blending", type=int, default=25, help="percent of seeds blending")
  parser.add_argument("--corr-rows", type=int, default=256)
  parser.add_argument("--batch-per-device", type=int, default=1024)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--check-epochs", type=int, default=4)
  parser.add_argument("--check-steps", type=int, default=6)
  parser.add_argument("--check-batch", type=int, default=512)
  parser.add_argument("--no-check", action="store_true", help="skip the decision check")
  parser.add_argument("--out", default=os.environ.get("OUT"),
                      help="directory for <prefix>_<date>_scaling.json (default $OUT)")
  parser.add_argument("--prefix", default=None,
                      help="machine tag of the results file (default from the device: "
                           "e.g. h200x2)")
  args = parser.parse_args(argv)
  if args.small:
    args.d_in, args.width, args.classes, args.seeds = 256, 1024, 100, 16
    args.batch_per_device, args.check_batch = 64, 128
    args.steps, args.repeats = 5, 3
  available = jax.device_count()
  if args.devices:
    counts = [int(c) for c in args.devices.split(",")]
  else:
    counts = [c for c in (1, 2, 4, 8, 16) if c <= available]
  if 1 not in counts:
    counts = [1] + counts
  if max(counts) > available:
    raise SystemExit(f"--devices: asked for {max(counts)}, JAX sees {available}")
  if args.check_batch % max(counts):
    raise SystemExit(f"--check-batch: {args.check_batch} not divisible by {max(counts)}")

  device = jax.devices()[0]
  meta = {"date": datetime.date.today().isoformat(), "platform": device.platform,
          "device_kind": device.device_kind, "devices_visible": available,
          "jax": jax.__version__, "config": vars(args)}
  print(f"# {meta['device_kind']} ({meta['platform']}) x{available}, jax {jax.__version__}",
        flush=True)
  base = new_state(args, training.TrainConfig())
  counts_params = training.param_counts(base)
  meta["params"] = counts_params
  records = []
  for n in counts:
    recs = throughput(args, n, base)
    for r in recs:
      print(f"devices {r['devices']} {r['program']:13s} {r['step_ms']:8.2f} ms/step "
            f"{r['rows_per_s']:10.0f} rows/s", flush=True)
    records.extend(recs)
  one = next(r for r in records if r["devices"] == 1 and r["program"] == "data_parallel")
  plain = next(r for r in records if r["devices"] == 1 and r["program"] == "plain")
  for r in records:
    r["efficiency"] = r["rows_per_s"] / (r["devices"] * one["rows_per_s"])
  # The one-device cost of data parallelism (the target: <= 3%).
  dp_overhead = one["step_ms"] / plain["step_ms"] - 1.0
  print(f"one-device data-parallel overhead over the plain step: {100 * dp_overhead:.1f}%",
        flush=True)

  check = None
  if not args.no_check:
    reference = decisions(args, 0)
    check = {"reference_stages": [e["stages"] for e in reference["epochs"]], "runs": {}}
    for n in counts:
      got = decisions(args, n)
      problems = compare(reference, got)
      check["runs"][str(n)] = {"same_decisions": not problems, "problems": problems,
                               "replicas_agree": got["replicas_agree"]}
      print(f"decisions on {n} device(s): "
            f"{'same as one device' if not problems else 'DIFFER: ' + '; '.join(problems)}",
            flush=True)
    # Evidence that the check exercised the lifecycle: commands Tamiyo issued and the
    # lifecycle accepted (germinations, advances, culls) over the reference run.
    check["accepted_commands"] = sum(
        int(np.sum((np.array(e["commands"][k]) != int(lifecycle.Op.NONE)) & np.array(acc)))
        for e in reference["epochs"] for k, acc in e["accepted"].items())

  lines = ["| devices | program | global batch | ms / step | steps / s | rows / s | efficiency |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in records:
    lines.append(f"| {r['devices']} | {r['program']} | {r['global_batch']} | {r['step_ms']:.2f} "
                 f"| {r['steps_per_s']:.1f} | {r['rows_per_s']:.0f} | {r['efficiency']:.2f} |")
  table = "\n".join(lines)
  print(table)
  if check is not None:
    print("decision check:", {n: v["same_decisions"] for n, v in check["runs"].items()},
          "| reference stages per epoch:", check["reference_stages"])
  ok = check is None or all(v["same_decisions"] for v in check["runs"].values())
  top = max(counts)
  summary = {
      "dp_overhead_one_device": dp_overhead,
      "efficiency": {str(r["devices"]): r["efficiency"] for r in records
                     if r["program"] == "data_parallel"},
      "decisions_same": None if check is None else ok,
  }
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    name = f"{args.prefix or _machine_prefix(device, top)}_{meta['date']}_scaling.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as fh:
      json.dump({"meta": meta, "summary": summary, "records": records,
                 "decision_check": check, "table": table}, fh, indent=1, default=str)
    print(f"wrote {path}", flush=True)
  return 0 if ok else 1


def _machine_prefix(device, count: int) -> str:
  """The results file's machine tag: e.g. "h200x2" (GPU model and device count), "cpux4"."""
  kind = str(getattr(device, "device_kind", "") or device.platform).lower()
  for word in kind.replace("-", " ").split():
    if any(ch.isdigit() for ch in word) and any(ch.isalpha() for ch in word):
      return f"{word}x{count}"
  return f"{device.platform}x{count}"


if __name__ == "__main__":
  sys.exit(main())
