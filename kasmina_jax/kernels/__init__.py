"""Fused kernels for the chunked Kasmina layer, behind the contract of
`kasmina_jax.layer.forward_reference`.

`layer.forward(..., impl=...)` selects the path:

  "reference"  the pure-`jnp` forward under XLA (any platform);
  "pallas"     the Pallas kernels (`kernels.pallas`); on a GPU they lower through Triton, on
               any other platform they run in interpret mode (slow: for tests);
  "triton"     hand-written Triton kernels through jax-triton (`kernels.triton`): the GPU
               extra (`pip install kasmina_jax[gpu]`); needs an NVIDIA GPU;
  "auto"       (the default) by the default device's capability, the layer's shape and the
               precision (`select.choose_impl`): on NVIDIA GPUs from Ampere on, the backend
               measured fastest for that architecture and layer mode
               (`select.AUTO_BY_CAPABILITY`, from `benchmarks/`: Triton for chunks of up to
               `select.FUSED_BACKWARD_MAX_CHUNK` nodes and per node), the reference
               elsewhere (CPU included); it logs one line saying what it chose and why.

Every path takes the caller's `precision` for the child matmuls (`chunks.canonical_precision`:
None = JAX's default, TF32 on those GPUs; "highest" = the exact path).

`common` defines the fused primitive every backend implements (`fused_blend_reference` and
its backward) and the wrapper around it. The backends are imported on first use (Pallas
loads `jax.experimental.pallas`; Triton needs the optional jax-triton), not to break an
import cycle: this package imports `chunks`, `blueprints` and `telemetry`, never `layer`.
"""

from __future__ import annotations

from kasmina_jax.kernels import common
from kasmina_jax.kernels import select
from kasmina_jax.kernels import sharded
from kasmina_jax.kernels.sharded import RowSplit, current_row_split, split_rows
from kasmina_jax.kernels.select import (
    AUTO_BY_CAPABILITY,
    FUSED_BACKWARD_MAX_CHUNK,
    IMPLS,
    DeviceInfo,
    choose_impl,
    cuda_device_kind,
    device_info,
    resolve_impl,
    triton_available,
)


def fused_primitive(impl: str):
  """The differentiable fused primitive of a resolved backend ("pallas", "triton", or
  "jnp": the contract itself under XLA, for tests)."""
  if impl == "pallas":
    from kasmina_jax.kernels import pallas  # pylint: disable=g-import-not-at-top
    return pallas.fused_blend
  if impl == "triton":
    from kasmina_jax.kernels import triton  # pylint: disable=g-import-not-at-top
    return triton.fused_blend
  if impl == "jnp":
    return common.fused_blend_jnp
  raise ValueError(f"impl: expected 'pallas', 'triton' or 'jnp', got {impl!r}")


def forward(spec, params, seeds, x, *, u=None, telemetry=None, eval_alpha=None,
            impl: str = "pallas", precision=None, row_split=None):
  """The chunked layer through a fused backend ("pallas", "triton" or "jnp"); same contract
  as `layer.forward_reference`; `row_split` (a `RowSplit`): run per device on its rows. Inputs are
  checked by `layer.forward`; call that."""
  return common.forward(spec, params, seeds, x, u=u, telemetry=telemetry,
                        eval_alpha=eval_alpha, fused=fused_primitive(impl),
                        precision=precision, row_split=row_split)


__all__ = ["AUTO_BY_CAPABILITY", "DeviceInfo", "FUSED_BACKWARD_MAX_CHUNK", "IMPLS", "RowSplit",
           "choose_impl", "common",
           "current_row_split", "sharded", "split_rows",
           "cuda_device_kind", "device_info", "forward", "fused_primitive", "resolve_impl",
           "select", "triton_available"]
