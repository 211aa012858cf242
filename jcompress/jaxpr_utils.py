"""Walks over jaxprs: what a traced function really computes (tests and benchmarks use them to
prove an op runs in a narrow dtype, or that a teacher runs forward only)."""

from __future__ import annotations


def primitive_eqns(jaxpr, name: str) -> list:
  """The equations of primitive `name` in a jaxpr (or closed jaxpr) and all its sub-jaxprs
  (pjit, custom_vjp, cond branches, ...), in program order."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      out.append(eqn)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          out.extend(primitive_eqns(sub, name))
  return out


def count_primitive(jaxpr, name: str) -> int:
  """Occurrences of primitive `name` in a jaxpr and all its sub-jaxprs (`primitive_eqns`):
  what a compiled step really computes, e.g. `count_primitive(jax.make_jaxpr(step)(...).jaxpr,
  "conv_general_dilated")` tells a teacher's forward-only pass from a forward + backward one."""
  return len(primitive_eqns(jaxpr, name))
