"""A JSONL event log of a run: epoch summaries, commands, stage transitions, field reports.

One JSON object a line, appended and flushed as it happens (a crash loses at most the line
being written). Every line has `type`, `epoch`, `step` (null where not applicable) and
`time` (Unix seconds); the first line of each run is a `{"type": "run", ...}` header, so one
file may hold several runs or the resumptions of one (readers keep the last record of an
epoch). Values are converted to plain JSON: numpy / jax scalars and arrays become numbers and
(nested) lists, enums their names, and non-finite floats `null` (strict JSON, readable
anywhere).

Record types written by the helpers (all take `epoch` and `step`):

- `epoch`: train_loss, val_loss, val_metric, params_active, params_allocated,
  stages `{layer: [stage id per seed]}`, health `{layer: {metric: [value per seed]}}`,
  alpha `{layer: [alpha per seed]}`, extra (free-form, e.g. `rolled_back`);
- `commands`: layer, ops (ids), op_names, accepted, targets / blueprints / strategies;
- `transition`: layer, seed, from_stage, to_stage (stage names), blueprint;
- `field_report`: a record of `tamiyo.to_records` (outcome, blueprint, strategy, health before
  and after, delta, param_count / param_bytes, flops_per_row, gradient_variance,
  lifecycle_steps).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import time
from typing import Any

import numpy as np

from kasmina_jax import lifecycle

RECORD_KEYS = ("type", "epoch", "step", "time")


def to_json(value: Any, *, where: str = "value") -> Any:
  """`value` as plain JSON types: numpy / jax arrays to lists, NaN and inf to None."""
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, enum.Enum):
    return value.name
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {_json_key(k): to_json(v, where=f"{where}[{k!r}]") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_json(getattr(value, f.name), where=f"{where}.{f.name}")
            for f in dataclasses.fields(value)}
  if hasattr(value, "__array__") or isinstance(value, np.generic):
    arr = np.asarray(value)
    if arr.dtype.kind in "biu":
      return arr.tolist()
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
      arr = arr.astype(np.float64)
      if arr.ndim == 0:
        return float(arr) if math.isfinite(arr) else None
      return np.where(np.isfinite(arr), arr, None).tolist()  # object array: NaN -> None
    if arr.dtype.kind in "US":
      return arr.tolist()
    raise TypeError(f"{where}: cannot write an array of dtype {arr.dtype} to the event log")
  raise TypeError(f"{where}: cannot write a {type(value).__name__} to the event log")


def _json_key(key) -> str:
  if isinstance(key, tuple):
    return "/".join(str(k) for k in key)
  if isinstance(key, enum.Enum):
    return key.name
  return str(key)


def stage_name(stage) -> str:
  """A stage given as a `Stage`, its id or its name, as its name (validated)."""
  if isinstance(stage, str):
    try:
      return lifecycle.Stage[stage.upper()].name
    except KeyError:
      raise ValueError(f"stage: unknown name {stage!r}; known: "
                       f"{[s.name for s in lifecycle.Stage]}") from None
  try:
    return lifecycle.Stage(int(stage)).name
  except (ValueError, TypeError):
    raise ValueError(f"stage: expected a Stage, its id (0..{lifecycle.NUM_STAGES - 1}) or its "
                     f"name, got {stage!r}") from None


def _op_name(op) -> str:
  try:
    return lifecycle.Op(int(op)).name
  except ValueError:
    return str(int(op))


class EventLog:
  """Append-only JSONL event log; a context manager (`with EventLog(path) as log: ...`)."""

  def __init__(self, path, *, run: dict | None = None):
    self.path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(parent, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self.log("run", **(run or {}))

  # -- plumbing --
  @property
  def closed(self) -> bool:
    return self._file.closed

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> "EventLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def log(self, type: str, **fields) -> dict:  # pylint: disable=redefined-builtin
    """Appends one record `{"type": type, "epoch", "step", "time", **fields}`; returns it."""
    if not isinstance(type, str) or not type:
      raise ValueError(f"type: expected a non-empty str, got {type!r}")
    if self._file.closed:
      raise ValueError(f"EventLog {self.path}: the log is closed")
    record = {"type": type, "epoch": fields.pop("epoch", None), "step": fields.pop("step", None),
              "time": fields.pop("time", time.time())}
    record.update(fields)
    record = to_json(record, where=type)
    line = json.dumps(record, allow_nan=False, separators=(",", ":"))
    self._file.write(line + "\n")
    self._file.flush()
    return record

  # -- record types --
  def epoch(self, *, epoch, step, train_loss, val_loss, val_metric=None, params_active,
            params_allocated, stages: dict[str, list[int]],
            health: dict[str, dict[str, list[float]]],
            alpha: dict[str, list[float]] | None = None, extra: dict | None = None) -> dict:
    """An epoch's summary; `stages[layer]`, `health[layer][metric]` and `alpha[layer]` hold one
    value per seed of the layer."""
    for name, per_layer in (("stages", stages), ("health", health), ("alpha", alpha)):
      if per_layer is not None and not isinstance(per_layer, dict):
        raise TypeError(f"{name}: expected a dict keyed by layer name, got "
                        f"{type(per_layer).__name__}")
    return self.log("epoch", epoch=epoch, step=step, train_loss=train_loss, val_loss=val_loss,
                    val_metric=val_metric, params_active=params_active,
                    params_allocated=params_allocated, stages=stages, health=health,
                    alpha=alpha, extra=extra or {})

  def commands(self, *, epoch, step, layer: str, ops, accepted, targets=None, blueprints=None,
               strategies=None, **extra) -> dict:
    """The commands given to one layer at an epoch end (one entry per seed) and which of
    them the gates accepted."""
    ops_list = to_json(ops, where="ops")
    accepted_list = to_json(accepted, where="accepted")
    if not isinstance(ops_list, list) or not isinstance(accepted_list, list):
      raise TypeError("ops, accepted: expected one entry per seed")
    if len(ops_list) != len(accepted_list):
      raise ValueError(f"accepted: expected {len(ops_list)} entries (one per op), got "
                       f"{len(accepted_list)}")
    return self.log("commands", epoch=epoch, step=step, layer=layer, ops=ops_list,
                    op_names=[_op_name(o) for o in ops_list], accepted=accepted_list,
                    targets=targets, blueprints=blueprints, strategies=strategies, **extra)

  def transition(self, *, epoch, step, layer, seed, from_stage, to_stage,
                 blueprint: str | None = None, **extra) -> dict:
    """One seed's stage change (stages as `Stage`, id or name; written as names)."""
    return self.log("transition", epoch=epoch, step=step, layer=layer, seed=int(seed),
                    from_stage=stage_name(from_stage), to_stage=stage_name(to_stage),
                    blueprint=blueprint, **extra)

  def field_report(self, record: dict) -> dict:
    """A field report (a record of `tamiyo.to_records`)."""
    if not isinstance(record, dict):
      raise TypeError(f"record: expected a dict, got {type(record).__name__}")
    fields = dict(record)
    fields.pop("type", None)
    return self.log("field_report", **fields)


def read_events(path) -> list[dict]:
  """The records of a JSONL event log, in order.

  A last line cut short (a crash mid-write) is skipped; any other unreadable line raises a
  `ValueError` naming its line number.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      if i == last and not line.endswith("}"):
        break  # the line being written when the run stopped
      raise ValueError(f"{path}:{i + 1}: not a JSON record: {err}") from err
    if not isinstance(record, dict) or "type" not in record:
      raise ValueError(f"{path}:{i + 1}: not an event record (a JSON object with a 'type')")
    records.append(record)
  return records

