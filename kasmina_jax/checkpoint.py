"""Checkpoints of a whole training state (any pytree) with orbax-checkpoint.

`save` writes one step directory under `directory` through orbax's `CheckpointManager`
(written under a temporary name, then renamed: a crash mid-save leaves no half checkpoint
behind) holding

- `state/`: the array leaves, flattened and keyed `leaf_00000, leaf_00001, ...` (orbax then
  never has to understand the state's own node types or their static metadata);
- `meta/metadata`: a small JSON file with the tree's fingerprint: every leaf's path, shape,
  dtype and CRC-32, every node's type and static metadata, the `str` of the tree structure.

`restore` reads the fingerprint first and compares it with `target` before touching the
arrays, so a checkpoint of another model (other width, seed count, optimizer, a missing leaf)
fails with a `CheckpointError` that names what differs; the CRC-32s catch damaged data files
that still decode. The result has `target`'s tree structure (its static metadata: apply
functions, optimizer, layer specs) with the leaves from disk.

Leaves: jax / numpy arrays, numpy and Python scalars, and new-style PRNG key arrays
(`jax.random.key`, stored as their `key_data`). Zero-sized leaves (absent parts of a child
layout) are kept in the fingerprint only. `target` may also hold `jax.ShapeDtypeStruct`
leaves (`jax.eval_shape` of the state's constructor).

`InMemoryCheckpoint` keeps the last good state on the device for emergency rollback.

orbax-checkpoint is an optional dependency: `pip install 'kasmina_jax[checkpoint]'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
_STATE_ITEM = "state"
_META_ITEM = "meta"
_MAX_LISTED = 12


class CheckpointError(ValueError):
  """A checkpoint is missing, damaged, or does not match the state it is restored into."""


class CheckpointWarning(UserWarning):
  """The checkpoint's static metadata differs from the target's (leaves still match)."""


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ImportError(
        "kasmina_jax.checkpoint needs orbax-checkpoint, an optional dependency: install it "
        "with `pip install 'kasmina_jax[checkpoint]'` (or `pip install orbax-checkpoint`)"
    ) from err
  return ocp


# ------------------------------------------------------------------------------ fingerprints

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _sanitize(text: str) -> str:
  """`repr`s of functions and objects carry memory addresses that change between runs."""
  return _ADDRESS.sub("", text)


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _describe_leaf(path: str, x) -> dict:
  """Shape and dtype of a leaf (concrete or abstract), as written in the fingerprint."""
  if isinstance(x, jax.ShapeDtypeStruct) or isinstance(x, (jax.Array, np.ndarray, np.generic)):
    desc = {"path": path, "shape": list(x.shape), "dtype": str(x.dtype)}
  elif isinstance(x, (bool, int, float, complex)):
    arr = np.asarray(x)
    desc = {"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "python": type(x).__name__}
  else:
    raise CheckpointError(f"leaf {path}: cannot checkpoint a {type(x).__name__} "
                          "(leaves must be arrays, numpy or Python scalars, or PRNG keys)")
  if _is_key(x):
    desc["key_impl"] = str(jax.random.key_impl(x)) if not isinstance(
        x, jax.ShapeDtypeStruct) else None
  return desc


def _node_descriptions(tree) -> list[dict]:
  """Every interior node of `tree`: its path, type and static metadata (aux data)."""
  out = []

  def walk(x, path):
    treedef = jax.tree_util.tree_structure(x, is_leaf=lambda y: y is not x)
    if jax.tree_util.treedef_is_leaf(treedef):
      return
    node_type, aux = treedef.node_data()
    out.append({"path": jax.tree_util.keystr(path), "type": node_type.__qualname__,
                "static": _sanitize(repr(aux))})
    children, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    for child_path, child in children:
      walk(child, path + tuple(child_path))

  walk(tree, ())
  return out


def _is_with_derived(x) -> bool:
  return (dataclasses.is_dataclass(x) and not isinstance(x, type)
          and any(f.metadata.get("derived") for f in dataclasses.fields(x)))


def without_derived(tree):
  """`tree` with every static dataclass field marked `metadata={"derived": True}` (facts
  derived from the leaves, e.g. a Kasmina layer's `live`) back at its default: a checkpoint
  neither stores nor compares them, and a restored state starts from the default."""
  def reset(x):
    if not _is_with_derived(x):
      return x
    return dataclasses.replace(x, **{f.name: f.default for f in dataclasses.fields(x)
                                     if f.metadata.get("derived")})
  return jax.tree_util.tree_map(reset, tree, is_leaf=_is_with_derived)


def fingerprint(tree) -> dict:
  """The JSON-able description of `tree` that `save` stores and `restore` checks."""
  tree = without_derived(tree)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [_describe_leaf(jax.tree_util.keystr(p), x) for p, x in leaves_with_paths]
  return {"treedef": _sanitize(str(treedef)), "leaves": leaves,
          "nodes": _node_descriptions(tree)}


def _leaf_differences(saved: list[dict], wanted: list[dict]) -> list[str]:
  saved_by_path = {d["path"]: d for d in saved}
  wanted_by_path = {d["path"]: d for d in wanted}
  diffs = []
  for path, w in wanted_by_path.items():
    s = saved_by_path.get(path)
    if s is None:
      diffs.append(f"leaf {path} ({w['dtype']}{tuple(w['shape'])}) is in the target but not in "
                   "the checkpoint")
      continue
    if s["shape"] != w["shape"]:
      diffs.append(f"leaf {path}: shape {tuple(s['shape'])} in the checkpoint, "
                   f"{tuple(w['shape'])} in the target")
    if not _dtypes_compatible(s, w):
      diffs.append(f"leaf {path}: dtype {s['dtype']} in the checkpoint, {w['dtype']} in the "
                   "target")
    elif (s.get("key_impl") and w.get("key_impl") and s["key_impl"] != w["key_impl"]):
      diffs.append(f"leaf {path}: PRNG key implementation {s['key_impl']} in the checkpoint, "
                   f"{w['key_impl']} in the target")
  for path, s in saved_by_path.items():
    if path not in wanted_by_path:
      diffs.append(f"leaf {path} ({s['dtype']}{tuple(s['shape'])}) is in the checkpoint but "
                   "not in the target")
  if not diffs and [d["path"] for d in saved] != [d["path"] for d in wanted]:
    diffs.append("the leaves are the same but in another order (a different tree structure)")
  return diffs


def _dtypes_compatible(saved: dict, wanted: dict) -> bool:
  if saved["dtype"] == wanted["dtype"]:
    return True
  # A Python scalar is stored at full precision (int64 / float64); traced or abstract, the
  # same leaf has jax's canonical dtype (int32 / float32 unless x64 is on).
  for a, b in ((saved, wanted), (wanted, saved)):
    if "python" in a and "python" not in b and b["dtype"] in ("int32", "float32", "bool",
                                                               "complex64"):
      return str(jax.dtypes.canonicalize_dtype(np.dtype(a["dtype"]))) == b["dtype"]
  return False


def _static_differences(saved: list[dict], wanted: list[dict]) -> list[str]:
  saved_by_path = {d["path"]: d for d in saved}
  diffs = []
  for w in wanted:
    s = saved_by_path.get(w["path"])
    if s is None:
      continue
    if s["type"] != w["type"]:
      diffs.append(f"node {w['path'] or '(root)'}: {s['type']} in the checkpoint, {w['type']} "
                   "in the target")
    elif s["static"] != w["static"]:
      a, b = _diff_excerpts(s["static"], w["static"])
      diffs.append(f"node {w['path'] or '(root)'} ({w['type']}): static metadata {a} in the "
                   f"checkpoint, {b} in the target")
  return diffs


def _diff_excerpts(a: str, b: str, context: int = 60) -> tuple[str, str]:
  """The part of two long `repr`s around their first difference."""
  start = 0
  while start < min(len(a), len(b)) and a[start] == b[start]:
    start += 1
  lo = max(0, start - context)

  def cut(text):
    hi = min(len(text), start + context)
    return ("..." if lo > 0 else "") + text[lo:hi] + ("..." if hi < len(text) else "")

  return cut(a), cut(b)


def _shorten(text: str, limit: int = 300) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def _listed(diffs: list[str]) -> str:
  shown = "\n  - ".join(diffs[:_MAX_LISTED])
  more = f"\n  ... and {len(diffs) - _MAX_LISTED} more" if len(diffs) > _MAX_LISTED else ""
  return f"\n  - {shown}{more}"


# ------------------------------------------------------------------------------------- disk


def _abs_dir(directory) -> str:
  return os.path.abspath(os.fspath(directory))


def _manager(ocp, directory: str, *, keep: int | None, create: bool):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options)


def _leaf_key(i: int) -> str:
  return f"leaf_{i:05d}"


def _host_value(x) -> np.ndarray:
  if _is_key(x):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _crc(arr: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(arr).tobytes())


def _state_step(state) -> int | None:
  step = getattr(state, "step", None)
  if step is None:
    return None
  try:
    return int(np.asarray(step))
  except (TypeError, ValueError):
    return None


def save(directory, state, *, step: int | None = None, keep: int | None = 3,
         overwrite: bool = False) -> str:
  """Writes `state` (any pytree) as step `step` under `directory`; returns the step's path.

  step: defaults to `state.step` when the state has one, else one past the latest step.
  keep: how many steps to keep (older ones are deleted after the save); None keeps all.
  overwrite: replace an existing checkpoint of the same step (otherwise an error).
  """
  ocp = _orbax()
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
    raise ValueError(f"keep: expected a positive int or None, got {keep!r}")
  directory = _abs_dir(directory)
  if step is None:
    step = _state_step(state)
  if step is None:
    last = latest_step(directory)
    step = 0 if last is None else last + 1
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step: expected a non-negative int, got {step!r}")
  step = int(step)

  meta = fingerprint(state)
  leaves = jax.tree_util.tree_leaves(state)
  arrays = {}
  for i, (x, desc) in enumerate(zip(leaves, meta["leaves"])):
    value = _host_value(x)
    desc["stored"] = value.size > 0
    if value.size > 0:  # orbax refuses zero-sized arrays; their shape is in the fingerprint
      arrays[_leaf_key(i)] = value
      desc["crc32"] = _crc(value)
      if _is_key(x):
        desc["stored_shape"] = list(value.shape)
        desc["stored_dtype"] = str(value.dtype)
  meta.update(format=FORMAT_VERSION, step=step)

  with _manager(ocp, directory, keep=keep, create=True) as manager:
    if step in manager.all_steps():
      if not overwrite:
        raise CheckpointError(f"{directory}: step {step} already has a checkpoint (pass "
                              "overwrite=True to replace it)")
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(**{
        _STATE_ITEM: ocp.args.StandardSave(arrays),
        _META_ITEM: ocp.args.JsonSave(meta)}), force=True)
    manager.wait_until_finished()
    path = os.path.join(directory, str(step))
  return path


def all_steps(directory) -> list[int]:
  """The steps with a finished checkpoint under `directory`, ascending ([] when none)."""
  directory = _abs_dir(directory)
  if not os.path.isdir(directory):
    return []
  ocp = _orbax()
  with _manager(ocp, directory, keep=None, create=False) as manager:
    return sorted(int(s) for s in manager.all_steps())


def latest_step(directory) -> int | None:
  """The newest finished checkpoint's step under `directory`, or None."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


def read_metadata(directory, *, step: int | None = None) -> dict:
  """The JSON fingerprint written beside a checkpoint (latest step when `step` is None)."""
  directory, step = _resolve_step(directory, step)
  path = os.path.join(directory, str(step), _META_ITEM, "metadata")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError as err:
    raise CheckpointError(f"{directory} step {step}: metadata file {path} is missing (not a "
                          "kasmina_jax checkpoint, or damaged)") from err
  except (OSError, ValueError) as err:
    raise CheckpointError(f"{directory} step {step}: metadata file {path} is damaged: "
                          f"{err}") from err
  if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "leaves" not in meta:
    raise CheckpointError(f"{directory} step {step}: metadata file {path} is not a kasmina_jax "
                          f"checkpoint fingerprint of format {FORMAT_VERSION}")
  return meta


def _resolve_step(directory, step) -> tuple[str, int]:
  directory = _abs_dir(directory)
  steps = all_steps(directory)
  if not steps:
    raise CheckpointError(f"{directory}: no checkpoint found"
                          + ("" if os.path.isdir(directory) else " (no such directory)"))
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise CheckpointError(f"{directory}: no checkpoint of step {step} (steps present: {steps})")
  return directory, int(step)


def restore(directory, target, *, step: int | None = None, strict_static: bool = False):
  """Reads a checkpoint into the structure of `target` (latest step when `step` is None).

  Returns a pytree with `target`'s tree structure and static metadata, its leaves read from
  disk (jax arrays placed like `target`'s, numpy arrays, Python scalars as in `target`).
  Raises `CheckpointError` when there is no checkpoint, when its leaves differ from
  `target`'s (paths, shapes, dtypes), or when its files are damaged. Differing static
  metadata (the `repr` of a node's non-array fields, e.g. a layer's spec) with matching
  leaves gives a `CheckpointWarning`, or an error with `strict_static=True`.
  """
  ocp = _orbax()
  directory, step = _resolve_step(directory, step)
  where = f"{directory} step {step}"
  meta = read_metadata(directory, step=step)
  wanted = fingerprint(target)

  diffs = _leaf_differences(meta["leaves"], wanted["leaves"])
  static_diffs = _static_differences(meta.get("nodes", []), wanted["nodes"])
  if diffs:
    also = (f"\nstatic metadata that differs too:{_listed(static_diffs)}" if static_diffs
            else "")
    raise CheckpointError(
        f"{where} does not match the target state ({len(diffs)} difference"
        f"{'s' if len(diffs) != 1 else ''} in {len(wanted['leaves'])} target leaves):"
        f"{_listed(diffs)}{also}")
  if static_diffs:
    message = f"{where}: static metadata differs from the target's:{_listed(static_diffs)}"
    if strict_static:
      raise CheckpointError(message)
    warnings.warn(message + "\n(the leaves match; restoring with the target's metadata)",
                  CheckpointWarning, stacklevel=2)

  abstract = {}
  for i, desc in enumerate(meta["leaves"]):
    if desc.get("stored"):
      shape = desc.get("stored_shape", desc["shape"])
      dtype = np.dtype(desc.get("stored_dtype", desc["dtype"]))
      abstract[_leaf_key(i)] = np.zeros(shape, dtype)
  try:
    with _manager(ocp, directory, keep=None, create=False) as manager:
      arrays = manager.restore(step, args=ocp.args.Composite(**{
          _STATE_ITEM: ocp.args.StandardRestore(abstract)}))[_STATE_ITEM]
  except Exception as err:  # orbax / tensorstore raise many types for damaged files
    raise CheckpointError(f"{where}: could not read the array data (files missing, truncated "
                          f"or damaged): {type(err).__name__}: {_shorten(str(err), 600)}") from err

  target_leaves, target_def = jax.tree_util.tree_flatten(without_derived(target))
  restored = []
  for i, (desc, like) in enumerate(zip(meta["leaves"], target_leaves)):
    if desc.get("stored"):
      value = np.asarray(arrays.get(_leaf_key(i)))
      expected = abstract[_leaf_key(i)]
      if value.shape != expected.shape or value.dtype != expected.dtype:
        raise CheckpointError(f"{where}: leaf {desc['path']} read back as "
                              f"{value.dtype}{value.shape}, expected "
                              f"{expected.dtype}{expected.shape} (damaged checkpoint)")
      if _crc(value) != desc.get("crc32"):
        raise CheckpointError(f"{where}: leaf {desc['path']} fails its CRC-32 check "
                              "(damaged checkpoint)")
    else:
      value = np.zeros(desc.get("stored_shape", desc["shape"]),
                       np.dtype(desc.get("stored_dtype", desc["dtype"])))
    restored.append(_like(value, like, desc))
  return jax.tree_util.tree_unflatten(target_def, restored)


def _like(value: np.ndarray, like, desc: dict):
  """`value` as the same kind of leaf as `like` (placement, key type, Python scalar)."""
  if "python" in desc and isinstance(like, (bool, int, float, complex)):
    return type(like)(value.item())
  if isinstance(like, jax.ShapeDtypeStruct) and not _is_key(like) and value.dtype != like.dtype:
    value = value.astype(like.dtype)  # a Python scalar restored into its abstract jax dtype
  if isinstance(like, np.generic):
    return value[()]
  if isinstance(like, np.ndarray):
    return value
  sharding = getattr(like, "sharding", None)
  if _is_key(like):
    impl = (jax.random.key_impl(like) if not isinstance(like, jax.ShapeDtypeStruct)
            else desc.get("key_impl"))
    key = jax.random.wrap_key_data(jnp.asarray(value), impl=impl)
    return jax.device_put(key, sharding) if sharding is not None else key
  if sharding is not None:
    return jax.device_put(value, sharding)
  return jnp.asarray(value)


# -------------------------------------------------------------------------------- in memory


def _device_copy(x):
  # Copies, not references: a train step that donates its state's buffers would otherwise
  # delete the "last good" copy along with them.
  if isinstance(x, jax.Array):
    return jnp.copy(x)
  if isinstance(x, np.ndarray):
    return x.copy()
  return x


class InMemoryCheckpoint:
  """The last good state, kept on the device for emergency rollback without disk I/O."""

  def __init__(self):
    self._state = None
    self._has_value = False
    self.step: int | None = None

  @property
  def has_value(self) -> bool:
    return self._has_value

  def save(self, state) -> None:
    self._state = jax.tree.map(_device_copy, state)
    self._has_value = True
    self.step = _state_step(state)

  def restore(self):
    """A fresh copy of the saved state (the kept copy survives donation of the result)."""
    if not self._has_value:
      raise CheckpointError("InMemoryCheckpoint.restore: nothing has been saved yet")
    return jax.tree.map(_device_copy, self._state)

  def clear(self) -> None:
    self._state = None
    self._has_value = False
    self.step = None
