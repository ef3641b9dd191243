"""The checks `training.fit` and `distributed.fit` run on their data once, before training.

A run over data it cannot learn from does not fail on its own: a non-finite input makes every
step's loss non-finite, the step skips its update (`steps.train_step`) and every epoch rolls
back, so `fit` would return its initial parameters after the whole run; a label at or above
the class count makes `optax`'s cross-entropy NaN the same way, and a negative one trains on
garbage without a sign. So the data is refused at the door, with an error that names the
array, its row count and the first bad row (`check_data`).

What is checked, for the training and the validation data alike:

- the data is a mapping of arrays with at least one axis, holding `"x"` (the model's input);
- every array has as many rows (leading axis) as `"x"`;
- every floating array is finite;
- the keys the loss reads are there: the loss is traced once on a probe batch of two rows
  (`jax.eval_shape`, nothing is computed), and a `KeyError` it raises is reported as the
  missing key;
- labels (`"y"`), where the class count is known: integer dtype and every value in
  `[0, num_classes)`. `num_classes="auto"` (the default) knows it for
  `losses.cross_entropy_loss`, whose class count is the model's output width (read from the
  same probe); for any other loss `"auto"` checks no label range (a loss may use `-1` as an
  ignore index, or take float targets); pass `num_classes=` an int to check it for your own
  loss, or None to skip it.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import jax
import numpy as np

from kasmina_jax import linen as knn
from kasmina_jax import losses

LABEL_KEY = "y"


def _rows(name: str, key: str, value) -> int:
  shape = np.shape(value)
  if not shape:
    raise ValueError(f"{name}[{key!r}]: expected an array with a leading row axis, got a "
                     f"scalar ({value!r})")
  return int(shape[0])


def _first_bad_row(bad: np.ndarray) -> int:
  rows = bad.reshape(bad.shape[0], -1).any(axis=1)
  return int(np.argmax(rows))


def check_arrays(name: str, data) -> int:
  """Checks the mapping `data` (keys, lengths, finiteness); returns its row count."""
  if not isinstance(data, collections.abc.Mapping):
    raise TypeError(f"{name}: expected a dict of arrays ({{'x': inputs, 'y': labels, ...}}), "
                    f"got {type(data).__name__}")
  if "x" not in data:
    raise ValueError(f"{name}: expected a key 'x' (the model's input), got keys "
                     f"{sorted(map(str, data))}")
  n = _rows(name, "x", data["x"])
  if n == 0:
    raise ValueError(f"{name}['x']: expected at least one row, got 0")
  for key, value in data.items():
    rows = _rows(name, key, value)
    if rows != n:
      raise ValueError(f"{name}[{key!r}]: {rows} rows, but {name}['x'] has {n}; every array "
                       "needs one row per example")
    dtype = np.result_type(value)
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
      arr = np.asarray(value)
      bad = ~np.isfinite(arr)
      if bad.any():
        row = _first_bad_row(bad)
        shown = arr[row].reshape(-1)[np.argmax(bad[row].reshape(-1))]
        count = int(bad.reshape(n, -1).any(axis=1).sum())
        raise ValueError(f"{name}[{key!r}]: row {row} of {n} holds a non-finite value "
                         f"({shown}); {count} row(s) in all. Every step that sees such a row "
                         "has a non-finite loss and is skipped: drop or repair them")
  return n


def _probe(state, data: dict, loss_fn):
  """Shapes of the model's output and the loss on the first two rows (traced, not run)."""
  batch = {k: np.asarray(v[:2]) for k, v in data.items()}
  variables = {"params": state.params, knn.KASMINA: state.kasmina, **state.model_state}

  def run(variables, batch):
    out, _ = state.model.apply(variables, batch["x"], train=False, mutable=[knn.KASMINA_AUX])
    return out, loss_fn(out, batch)

  return jax.eval_shape(run, variables, batch)


def check_data(name: str, data, *, state=None, loss_fn=None,
               num_classes: Any = "auto") -> int:
  """Checks `data` as described in the module docstring; returns its row count.

  `state` (a `TrainState`) and `loss_fn` allow the probe (the loss's keys, the model's output
  width); without them only the arrays are checked (`check_arrays`).
  """
  if not (num_classes is None or num_classes == "auto"
          or (isinstance(num_classes, int) and not isinstance(num_classes, bool))):
    raise TypeError(f"num_classes: expected 'auto', None or an int, got {num_classes!r}")
  if isinstance(num_classes, int) and num_classes <= 0:
    raise ValueError(f"num_classes: expected a positive int, got {num_classes}")
  n = check_arrays(name, data)
  classes = num_classes if isinstance(num_classes, int) else None
  class_loss = num_classes == "auto" and loss_fn is losses.cross_entropy_loss
  if classes is not None or class_loss:
    # Before the probe: a float label would fail inside the loss with JAX's own message.
    _check_label_dtype(name, data)
  if state is not None and loss_fn is not None:
    try:
      out, _ = _probe(state, data, loss_fn)
    except KeyError as e:
      raise ValueError(f"{name}: the loss reads key {e.args[0]!r}, which the data lacks "
                       f"(keys: {sorted(map(str, data))})") from e
    if class_loss and out.ndim >= 1:
      classes = int(out.shape[-1])
  if classes is not None:
    check_labels(name, data, classes)
  return n


def _check_label_dtype(name: str, data) -> None:
  if LABEL_KEY not in data:
    raise ValueError(f"{name}: expected a key {LABEL_KEY!r} (integer class labels), got keys "
                     f"{sorted(map(str, data))}")
  dtype = np.result_type(data[LABEL_KEY])
  if not np.issubdtype(dtype, np.integer):
    raise TypeError(f"{name}[{LABEL_KEY!r}]: expected integer class labels, got dtype {dtype} "
                    "(cast with .astype(np.int32) if they are whole numbers)")


def check_labels(name: str, data, num_classes: int) -> None:
  """`data["y"]`: integer labels in `[0, num_classes)`."""
  _check_label_dtype(name, data)
  arr = np.asarray(data[LABEL_KEY])
  bad = (arr < 0) | (arr >= num_classes)
  if bad.any():
    row = _first_bad_row(bad)
    value = int(arr[row].reshape(-1)[np.argmax(bad[row].reshape(-1))])
    raise ValueError(f"{name}[{LABEL_KEY!r}]: row {row} of {len(arr)} holds label {value}, "
                     f"outside [0, {num_classes}) (the class count: the model's output width "
                     "for cross_entropy_loss, else num_classes=)")
