"""Test-session settings that must precede every import of the code under test."""

import os

# Triton's interpreter has to be chosen before triton is first imported: triton builds its own
# `@triton.jit` library functions (`tl.sigmoid`, ...) at import, in the mode set then. Where no
# GPU can run the kernels (forced CPU, or no NVIDIA device) the Triton tests use the
# interpreter, so choose it now.
if (os.environ.get("JAX_PLATFORMS", "").lower() == "cpu"
    or not os.path.exists("/dev/nvidiactl")):
  os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after the environment settings above)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs and tracing caches after each test module: a worker runs
  hundreds of modules' programs, and holding every one of them for the whole session grows
  the worker's native memory (modules rarely share a program, so little is recompiled)."""
  yield
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
