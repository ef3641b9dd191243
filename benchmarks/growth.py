"""The efficacy report: does growth pay? One run, mean ± std over RNG seeds, for MNIST-1D and
the character LM: fixed-small, fixed-large, the ceiling (every seed's child present from the
start) and grown (starts as fixed-small; Tamiyo decides).

    python benchmarks/growth.py                       # the defaults (MNIST-1D 4000/1000, 6000 steps, 3 seeds)
    python benchmarks/growth.py --tasks mnist1d --samples 10000 --noise 0.5 --small 16 --steps 3000
    python benchmarks/growth.py --tasks char_lm --lm-steps 2000 --seeds 3

Every dataset setting, width, step budget and RNG seed is a command-line argument; results
go to `--out` (markdown tables, JSON, and accuracy-against-parameters plots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import char_lm  # noqa: E402  pylint: disable=g-import-not-at-top
import mnist1d_mlp as mnist1d  # noqa: E402  pylint: disable=g-import-not-at-top

from kasmina_jax import experiments  # noqa: E402  pylint: disable=g-import-not-at-top


def _lm_args(args) -> argparse.Namespace:
  return argparse.Namespace(
      seeds=args.seeds, steps=args.lm_steps, batch_size=args.lm_batch_size, context=args.context,
      train_bytes=args.train_bytes, val_bytes=args.val_bytes, small=args.lm_small,
      large=args.lm_large, child_width=args.lm_child_width, lr=args.lm_lr,
      variants=args.variants, progress=args.progress)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default="mnist1d,char_lm")
  parser.add_argument("--out", default="runs/growth")
  mnist1d.add_arguments(parser)  # --seeds --steps --samples --noise --small --large ...
  parser.add_argument("--lm-steps", type=int, default=1500)
  parser.add_argument("--lm-batch-size", type=int, default=32)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--train-bytes", type=int, default=400_000)
  parser.add_argument("--val-bytes", type=int, default=16_448)
  parser.add_argument("--lm-small", type=int, default=32)
  parser.add_argument("--lm-large", type=int, default=64)
  parser.add_argument("--lm-child-width", type=int, default=32)
  parser.add_argument("--lm-lr", type=float, default=3e-3)
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  report = {"args": vars(args), "tasks": {}}
  sections = []
  for task in args.tasks.split(","):
    start = time.perf_counter()
    if task == "mnist1d":
      results = mnist1d.run(args, os.path.join(args.out, "mnist1d"))
      metric = "accuracy"
    elif task == "char_lm":
      results = char_lm.run(_lm_args(args), os.path.join(args.out, "char_lm"))
      metric = "accuracy"
    else:
      raise ValueError(f"--tasks: unknown task {task!r} (mnist1d, char_lm)")
    rows = experiments.summarize(results)
    table = experiments.markdown_table(rows, metric)
    grown = {r["name"]: r for r in rows}
    verdict = ""
    if "grown" in grown and "fixed_small" in grown and "ceiling" in grown:
      g, s, c = grown["grown"], grown["fixed_small"], grown["ceiling"]
      gap = 100 * (c["metric_mean"] - g["metric_mean"])
      margin = (g["metric_mean"] - s["metric_mean"]) / max(s["metric_std"], g["metric_std"], 1e-9)
      verdict = (f"grown − fixed-small: {100 * (g['metric_mean'] - s['metric_mean']):+.2f} points "
                 f"({margin:.1f}× the larger std); ceiling − grown: {gap:+.2f} points; "
                 f"grown params {g['params']:.0f} (ceiling {c['params']:.0f}).")
    sections.append(f"### {task}\n\n{table}\n\n{verdict}\n\n(wall time of the task: "
                    f"{time.perf_counter() - start:.0f} s)\n")
    report["tasks"][task] = {"rows": rows, "verdict": verdict,
                             "runs": [{"variant": r.variant, "seed": r.seed, "metric": r.metric,
                                       "val_loss": r.val_loss, "params": r.params,
                                       "fossilized": r.fossilized, "wall_time": r.wall_time,
                                       "history": r.history} for r in results]}
    print(sections[-1], flush=True)
    if not args.no_plots:
      from kasmina_jax import plots  # pylint: disable=g-import-not-at-top
      plots.plot_comparison(rows, os.path.join(args.out, f"{task}_accuracy_vs_params.png"),
                            title=f"{task}: held-out accuracy against parameters")
  with open(os.path.join(args.out, "growth.md"), "w") as fh:
    fh.write("\n".join(sections))
  with open(os.path.join(args.out, "growth.json"), "w") as fh:
    json.dump(report, fh, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
