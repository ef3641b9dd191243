"""The epoch loop around the pure functions of `kasmina_jax.steps`: `fit` and `fit_loop`
(shared by `distributed.fit`), the end of epoch's Python shell (`end_of_epoch`,
`finish_epoch`: emergency rollback to the last good state, the event log), the history and
the progress bar. `kasmina_jax.training` re-exports all of it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import jax
import numpy as np

from kasmina_jax import _checks
from kasmina_jax import data_checks
from kasmina_jax import grafting as graft_lib
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import tamiyo
from kasmina_jax.losses import LossFn
from kasmina_jax.steps import (EpochOutput, TrainState, _is_child, apply_rollback,
                               epoch_transition, layer_name, refresh_liveness,
                               rollback_in_place, train_step)


def param_counts(state: TrainState) -> dict[str, int]:
  """Host parameters, allocated child parameters, and active child parameters."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  children = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.tree.map(lambda c: c if _is_child(c) else None, state.params, is_leaf=_is_child)))
  active = 0
  for lv in knn.find_layers(state.kasmina).values():
    live = np.asarray(lifecycle.stage_in(lv.seeds.stage, lifecycle.ACTIVE_STAGES))
    b = np.clip(np.asarray(lv.seeds.blueprint), 0, lv.spec.num_blueprints - 1)
    active += int(np.sum(np.where(live, lv.spec.catalog.param_count[b], 0)))
  return {"host": total - children, "allocated": children, "active": active,
          "model": total - children + active}


def _stage_names(stages) -> list[str]:
  return [lifecycle.Stage(int(s)).name for s in np.asarray(stages)]


def log_epoch(log, state: TrainState, out: EpochOutput, rolled_back: bool, fr_extra=None):
  """Writes an epoch's events (epoch summary, transitions, field reports) to an EventLog."""
  epoch, step = int(out.report.epoch), int(state.step)
  layers = _by_name(knn.find_layers(state.kasmina))
  counts = param_counts(state)
  log.epoch(
      epoch=epoch, step=step, train_loss=float(out.train_loss), val_loss=float(out.val_loss),
      val_metric=float(out.val_metrics.get("accuracy", np.nan)) if out.val_metrics else None,
      params_active=counts["model"], params_allocated=counts["host"] + counts["allocated"],
      stages={k: np.asarray(v.seeds.stage).tolist() for k, v in layers.items()},
      health={k: {f: np.asarray(getattr(r.health, f)).tolist()
                  for f in tamiyo.HEALTH_FIELDS}
              for k, r in _by_name(out.report.layers).items()},
      alpha={k: np.asarray(v.seeds.alpha).tolist() for k, v in layers.items()},
      extra={"rolled_back": rolled_back,
             "delta": {k: np.asarray(v).tolist() for k, v in _by_name(out.delta).items()},
             **{f"train_{k}": float(v) for k, v in out.train_metrics.items()}})
  for path in out.old_stage:
    old, new = np.asarray(out.old_stage[path]), np.asarray(out.new_stage[path])
    name = layer_name(path)
    lv = layers[name]
    for k in np.nonzero(old != new)[0]:
      b = int(np.asarray(lv.seeds.blueprint)[k])
      log.transition(epoch=epoch, step=step, layer=name, seed=int(k),
                     from_stage=lifecycle.Stage(int(old[k])).name,
                     to_stage=lifecycle.Stage(int(new[k])).name,
                     blueprint=lv.spec.catalog.names[b] if b >= 0 else None)
  for fr in ([fr_extra] if rolled_back and fr_extra is not None else [out.field_reports]):
    for rec in field_report_records(state, fr):
      log.field_report(rec)


def _by_name(per_layer: dict) -> dict:
  """A `{layer path: value}` map keyed by `layer_name` instead (for JSON outputs)."""
  return {layer_name(p): v for p, v in per_layer.items()}


