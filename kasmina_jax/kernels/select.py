"""Which backend runs the chunked layer: the `impl` names, and what `impl="auto"` picks.

`choose_impl` is a pure function of a device description (`DeviceInfo`: platform and, on
NVIDIA GPUs, compute capability), the layer mode and whether jax-triton is installed; it
decides by capability (GPU architecture), never by product name. `resolve_impl` applies it
to the default device and logs, once per distinct outcome, one line saying what it chose
and why (logger `kasmina_jax.kernels.select`, level INFO).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import jax

from kasmina_jax import chunks

_LOG = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "pallas", "triton")
"""The values of `layer.forward`'s `impl`."""

FUSED_BACKWARD_MAX_CHUNK = 128
"""Chunks up to this many nodes run the Triton backward in one launch; wider ones in two
(`kernels.triton`): the layer mode "wide_chunk"."""

# (minimum compute capability, architecture, {layer mode: backend}), newest first. Modes:
# "chunk" (chunks of 2 .. FUSED_BACKWARD_MAX_CHUNK nodes), "wide_chunk" (wider chunks) and
# "per_node" (num_seeds == dim), each at JAX's default matmul precision and, with "/exact",
# at precision="highest". A training layer's cost is its forward+backward, so that decides.
# Measured on an H100 on 2026-12-06 (benchmarks/results/h100_2026-12-06_bench_layer.json;
# 16384 x 4096 activations, telemetry on every row, every implementation timed with XLA's
# command buffers off, which had hidden the reference's conditional child kernels from the
# profiler and made it look faster than a copy of x):
# - chunk, 64 seeds of 64: forward+backward Triton 0.607 ms f32 / 0.440 ms bf16 against the
#   reference's 3.386 / 2.537 with every seed blending, 0.222 / 0.148 against 0.823 / 0.596
#   with all dormant: Triton (the exact path was Triton already: 1.237 ms against 2.181, H100,
#   2026-11-25).
# - wide chunks (16 seeds of 256; Triton's forward, the contract's backward under XLA): on an
#   H100 1.87 ms against the reference's 2.99 with every seed blending but 1.80 against 0.82
#   with all dormant, the common case of a growing network, until that backward skipped the
#   child's recomputation when no seed is live (one device-side branch, as the reference's;
#   H200: f32 1.281 against 2.210 blending, 0.174 against 0.617 dormant,
#   benchmarks/results/h200_2026-12-06_bench_layer_wide_branch.json), then ran as two kernels
#   (H100, h100_2026-12-06_bench_layer_wide_two_part.json): f32 1.190 against 2.933
#   blending, 0.235 against 0.808 dormant; bf16 0.810 / 2.079, 0.169 / 0.590. At
#   precision="highest" (XLA backward behind the branch, H100): 2.015 / 3.116 and 0.224 /
#   0.820: Triton at either precision.
# - per node (4096 seeds of 1 node), H200 (2026-12-01): Triton 2.88 ms against Pallas 32.0 ms
#   (the reference's per-node program took 2.6 minutes to compile); H100 (2026-12-06, after
#   the per-node forward's rewrite): Triton 1.841 ms against the reference's 16.93 blending,
#   0.301 against 0.302 all dormant: Triton.
# Ampere and Ada (sm_80 .. sm_89) are not measured: the kernels are the same (TF32 and
# bfloat16 tensor cores), so Hopper's ranking is assumed. Before Ampere there are no TF32
# tensor cores, for which the kernels are written: the reference. Without jax-triton: the
# reference (the Pallas path lowers through Pallas's deprecated Triton backend and was
# slower than Triton at every shape).
_MEASURED_ON_HOPPER = {"chunk": "triton", "chunk/exact": "triton",
                       "wide_chunk": "triton", "wide_chunk/exact": "triton",
                       "per_node": "triton", "per_node/exact": "triton"}
MODES = ("chunk", "wide_chunk", "per_node")
AUTO_BY_CAPABILITY: tuple[tuple[tuple[int, int], str, dict[str, str]], ...] = (
    ((9, 0), "Hopper or later", _MEASURED_ON_HOPPER),
    ((8, 0), "Ampere / Ada (not measured: Hopper's ranking)", _MEASURED_ON_HOPPER),
)


def layer_mode(spec) -> str:
  """The `choose_impl` mode of a `KasminaSpec`: "per_node", "wide_chunk" or "chunk"."""
  if spec.chunk_width == 1:
    return "per_node"
  return "wide_chunk" if spec.chunk_width > FUSED_BACKWARD_MAX_CHUNK else "chunk"


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
  """What `choose_impl` needs to know about a device.

  platform: "cuda" (NVIDIA GPU), "rocm" (AMD GPU), "cpu", "tpu", ...; compute_capability:
  "major.minor" on NVIDIA GPUs (`jax.Device.compute_capability`), else None; name: the model
  (`device_kind`), for the log line only.
  """

  platform: str
  compute_capability: str | None = None
  name: str = ""


