"""Learn a Tamiyo: evolution strategies over vmapped populations of whole MNIST-1D growth
runs, then a held-out comparison with the heuristic Tamiyo and a fixed-large host.

    python examples/learn_tamiyo.py --small          # 2 CPU cores, a few minutes
    python examples/learn_tamiyo.py                  # one GPU (H200: a few minutes)
    python examples/learn_tamiyo.py --throughput-only   # growth runs per second, JSON

1. Training (`kasmina_jax.evolution`, antithetic ES): each generation draws `--members`
   runs (a training setting, a learning rate, an RNG seed); every candidate policy, the
   search's mean and the heuristic run all of them in one `jit(vmap(...))` program
   (`kasmina_jax.population`). A candidate's fitness is its mean reward: final validation
   accuracy minus a parameter and a FLOP cost. The search is checkpointed every generation
   (`OUT/es_state.npz`; a rerun resumes), with a progress bar and `OUT/es_curves.png`.
2. Evaluation on settings held out of training (other data seeds, noise levels and sample
   counts), under the growth protocol (`kasmina_jax.experiments`): validation carved from the
   training split; each variant's learning rate chosen on validation from `--lrs`;
   `--eval-seeds` RNG seeds (>= 5); the test split read once, for the chosen runs only.
   Variants: learned (the trained mean), heuristic Tamiyo, fixed-large (no growth, a host
   `--large-factor` times wider).
3. Outputs: the policy (`--save-policy`, `tamiyo.learned.save`), the results JSON
   (`--results-json`, default `benchmarks/results/learned_tamiyo_<device>_<date>.json`),
   `OUT/heldout.png` (test accuracy against parameters) and the throughput (whole growth runs
   per second and per minute, after compilation).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

from kasmina_jax import evolution as es
from kasmina_jax import experiments
from kasmina_jax import plots
from kasmina_jax import population as pop
from kasmina_jax import tamiyo
from kasmina_jax import training
from kasmina_jax.tamiyo import learned

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@dataclasses.dataclass(frozen=True)
class Preset:
  """Everything one mode fixes: the env, the ES, the settings."""

  env: pop.EnvConfig
  es: es.ESConfig
  generations: int
  members: int  # runs each candidate is scored on, a generation
  time_budget: float  # seconds of ES training at most (the checkpoint keeps the rest)
  train_settings: tuple
  heldout_settings: tuple
  lrs: tuple
  eval_seeds: int
  large_factor: int
  hidden: int = 16


def _mnist(samples, noise, data_seed):
  return pop.Setting("mnist1d", samples=samples, noise=noise, data_seed=data_seed)


SMALL = Preset(
    env=pop.EnvConfig(width=16, child_width=16, epochs=8, steps_per_epoch=20, batch_size=32,
                      fit_rows=1200, val_rows=300, test_rows=400),
    es=es.ESConfig(pairs=4, sigma=0.5, learning_rate=0.1),
    generations=6, members=2, time_budget=90.0,
    train_settings=tuple(_mnist(s, n, d) for s, n, d in
                         [(2000, None, 1), (2000, 0.1, 2), (1600, 0.4, 3), (2000, 0.25, 4)]),
    heldout_settings=(_mnist(2000, 0.15, 101), _mnist(1800, 0.35, 102)),
    lrs=(3e-3, 1e-2), eval_seeds=5, large_factor=4)

FULL = Preset(
    env=pop.EnvConfig(width=32, child_width=32, epochs=24, steps_per_epoch=40, batch_size=64,
                      fit_rows=3000, val_rows=600, test_rows=1000),
    es=es.ESConfig(pairs=24, sigma=0.3, learning_rate=0.05),
    generations=40, members=8, time_budget=150.0,
    train_settings=tuple(_mnist(s, n, d) for s, n, d in
                         [(4000, None, 1), (4000, 0.1, 2), (3000, 0.4, 3), (5000, 0.25, 4),
                          (3000, None, 5), (5000, 0.15, 6), (4000, 0.3, 7), (3500, 0.2, 8)]),
    heldout_settings=(_mnist(4000, 0.2, 101), _mnist(3000, 0.35, 102),
                      _mnist(5000, 0.05, 103), _mnist(4500, None, 104)),
    lrs=(1e-3, 3e-3, 1e-2), eval_seeds=5, large_factor=4)


def batch_size(preset: Preset) -> int:
  """Runs per compiled call: every candidate, the mean and the heuristic on `members` runs."""
  return (preset.es.population + 2) * preset.members


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform) or d.platform
  return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_") or d.platform


# ---------------------------------------------------------------------------- training


def generation_members(preset: Preset, generation: int):
  """The (setting, lr, seed) triples of a generation (fixed by the generation number)."""
  rng = np.random.default_rng([1234, generation])
  out = []
  for _ in range(preset.members):
    setting = preset.train_settings[rng.integers(len(preset.train_settings))]
    lr = float(preset.lrs[rng.integers(len(preset.lrs))])
    out.append((setting, lr, int(rng.integers(1_000_000))))
  return out


def run_generation(preset: Preset, state: es.ESState, generation: int, fast: bool):
  """One ES generation: `(fitness of the candidates, record, the next state, wall seconds)`."""
  candidates, noise = es.ask(state, preset.es)
  params = [learned.from_vector(c, preset.hidden) for c in candidates]
  center = learned.from_vector(state.mean, preset.hidden)
  jobs = generation_members(preset, generation)
  members = []
  for p in params + [center]:
    members += [pop.member(preset.env, s, seed=seed, learning_rate=lr, policy=p)
                for s, lr, seed in jobs]
  members += [pop.member(preset.env, s, seed=seed, learning_rate=lr, policy=center,
                         heuristic=True) for s, lr, seed in jobs]
  start = time.perf_counter()
  out = pop.run_batched(preset.env, members, batch_size(preset), fast_compile=fast)
  wall = time.perf_counter() - start
  rewards = np.asarray(pop.reward(out, preset.env)).reshape(-1, preset.members)
  val = np.asarray(out.val_accuracy).reshape(-1, preset.members)
  prm = np.asarray(out.params).reshape(-1, preset.members)
  fitness = rewards[:preset.es.population].mean(1)
  new_state = es.tell(state, noise, fitness, preset.es)
  record = {
      "generation": generation, "fitness_mean": float(fitness.mean()),
      "fitness_best": float(fitness.max()),
      "center_reward": float(rewards[-2].mean()), "heuristic_reward": float(rewards[-1].mean()),
      "center_val": float(val[-2].mean()), "heuristic_val": float(val[-1].mean()),
      "center_params": float(prm[-2].mean()), "heuristic_params": float(prm[-1].mean()),
      "runs": len(members), "wall": wall, "runs_per_second": len(members) / wall}
  return new_state, record


def train(preset: Preset, out_dir: str, *, fresh: bool, fast: bool, progress: bool = True):
  """The ES loop with its checkpoint (`OUT/es_state.npz`); returns `(state, history)`."""
  path = os.path.join(out_dir, "es_state.npz")
  if os.path.exists(path) and not fresh:
    state, extra = es.load(path)
    history = json.loads(str(extra["history"]))
    print(f"resuming from {path} at generation {int(state.generation)}", flush=True)
  else:
    # A small germination bias: perturbations flip decisions (a saturated start, where every
    # candidate germinates every seed at the first epoch end, gives the search no signal).
    start = learned.init(jax.random.PRNGKey(0), hidden=preset.hidden, germination_bias=0.5)
    state = es.init(learned.to_vector(start), jax.random.PRNGKey(1))
    history = []
  start_gen = int(state.generation)
  bar = training.progress_bar(preset.generations, "ES") if progress else None
  if bar is not None:
    bar.update(start_gen)
  start = time.perf_counter()
  try:
    for g in range(start_gen, preset.generations):
      if history and time.perf_counter() - start > preset.time_budget:
        print(f"\ntime budget of {preset.time_budget:.0f}s spent at generation {g}; rerun to "
              "resume from the checkpoint", flush=True)
        break
      state, record = run_generation(preset, state, g, fast)
      history.append(record)
      es.save(path, state, history=np.asarray(json.dumps(history)))
      if bar is not None:
        bar.update(1)
        bar.set_postfix(fit=f"{record['fitness_mean']:.3f}",
                        learned=f"{record['center_reward']:.3f}",
                        heur=f"{record['heuristic_reward']:.3f}",
                        runs_s=f"{record['runs_per_second']:.1f}")
  finally:
    if bar is not None:
      bar.close()
  return state, history


# ---------------------------------------------------------------------------- evaluation


VARIANTS = ("learned", "heuristic", "fixed_large")


def evaluate(preset: Preset, policy: learned.PolicyParams, *, fast: bool, seeds: int):
  """The held-out comparison under the growth protocol; returns (rows, runs)."""
  grow_env = preset.env
  large_env = dataclasses.replace(preset.env, width=preset.env.width * preset.large_factor,
                                  grow=False)
  jobs = [(v, s, lr, seed) for s in preset.heldout_settings for v in VARIANTS
          for lr in preset.lrs for seed in range(seeds)]
  grown = [j for j in jobs if j[0] != "fixed_large"]
  fixed = [j for j in jobs if j[0] == "fixed_large"]
  b = batch_size(preset)
  t0 = time.perf_counter()
  out_grown = pop.run_batched(grow_env, [pop.member(grow_env, s, seed=seed, learning_rate=lr,
                                                    policy=policy, heuristic=(v == "heuristic"))
                                         for v, s, lr, seed in grown], b, fast_compile=fast)
  out_fixed = pop.run_batched(large_env, [pop.member(large_env, s, seed=seed, learning_rate=lr)
                                          for v, s, lr, seed in fixed], b, fast_compile=fast)
  print(f"held-out runs: {len(jobs)} in {time.perf_counter() - t0:.1f}s (compilation "
        "included)", flush=True)
  runs = []
  for group, out, env in ((grown, out_grown, grow_env), (fixed, out_fixed, large_env)):
    rewards = np.asarray(pop.reward(out, env))
    for i, (v, s, lr, seed) in enumerate(group):
      runs.append({"variant": v, "setting": s.label(), "lr": lr, "seed": seed,
                   "val_metric": float(out.val_accuracy[i]), "val_loss": float(out.val_loss[i]),
                   "params": int(out.params[i]), "train_flops": float(out.train_flops[i]),
                   "fossilized": int(out.fossilized[i]), "rollbacks": int(out.rollbacks[i]),
                   "reward": float(rewards[i]),
                   "_variables": jax.tree.map(lambda x, i=i: x[i], out.variables),
                   "_env": env, "_setting": s})
  # The protocol: the rate of each variant chosen on validation per setting (mean over
  # seeds), then the test split read once for the runs at that rate.
  rows = []
  for s in preset.heldout_settings:
    for v in VARIANTS:
      at = [r for r in runs if r["variant"] == v and r["setting"] == s.label()]
      by_lr = {lr: float(np.mean([r["val_metric"] for r in at if r["lr"] == lr]))
               for lr in preset.lrs}
      chosen = max(preset.lrs, key=lambda lr: (by_lr[lr], -lr))
      picked = [r for r in at if r["lr"] == chosen]
      for r in picked:
        test = pop.evaluate_test(r["_env"], r["_variables"], r["_setting"])
        r["test_metric"], r["test_loss"] = test["accuracy"], test["loss"]
      tm = [r["test_metric"] for r in picked]
      rows.append({
          "setting": s.label(), "variant": v, "lr": chosen, "seeds": len(picked),
          "test_mean": float(np.mean(tm)), "test_std": float(np.std(tm, ddof=1)),
          "val_mean": by_lr[chosen], "val_by_lr": {f"{k:g}": x for k, x in by_lr.items()},
          "params": float(np.mean([r["params"] for r in picked])),
          "params_std": float(np.std([r["params"] for r in picked])),
          "train_flops": float(np.mean([r["train_flops"] for r in picked])),
          "fossilized": float(np.mean([r["fossilized"] for r in picked])),
          "reward": float(np.mean([r["reward"] for r in picked]))})
  for r in runs:
    for k in ("_variables", "_env", "_setting"):
      r.pop(k)
  return rows, runs


def summarize(rows) -> dict:
  """Mean over held-out settings of each variant's figures, and learned against the others."""
  out = {}
  for v in VARIANTS:
    rs = [r for r in rows if r["variant"] == v]
    out[v] = {k: float(np.mean([r[k] for r in rs]))
              for k in ("test_mean", "val_mean", "params", "train_flops", "reward")}
  out["learned_minus_heuristic_test"] = out["learned"]["test_mean"] - out["heuristic"]["test_mean"]
  out["learned_minus_fixed_large_test"] = (out["learned"]["test_mean"]
                                           - out["fixed_large"]["test_mean"])
  out["learned_over_heuristic_params"] = out["learned"]["params"] / out["heuristic"]["params"]
  return out


