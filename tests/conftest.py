"""Test-session settings that must precede every import of the code under test."""

import os

# Triton's interpreter has to be chosen before triton is first imported: triton builds its own
# `@triton.jit` library functions (`tl.sigmoid`, ...) at import, in the mode set then. Where no
# GPU can run the kernels (forced CPU, or no NVIDIA device) the Triton tests use the
# interpreter, so choose it now.
if (os.environ.get("JAX_PLATFORMS", "").lower() == "cpu"
    or not os.path.exists("/dev/nvidiactl")):
  os.environ.setdefault("TRITON_INTERPRET", "1")
