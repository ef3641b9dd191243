"""How much of each seed's child an export folds in (`export`, `export_lm`)."""

from __future__ import annotations

import numpy as np

from kasmina_jax import lifecycle
from kasmina_jax.lifecycle import Stage

IN_FLIGHT = (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
             Stage.FINE_TUNING)


def fold_weights(seeds: lifecycle.SeedState, include: str, where: str) -> np.ndarray:
  """(K,) the weight with which each seed's child enters the exported layer (0: dropped).

  `include="fossilized"`: FOSSILIZED 1, and an error if any seed is in flight;
  `include="live"`: what the evaluation pass computes: 1 for STABILIZATION .. FOSSILIZED,
  alpha for GRAFTING, 0 otherwise (TRAINING's chunk is still `x`).
  """
  stage = np.asarray(seeds.stage)
  alpha = np.asarray(seeds.alpha, np.float32)
  if include == "fossilized":
    flight = np.isin(stage, [int(s) for s in IN_FLIGHT])
    if flight.any():
      listed = ", ".join(f"seed {k} ({Stage(int(stage[k])).name})" for k in np.flatnonzero(flight))
      raise ValueError(
          f"include='fossilized': layer {where} has seeds in flight: {listed}. Fossilize or "
          "cull them first, or pass include='live' to export the evaluation pass as it is")
    return np.where(stage == Stage.FOSSILIZED, 1.0, 0.0).astype(np.float32)
  full_on = (stage >= Stage.STABILIZATION) & (stage <= Stage.FOSSILIZED)
  return np.where(full_on, 1.0, np.where(stage == Stage.GRAFTING, alpha, 0.0)).astype(np.float32)