def field_report_records(state: TrainState, fr) -> list[dict]:
  """JSON records of `fr` (field reports keyed by layer path), layers, blueprints and
  grafting strategies by name."""
  layers = _by_name(knn.find_layers(state.kasmina))
  return tamiyo.to_records(
      fr, blueprint_names={k: lv.spec.catalog.names for k, lv in layers.items()},
      strategy_names={k: graft_lib.strategy_names(lv.strategies) for k, lv in layers.items()})


def end_of_epoch(state: TrainState, val_batch: dict, loss_fn: LossFn, *,
                 policy: Callable = tamiyo.decide, last_good=None, log=None):
  """The epoch end with its Python shell: transition, emergency rollback, event log.

  `last_good` is a `checkpoint.InMemoryCheckpoint` (or anything with `save`, `restore` and
  `has_value`): saved at every epoch end that passes the rollback test, restored on rollback.
  Without one (None, or nothing saved yet) a rollback restores nothing but still ends the
  in-flight seeds (`rollback_in_place`). Either way, on a rollback `out.field_reports` holds
  the rolled-back seeds' reports (the ones logged and counted by `tamiyo.observe`).
  Returns `(state, out, rolled_back)`.
  """
  new_state, out = epoch_transition(state, val_batch, loss_fn, policy)
  return finish_epoch(new_state, out, restore=apply_rollback, last_good=last_good, log=log)


def finish_epoch(new_state: TrainState, out: EpochOutput, *, restore: Callable = apply_rollback,
                 last_good=None, log=None):
  """`end_of_epoch` after the transition: the emergency rollback (`restore(base, ctrl)` on
  the last good state, e.g. `apply_rollback` or a placed, compiled twin of it; or
  `rollback_in_place` with nothing to restore), the last good state's save and the event
  log. Shared by every loop (`distributed` passes its mesh-placed rollback).
  Returns `(state, out, rolled_back)`."""
  # A replicated scalar under a mesh: every process takes the same branch.
  rolled_back = bool(out.rollback_requested)
  fr_extra = None
  if rolled_back:
    if last_good is not None and last_good.has_value:
      base = last_good.restore()
      base = base.replace(epoch=new_state.epoch, rng=new_state.rng, stats=new_state.stats)
      new_state, fr_extra = restore(base, new_state.ctrl)
    else:
      new_state, fr_extra = rollback_in_place(new_state, out.field_reports)
    out = out.replace(field_reports=fr_extra)
  if last_good is not None and not rolled_back:
    last_good.save(new_state)
  if log is not None:
    log_epoch(log, new_state, out, rolled_back, fr_extra)
  # The stages are fixed until the next epoch end: let the steps compile on them.
  new_state = refresh_liveness(new_state)
  return new_state, out, rolled_back


