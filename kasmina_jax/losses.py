"""Loss functions for the train step: `loss_fn(out, batch) -> (loss, metrics)`."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, dict], tuple[jax.Array, dict]]


def cross_entropy_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """Mean softmax cross-entropy against integer `batch["y"]`, with accuracy."""
  labels = batch["y"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return jnp.mean(loss), {"accuracy": acc}