def device_info(device=None) -> DeviceInfo:
  """The `DeviceInfo` of `device` (default: the default backend's first device)."""
  dev = device if device is not None else jax.devices()[0]
  platform = str(getattr(dev, "platform", "")).lower()
  if platform in ("gpu", "cuda", "rocm"):
    version = str(getattr(getattr(dev, "client", None), "platform_version", "")).lower()
    platform = "rocm" if (platform == "rocm" or "rocm" in version or "hip" in version) else "cuda"
  cc = getattr(dev, "compute_capability", None) if platform == "cuda" else None
  return DeviceInfo(platform=platform, compute_capability=None if cc is None else str(cc),
                    name=str(getattr(dev, "device_kind", "")))


def cuda_device_kind() -> str | None:
  """The default device's model name when it is an NVIDIA (CUDA) GPU, else None."""
  info = device_info()
  return info.name if info.platform == "cuda" else None


def triton_available() -> bool:
  """jax-triton is importable (the GPU extra is installed)."""
  return importlib.util.find_spec("jax_triton") is not None


def _capability(cc: str | None) -> tuple[int, int] | None:
  try:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)
  except ValueError:
    return None


def choose_impl(device: DeviceInfo, mode: str = "chunk", triton_installed: bool = False,
                exact: bool = False) -> tuple[str, str]:
  """`impl="auto"`'s choice: `(backend, reason)`, backend "reference", "pallas" or
  "triton". Pure: depends only on its arguments. `mode` is one of `MODES` (`layer_mode`); `exact`:
  the child matmuls run at `precision="highest"` (else JAX's default, TF32 on these GPUs)."""
  if mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  if not isinstance(exact, bool):
    raise TypeError(f"exact: expected a bool, got {type(exact).__name__}")
  if device.platform != "cuda":
    return "reference", f"no NVIDIA GPU (platform {device.platform!r}): the jnp reference"
  cc = _capability(device.compute_capability)
  if cc is None:
    return "reference", (f"NVIDIA GPU of unknown compute capability "
                         f"({device.compute_capability!r}): the jnp reference")
  for min_cc, arch, table in AUTO_BY_CAPABILITY:
    if cc >= min_cc:
      choice = table[mode + ("/exact" if exact else "")]
      why = (f"compute capability {cc[0]}.{cc[1]}, {arch}, {mode} mode, "
             f"{'exact float32' if exact else 'default (TF32)'} matmuls")
      if choice == "triton" and not triton_installed:
        return "reference", (f"{why}: Triton measured fastest, but jax-triton is not "
                             "installed (pip install 'kasmina_jax[gpu]'): the jnp reference")
      return choice, f"{why}: {choice} measured fastest"
  return "reference", (f"compute capability {cc[0]}.{cc[1]} is older than Ampere (8.0), "
                       "which the kernels need (TF32 tensor cores): the jnp reference")


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    _LOG.info(message)


def resolve_impl(impl: str, spec=None, precision=None) -> str:
  """Maps a user's `impl` to the backend that will run: "reference", "pallas" or "triton".

  For "auto", `spec` (a `KasminaSpec`, optional) selects the layer mode (`layer_mode`), and
  `precision` (the child matmuls', as
  `layer.forward` takes it) whether the exact path's ranking applies; the choice is `choose_impl`'s for the default
  device, logged once (INFO) with its reason.

  Raises ValueError for an unknown name, and for "triton" where jax-triton or an NVIDIA GPU
  is missing (an explicit request is never silently replaced).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
  if impl in ("reference", "pallas"):
    return impl
  info = device_info()
  if impl == "triton":
    if not triton_available():
      raise ValueError("impl='triton': needs jax-triton (pip install 'kasmina_jax[gpu]'); "
                       "use impl='pallas' or 'reference' instead")
    if info.platform != "cuda":
      raise ValueError(f"impl='triton': needs an NVIDIA GPU, but the default backend is "
                       f"{jax.default_backend()!r}; use impl='reference' (or 'pallas')")
    return "triton"
  mode = layer_mode(spec) if spec is not None else "chunk"
  exact = chunks.effective_precision(precision) == jax.lax.Precision.HIGHEST
  choice, why = choose_impl(info, mode, triton_available(), exact=exact)
  name = f" ({info.name})" if info.name else ""
  _log_once(f"kasmina_jax: impl='auto' chose {choice!r} on {info.platform}{name}: {why}")
  return choice


__all__ = ["AUTO_BY_CAPABILITY", "DeviceInfo", "FUSED_BACKWARD_MAX_CHUNK", "IMPLS", "MODES",
           "choose_impl", "cuda_device_kind", "device_info", "layer_mode", "resolve_impl",
           "triton_available"]
