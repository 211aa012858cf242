"""Which of a checkout's Python definitions a process ran, and whether they changed since.

A quality-table point (benchmarks/quality.py) records, while it trains, every function, class
body and module of the checkout's library that Python entered (`Recorder`: a `sys.settrace`
hook that sees each new frame's code object and asks for no line events). Later, a change to
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
(`Recorder(whole=...)`: a dataset prepared by another process), and Python run where no trace
hook reaches (threads started outside `threading`, callbacks from native code).
"""

from __future__ import annotations

import ast
import os
import sys
import threading

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
  """Records the code objects Python enters while active, in this thread and in threads
  started meanwhile; `qualnames()` maps the files under `root` whose relative path starts with
  one of `prefixes` to the qualified names of what ran there. A file under one of `whole` that
  ran at all is recorded as WHOLE_FILE too: code whose effect outlives the process that ran it
  (a dataset builder whose prepared files a later process reads without running it).

    with Recorder(root, ("jcompress/",)) as rec:
      ...
    rec.qualnames()   # {"jcompress/train.py": ["<module>", "train_and_evaluate", ...], ...}
  """

  def __init__(self, root: str, prefixes: tuple[str, ...], whole: tuple[str, ...] = ()):
    self.root = os.path.abspath(root)
    self.prefixes = prefixes
    self.whole = whole
    self.codes: set = set()
    self.early: set[str] = set()
    self._previous = None

  def _tracked(self, filename: str) -> str | None:
    if not filename or not filename.endswith(".py"):
      return None
    path = os.path.abspath(filename)
    if not path.startswith(self.root + os.sep):
      return None
    rel = os.path.relpath(path, self.root).replace(os.sep, "/")
    return rel if rel.startswith(self.prefixes) else None

  def _trace(self, frame, event, arg):  # noqa: ARG002
    self.codes.add(frame.f_code)
    return None   # no line events

  def __enter__(self) -> Recorder:
    for module in list(sys.modules.values()):   # imported already: its module code is unseen
      rel = self._tracked(getattr(module, "__file__", None) or "")
      if rel:
        self.early.add(rel)
    self._previous = sys.gettrace()
    threading.settrace(self._trace)
    sys.settrace(self._trace)
    return self

  def __exit__(self, *exc) -> None:
    sys.settrace(self._previous)
    threading.settrace(self._previous)

  def qualnames(self) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for code in list(self.codes):
      rel = self._tracked(code.co_filename)
      if rel:
        out.setdefault(rel, set()).add(
            MODULE if code.co_name == "<module>" else code.co_qualname)
    for rel in self.early | {rel for rel in out if rel.startswith(self.whole or ("\0",))}:
      out.setdefault(rel, set()).add(WHOLE_FILE)
    return {rel: sorted(names) for rel, names in sorted(out.items())}


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
  if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)):
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
