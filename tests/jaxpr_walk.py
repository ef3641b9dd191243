"""Test helper: what a function's jaxpr asks of its matmuls."""

import jax


def dot_precisions(fn, *args) -> list:
  """The `precision` of every `dot_general` in `fn`'s jaxpr, sub-jaxprs (cond, custom_vjp,
  pjit, pallas_call, ...) included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found
