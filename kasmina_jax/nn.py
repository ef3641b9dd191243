"""Deprecated alias of `kasmina_jax.linen`, kept for one release.

The Linen shell moved to `kasmina_jax.linen`: a module named `nn` shadows the usual
`import flax.linen as nn` in user code. Everything here is `kasmina_jax.linen`'s (the same
objects, not copies), so `kasmina_jax.nn.KasminaDense is kasmina_jax.linen.KasminaDense`.
"""

from kasmina_jax.linen import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from kasmina_jax.linen import __all__  # noqa: F401
