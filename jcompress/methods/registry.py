"""The registered compression methods, in the order their transforms are chained.

Pruning comes first (later methods see the pruned weights, as Deep Compression's prune ->
quantize pipeline), binarization last; structured pruning and distillation act before and
around training rather than on the weights. Adding a method: one module under
`jcompress/methods/` defining `METHOD = jcompress.methods.base.Method(...)`, and one line here.

Importing this module imports every method module and checks each: a module without a
`METHOD`, a `METHOD` that is not a `Method` or has no action hook, and a name registered twice
are errors (`RegistryError`) naming the module.
"""

from __future__ import annotations

import importlib
from typing import Iterable

from jcompress.errors import JCompressError
from jcompress.methods import base

#: The method modules, in chain order.
MODULES = (
    "jcompress.methods.prune",
    "jcompress.methods.lowrank",
    "jcompress.methods.pq",
    "jcompress.methods.quant",
    "jcompress.methods.binary",
    "jcompress.methods.structured",
    "jcompress.methods.distill",
)


class RegistryError(JCompressError):
  """A method module that cannot be registered."""


def load(modules: Iterable[str]) -> tuple[base.Method, ...]:
  """The `METHOD`s of `modules`, checked (see the module docstring)."""
  methods: list[base.Method] = []
  seen: dict[str, str] = {}
  for module_name in modules:
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise RegistryError(f"method module {module_name} cannot be imported: {e}") from e
    method = getattr(module, "METHOD", None)
    if method is None:
      raise RegistryError(f"method module {module_name} defines no METHOD "
                          "(a jcompress.methods.base.Method)")
    if not isinstance(method, base.Method):
      raise RegistryError(f"method module {module_name}: METHOD is a {type(method).__name__}, "
                          "not a jcompress.methods.base.Method")
    if not isinstance(method.name, str) or not method.name.isidentifier():
      raise RegistryError(f"method module {module_name}: METHOD.name {method.name!r} is not a "
                          "config key")
    if not any(getattr(method, hook) is not None for hook in base.ACTIONS):
      raise RegistryError(f"method module {module_name}: METHOD {method.name!r} has none of the "
                          f"hooks {', '.join(base.ACTIONS)} (it would do nothing)")
    if method.name in seen:
      raise RegistryError(f"method module {module_name}: the method {method.name!r} is already "
                          f"registered by {seen[method.name]}")
    seen[method.name] = module_name
    methods.append(method)
  return tuple(methods)


METHODS: tuple[base.Method, ...] = load(MODULES)


def names() -> tuple[str, ...]:
  return tuple(m.name for m in METHODS)


def get(name: str) -> base.Method:
  for m in METHODS:
    if m.name == name:
      return m
  raise KeyError(f"no compression method {name!r}; registered: {', '.join(names())}")


def active(config) -> list[base.Method]:
  """The methods `config` turns on, in registry order."""
  return [m for m in METHODS if m.active(config)]


def with_hook(config, hook: str) -> list[base.Method]:
  """The active methods of `config` that define `hook`."""
  return [m for m in active(config) if getattr(m, hook) is not None]
