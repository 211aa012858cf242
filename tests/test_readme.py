"""README.md's library example runs as written and does what it says; its two set-up commands
are the ones CI runs."""

import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _section(title: str) -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else None]


def test_library_example_runs_and_compresses():
  blocks = re.findall(r"```python\n(.*?)```", _section("Library use"), re.S)
  assert blocks, "README's 'Library use' section has no ```python block"
  code = blocks[0]
  assert len(code.strip().splitlines()) <= 30, "the library example must stay within 30 lines"
  ns: dict = {}
  exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
  w, X, y = ns["w"], ns["X"], ns["y"]
  accuracy = float((ns["model"].apply({"params": w}, X).argmax(-1) == y).mean())
  assert accuracy > 0.95, accuracy
  # Pruning: the mask keeps exactly half the hidden layer's weights (ties broken by index).
  masks = [s["masks"] for s in ns["comp"] if isinstance(s, dict) and "masks" in s][0]
  kernel = np.asarray(w["hidden"]["kernel"])
  assert np.asarray(masks["hidden"]["kernel"]).mean() == 0.5
  assert np.all(kernel[~np.asarray(masks["hidden"]["kernel"])] == 0)
  # 4-bit symmetric narrow-range codes: at most 15 levels per output column.
  assert max(len(np.unique(kernel[:, j])) for j in range(kernel.shape[1])) <= 15
  # The head is left float (the default exclusion), and the latent params are untouched float.
  assert len(np.unique(np.asarray(w["head"]["kernel"]))) > 100
  assert jax.tree.structure(ns["params"]) == jax.tree.structure(w)


def test_readme_test_command_is_what_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci in _section("Set-up: the two commands")


def test_adding_a_method_shows_a_real_method_module():
  blocks = re.findall(r"```python\n(.*?)```", _section("Adding a method"), re.S)
  assert blocks and blocks[0] == (ROOT / "jcompress" / "methods" / "quant.py").read_text()
