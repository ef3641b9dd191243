"""The fused kernels under data parallelism (`kernels.RowSplit`, `common.fused_per_device`):
on 4 forced host devices the Pallas layer (interpret mode) runs per device on its own rows
under `shard_map`, with outputs, telemetry and gradients equal to the unsplit call, and the
compiled programs (the layer's loss and gradient, and `distributed`'s train step) hold no
all-gather, while the same call left to XLA's partitioner gathers the activations.

The device count must be set before JAX starts: the runs happen in a subprocess
(tests/sharded_kernels_run.py).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from kasmina_jax import kernels

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_pallas_layer_runs_per_device_without_gathering_rows():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_kernels_run.py")],
                        env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  layer, step = result["layer"], result["step"]
  # (Values, telemetry and gradients of the layer are compared inside the run at 1e-5.)
  assert layer["out_split"]
  assert layer["collectives"]["all-gather"] == 0, layer["collectives"]
  assert layer["collectives"]["all-reduce"] >= 1  # the per-seed sums and parameter gradients
  # The check has teeth: unsplit, the partitioner gathers the activations.
  assert layer["unsplit_collectives"]["all-gather"] > 0
  assert step["collectives"]["all-gather"] == 0, step["collectives"]
  assert step["loss_close"] and step["params_close"] and step["telemetry_close"]


def test_row_split_arguments():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(TypeError, match="mesh"):
    kernels.RowSplit("mesh", "data")
  with pytest.raises(ValueError, match="axis"):
    kernels.RowSplit(mesh, "rows")
  with pytest.raises(TypeError, match="rows"):
    with kernels.split_rows(("data",)):
      pass
  split = kernels.RowSplit(mesh, "data")
  assert kernels.current_row_split() is None
  with kernels.split_rows(split):
    assert kernels.current_row_split() == split and split.ways == 1
  assert kernels.current_row_split() is None
