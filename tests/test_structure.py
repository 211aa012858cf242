"""The package's shape: import layers without cycles, the method registry, and a trainer that
names no method (DESIGN.md, "Layout")."""

import ast
import pathlib
import sys
import types

import pytest

from jcompress.errors import JCompressError
from jcompress.methods import base
from jcompress.methods import registry

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jcompress"

#: Layers, bottom (0) to top: a module may import its own layer or lower ones, never higher.
LAYERS = {
    0: ("errors", "config", "transforms", "runtime", "packing", "jaxpr_utils", "native"),
    # algorithms, models, data: the pure math each method uses
    1: ("quantize", "prune", "binary", "pq", "lowrank", "distill", "structured", "fastconv",
        "bias_correction", "equalize", "brecq",
        "actquant", "bnn_infer", "pretrained", "sensitivity", "hessian", "bitalloc", "adaround",
        "intinfer", "models", "data"),
    2: ("methods",),
    3: ("artifact", "state", "optim", "evaluation", "metrics", "checkpoint"),
    4: ("experiment",),
    5: ("teacher",),
    6: ("train",),
    7: ("export", "analysis", "sweep"),
    8: ("cli",),
}
#: The trainer: it never names a compression method (the registry's hooks do the work).
TRAINER = ("train", "experiment", "teacher", "state", "checkpoint", "evaluation", "metrics",
           "optim", "sweep")


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
  """The layer of `jcompress.x.y`: that of `x`, where `x` is a listed name or starts with one
  followed by `_` (a module split off a listed one, e.g. `quantize_kmeans`)."""
  parts = module.split(".")
  if len(parts) == 1:
    return -1   # the package itself: the public API, importing from every layer below it
  head = parts[1]
  for level, names in LAYERS.items():
    if any(head == n or head.startswith(n + "_") for n in names):
      return level
  raise AssertionError(f"module {module} is in no layer of tests/test_structure.py: add it")


def _imports(module: str, path: pathlib.Path) -> set[str]:
  """The jcompress modules `module` imports anywhere in its source (function-local imports
  included: they hide cycles, they do not remove them)."""
  known = _modules()
  out = set()
  tree = ast.parse(path.read_text())
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base_name = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base_name = ".".join(anchor + ([base_name] if base_name else []))
      # `from pkg import mod` imports the module; `from mod import name`, the module.
      names = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name
               for a in node.names]
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name.startswith("jcompress.") and name != module:
        out.add(name)
  return out


def _graph() -> dict[str, set[str]]:
  return {m: _imports(m, p) for m, p in _modules().items() if m != "jcompress"}


def test_no_module_imports_a_higher_layer():
  bad = []
  for module, deps in _graph().items():
    for dep in deps:
      if _layer(dep) > _layer(module):
        bad.append(f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})")
  assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_checks_fail_on_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
  # The walker sees function-local imports: a model importing the trainer inside a function.
  src = tmp_path / "m.py"
  src.write_text("def f():\n  from jcompress import train\n  return train\n")
  deps = _imports("jcompress.models.m", src)
  assert deps == {"jcompress.train"}
  assert _layer("jcompress.train") > _layer("jcompress.models.m")


def test_size_limits():
  lines = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
  assert lines["jcompress.train"] <= 500, lines["jcompress.train"]
  over = {m: n for m, n in lines.items() if n > 900}
  assert not over, over


def test_trainer_names_no_method():
  """No string literal or attribute in the trainer's modules is a registered method's name:
  they loop over `registry` hooks instead."""
  names = set(registry.names())
  found = []
  for module in TRAINER:
    path = PACKAGE / f"{module}.py"
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value in names:
        found.append(f"{module}.py:{node.lineno}: {node.value!r}")
      if isinstance(node, ast.Attribute) and node.attr in names:
        found.append(f"{module}.py:{node.lineno}: .{node.attr}")
  assert not found, "\n".join(found)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_each_method_once_with_its_config_key():
  assert registry.names() == ("prune", "lowrank", "pq", "quant", "binary", "structured",
                              "distill")
  for m in registry.METHODS:
    assert m.summary and any(getattr(m, h) is not None for h in base.ACTIONS)
  # Chain order: pruning before the quantizers, binarization last of the transforms.
  transforms = [m.name for m in registry.METHODS if m.transform is not None]
  assert transforms == ["prune", "lowrank", "pq", "quant", "binary"]


def _fake_module(monkeypatch, name, **attrs):
  module = types.ModuleType(name)
  for k, v in attrs.items():
    setattr(module, k, v)
  monkeypatch.setitem(sys.modules, name, module)
  return name


def test_registry_errors_name_the_module(monkeypatch):
  ok = base.Method(name="scale", summary="s", transform=lambda *a: None)
  good = _fake_module(monkeypatch, "jc_ok", METHOD=ok)
  twice = _fake_module(monkeypatch, "jc_twice", METHOD=ok)
  with pytest.raises(JCompressError, match="jc_twice: the method 'scale' is already registered "
                     "by jc_ok"):
    registry.load([good, twice])
  with pytest.raises(JCompressError, match="jc_empty defines no METHOD"):
    registry.load([_fake_module(monkeypatch, "jc_empty")])
  with pytest.raises(JCompressError, match="jc_idle: METHOD 'idle' has none of the hooks"):
    registry.load([_fake_module(monkeypatch, "jc_idle",
                                METHOD=base.Method(name="idle", summary="nothing"))])
  with pytest.raises(JCompressError, match="jc_dict: METHOD is a dict"):
    registry.load([_fake_module(monkeypatch, "jc_dict", METHOD={"name": "x"})])
  with pytest.raises(JCompressError, match="jc_missing cannot be imported"):
    registry.load(["jc_missing"])
  with pytest.raises(JCompressError, match="jc_key: METHOD.name 'not a key'"):
    registry.load([_fake_module(monkeypatch, "jc_key", METHOD=base.Method(
        name="not a key", summary="s", transform=lambda *a: None))])
  assert registry.load([good])[0] is ok


def test_active_methods_follow_the_config():
  import ml_collections  # noqa: PLC0415
  c = ml_collections.ConfigDict({"quant": {"bits": 4}, "prune": {"enabled": False},
                                 "teacher": ""})
  assert [m.name for m in registry.active(c)] == ["quant"]
  c.teacher = "runs/teacher"
  assert [m.name for m in registry.active(c)] == ["quant", "distill"]
  assert [m.name for m in registry.with_hook(c, "make_loss")] == ["distill"]