def markdown(rows) -> str:
  lines = ["| setting | variant | lr | seeds | test acc | val acc | params | train FLOPs |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['setting']} | {r['variant']} | {r['lr']:g} | {r['seeds']} | "
                 f"{100 * r['test_mean']:.2f}% ± {100 * r['test_std']:.2f} | "
                 f"{100 * r['val_mean']:.2f}% | {r['params']:.0f} | {r['train_flops']:.3g} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- throughput


def throughput(preset: Preset, *, fast: bool, repeats: int = 2) -> dict:
  """Whole growth runs per second of one population call, after its compilation."""
  center = learned.init(jax.random.PRNGKey(0), hidden=preset.hidden)
  b = batch_size(preset)
  jobs = (generation_members(preset, 0) * (b // preset.members + 1))[:b]
  members = [pop.member(preset.env, s, seed=seed, learning_rate=lr, policy=center,
                        heuristic=bool(i % 2)) for i, (s, lr, seed) in enumerate(jobs)]
  stacked = pop.stack_members(members)
  t0 = time.perf_counter()
  jax.block_until_ready(pop.run_population(preset.env, stacked, fast_compile=fast))
  first = time.perf_counter() - t0
  walls = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(pop.run_population(preset.env, stacked, fast_compile=fast))
    walls.append(time.perf_counter() - t0)
  wall = float(np.median(walls))
  steps = preset.env.epochs * preset.env.steps_per_epoch
  return {"device": device_name(), "platform": jax.devices()[0].platform,
          "population": b, "epochs": preset.env.epochs, "steps_per_run": steps,
          "batch_size": preset.env.batch_size, "host_width": preset.env.width,
          "first_call_seconds": first, "seconds_per_call": wall,
          "runs_per_second": b / wall, "runs_per_minute": 60.0 * b / wall,
          "train_steps_per_second": b * steps / wall, "jax": jax.__version__}


# ---------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="the 2-CPU-core preset")
  parser.add_argument("--out", default=None, help="directory for the checkpoint and figures")
  parser.add_argument("--generations", type=int, default=None)
  parser.add_argument("--time-budget", type=float, default=None,
                      help="seconds of ES training at most (a rerun resumes)")
  parser.add_argument("--eval-seeds", type=int, default=None)
  parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
  parser.add_argument("--save-policy", default=None,
                      help="where to write the trained policy (default: OUT/policy.npz; the "
                           "shipped one is " + os.path.relpath(learned.PRETRAINED_MNIST1D, REPO)
                           + ")")
  parser.add_argument("--results-json", default=None)
  parser.add_argument("--throughput-only", action="store_true")
  parser.add_argument("--throughput-json", default=None)
  parser.add_argument("--no-fast-compile", action="store_true",
                      help="on a CPU, compile with XLA's full optimisation (slower to compile)")
  parser.add_argument("--param-cost", type=float, default=None,
                      help="the reward's weight on parameters over the host's (default: the "
                           "preset's)")
  parser.add_argument("--flop-cost", type=float, default=None,
                      help="the reward's weight on training FLOPs over the host's")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  preset = SMALL if args.small else FULL
  overrides = {k: v for k, v in (("generations", args.generations),
                                 ("time_budget", args.time_budget),
                                 ("eval_seeds", args.eval_seeds)) if v is not None}
  preset = dataclasses.replace(preset, **overrides)
  costs = {k: v for k, v in (("param_cost", args.param_cost), ("flop_cost", args.flop_cost))
           if v is not None}
  if costs:
    preset = dataclasses.replace(preset, env=dataclasses.replace(preset.env, **costs))
  if preset.eval_seeds < 5:
    print(f"note: {preset.eval_seeds} evaluation seeds (the protocol asks for >= 5)", flush=True)
  fast = jax.devices()[0].platform == "cpu" and not args.no_fast_compile
  mode = "small" if args.small else "full"
  out_dir = args.out or os.path.join("runs", f"learn_tamiyo_{mode}")
  os.makedirs(out_dir, exist_ok=True)
  date = datetime.date.today().isoformat()
  device = device_name()
  print(f"device {device}; mode {mode}; population {batch_size(preset)} runs a call "
        f"({preset.es.population} candidates + mean + heuristic, x {preset.members} runs); "
        f"{preset.env.epochs} epochs x {preset.env.steps_per_epoch} steps a run", flush=True)

  tp = throughput(preset, fast=fast)
  print(f"throughput: {tp['runs_per_second']:.1f} whole growth runs/s "
        f"({tp['runs_per_minute']:.0f}/min; {tp['train_steps_per_second']:.0f} train steps/s; "
        f"population {tp['population']}, first call incl. compilation "
        f"{tp['first_call_seconds']:.1f}s)", flush=True)
  tp_path = args.throughput_json or os.path.join(out_dir, f"throughput_{device}_{date}.json")
  with open(tp_path, "w") as fh:
    json.dump({"mode": mode, **tp}, fh, indent=1)
  if args.throughput_only:
    print("wrote", tp_path)
    return tp

  start = time.perf_counter()
  state, history = train(preset, out_dir, fresh=args.fresh, fast=fast,
                         progress=not args.no_progress)
  train_wall = time.perf_counter() - start
  policy = learned.from_vector(state.mean, preset.hidden)
  policy_path = args.save_policy or os.path.join(out_dir, "policy.npz")
  learned.save(policy_path, policy, mode=mode, generations=int(state.generation),
               device=device, date=date, env=repr(preset.env), es=repr(preset.es))
  curves = plots.plot_es_curves(history, os.path.join(out_dir, "es_curves.png"))

  t0 = time.perf_counter()
  rows, runs = evaluate(preset, policy, fast=fast, seeds=preset.eval_seeds)
  eval_wall = time.perf_counter() - t0
  table = markdown(rows)
  summary = summarize(rows)
  print(table)
  print(json.dumps(summary, indent=1))
  heldout = plots.plot_comparison(
      [{"name": v, "params": summary[v]["params"], "metric_mean": summary[v]["test_mean"],
        "metric_std": float(np.std([r["test_mean"] for r in rows if r["variant"] == v]))}
       for v in VARIANTS], os.path.join(out_dir, "heldout.png"),
      title="held-out MNIST-1D settings: test accuracy (mean over settings) vs parameters")
  results_path = args.results_json or os.path.join(
      REPO, "benchmarks", "results", f"learned_tamiyo_{device}_{date}.json")
  os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
  result = {"mode": mode, "device": device, "date": date, "jax": jax.__version__,
            "throughput": tp, "train_seconds": train_wall, "eval_seconds": eval_wall,
            "generations": int(state.generation), "history": history,
            "env": dataclasses.asdict(preset.env) | {"tamiyo": repr(preset.env.tamiyo)},
            "es": dataclasses.asdict(preset.es), "lrs": list(preset.lrs),
            "train_settings": [s.label() for s in preset.train_settings],
            "heldout_settings": [s.label() for s in preset.heldout_settings],
            "rows": rows, "summary": summary, "runs": runs, "policy": policy_path}
  with open(results_path, "w") as fh:
    json.dump(result, fh, indent=1, default=str)
  with open(os.path.join(out_dir, "heldout.md"), "w") as fh:
    fh.write(table + "\n")
  print("wrote:", policy_path, results_path, curves, heldout, tp_path, sep="\n  ")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
