"""Whole MNIST-1D growth runs per second (and per minute) of the learned-Tamiyo population
(`kasmina_jax.population`), on whatever device JAX finds; writes JSON.

    python benchmarks/learned_tamiyo.py [--small] [--out benchmarks/results/...json]

The full preset is `examples/learn_tamiyo.py`'s (the population one ES generation runs: every
candidate, the search's mean and the heuristic, on the generation's runs); `--small` is its
2-CPU-core preset. The figure is measured after compilation (the first call's time, with
compilation, is reported beside it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import jax  # noqa: E402

import learn_tamiyo  # noqa: E402  (examples/learn_tamiyo.py: the presets)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="the 2-CPU-core preset")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls (median reported)")
  parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                      "learned_tamiyo_throughput_<device>_<date>.json)")
  args = parser.parse_args(argv)
  preset = learn_tamiyo.SMALL if args.small else learn_tamiyo.FULL
  fast = jax.devices()[0].platform == "cpu"
  result = {"mode": "small" if args.small else "full",
            **learn_tamiyo.throughput(preset, fast=fast, repeats=args.repeats)}
  date = datetime.date.today().isoformat()
  out = args.out or os.path.join(HERE, "results",
                                 f"learned_tamiyo_throughput_{result['device']}_{date}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"{result['runs_per_second']:.2f} whole growth runs/s "
        f"({result['runs_per_minute']:.0f}/min) on {result['device']}, population "
        f"{result['population']}, {result['steps_per_run']} steps a run; first call "
        f"{result['first_call_seconds']:.1f}s\nwrote {out}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
