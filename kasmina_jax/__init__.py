"""kasmina_jax: morphogenetic neural networks in JAX."""

from kasmina_jax import lifecycle
from kasmina_jax.lifecycle import (
    LEGAL_TRANSITIONS,
    Commands,
    LifecycleConfig,
    Op,
    SeedState,
    Stage,
    apply_commands,
    cancel_germination,
    init_seed_state,
    make_commands,
    no_commands,
    request_germination,
    update_readiness,
)

__version__ = "0.1.0"
