"""Field reports as JSON-ready records (`to_records`), outside `jit`."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

from kasmina_jax import lifecycle
from kasmina_jax.lifecycle import Stage
from kasmina_jax.tamiyo.config import GRAFTING_STRATEGY_NAMES, HEALTH_FIELDS
from kasmina_jax.tamiyo.bandit import FieldReports


def layer_name(path: tuple) -> str:
  """A layer path (the tuple of keys down to a Kasmina layer, how every map of layers is
  keyed) as the string the JSON outputs use: its keys joined by "/" ("hidden0/kasmina")."""
  if not isinstance(path, tuple):
    raise TypeError(f"path: expected a tuple of keys, got {type(path).__name__}")
  return "/".join(str(p) for p in path)


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        value = getattr(key, attr)
        parts.append(layer_name(value) if isinstance(value, tuple) else str(value))
        break
    else:
      parts.append(str(key))
  return "/".join(parts) if parts else "layer"


def _float_or_none(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _names_for(names, layer: str, index: int, what: str):
  if names is None:
    return None
  if isinstance(names, Mapping):
    if layer not in names:
      raise ValueError(f"{what}: no entry for layer {layer!r}; has {sorted(names)}")
    return tuple(names[layer])
  if isinstance(names, Sequence) and not isinstance(names, str):
    names = tuple(names)
    if names and all(isinstance(n, str) for n in names):
      return names
    if names and all(isinstance(n, Sequence) and not isinstance(n, str) for n in names):
      if index >= len(names):
        raise ValueError(f"{what}: {len(names)} per-layer lists for more layers")
      return tuple(names[index])
  raise TypeError(f"{what}: expected a sequence of names, a sequence of such per layer or a "
                  f"dict from layer name to names, got {type(names).__name__}")


def _lookup(names, i: int) -> str | None:
  if i < 0:
    return None
  if names is None:
    return str(i)
  return names[i] if i < len(names) else str(i)


def to_records(reports, *, layer_names: Sequence[str] | Mapping[str, str] | None = None,
               blueprint_names=None, strategy_names: Sequence[str] | None = None) -> list[dict]:
  """JSON-serialisable records (plain Python types) of the valid field reports; outside `jit`.

  `reports`: a pytree of `FieldReports` keyed like the seeds. Layers are named by their pytree
  path (for a dict of layers: the key); `layer_names` renames them: a dict from path name to
  name, or a sequence, which is either exactly the path names (in any order; nothing is
  renamed) or one name per layer in pytree order (for a dict: sorted keys). `blueprint_names`: one
  sequence for every layer, a sequence of sequences (one per layer) or a dict from layer name
  to names (default: the id as a string). `strategy_names`: grafting strategy names, in the
  same forms (default `GRAFTING_STRATEGY_NAMES`, the built-in tuple's). Non-finite floats
  become None.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
      reports, is_leaf=lambda x: isinstance(x, FieldReports))
  for path, leaf in flat:
    if not isinstance(leaf, FieldReports):
      raise TypeError(f"reports: leaf at {jax.tree_util.keystr(path)} is a "
                      f"{type(leaf).__name__}, expected FieldReports")
  path_names = [_path_name(path) for path, _ in flat]
  if layer_names is None:
    names = path_names
  elif isinstance(layer_names, Mapping):
    names = [str(layer_names.get(p, p)) for p in path_names]
  else:
    layer_names = [str(n) for n in layer_names]
    if len(layer_names) != len(flat):
      raise ValueError(f"layer_names: expected {len(flat)} names, got {len(layer_names)}")
    names = path_names if sorted(layer_names) == sorted(path_names) else layer_names
  if strategy_names is None:
    strategy_names = GRAFTING_STRATEGY_NAMES
  records = []
  for li, (path, r) in enumerate(flat):
    name = names[li]
    bp_names = _names_for(blueprint_names, name, li, "blueprint_names")
    sg_names = _names_for(strategy_names, name, li, "strategy_names")
    r = jax.tree.map(np.asarray, r)
    for k in np.nonzero(r.valid)[0]:
      bp, sg, outcome = int(r.blueprint[k]), int(r.strategy[k]), int(r.outcome[k])
      records.append({
          "layer": name,
          "seed": int(r.seed[k]),
          "blueprint": _lookup(bp_names, bp),
          "blueprint_id": bp,
          "strategy": _lookup(sg_names, sg),
          "strategy_id": sg,
          "outcome": Stage(outcome).name if 0 <= outcome < lifecycle.NUM_STAGES else str(outcome),
          "epoch": int(r.epoch[k]),
          "germinated_epoch": int(r.germinated_epoch[k]),
          "stage_epochs": {st.name: int(r.stage_epochs[k, st]) for st in Stage},
          "health_before": {f: _float_or_none(r.health_before[k, j])
                            for j, f in enumerate(HEALTH_FIELDS)},
          "health_after": {f: _float_or_none(r.health_after[k, j])
                           for j, f in enumerate(HEALTH_FIELDS)},
          "delta": _float_or_none(r.delta[k]),
          "param_count": int(r.param_count[k]),
          "flops_per_row": int(r.flops_per_row[k]),
          "gradient_variance": _float_or_none(r.gradient_variance[k]),
          "param_bytes": int(r.param_bytes[k]),
          "lifecycle_steps": int(r.lifecycle_steps[k]),
      })
  return records
