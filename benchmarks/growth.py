"""The efficacy report: does growth pay against tuned fixed models?

For each task, four variants (fixed-small, fixed-large, the ceiling, grown) each sweep their
own learning rate (`--lrs`) over `--seeds` RNG seeds; every decision (Tamiyo's plateau,
counterfactuals and culls, and the rate of each variant) sees only a validation split carved
from the training data; the test split is read once, for the chosen rate's runs.

    python benchmarks/growth.py --tasks mnist1d --workers 16
    python benchmarks/growth.py --tasks mnist1d,mnist1d_10k,spirals,char_lm --workers 30

A sweep too long for one sitting can be split (by rate, say) and merged:

    python benchmarks/growth.py --tasks char_lm_gpu --lrs 1e-3 --save-runs runs/a
    python benchmarks/growth.py --tasks char_lm_gpu --lrs 3e-3 --save-runs runs/b
    python benchmarks/growth.py --tasks char_lm_gpu --from-runs runs/a,runs/b

Writes `benchmarks/results/growth_<task>.json` (a list `rows`, one per variant, with `variant`,
`lr`, `seeds`, `test_mean`, `test_std`, `val_mean`, `params`, `train_flops`, ...; the run's
settings under `args`; the verdict; every run's validation figures), and under `--out` the
markdown tables, the accuracy-against-parameters plots and the grown run's lifecycle plots.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import char_lm  # noqa: E402  pylint: disable=g-import-not-at-top
import mnist1d_mlp as mnist1d  # noqa: E402  pylint: disable=g-import-not-at-top
import spirals  # noqa: E402  pylint: disable=g-import-not-at-top

from kasmina_jax import experiments  # noqa: E402  pylint: disable=g-import-not-at-top

# task name -> (factory, keyword arguments, metric shown)
TASKS = {
    "mnist1d": (mnist1d.make_task, {}, "accuracy"),
    # The second MNIST-1D setting: twice the samples.
    "mnist1d_10k": (mnist1d.make_task, {"samples": 10000, "name": "mnist1d_10k"}, "accuracy"),
    "spirals": (spirals.make_task, {}, "accuracy"),
    "char_lm": (char_lm.make_task, {}, "loss"),
    # The GPU-scale LM on the same corpus (2 -> 4 blocks of width 128, context 128).
    "char_lm_gpu": (char_lm.make_gpu_task, {}, "loss"),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default="mnist1d,mnist1d_10k,spirals,char_lm")
  parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
  parser.add_argument("--variants", default=",".join(experiments.VARIANTS))
  parser.add_argument("--steps", type=int, default=None, help="override every task's steps")
  parser.add_argument("--controller", default=None,
                      help="JSON dict of TamiyoConfig overrides for the grown runs")
  parser.add_argument("--life", default=None,
                      help="JSON dict of LifecycleConfig overrides for the grown runs")
  parser.add_argument("--results", default=os.path.join(HERE, "results"),
                      help="where growth_<task>.json goes")
  parser.add_argument("--tag", default="", help="suffix of the JSON file names")
  parser.add_argument("--out", default="runs/growth", help="tables, plots, event logs")
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--val-only", action="store_true",
                      help="tuning: choose and report on validation, never read the test split")
  parser.add_argument("--save-runs", default=None,
                      help="sweep only: write each run (final variables, no test figures) to "
                           "<dir>/runs_<task>_<variant>_lr<lr>_seed<s><tag>.pkl as it ends, "
                           "and stop before choosing")
  parser.add_argument("--from-runs", default=None,
                      help="comma-separated .pkl files or folders that --save-runs wrote (e.g. "
                           "one rate per machine session): choose, test and report, no sweep")
  args = parser.parse_args(argv)
  if args.save_runs and args.from_runs:
    parser.error("--save-runs and --from-runs: give one of them")
  lrs = mnist1d.parse_lrs(args.lrs)
  os.makedirs(args.results, exist_ok=True)
  sections = []
  for name in args.tasks.split(","):
    if name not in TASKS:
      raise ValueError(f"--tasks: unknown task {name!r}; expected some of {sorted(TASKS)}")
    factory, kwargs, metric = TASKS[name]
    kwargs = dict(kwargs)
    if args.steps is not None:
      kwargs["steps"] = args.steps
    if args.controller:
      kwargs["controller"] = json.loads(args.controller)
    if args.life:
      kwargs["life"] = json.loads(args.life)
    out_dir = os.path.join(args.out, name)
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    if args.save_runs:
      os.makedirs(args.save_runs, exist_ok=True)

      def save(r, name=name):
        # One file a run, written as it ends: a sitting cut short keeps the runs it finished.
        path = os.path.join(args.save_runs,
                            f"runs_{name}_{r.variant}_lr{r.lr:g}_seed{r.seed}{args.tag}.pkl")
        experiments.save_results([r], path)
        print(r.summary(name), "->", path, flush=True)

      experiments.sweep(factory, kwargs, variants=args.variants.split(","), lrs=lrs,
                        seeds=args.seeds, workers=args.workers, log_dir=out_dir, on_result=save)
      continue
    if args.from_runs:
      paths = []
      for entry in args.from_runs.split(","):
        paths += (sorted(glob.glob(os.path.join(entry, f"runs_{name}_*.pkl")))
                  if os.path.isdir(entry) else [entry])
      results = [r for path in paths for r in experiments.load_results(path)]
      result = experiments.summarize_protocol(factory(**kwargs), results, log_dir=out_dir,
                                              read_test=not args.val_only)
    else:
      result = experiments.run_protocol(factory, kwargs, variants=args.variants.split(","),
                                        lrs=lrs, seeds=args.seeds, workers=args.workers,
                                        log_dir=out_dir, read_test=not args.val_only)
    table = experiments.markdown_table(result["rows"], metric)
    section = (f"### {name}\n\n{table}\n\nverdict: {json.dumps(result['verdict'])}\n\n"
               f"(wall time of the task: {time.perf_counter() - start:.0f} s)\n")
    print(section, flush=True)
    sections.append(section)
    runs = [{k: v for k, v in r.items() if k != "history"} for r in result["runs"]]
    report = {"task": name, "args": {**vars(args), "task_kwargs": kwargs}, "rows": result["rows"],
              "verdict": result["verdict"], "chosen": result["chosen"], "runs": runs,
              "date": time.strftime("%Y-%m-%d"), "wall_time": result["wall_time"],
              # The char LM's corpus is this Python's standard library: results are tied to it.
              "python": sys.version.split()[0], "platform": platform.platform()}
    with open(os.path.join(args.results, f"growth_{name}{args.tag}.json"), "w") as fh:
      json.dump(report, fh, indent=1)
    if not args.no_plots:
      from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
      plots.plot_protocol(result["rows"], os.path.join(out_dir, f"{metric}_vs_params.png"),
                          metric=metric, title=f"{name}: test {metric} against parameters")
      plots.plot_metric_vs_flops(result, os.path.join(out_dir, f"val_{metric}_vs_flops.png"),
                                 title=f"{name}: validation {metric} against training FLOPs")
      if result["grown_log"]:
        plots.plot_run(result["grown_log"], out_dir)
  if not sections:
    return
  with open(os.path.join(args.out, f"growth{args.tag}.md"), "w") as fh:
    fh.write("\n".join(sections))


if __name__ == "__main__":
  main(sys.argv[1:])