def _batches(data: dict, batch_size: int, rng: np.random.Generator):
  n = len(next(iter(data.values())))
  order = rng.permutation(n)
  for i in range(n // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {k: v[idx] for k, v in data.items()}


def epoch_record(state: TrainState, out: EpochOutput, rolled_back: bool, start: float) -> dict:
  """One epoch's entry of `fit`'s history (plain Python values)."""
  counts = param_counts(state)
  active = sum(int(np.sum(np.asarray(lifecycle.stage_in(v.seeds.stage, lifecycle.ACTIVE_STAGES))))
               for v in knn.find_layers(state.kasmina).values())
  return {
      "epoch": int(out.report.epoch), "train_loss": float(out.train_loss),
      "val_loss": float(out.val_loss),
      **{f"val_{k}": float(v) for k, v in out.val_metrics.items()},
      "params": counts["model"], "active_seeds": active, "rolled_back": rolled_back,
      "stages": {k: _stage_names(v) for k, v in _by_name(out.new_stage).items()},
      "time": time.perf_counter() - start,
  }


class PlainProgress:
  """A dependency-free progress line on stderr (what `progress_bar` gives without tqdm):
  `update`, `set_postfix` and `close` as tqdm's, redrawn at most every `interval` seconds."""

  def __init__(self, total: int, description: str, *, stream=None, interval: float = 1.0):
    self.total, self.description, self.n = int(total), description, 0
    self.postfix = ""
    self._stream = stream
    self._interval = interval
    self._last = -float("inf")

  @property
  def stream(self):
    return sys.stderr if self._stream is None else self._stream

  def _draw(self, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self._last < self._interval:
      return
    self._last = now
    self.stream.write(f"\r{self.description}: {self.n}/{self.total} steps {self.postfix}".rstrip())
    self.stream.flush()

  def update(self, n: int = 1) -> None:
    self.n += n
    self._draw()

  def set_postfix(self, **fields) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in fields.items())
    self._draw(force=True)

  def close(self) -> None:
    self._draw(force=True)
    self.stream.write("\n")
    self.stream.flush()


def progress_bar(total: int, description: str):
  """A tqdm bar when tqdm is installed (an optional extra, not a dependency), else a
  `PlainProgress` line, so `fit(progress=True)` works on a bare install."""
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return PlainProgress(total, description)
  return tqdm(total=total, desc=description, leave=False)


class NonFiniteTrainingError(RuntimeError):
  """Raised by `fit` when `max_skipped_epochs` epochs in a row skipped every step for a
  non-finite loss or gradient: such a run cannot learn, and going on would only roll back
  epoch after epoch. `state` is the last good state (the one the emergency rollback keeps:
  save it with `checkpoint.save` to resume from it), `history` the epochs run so far and
  `epoch` the epoch at which the run stopped."""

  def __init__(self, message: str, *, state, history: list, epoch: int):
    super().__init__(message)
    self.state = state
    self.history = history
    self.epoch = epoch


def fit(state: TrainState, train_data: dict, val_data: dict, loss_fn: LossFn, *,
        epochs: int, batch_size: int, policy: Callable = tamiyo.decide, seed: int = 0,
        log_path: str | None = None, progress: bool = True, rollback: bool = True,
        description: str = "fit", num_classes="auto", max_skipped_epochs: int | None = 3):
  """Trains for `epochs` epochs over in-memory arrays (`train_data["x"]` plus labels).

  Both data sets are checked once before training (`kasmina_jax.data_checks`): a mapping
  with `"x"`, one row per example in every array, finite floating arrays, the keys the loss
  reads and, where the class count is known, integer labels `"y"` in `[0, num_classes)`
  (`num_classes="auto"`: the model's output width for `cross_entropy_loss`, no label check
  for other losses; an int: that count; None: no label check). Bad data is a ValueError (or a
  TypeError for a wrong dtype) naming the array, its row count and the first bad row.

  `max_skipped_epochs`: after this many consecutive epochs in which every step was skipped
  for a non-finite loss, `fit` raises `NonFiniteTrainingError` with the last good state
  (None: never).

  Returns `(state, history)`, `history` a list of per-epoch dicts (losses, metrics, stages,
  parameter counts, wall time). With `log_path`, writes the JSONL event log.
  """
  check_fit_args(train_data, epochs, batch_size, val_data=val_data, state=state,
                 loss_fn=loss_fn, num_classes=num_classes)
  return fit_loop(
      state, train_data, val_data, loss_fn, epochs=epochs, batch_size=batch_size,
      policy=policy, seed=seed, log_path=log_path, progress=progress, rollback=rollback,
      description=description, max_skipped_epochs=max_skipped_epochs)


_NO_VAL = object()


def check_fit_args(train_data: dict, epochs: int, batch_size: int, *, val_data=_NO_VAL,
                   state: TrainState | None = None, loss_fn: LossFn | None = None,
                   num_classes="auto") -> None:
  """`fit`'s argument checks: the counts, and the data (`data_checks.check_data`; the loss's
  keys and the class count only with `state` and `loss_fn`)."""
  _checks.positive_int("epochs", epochs)
  _checks.positive_int("batch_size", batch_size)
  n = data_checks.check_data("train_data", train_data, state=state, loss_fn=loss_fn,
                             num_classes=num_classes)
  if batch_size > n:
    raise ValueError(f"batch_size: {batch_size} exceeds the {n} training rows")
  if val_data is not _NO_VAL:
    data_checks.check_data("val_data", val_data, state=state, loss_fn=loss_fn,
                           num_classes=num_classes)


def _check_max_skipped(value) -> int | None:
  if value is None:
    return None
  return _checks.positive_int("max_skipped_epochs", value)


def fit_loop(state: TrainState, train_data: dict, val_data: dict, loss_fn: LossFn, *,
             epochs: int, batch_size: int, policy: Callable = tamiyo.decide, seed: int = 0,
             log_path: str | None = None, progress: bool = True, rollback: bool = True,
             description: str = "fit", step: Callable = train_step,
             end: Callable = end_of_epoch, batch_hook: Callable | None = None,
             primary: bool = True, run_info: dict | None = None,
             max_skipped_epochs: int | None = 3):
  """The epoch loop of every `fit` (this module's and `distributed.fit`): batches in a
  (seed, epoch) order, `step(state, batch, loss_fn)` per batch, `end(state, val_data, loss_fn,
  policy=, last_good=, log=)` per epoch, the in-memory last good state, the event log and
  progress (on the `primary` process only), and the history.

  `batch_hook(batch)` places a batch before its step (None: as is); `run_info` joins the
  event log's run record; `max_skipped_epochs` as in `fit`."""
  max_skipped_epochs = _check_max_skipped(max_skipped_epochs)
  n = len(train_data["x"])
  # Read the stages once at the start (a restored or hand-made state may not know them), so a
  # resumed run compiles the program an uninterrupted one runs.
  state = refresh_liveness(state)
  from kasmina_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  last_good = ckpt_lib.InMemoryCheckpoint() if rollback else None
  if last_good is not None:
    last_good.save(state)
  log = None
  if log_path is not None and primary:
    from kasmina_jax import events  # pylint: disable=g-import-not-at-top
    log = events.EventLog(log_path, run={"description": description, "epochs": epochs,
                                         "batch_size": batch_size, "seed": seed,
                                         **(run_info or {})})
  steps_per_epoch = n // batch_size
  bar = progress_bar(epochs * steps_per_epoch, description) if progress and primary else None
  history = []
  skipped_in_a_row = 0
  start = time.perf_counter()
  try:
    for _ in range(epochs):
      # The data order depends on (seed, epoch) only, so a resumed run sees the same batches.
      rng = np.random.default_rng([seed, int(state.epoch)])
      for batch in _batches(train_data, batch_size, rng):
        if batch_hook is not None:
          batch = batch_hook(batch)
        state, _ = step(state, batch, loss_fn)
        if bar is not None:
          bar.update(1)
      # Replicated scalars under a mesh: every process takes the same branch.
      skipped_all = bool(state.stats.steps > 0) and bool(
          state.stats.nonfinite_steps >= state.stats.steps)
      state, out, rolled_back = end(state, val_data, loss_fn, policy=policy,
                                    last_good=last_good, log=log)
      record = epoch_record(state, out, rolled_back, start)
      history.append(record)
      skipped_in_a_row = skipped_in_a_row + 1 if skipped_all else 0
      if max_skipped_epochs is not None and skipped_in_a_row >= max_skipped_epochs:
        good = last_good.restore() if last_good is not None and last_good.has_value else state
        raise NonFiniteTrainingError(
            f"fit: every step of the last {skipped_in_a_row} epochs (epochs "
            f"{record['epoch'] - skipped_in_a_row + 1}..{record['epoch']}) had a non-finite "
            "loss or gradient and was skipped, so the run cannot learn (a learning rate too "
            "large, a loss that overflows, or data the checks could not see?). The last good "
            "state is this error's `state`; max_skipped_epochs= sets the patience",
            state=good, history=history, epoch=record["epoch"])
      if bar is not None:
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        acc=f"{record.get('val_accuracy', float('nan')):.3f}",
                        seeds=record["active_seeds"])
  finally:
    if bar is not None:
      bar.close()
    if log is not None:
      log.close()
  return state, history
