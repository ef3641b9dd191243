"""The fused Pallas layer (interpret mode) per device under `shard_map` on 4 forced host
devices, against the unsplit call; prints JSON. Run by tests/test_kernels_sharded.py in a
subprocess (the device count must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python tests/sharded_kernels_run.py
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import test_kernels as tk  # noqa: E402
from kasmina_jax import datasets, distributed, kernels, training  # noqa: E402
from kasmina_jax import nn as knn  # noqa: E402

DEVICES = 4
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> dict:
  """Count of each collective op in an HLO module's text, and the shapes all-gathered."""
  ops = re.findall(r"= (\S+) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo)
  out = {c: sum(1 for _, o in ops if o == c) for c in COLLECTIVES}
  out["gathered"] = sorted({s for s, o in ops if o == "all-gather"})
  return out


def layer_case(mesh):
  """Outputs, telemetry and gradients of a loss through the layer, split against unsplit."""
  row_split = kernels.RowSplit(mesh, "data")
  # 16 rows over 4 devices; the correlation subsample (5 rows) spans two devices' rows.
  spec, params, seeds, x, u, tel = tk.make_layer("even", jax.random.key(3), lead=(16,))
  ref = tk.run(tk.pallas_forward, spec, params, seeds, x, u, tel)
  xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  got = tk.run(tk.pallas_forward, spec, params, seeds, xs, u, tel, row_split=row_split)
  tk.assert_close(got, ref, 1e-5, "split against unsplit")
  weights = jnp.ones(x.shape, jnp.float32)

  def program(split):
    def loss(params, x):
      out, aux = tk.pallas_forward(spec, params, seeds, x, telemetry=tel, row_split=split)
      return jnp.sum(out * weights) + aux.child_loss, aux.telemetry
    return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, xs).compile().as_text()

  # Unsplit, the same call on the same split input gathers the rows (what the split avoids).
  return {"out_split": got[0].sharding.spec == PartitionSpec("data"),
          "collectives": collectives(program(row_split)),
          "unsplit_collectives": collectives(program(None))}


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = knn.KasminaDense(16, 4, activation=nn.relu, corr_rows=6, impl="pallas",
                         name="hidden")(x, train=train)
    return nn.Dense(2, name="head")(x)


def step_case(mesh):
  """The data-parallel train step with the Pallas layer: the program each device runs, and
  one step against the single-device step."""
  data = datasets.two_spirals(32, seed=1)
  state = training.create_train_state(Net(), optax.adam(1e-2), jnp.asarray(data["x"][:2]),
                                      jax.random.key(0))
  placed, dp = distributed.data_parallel(state, mesh)
  hlo = dp.lower_train_step(placed, data, training.cross_entropy_loss).compile().as_text()
  ref, m_ref = training.train_step(state, data, training.cross_entropy_loss)
  got, m_got = dp.train_step(placed, data, training.cross_entropy_loss)
  tel = lambda s: {k: np.asarray(v).tolist() for k, v in vars(
      next(iter(knn.find_layers(s.kasmina).values())).telemetry).items()}
  close = bool(np.allclose(float(m_got["loss"]), float(m_ref["loss"]), rtol=1e-6))
  grads_close = all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
                    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)))
  tel_close = all(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-5)
                  for a, b in zip(jax.tree.leaves(tel(got)), jax.tree.leaves(tel(ref))))
  return {"collectives": collectives(hlo), "loss_close": close, "params_close": grads_close,
          "telemetry_close": tel_close}


def main():
  assert jax.device_count() >= DEVICES, jax.device_count()
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  print(json.dumps({"layer": layer_case(mesh), "step": step_case(mesh)}))


if __name__ == "__main__":
  main()
