"""Fused kernels for the chunked Kasmina layer, behind the contract of
`kasmina_jax.layer.forward_reference`.

`layer.forward(..., impl=...)` selects the path:

  "reference"  the pure-`jnp` forward under XLA (any platform);
  "pallas"     the Pallas kernels (`kernels.pallas`); on a GPU they lower through Triton, on
               any other platform they run in interpret mode (slow: for tests);
  "triton"     hand-written Triton kernels through jax-triton (`kernels.triton`): the GPU
               extra (`pip install kasmina_jax[gpu]`); needs an NVIDIA GPU;
  "auto"       on an NVIDIA GPU the backend measured fastest on that GPU model
               (`AUTO_BY_GPU`, filled from `benchmarks/`), Pallas where none was measured;
               the reference elsewhere.

`common` defines the fused primitive every backend implements (`fused_blend_reference` and
its backward) and the wrapper around it.
"""

from __future__ import annotations

import importlib.util

import jax

from kasmina_jax import layer as layer_lib
from kasmina_jax.kernels import common

IMPLS = layer_lib.IMPLS  # one list of the layer's `impl` values (kasmina_jax.layer)

# GPU model (`jax.Device.device_kind`) -> {layer mode: the backend measured fastest there,
# forward and forward+backward, by benchmarks/bench_layer.py (benchmarks/RESULTS.md)}. Modes:
# "chunk" (chunks of several nodes) and "per_node" (num_seeds == dim). H100, 2026-11-25,
# float32, 16384 x 4096: 64 seeds, Triton 0.358 / 1.237 ms against Pallas 0.562 / 2.107 ms
# (fwd / fwd+bwd, all seeds blending); per-node forward, Pallas 0.795 ms against Triton 1.243.
# Models not listed get `DEFAULT_GPU_IMPL`.
AUTO_BY_GPU: dict[str, dict[str, str]] = {
    "NVIDIA H100 80GB HBM3": {"chunk": "triton", "per_node": "pallas"},
}
DEFAULT_GPU_IMPL = "pallas"


def cuda_device_kind() -> str | None:
  """The default device's model name when it is an NVIDIA (CUDA) GPU, else None."""
  if jax.default_backend() != "gpu":
    return None
  dev = jax.devices()[0]
  version = str(getattr(getattr(dev, "client", None), "platform_version", "")).lower()
  if "rocm" in version or "hip" in version:
    return None
  return dev.device_kind


def triton_available() -> bool:
  """jax-triton is importable (the GPU extra is installed)."""
  return importlib.util.find_spec("jax_triton") is not None


def resolve_impl(impl: str, spec=None) -> str:
  """Maps a user's `impl` to the backend that will run: "reference", "pallas" or "triton".

  For "auto", `spec` (a `KasminaSpec`, optional) selects the layer mode looked up in
  `AUTO_BY_GPU`: "per_node" when every chunk has one node, else "chunk".

  Raises ValueError for an unknown name, and for "triton" where jax-triton or an NVIDIA GPU
  is missing (an explicit request is never silently replaced).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
  if impl in ("reference", "pallas"):
    return impl
  kind = cuda_device_kind()
  if impl == "triton":
    if not triton_available():
      raise ValueError("impl='triton': needs jax-triton (pip install 'kasmina_jax[gpu]'); "
                       "use impl='pallas' or 'reference' instead")
    if kind is None:
      raise ValueError(f"impl='triton': needs an NVIDIA GPU, but the default backend is "
                       f"{jax.default_backend()!r}; use impl='reference' (or 'pallas')")
    return "triton"
  # auto
  if kind is None:
    return "reference"
  mode = "per_node" if (spec is not None and spec.chunk_width == 1) else "chunk"
  choice = AUTO_BY_GPU.get(kind, {}).get(mode, DEFAULT_GPU_IMPL)
  if choice == "triton" and not triton_available():
    return "pallas"
  return choice


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
            impl: str = "pallas"):
  """The chunked layer through a fused backend; same contract as
  `layer.forward_reference`. Inputs are checked by `layer.forward`; call that."""
  if impl == "reference":
    from kasmina_jax import layer  # pylint: disable=g-import-not-at-top
    return layer.forward_reference(spec, params, seeds, x, u=u, telemetry=telemetry,
                                   eval_alpha=eval_alpha)
  return common.forward(spec, params, seeds, x, u=u, telemetry=telemetry,
                        eval_alpha=eval_alpha, fused=fused_primitive(impl))


__all__ = ["AUTO_BY_GPU", "DEFAULT_GPU_IMPL", "IMPLS", "common", "cuda_device_kind", "forward",
           "fused_primitive", "resolve_impl", "triton_available"]
