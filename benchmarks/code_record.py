"""Which of a checkout's Python definitions a process ran, and whether they changed since.

A quality-table point (benchmarks/quality.py) records, while it trains, every function, class
body and module of the checkout's library that Python entered (`Recorder`: an import hook that
compiles the library with a mark at the top of every module, class body and function body).
Later, a change to
the library makes the point stale only if it touches what the point ran (`file_differs`):
for each changed file, the code of each recorded definition and of the scopes around it (the
class body with its fields, the module's own statements) is compared between the two commits,
comments and docstrings aside. A definition that never ran is compared only by its header
where it carries a decorator (a decorator runs at import and may register it); a new
undecorated function changes nothing a point ran until some code that ran calls it, and that
code changed.

What this cannot see, the caller must treat as a change: files that are not Python (data,
pyproject.toml), modules imported before the recording started (`Recorder.early`: recorded as
"*", the whole file compared), code whose effect a process reads from disk without running it
(`Recorder(whole=...)`: a dataset prepared by another process), and code compiled from the
library's files some other way than by importing them while the recorder is active.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import os
import sys

#: Decorators that only wrap the function they decorate and run its body whenever the wrapper is
#: used (no registration, no other effect at import): a function that never ran under one of
#: them is not compared, like an undecorated one. Not jax.custom_vjp / custom_jvp: where the
#: wrapper is differentiated only its fwd / bwd run, so its header (nondiff_argnums) is kept.
PURE_DECORATORS = frozenset({
    "staticmethod", "classmethod", "property", "functools.wraps", "functools.lru_cache",
    "functools.cache", "functools.cached_property", "jax.jit", "nn.compact", "nn.nowrap",
    "abc.abstractmethod", "typing.overload",
})

MODULE = "<module>"
WHOLE_FILE = "*"


class Recorder:
  """Records the definitions of the files under `root` whose relative path starts with one of
  `prefixes` that run while active, in every thread; `qualnames()` maps each such file to the
  qualified names of what ran there. A file under one of `whole` that ran at all is recorded as
  WHOLE_FILE too: code whose effect outlives the process that ran it (a dataset builder whose
  prepared files a later process reads without running it).

    with Recorder(root, ("jcompress/",)) as rec:
      ...
    rec.qualnames()   # {"jcompress/train.py": ["<module>", "train_and_evaluate", ...], ...}

  How: while active, an import hook (first on `sys.meta_path`) compiles those files from their
  source with one added statement at the top of the module, of each class body and of each
  function body (after the docstring, on the line of the statement it precedes, so tracebacks
  and line numbers are unchanged): `__code_record__("qualname")`, which adds the name to the
  file's set. Nothing else is traced: a `sys.settrace` hook slows all Python code about 2x on
  CPython 3.11 (the interpreter leaves its specialised instructions to check every line), which
  added ~14% to a BRECQ point (jit tracing and its Python dispatch); this costs one set insertion
  per call of a library function. A lambda's or a comprehension's code is not marked itself: it
  runs only inside, or after, a run of the function around it, which `definition` folds it into.
  The instrumented code is never written to a bytecode cache. `root` is where the package is
  imported from: each prefix begins with a top-level package's directory (or module's file).
  Modules imported before the recording began are recorded whole (`early`); on exit the added
  statements stop recording.
  """

  MARK = "__code_record__"

  def __init__(self, root: str, prefixes: tuple[str, ...], whole: tuple[str, ...] = ()):
    self.root = os.path.abspath(root)
    self.prefixes = prefixes
    self.whole = whole
    self.ran: dict[str, set[str]] = {}
    self.early: set[str] = set()
    self._modules: list[dict] = []
    self._finder = None

  def _tracked(self, filename: str) -> str | None:
    if not filename or not filename.endswith(".py"):
      return None
    path = os.path.abspath(filename)
    if not path.startswith(self.root + os.sep):
      return None
    rel = os.path.relpath(path, self.root).replace(os.sep, "/")
    return rel if rel.startswith(self.prefixes) else None

  def __enter__(self) -> Recorder:
    for module in list(sys.modules.values()):   # imported already: its module code is unseen
      rel = self._tracked(getattr(module, "__file__", None) or "")
      if rel:
        self.early.add(rel)
    self._finder = _Finder(self)
    sys.meta_path.insert(0, self._finder)
    return self

  def __exit__(self, *exc) -> None:
    if self._finder in sys.meta_path:
      sys.meta_path.remove(self._finder)
    for namespace in self._modules:
      namespace[self.MARK] = _ignore

  def qualnames(self) -> dict[str, list[str]]:
    out = {rel: set(names) for rel, names in self.ran.items() if names}
    for rel in self.early | {rel for rel in out if rel.startswith(self.whole or ("\0",))}:
      out.setdefault(rel, set()).add(WHOLE_FILE)
    return {rel: sorted(names) for rel, names in sorted(out.items())}


def _ignore(_name: str) -> None:
  return None


class _Marker(ast.NodeTransformer):
  """Adds `Recorder.MARK("qualname")` at the top of the module, of each class body and of each
  function body (`co_qualname`'s names: "f.<locals>.g", "C.m")."""

  def __init__(self):
    self.prefix = ""

  def _mark(self, body: list, name: str) -> list:
    at = 1 if body and _is_docstring(body[0]) else 0
    if name == MODULE:
      while at < len(body) and isinstance(body[at], ast.ImportFrom) and \
          body[at].module == "__future__":
        at += 1
    anchor = body[min(at, len(body) - 1)] if body else None
    line, col = (anchor.lineno, anchor.col_offset) if anchor else (1, 0)
    call = ast.Expr(ast.Call(ast.Name(Recorder.MARK, ast.Load()), [ast.Constant(name)], []))
    for node in ast.walk(call):
      if "lineno" in node._attributes:   # noqa: SLF001  (not the Load context)
        node.lineno, node.col_offset, node.end_lineno, node.end_col_offset = line, col, line, col
    return [*body[:at], call, *body[at:]]

  def visit_Module(self, node):
    self.generic_visit(node)
    node.body = self._mark(node.body, MODULE)   # an empty module too: importing it ran it
    return node

  def _scope(self, node, inner: str):
    name = self.prefix + node.name
    saved, self.prefix = self.prefix, name + inner
    node.body = [self.visit(n) for n in node.body]
    self.prefix = saved
    # decorators, defaults and bases belong to the scope around (already visited there)
    node.body = self._mark(node.body, name)
    return node

  def visit_FunctionDef(self, node):
    return self._scope(node, ".<locals>.")

  visit_AsyncFunctionDef = visit_FunctionDef

  def visit_ClassDef(self, node):
    return self._scope(node, ".")


def _is_docstring(node) -> bool:
  return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and \
      isinstance(node.value.value, str)


class _Loader(importlib.machinery.SourceFileLoader):
  """Compiles a recorded file with its marks; never reads or writes a bytecode cache."""

  def __init__(self, fullname: str, path: str, recorder: Recorder, rel: str):
    super().__init__(fullname, path)
    self.recorder, self.rel = recorder, rel

  def get_code(self, fullname):
    path = self.get_filename(fullname)
    tree = _Marker().visit(ast.parse(self.get_data(path), path))
    return compile(tree, path, "exec", dont_inherit=True)

  def exec_module(self, module):
    namespace = module.__dict__
    namespace[Recorder.MARK] = self.recorder.ran.setdefault(self.rel, set()).add
    self.recorder._modules.append(namespace)   # noqa: SLF001
    super().exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
  """Gives the recorded files `_Loader`; every other module is left to the finders after it."""

  def __init__(self, recorder: Recorder):
    self.recorder = recorder
    # the top-level names a recorded file can be imported under ("jcompress/" -> "jcompress")
    self.tops = {p.split("/")[0].removesuffix(".py") for p in recorder.prefixes}

  def find_spec(self, fullname, path, target=None):
    if fullname.partition(".")[0] not in self.tops:
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
      return None
    rel = self.recorder._tracked(spec.origin or "")   # noqa: SLF001
    if rel is None:
      return None
    spec.loader = _Loader(fullname, spec.origin, self.recorder, rel)
    spec.cached = None
    return spec


def merge(a: dict[str, list[str]] | None, b: dict[str, list[str]]) -> dict[str, list[str]]:
  """The union of two records (a point that ran in several processes)."""
  out = {k: set(v) for k, v in (a or {}).items()}
  for k, v in b.items():
    out.setdefault(k, set()).update(v)
  return {k: sorted(v) for k, v in sorted(out.items())}


def definition(qualname: str) -> str:
  """The def or class statement a code object's qualname belongs to: a lambda's or a
  comprehension's code is part of the function around it ("f.<locals>.<lambda>" -> "f")."""
  parts = qualname.split(".")
  while parts and (parts[-1].startswith("<") or parts[-1] == ""):
    parts.pop()
    while parts and parts[-1] == "<locals>":
      parts.pop()
  return ".".join(parts) or MODULE


def enclosing(qualname: str) -> list[str]:
  """The definition itself and every scope around it, innermost first, the module last."""
  out, parts = [], definition(qualname).split(".") if qualname != MODULE else []
  while parts:
    out.append(".".join(parts))
    parts.pop()
    while parts and parts[-1] == "<locals>":
      parts.pop()
  return [*out, MODULE]


def _decorator_name(node: ast.expr) -> str:
  if isinstance(node, ast.Call):
    name = _decorator_name(node.func)
    if name == "functools.partial" and node.args:   # functools.partial(jax.custom_vjp, ...)
      return _decorator_name(node.args[0])
    return name
  if isinstance(node, ast.Attribute):
    return f"{_decorator_name(node.value)}.{node.attr}"
  if isinstance(node, ast.Name):
    return node.id
  return "?"


def _impure_decorators(node) -> bool:
  return any(_decorator_name(d) not in PURE_DECORATORS for d in node.decorator_list)


def _strip_docstring(body: list) -> list:
  if body and _is_docstring(body[0]):
    return body[1:] or [ast.Pass()]
  return body


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _with_body(node, body: list):
  """A copy of the def or class statement `node` with `body` as its body."""
  return type(node)(**{**{f: getattr(node, f, None) for f in node._fields}, "body": body})


def definitions(text: str, ran: set[str]) -> dict[str, str] | None:
  """{qualname: the code of that scope alone} for a module's text: the module (MODULE), every
  class and function, each without its docstring and with the bodies of the definitions
  inside it left out; a nested definition keeps its header (name, arguments, defaults,
  decorators, bases) in its parent's code where it is in `ran` or has a decorator outside
  PURE_DECORATORS, and is left out of it otherwise. Several statements of one name (a
  conditional definition) are listed together. None where the text does not parse."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return None
  out: dict[str, list[str]] = {}

  def own(node, qualname: str, body: list) -> None:
    kept = []
    for stmt in _strip_docstring(body):
      if isinstance(stmt, _DEFS):
        if node is tree:                        # Python's __qualname__ of the definition
          inner = stmt.name
        elif isinstance(node, ast.ClassDef):
          inner = f"{qualname}.{stmt.name}"
        else:
          inner = f"{qualname}.<locals>.{stmt.name}"
        own(stmt, inner, stmt.body)
        if inner in ran or _impure_decorators(stmt):
          kept.append(_with_body(stmt, [ast.Pass()]))   # its header
      else:
        kept.append(stmt)
    if node is tree:
      code = ast.dump(ast.Module(body=kept, type_ignores=[]), include_attributes=False)
    else:
      code = ast.dump(_with_body(node, kept), include_attributes=False)
    out.setdefault(qualname, []).append(code)

  own(tree, MODULE, tree.body)
  return {k: "\n".join(v) for k, v in out.items()}


def file_differs(old: str | None, new: str | None, names: list[str]) -> bool:
  """Whether the definitions `names` (a record's qualnames for one file) or the scopes around
  them differ between two versions of the file's text (None: not there). WHOLE_FILE in `names`
  compares every definition."""
  if old is None or new is None:
    return old is not new
  ran = {definition(n) for n in names}
  a, b = definitions(old, ran), definitions(new, ran)
  if a is None or b is None:
    return True
  if WHOLE_FILE in names:
    return a != b
  scopes = {s for n in names for s in enclosing(n)}
  return any(a.get(s) != b.get(s) for s in scopes)


def pack(code: dict[str, list[str]]) -> tuple[str, str]:
  """(digest, text) of a record for a table file: the text zlib-compressed JSON in base64,
  the digest its first 16 hex digits of SHA-256 (records that are equal share one)."""
  import base64  # noqa: PLC0415
  import hashlib  # noqa: PLC0415
  import json  # noqa: PLC0415
  import zlib  # noqa: PLC0415

  raw = json.dumps(code, sort_keys=True, separators=(",", ":")).encode()
  return hashlib.sha256(raw).hexdigest()[:16], base64.b64encode(zlib.compress(raw, 9)).decode()


def unpack(text: str) -> dict[str, list[str]] | None:
  """The record `pack` wrote as `text`; None where it does not decode."""
  import base64  # noqa: PLC0415
  import binascii  # noqa: PLC0415
  import json  # noqa: PLC0415
  import zlib  # noqa: PLC0415

  try:
    return json.loads(zlib.decompress(base64.b64decode(text)))
  except (binascii.Error, zlib.error, ValueError, TypeError):
    return None
