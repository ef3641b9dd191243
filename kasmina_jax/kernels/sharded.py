"""The fused primitive per device, each on its own rows, when the batch is split over a mesh.

`common.fused_per_device` does the work; this module holds the split (`RowSplit`) and how it
reaches the layer. The fused kernels (`impl="pallas"` / `"triton"`) lower to custom calls that XLA's partitioner
cannot split: under a data-parallel `jit` (GSPMD) every device would gather the whole batch
and run every row. Here the primitive runs under `shard_map` over the mesh axis that splits
the rows (`RowSplit`): each device runs the kernel on its block of rows, the output stays
split, and the per-seed sums the layer needs (`sum_r2`, `sum_x2`, the telemetry partials)
are added over the axis with `psum`. Parameters and seed inputs enter replicated; their
cotangents are summed over the axis by `shard_map`'s transpose, as the gradient of a
replicated value must be.

Row-indexed choices stay those of the global batch, so a split run measures what one device
measures: the correlation subsample is the first `corr_rows` rows of the *global* batch
(each device takes the part of its rows that falls in it, masked by its position on the
axis; the kernel runs with its own Gram matrix off), and the telemetry shift is set by the
caller from the global first row.

How the layer learns of the split (functional, no global state that outlives a trace): the
train step and the epoch transition take `rows` as a static argument (part of their `jit`
cache key) and trace the model under `split_rows(rows)`; `layer.forward` reads
`current_row_split()` when no `rows` is passed to it. `kasmina_jax.distributed` passes
`RowSplit(mesh, "data")` when its data axis has more than one device, so a one-device mesh
compiles the plain program.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class RowSplit:
  """The rows of every activation are split over `axis` of `mesh` (hashable: a static
  argument). A batch whose rows do not divide over the axis is run unsplit."""

  mesh: Mesh
  axis: str

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(self.mesh).__name__}")
    if not isinstance(self.axis, str) or self.axis not in self.mesh.axis_names:
      raise ValueError(f"axis: {self.axis!r} is not an axis of the mesh "
                       f"{tuple(self.mesh.axis_names)}")

  @property
  def ways(self) -> int:
    return int(self.mesh.shape[self.axis])


_CURRENT: contextvars.ContextVar[RowSplit | None] = contextvars.ContextVar(
    "kasmina_row_split", default=None)


def check_row_split(rows, name: str = "rows") -> None:
  if rows is not None and not isinstance(rows, RowSplit):
    raise TypeError(f"{name}: expected a kernels.RowSplit or None, got {type(rows).__name__}")


@contextlib.contextmanager
def split_rows(rows: RowSplit | None):
  """Within the block (at trace time), Kasmina layers run their fused kernels per device over
  `rows` (None: unsplit). Use it inside a function whose `jit` cache key holds `rows`."""
  check_row_split(rows)
  token = _CURRENT.set(rows)
  try:
    yield rows
  finally:
    _CURRENT.reset(token)


def current_row_split() -> RowSplit | None:
  """The `RowSplit` of the innermost `split_rows` block, or None."""
  return _CURRENT.get()


def shard_map(fn, mesh, in_specs, out_specs):
  """`jax.shard_map` (jax >= 0.7), else the older `jax.experimental.shard_map`; without the
  replication check, which Pallas's outputs cannot take part in (their shapes carry no
  device-variance)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map as old  # pylint: disable=g-import-not-at-top
  return old(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
