"""What importing the package loads: the core stays free of Flax and of the experiment code
(docs/design.md, "Layering"), and the Linen shell answers to both of its names."""

import os
import subprocess
import sys


def _loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
  """The `modules` in `sys.modules` after running `statement` in a fresh interpreter."""
  code = (f"import sys\n{statement}\n"
          f"print(','.join(m for m in {modules!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return [m for m in out.stdout.strip().split(",") if m]


def test_import_kasmina_jax_does_not_load_experiments_datasets_or_distributed():
  lazy = ("kasmina_jax.experiments", "kasmina_jax.datasets", "kasmina_jax.distributed")
  assert _loaded_after("import kasmina_jax", lazy) == []
  # ...and they still load on first use.
  assert _loaded_after("import kasmina_jax; kasmina_jax.datasets", lazy) == [
      "kasmina_jax.datasets"]


def test_import_optim_does_not_load_flax_linen():
  assert _loaded_after("import kasmina_jax.optim", ("flax.linen", "flax")) == []


def test_import_orchestration_does_not_load_flax():
  assert _loaded_after("import kasmina_jax.orchestration", ("flax.linen", "flax")) == []


def test_linen_and_its_old_name_nn_are_the_same_classes():
  import kasmina_jax  # pylint: disable=g-import-not-at-top
  from kasmina_jax import linen, nn  # pylint: disable=g-import-not-at-top
  for name in linen.__all__:
    assert getattr(nn, name) is getattr(linen, name), name
  assert kasmina_jax.KasminaDense is linen.KasminaDense
  assert kasmina_jax.linen is linen
