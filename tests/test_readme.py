"""The README's tour runs as pasted: its python snippets, in order, in one namespace (the
README says they run so), in a fresh process in a scratch directory (the Flax snippet writes
its event log)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def tour_snippets() -> list[tuple[str, str]]:
  """`(section heading, code)` of every ```python block between "## A short tour" and the
  next top-level section."""
  text = open(README, encoding="utf-8").read()
  start = text.index("\n## A short tour\n")
  end = text.index("\n## ", start + 1)
  tour = text[start:end]
  out, heading = [], None
  for m in re.finditer(r"^### ([^\n]+)$|^```python\n(.*?)^```$", tour, re.M | re.S):
    if m.group(1) is not None:
      heading = m.group(1)
    else:
      out.append((heading, m.group(2)))
  return out


def test_the_tour_has_the_snippets_this_test_runs():
  headings = [h for h, _ in tour_snippets()]
  # One per section that shows code; a lost snippet would silently shrink the test below.
  for section in ("The lifecycle, as pure functions", "The chunked layer",
                  "In a Flax model, with the training loop", "One loop for Linen, NNX and a mesh",
                  "Your own grafting strategy", "NNX by hand",
                  "Growing a transformer: heads and blocks (`kasmina_jax.sequence`, `transformer`)"):
    assert section in headings, section
  assert sum(h.startswith("A learned Tamiyo") for h in headings) == 1
  assert len(headings) == 8


# Run in a fresh process (as a reader pasting the tour would), with XLA's CPU backend
# optimisations off: the snippets are unchanged, only their compilation (most of the test's
# time) is cheaper. The last lines check what the snippets say they produce.
_RUNNER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import test_readme
namespace = {"__name__": "__readme__"}
for heading, code in test_readme.tour_snippets():
  try:
    exec(compile(code, "README.md (" + heading + ")", "exec"), namespace)
  except Exception as e:
    raise SystemExit("the README snippet of section %r failed: %r" % (heading, e))
assert os.path.exists("run.jsonl")
assert namespace["history"] and "val_accuracy" in namespace["history"][-1]
assert bool(namespace["ok"].any()) and namespace["accepted"].shape == (8,)
assert namespace["out"].shape == (256, 4096)
assert set(namespace["reports"]) == {("h0", "kasmina"), ("h1", "kasmina")}
assert type(namespace["model"]).__name__ == "GrowableLM" and namespace["state"].kasmina
print("tour ok")
"""


@pytest.mark.slow
def test_the_tour_runs_as_pasted(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                               "--xla_llvm_disable_expensive_passes=true"]).strip()
  run = subprocess.run([sys.executable, "-c", _RUNNER, os.path.join(ROOT, "tests")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "tour ok" in run.stdout
