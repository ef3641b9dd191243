"""Frozen dataclass pytrees without Flax: `flax.struct`'s contract for the core modules.

docs/design.md, "Layering": nothing below a shell imports Flax, and `import flax`
loads all of `flax.linen`. The core's state (`SeedState`, telemetry, reports) only needs what
`flax.struct` gives: a frozen dataclass, registered as a pytree (fields with
`pytree_node=False` ride in the tree structure as static metadata), with `.replace(**fields)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax


def field(pytree_node: bool = True, *, metadata=None, **kwargs):
  """A dataclass field; `pytree_node=False` makes it static metadata (part of the treedef)."""
  return dataclasses.field(metadata={**(metadata or {}), "pytree_node": pytree_node}, **kwargs)


def _replace(self, **updates):
  """A copy with the given fields replaced."""
  return dataclasses.replace(self, **updates)


def dataclass(cls=None, **kwargs):
  """`flax.struct.dataclass`: a frozen dataclass registered as a pytree, with `replace`."""
  if cls is None:
    return functools.partial(dataclass, **kwargs)
  kwargs.setdefault("frozen", True)
  data_cls = dataclasses.dataclass(**kwargs)(cls)
  data, meta = [], []
  for f in dataclasses.fields(data_cls):
    (data if f.metadata.get("pytree_node", True) else meta).append(f.name)
  data_cls.replace = _replace
  jax.tree_util.register_dataclass(data_cls, data, meta)
  data_cls._kasmina_dataclass = True  # pylint: disable=protected-access
  return data_cls
