"""README.md's library example runs as written and does what it says; its two set-up commands
are the ones CI runs."""

import copy
import os
import pathlib
import re
import textwrap

import jax
import numpy as np
import pytest

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
  """CI runs the README's test command (the line after its marker in .ci/run), then the
  tests that command leaves out (`-m slow`), so the whole suite runs."""
  lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
  marker = [i for i, line in enumerate(lines) if line.startswith("# --- README test command")]
  assert len(marker) == 1
  assert lines[marker[0] + 1] in _section("Set-up: the two commands")
  assert lines[marker[0] + 1].endswith("python -m pytest -q")
  assert "python -m pytest -q -m slow" in lines[marker[0] + 2:]


def test_default_run_checks_each_parametrized_test_once():
  """The README command's selection (tests/conftest.py): the first case of a parametrized test
  not already marked slow stays, its other cases become slow; unparametrized tests and tests
  marked slow are left as they are."""
  from conftest import _other_cases_are_slow  # tests/ is on sys.path (pytest's rootdir import)

  class Item:
    def __init__(self, name, case, slow=False):
      self.path, self.originalname = pathlib.Path("tests/test_x.py"), name
      self.callspec = case
      self.marks = ["slow"] if slow else []

    def get_closest_marker(self, name):
      return name if name in self.marks else None

    def add_marker(self, mark):
      self.marks.append(mark.name)

  items = [Item("a", 1, slow=True), Item("a", 2), Item("a", 3), Item("b", None),
           Item("c", 1), Item("a", 4)]
  _other_cases_are_slow(items)
  assert [bool(item.marks) for item in items] == [True, False, True, False, False, True]


def test_adding_a_method_shows_a_real_method_module():
  blocks = re.findall(r"```python\n(.*?)```", _section("Adding a method"), re.S)
  assert blocks and blocks[0] == (ROOT / "jcompress" / "methods" / "prune.py").read_text()


def test_results_table_is_the_generated_file_it_names():
  """README's results table is benchmarks/quality.py's rendering of the json file it names,
  not typed by hand; and the renderer marks stale and missing seeds."""
  import json
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  text = (ROOT / "README.md").read_text()
  assert text.count(quality.README_BEGIN) == 1 and text.count(quality.README_END) == 1
  block = text[text.index(quality.README_BEGIN):text.index(quality.README_END)
               + len(quality.README_END)]
  source = re.search(r"From `([^`]+)`", block).group(1)
  summary = json.loads((ROOT / source).read_text())
  assert block == quality.readme_block(summary, source)
  rows = {r["row"] for r in summary["rows"] if r["seeds"]}
  assert "float" in rows and len(rows) >= 5
  # Rendering: a stale seed is said in the table, a failed one listed with its error.
  row = {"row": "x", "label": "X", "command": "c", "seeds": [{"test_accuracy": 0.5}],
         "missing": [{"seed": 1, "reason": "failed: ValueError: bad"}], "stale_seeds": [0],
         "accuracy_mean": 50.0, "accuracy_std": 0.0, "model_bytes": 10,
         "compression_ratio": 2.0, "wall_seconds": 1.0}
  table = quality.markdown({**summary, "rows": [row]})
  assert "STALE: seeds [0]" in table and "seed 1 failed: ValueError: bad" in table
  assert "X (stale)" in quality.markdown({**summary, "rows": [row]}, readme=True)


def test_quality_rows_subset_keeps_the_other_rows_of_the_table():
  """`quality.py --rows=...` rewrites its rows in the table file and keeps the others, in the
  table's order, re-checked for staleness and with their drops from the (new) float row."""
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  def row(name, acc, commit, seed=0):
    return {"row": name, "label": name, "command": "c", "missing": [], "stale_seeds": [],
            "seeds": [{"seed": seed, "test_accuracy": acc / 100, "commit": commit}],
            "accuracy_mean": acc, "accuracy_std": 0.0}

  previous = {"data": "digits", "seeds": [0, 1], "rows": [
      row("float", 99.0, "abc"), row("ptq_uniform8", 98.0, "abc"),
      row("prune90", 97.0, "abc+dirty", seed=1)]}
  summary = {"data": "digits", "seeds": [0], "commit": "abc",
             "rows": [row("float", 99.5, "abc"), row("qat_w4a4", 99.0, "abc")]}
  merged = quality.merge(summary, previous, "abc")
  assert [e["row"] for e in merged["rows"]] == ["float", "ptq_uniform8", "qat_w4a4", "prune90"]
  by = {e["row"]: e for e in merged["rows"]}
  assert by["float"]["accuracy_mean"] == 99.5 and by["ptq_uniform8"]["drop"] == 1.5
  assert by["prune90"]["stale_seeds"] == [1] and by["ptq_uniform8"]["stale_seeds"] == []
  assert merged["seeds"] == [0, 1]
  assert quality.merge(summary, {**previous, "data": "digits_hard"}, "abc") == summary


def test_quality_rows_subset_keeps_the_seeds_it_has_no_run_of(monkeypatch):
  """`--rows` over a checkout holding only some seeds' runs (the others ran on another machine,
  or went with a fresh checkout) keeps those seeds' figures from the table file, re-checked
  for staleness, and the row's mean over all of them; a seed whose run failed here is listed as
  failed, not replaced by its old figure."""
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415
  monkeypatch.setattr(quality, "is_stale", lambda point_commit, commit, config_unchanged=False:
                      point_commit != commit)

  def seed(s, acc, commit):
    return {"seed": s, "test_accuracy": acc / 100, "model_bytes": 100, "compression_ratio": 4.0,
            "wall_seconds": 10.0, "commit": commit}

  def row(name, seeds, missing=()):
    return quality._aggregate({"row": name, "label": name, "command": "c", "seeds": seeds,
                               "missing": [*missing], "stale_seeds": []})

  previous = {"data": "digits", "seeds": [0, 1, 2], "rows": [
      row("float", [seed(s, 99.0, "old") for s in (0, 1, 2)]),
      row("ptq_uniform8", [seed(s, 98.0, "old") for s in (0, 1, 2)])]}
  summary = {"data": "digits", "seeds": [0], "commit": "new", "rows": [
      row("float", [seed(0, 99.5, "new")], [{"seed": 1, "reason": "not run"},
                                            {"seed": 2, "reason": "failed: OSError: disk"}]),
      row("ptq_uniform8", [seed(0, 99.5, "new")], [{"seed": 1, "reason": "not run"},
                                                   {"seed": 2, "reason": "not run"}])]}
  merged = quality.merge(summary, previous, "new")
  by = {e["row"]: e for e in merged["rows"]}
  assert [s["seed"] for s in by["ptq_uniform8"]["seeds"]] == [0, 1, 2]
  assert by["ptq_uniform8"]["missing"] == [] and by["ptq_uniform8"]["stale_seeds"] == [1, 2]
  assert by["ptq_uniform8"]["accuracy_mean"] == pytest.approx(98.5)
  assert [s["seed"] for s in by["float"]["seeds"]] == [0, 1]
  assert by["float"]["missing"] == [{"seed": 2, "reason": "failed: OSError: disk"}]
  assert by["float"]["stale_seeds"] == [1]
  assert by["ptq_uniform8"]["drop"] == pytest.approx(by["float"]["accuracy_mean"] - 98.5)
  # a kept seed that is fresh itself is stale where the base seed it started from is; it keeps
  # the table's machine; the table file's entry of that row is not changed
  previous["machine"] = "cpu: M"
  previous["rows"][1]["seeds"][1]["commit"] = "new"
  before = copy.deepcopy(previous)
  for named in (None, ["ptq_uniform8"]):
    merged = quality.merge(summary, previous, "new", named=named)
    by = {e["row"]: e for e in merged["rows"]}
    assert by["ptq_uniform8"]["stale_seeds"] == [1, 2], named
    assert all(s["machine"] == "cpu: M" for s in by["ptq_uniform8"]["seeds"][1:])
    assert previous["rows"][1] == before["rows"][1]


def test_quality_staleness_ignores_comment_and_docstring_changes(tmp_path, monkeypatch):
  """A library file whose comments or docstrings alone changed leaves the points fresh; any
  change to its code (a docstring turned into a value, a constant, an added statement), a file
  that is gone, or a change to a file that is not Python, does not."""
  import subprocess
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  old = textwrap.dedent('''\
      """Module doc."""
      import math  # a comment

      class A:
        """Class doc."""
        def f(self, x):
          """f's doc."""
          return math.sqrt(x) * 2
      ''')
  docs = (old.replace("Module doc.", "Another module doc.\n\nLonger.")
          .replace("# a comment", "# another").replace('"""f\'s doc."""', "# f computes"))
  assert quality._same_code(old, docs)
  for code in (old.replace("* 2", "* 3"), old.replace('"""Class doc."""', 'x = "Class doc."'),
               old.replace("return", "y = 1\n    return")):
    assert not quality._same_code(old, code), code
  assert not quality._same_code(old, None) and not quality._same_code("x = (", "x = (")

  # the same through git, in a repository of its own
  def git(*args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

  git("init", "-q")
  (tmp_path / "jcompress").mkdir()
  commits = []
  for text, toml in ((old, "a = 1"), (docs, "a = 1"), (docs, "a = 2  # b"),
                     (old.replace("* 2", "* 3"), "a = 2  # b")):
    (tmp_path / "jcompress" / "m.py").write_text(text)
    (tmp_path / "pyproject.toml").write_text(toml)
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    commits.append(git("rev-parse", "--short=12", "HEAD"))
  monkeypatch.setattr(quality, "ROOT", str(tmp_path))
  assert not quality.is_stale(commits[0], commits[1], True)        # docstrings and comments
  assert quality.is_stale(commits[1], commits[2], True)            # pyproject.toml
  assert quality.is_stale(commits[2], commits[3], True)            # code
  assert quality.is_stale(commits[0], commits[3], True)


def test_quality_rerun_stale_moves_stale_points_and_their_stale_bases_aside(tmp_path,
                                                                           monkeypatch):
  """`--rerun_stale` moves each finished stale point's workdir (and a stale finished base run
  of a point it runs) under ROOT/stale/, keeping its files, so that the run trains it again;
  fresh and unfinished points stay where they are."""
  import json
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415
  monkeypatch.setattr(quality, "is_stale", lambda point_commit, commit, config_unchanged=False:
                      point_commit != commit)
  monkeypatch.setattr(quality, "same_config", lambda point, data: True)
  root = str(tmp_path / "q")
  rows = [quality.ROW_BY_NAME[n] for n in ("float", "ptq_uniform8", "qat_w4a4")]
  pts = quality.points(rows, 3, root, "digits")
  at = {(p["row"], p["seed"]): p for p in pts}

  def finish(row, seed, commit):
    d = at[row, seed]["workdir"]
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({"test_accuracy": 0.9}, f)
    with open(os.path.join(d, "point.json"), "w") as f:
      json.dump({"commit": commit}, f)

  finish("float", 0, "old")        # stale base: it and its fresh dependent move
  finish("ptq_uniform8", 0, "new")
  finish("float", 1, "new")        # fresh base: only its stale dependent moves
  finish("ptq_uniform8", 1, "old")
  finish("qat_w4a4", 1, "new")
  os.makedirs(at["qat_w4a4", 0]["workdir"])   # unfinished: left to resume
  moved = quality.set_aside_stale(pts, pts, "digits", "new", root)
  stale_dir = os.path.join(root, "stale", "digits")
  assert sorted(moved) == sorted([
      (at["float", 0]["workdir"], os.path.join(stale_dir, "seed0", "float-old")),
      (at["ptq_uniform8", 0]["workdir"], os.path.join(stale_dir, "seed0", "ptq_uniform8-new")),
      (at["ptq_uniform8", 1]["workdir"], os.path.join(stale_dir, "seed1", "ptq_uniform8-old"))])
  for src, dst in moved:
    assert not os.path.exists(src) and os.path.exists(os.path.join(dst, "results.json"))
  for key in (("float", 1), ("qat_w4a4", 1), ("qat_w4a4", 0)):
    assert os.path.isdir(at[key]["workdir"]), key
  assert quality.set_aside_stale(pts, pts, "digits", "new", root) == []
  # the same point stale again at the same commit: kept beside the first, not over it
  finish("ptq_uniform8", 1, "old")
  assert quality.set_aside_stale([at["ptq_uniform8", 1]], pts, "digits", "new", root) == [
      (at["ptq_uniform8", 1]["workdir"], os.path.join(stale_dir, "seed1", "ptq_uniform8-old-2"))]
  # a point run alone (`--point`) whose finished base is stale: the base moves too, so that
  # the point waits for a fresh base instead of training from the stale one
  finish("float", 2, "old")
  finish("qat_w4a4", 2, "old")
  assert sorted(quality.set_aside_stale([at["qat_w4a4", 2]], pts, "digits", "new", root)) == [
      (at["float", 2]["workdir"], os.path.join(stale_dir, "seed2", "float-old")),
      (at["qat_w4a4", 2]["workdir"], os.path.join(stale_dir, "seed2", "qat_w4a4-old"))]
  # the flag of main: without it a stale point stays; with it, it is moved, then run
  from jcompress import runtime  # noqa: PLC0415
  monkeypatch.setattr(runtime, "configure_cpu", lambda: {})   # leave this process's tuning be
  monkeypatch.setattr(quality, "git_commit", lambda: "new")
  ran = []
  monkeypatch.setattr(quality, "run_point", lambda point, data, commit: (
      ran.append((point["workdir"], _done(point))) or {"status": "done"}))
  _done = quality._done
  root2 = str(tmp_path / "q2")
  at = {(p["row"], p["seed"]): p
        for p in quality.points([rows[0], rows[1]], 1, root2, "digits")}
  finish("float", 0, "new")
  finish("ptq_uniform8", 0, "old")
  args = ["--data=digits", "--seeds=1", "--rows=ptq_uniform8", f"--root={root2}", "--point=1"]
  assert quality.main(args) == 0
  assert ran == [(at["ptq_uniform8", 0]["workdir"], True)]   # left in place: skipped as done
  assert quality.main([*args, "--rerun_stale"]) == 0
  assert ran[1] == (at["ptq_uniform8", 0]["workdir"], False)  # moved aside, then run again
  assert os.path.exists(os.path.join(root2, "stale", "digits", "seed0", "ptq_uniform8-old",
                                     "results.json"))


def test_quality_vit_rows_run_on_digits_only(capsys):
  """The ViT rows are left out of the digits_hard table (and its --quick subset), a table file
  that still lists them loses them on the next --rows update, and --rows naming one there is
  refused with the row's name."""
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  vit = {r.name for r in quality.ROWS if r.name.startswith("vit_")}
  assert vit and all(quality.ROW_BY_NAME[n].runs_on("digits") for n in vit)
  assert not any(quality.ROW_BY_NAME[n].runs_on("digits_hard") for n in vit)
  assert quality.ROW_BY_NAME["student_kd"].runs_on("digits_hard")
  for args, expect_vit in (([], False), (["--quick"], False)):
    quality.main(["--data=digits_hard", "--list", *args])
    listed = capsys.readouterr().out
    assert "student_kd" in listed or "--quick" in args
    assert "float" in listed and ("vit_" in listed) == expect_vit
  quality.main(["--data=digits", "--list"])
  assert "vit_deit200" in capsys.readouterr().out

  def row(name):
    return {"row": name, "label": name, "command": "c", "missing": [], "stale_seeds": [],
            "seeds": [{"seed": 0, "test_accuracy": 0.5, "commit": "abc"}],
            "accuracy_mean": 50.0, "accuracy_std": 0.0}

  previous = {"data": "digits_hard", "seeds": [0],
              "rows": [row("float"), row("vit_float"), row("vit_ptq8"), row("pq")]}
  summary = {"data": "digits_hard", "seeds": [0], "commit": "abc", "rows": [row("qcnn")]}
  merged = quality.merge(summary, previous, "abc")
  assert [e["row"] for e in merged["rows"]] == ["float", "pq", "qcnn"]
  with pytest.raises(SystemExit, match="vit_float"):
    quality.main(["--data=digits_hard", "--rows=vit_float", "--list"])


def test_quality_vit_rows_start_from_the_float_vit_and_drop_from_it():
  """The ViT rows' {float} is the seed's float ViT (run first, with the float ResNet); their drops
  are from the float ViT's mean; the DeiT row's teacher is the float ResNet."""
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  rows = [quality.ROW_BY_NAME[n] for n in ("vit_deit200", "vit_qat_w4a4", "vit_float", "float")]
  pts = quality.points(rows, 1, "/r", "digits")
  assert [p["row"] for p in pts][:2] == ["vit_float", "float"]
  by = {p["row"]: p for p in pts}
  assert by["vit_qat_w4a4"]["float"] == "/r/digits/seed0/vit_float"
  assert by["vit_deit200"]["float"] == "/r/digits/seed0/float"

  def entry(name, acc):
    return {"row": name, "seeds": [{}], "accuracy_mean": acc}

  entries = [entry("float", 99.0), entry("vit_float", 98.0), entry("vit_qat_w4a4", 97.5),
             entry("vit_deit200", 96.0), entry("ptq_uniform8", 98.5)]
  quality.set_drops(entries)
  drops = {e["row"]: e.get("drop") for e in entries}
  assert drops == {"float": None, "vit_float": None, "vit_qat_w4a4": 0.5, "vit_deit200": 2.0,
                   "ptq_uniform8": 0.5}


def test_quality_workers_start_a_point_after_its_base_and_skip_it_when_the_base_fails(tmp_path):
  """`quality.py --workers=N`'s scheduler: a point starts only once its base run has results,
  and the points of a failed base run are skipped, not started."""
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  rows = [quality.ROW_BY_NAME[n] for n in ("float", "ptq_uniform8", "qat_w4a4", "vit_float",
                                             "vit_ptq8")]
  pts = quality.points(rows, 1, str(tmp_path), "digits")
  # a fake point: fails for vit_float; for the others exits 3 if its base has no results yet,
  # else writes results.json after a short while
  fake = ("import json, os, sys, time; w, base = sys.argv[1], sys.argv[2];"
          "os.path.basename(w) == 'vit_float' and sys.exit(1);"
          "base and not os.path.exists(os.path.join(base, 'results.json')) and sys.exit(3);"
          "time.sleep(0.3); json.dump({}, open(os.path.join(w, 'results.json'), 'w'))")

  def command(p):
    base = quality.base_point(p, pts)
    return [sys.executable, "-c", fake, p["workdir"], base["workdir"] if base else ""]

  status = quality.run_workers(pts, pts, 2, command, poll_seconds=0.05)
  by = {p["row"]: status[p["index"]] for p in pts}
  assert by["float"] == by["ptq_uniform8"] == by["qat_w4a4"] == "done"
  assert by["vit_float"] == "failed" and by["vit_ptq8"].startswith("skipped")
  assert not os.path.exists(os.path.join(tmp_path, "digits", "seed0", "vit_ptq8", "log.txt"))
  # a second call finds the finished points done and starts nothing for them
  finished = [p for p in pts if by[p["row"]] == "done"]
  assert quality.run_workers(finished, pts, 2, lambda p: ["false"]) == {
      p["index"]: "done" for p in finished}


def test_quality_workers_start_the_longest_chain_first(tmp_path):
  """Of the points ready to start, `run_workers` starts first the one heading the longest
  chain of expected run times (`critical_path`), those taken from the table files' wall times
  (`expected_seconds`: a row no file has gets the median of those that do)."""
  import json
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  rows = [quality.ROW_BY_NAME[n] for n in ("float", "ptq_uniform8", "qat_w4a4", "bnn_w1a1_kd")]
  pts = quality.points(rows, 2, str(tmp_path / "runs"), "digits")
  table = tmp_path / "digits.json"
  table.write_text(json.dumps({"rows": [{"row": "float", "wall_seconds": 300.0},
                                        {"row": "ptq_uniform8", "wall_seconds": 20.0},
                                        {"row": "bnn_w1a1_kd", "wall_seconds": 750.0}]}))
  cost = quality.expected_seconds(pts, [str(tmp_path / "missing.json"), str(table)])
  by_row = {p["row"]: cost[p["index"]] for p in pts if p["seed"] == 0}
  assert by_row == {"float": 300.0, "ptq_uniform8": 20.0, "qat_w4a4": 300.0,
                    "bnn_w1a1_kd": 750.0}
  level = quality.critical_path(pts, pts, cost)
  assert {p["row"]: level[p["index"]] for p in pts if p["seed"] == 1} == {
      "float": 1050.0, "ptq_uniform8": 20.0, "qat_w4a4": 300.0, "bnn_w1a1_kd": 750.0}
  log = tmp_path / "order.txt"
  fake = ("import json, os, sys; w = sys.argv[1];"
          "open(sys.argv[2], 'a').write(os.path.relpath(w, sys.argv[3]) + '\\n');"
          "json.dump({}, open(os.path.join(w, 'results.json'), 'w'))")

  def command(p):
    return [sys.executable, "-c", fake, p["workdir"], str(log), str(tmp_path / "runs")]

  status = quality.run_workers(pts, pts, 1, command, poll_seconds=0.02, cost=cost)
  assert set(status.values()) == {"done"}
  order = log.read_text().split()
  # both float runs head chains of 1,050 s, then the long BNN runs, then the rest by length
  assert order[:2] == ["digits/seed0/float", "digits/seed1/float"]
  assert order[2:4] == ["digits/seed0/bnn_w1a1_kd", "digits/seed1/bnn_w1a1_kd"]
  assert order[4:] == ["digits/seed0/qat_w4a4", "digits/seed1/qat_w4a4",
                       "digits/seed0/ptq_uniform8", "digits/seed1/ptq_uniform8"]


def test_quality_point_is_stale_where_its_config_or_its_base_changed(tmp_path, monkeypatch):
  """A finished point whose config is the one the checkout builds for it is judged on the
  library's code alone (SHARED_PATHS); one whose config changed on every code path; the
  widths a structured run wrote into its config are not a change; a stale base makes its
  dependents stale."""
  import json
  import sys

  import ml_collections

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  built = {"float": {"lr": 0.1, "model_kwargs": {}},
           "filters_half": {"lr": 0.2, "structured": {"flops": 0.5}, "model_kwargs": {}}}
  monkeypatch.setattr(quality, "build_config",
                      lambda p, data: ml_collections.ConfigDict(built[p["row"]]))
  calls = []

  def is_stale(point_commit, commit, config_unchanged=False):
    calls.append((point_commit, config_unchanged))
    return point_commit == "old" or (point_commit == "expt" and not config_unchanged)

  monkeypatch.setattr(quality, "is_stale", is_stale)
  rows = [quality.ROW_BY_NAME[n] for n in ("float", "filters_half")]
  pts = {p["row"]: p for p in quality.points(rows, 1, str(tmp_path), "digits")}

  def ran(row, commit, config):
    os.makedirs(pts[row]["workdir"], exist_ok=True)
    with open(os.path.join(pts[row]["workdir"], "point.json"), "w") as f:
      json.dump({"commit": commit}, f)
    with open(os.path.join(pts[row]["workdir"], "config.json"), "w") as f:
      json.dump(config, f)

  def stale(row):
    return quality.point_stale(pts[row], "digits", "new", {})

  chosen = {"lr": 0.2, "structured": {"flops": 0.5}, "model_kwargs": {"channels": [["c", 3]]}}
  ran("float", "expt", built["float"])       # same config: an experiments/ change is no matter
  ran("filters_half", "expt", chosen)        # the widths it chose are not a config change
  assert quality.same_config(pts["filters_half"], "digits")
  assert not stale("float") and not stale("filters_half")
  assert calls[:2] == [("expt", True), ("expt", True)]
  ran("filters_half", "expt", {**chosen, "lr": 0.3})   # another config: every path counts
  assert not quality.same_config(pts["filters_half"], "digits") and stale("filters_half")
  ran("filters_half", "expt", chosen)
  ran("float", "old", built["float"])        # the base ran at a commit whose library differs
  assert stale("float") and stale("filters_half")
  os.remove(os.path.join(pts["float"]["workdir"], "config.json"))
  assert not quality.same_config(pts["float"], "digits")


def test_quality_merge_judges_a_gone_run_on_the_config_it_ran_with(tmp_path, monkeypatch):
  """Where a kept row's run is gone (a fresh checkout), `merge` compares the config it ran
  with (the seed's digest, or what the experiment files of its commit build) against the one
  the checkout builds: an experiment file changed for another row leaves it fresh, a change
  to its own config stales it, and a stale base seed stales its dependents' seed."""
  import sys

  import ml_collections

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  lr = {"experiments": {"float": 0.1, "prune90": 0.2, "qat_w4a4": 0.3},     # the checkout's
        "old": {"float": 0.1, "prune90": 0.2, "qat_w4a4": 0.4}}             # at commit "expt"
  monkeypatch.setattr(quality, "build_config", lambda p, data, experiments=None:
                      ml_collections.ConfigDict({"lr": lr[experiments or "experiments"][p["row"]],
                                                 "init": p["float"]}))
  monkeypatch.setattr(quality, "experiments_at", lambda commit, cache: "old")
  monkeypatch.setattr(quality, "is_stale", lambda point_commit, commit, config_unchanged=False:
                      point_commit == "lib" or (point_commit == "expt" and not config_unchanged))

  def row(name, commit, digest=None, seeds=(0,), stale=()):
    spec = quality.ROW_BY_NAME[name].spec
    config = {} if digest is None else {"config": digest}   # an entry from before the digests
    return {"row": name, "label": name, "command": spec, "missing": [], "stale_seeds": [*stale],
            "seeds": [{"seed": s, "test_accuracy": 0.9, "commit": commit, **config}
                      for s in seeds], "accuracy_mean": 90.0, "accuracy_std": 0.0}

  def digest(name):
    p = quality.make_point(str(tmp_path), "digits", quality.ROW_BY_NAME[name], 0)
    return quality.built_digest(p, "digits")

  summary = {"data": "digits", "seeds": [0], "commit": "new", "rows": []}
  previous = {"data": "digits", "rows": [row("float", "expt"), row("prune90", "expt"),
                                         row("qat_w4a4", "expt")]}
  merged = quality.merge(summary, previous, "new", str(tmp_path))
  assert {e["row"]: e["stale_seeds"] for e in merged["rows"]} == {
      "float": [], "prune90": [], "qat_w4a4": [0]}
  # a fresh seed's digest is recorded and used next time, without the old experiment files
  seed0 = {e["row"]: e["seeds"][0] for e in merged["rows"]}
  assert seed0["prune90"]["config"] == digest("prune90") and "config" not in seed0["qat_w4a4"]
  previous = {"data": "digits", "rows": [row("float", "expt", digest("float")),
                                         row("prune90", "expt", "0" * 16)]}
  by = {e["row"]: e["stale_seeds"] for e in quality.merge(summary, previous, "new",
                                                           str(tmp_path))["rows"]}
  assert by == {"float": [], "prune90": [0]}
  # a seed that ran with another config than its checkout built, or that the table already
  # marks stale, stays stale though the experiment files of its commit build today's config
  previous = {"data": "digits", "rows": [row("float", "expt", quality.CHANGED),
                                         row("prune90", "expt", stale=(0,))]}
  by = {e["row"]: e["stale_seeds"] for e in quality.merge(summary, previous, "new",
                                                           str(tmp_path))["rows"]}
  assert by == {"float": [0], "prune90": [0]}
  # a library change stales the base seed, and with it the seed that started from it
  previous = {"data": "digits", "rows": [row("float", "lib", seeds=(0, 1)),
                                         row("prune90", "expt", seeds=(0,))]}
  by = {e["row"]: e["stale_seeds"] for e in quality.merge(summary, previous, "new",
                                                           str(tmp_path))["rows"]}
  assert by == {"float": [0, 1], "prune90": [0]}
  # the same config built from two checkouts (another root) has the same digest
  p = quality.make_point(str(tmp_path), "digits", quality.ROW_BY_NAME["prune90"], 0)
  q = quality.make_point("/elsewhere", "digits", quality.ROW_BY_NAME["prune90"], 0)
  assert quality.built_digest(p, "digits") == quality.built_digest(q, "digits")


def test_quality_workers_prepare_the_dataset_once_before_they_start(tmp_path, monkeypatch):
  """`--workers=N` prepares the dataset in the parent first: N workers finding it missing on
  a fresh machine would build it at once, and all but one fail at TFDS's rename."""
  import sys

  from jcompress import data as data_lib
  from jcompress import runtime

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  calls = []
  monkeypatch.setattr(runtime, "configure_cpu", lambda *a, **k: {})
  monkeypatch.setattr(data_lib, "dataset_info", lambda name, **k: calls.append(("prepare", name)))
  monkeypatch.setattr(quality, "run_workers", lambda todo, pts, workers, command, cost: (
      calls.append(("workers", workers)) or {p["index"]: "done" for p in todo}))
  quality.main(["--data=digits_hard", "--rows=float", "--seeds=1", "--workers=2",
                f"--root={tmp_path}/runs", f"--out_dir={tmp_path}/out"])
  assert calls == [("prepare", "digits_hard"), ("workers", 2)]


def test_quality_table_says_where_seeds_ran_and_from_which_base_run():
  """The table names every machine its seeds ran on (the notes say which rows ran on the
  others), and a seed that started from a base run other than the one its base row shows
  (the base rerun on another machine, say) is noted with both accuracies."""
  import sys

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  def row(name, accs, machine, base=None):
    return {"row": name, "label": name, "command": "c", "missing": [], "stale_seeds": [],
            "seeds": [{"seed": i, "test_accuracy": a, "machine": machine,
                       "base_accuracy": None if base is None else base[i]}
                      for i, a in enumerate(accs)],
            "accuracy_mean": 100 * sum(accs) / len(accs), "accuracy_std": 0.0}

  summary = {"data": "digits", "date": "d", "commit": "c", "machine": "A", "rows": [
      row("float", [1.0, 0.99], "A"), row("prune90", [0.98, 0.98], "A", base=[1.0, 0.99]),
      row("bnn_w1a1_kd", [0.99, 0.99], "B", base=[0.9944, 0.99])]}
  table = quality.markdown(summary)
  assert "on A (4 seeds), B (2 seeds) (the notes say which) by" in table
  notes = {line.split(" | ")[0].strip("| "): line.split(" | ")[-1]
           for line in table.splitlines() if line.startswith("| ")}
  assert "started from" not in notes["prune90"]
  assert "ran on B" in notes["bnn_w1a1_kd"] and "ran on" not in notes["prune90"]
  assert ("seed 0 started from a float run at 99.44% (the float row's seed 0: 100.00%)"
          in notes["bnn_w1a1_kd"]) and "seed 1 started" not in notes["bnn_w1a1_kd"]
  assert "the notes say which" not in quality.markdown(summary, readme=True)
  one = {**summary, "rows": summary["rows"][:2]}
  assert "on A by" in quality.markdown(one)
  # a kept seed that does not say where it ran ran on the machine of the table it came from
  unsaid = {**summary["rows"][1], "seeds": [{**summary["rows"][1]["seeds"][0], "machine": None}]}
  merged = quality.merge({**summary, "rows": [], "seeds": []},
                         {**summary, "machine": "A", "rows": [unsaid]}, "c")
  assert quality.machines({**merged, "machine": "B"}) == [("A", 1)]


def test_quality_rows_subset_keeps_the_tables_base_row_unless_named(tmp_path, monkeypatch):
  """`--rows=X` runs the base rows X needs but leaves the table file's base row as it was
  (the table's other rows started from it) unless the base row is named too."""
  import json
  import sys

  from jcompress import runtime

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  monkeypatch.setattr(runtime, "configure_cpu", lambda *a, **k: {})
  out = tmp_path / "out"
  out.mkdir()
  kept = {"row": "float", "label": "float", "command": "c", "missing": [], "stale_seeds": [],
          "seeds": [{"seed": 0, "test_accuracy": 1.0, "commit": "abc"}],
          "accuracy_mean": 100.0, "accuracy_std": 0.0}
  (out / "digits.json").write_text(json.dumps({"data": "digits", "machine": "M", "rows": [kept]}))
  run = tmp_path / "runs" / "digits" / "seed0" / "float"   # a finished float run of the subset's
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps({"test_accuracy": 0.5, "model_bytes": 1,
                                                "compression_ratio": 1.0, "wall_seconds": 1.0}))
  args = ["--data=digits", "--seeds=1", "--summarize", f"--root={tmp_path}/runs",
          f"--out_dir={out}"]
  quality.main([*args, "--rows=prune90"])
  rows = {e["row"]: e for e in json.loads((out / "digits.json").read_text())["rows"]}
  assert rows["float"]["seeds"] == [{**kept["seeds"][0], "machine": "M"}]
  assert rows["prune90"]["missing"] == [{"seed": 0, "reason": "not run"}]
  quality.main([*args, "--rows=float,prune90"])
  rows = {e["row"]: e for e in json.loads((out / "digits.json").read_text())["rows"]}
  assert [s["test_accuracy"] for s in rows["float"]["seeds"]] == [0.5]


def test_quality_recheck_marks_the_table_files_stale_seeds(tmp_path, monkeypatch):
  """`--recheck` rewrites a table file with its seeds judged again against the checkout, its
  figures unchanged; without a table file it says which file is missing."""
  import json
  import sys

  from jcompress import runtime

  sys.path.insert(0, str(ROOT / "benchmarks"))
  import quality  # noqa: PLC0415

  monkeypatch.setattr(runtime, "configure_cpu", lambda *a, **k: {})
  monkeypatch.setattr(quality, "is_stale", lambda point_commit, commit, config_unchanged=False:
                      point_commit == "lib")
  out = tmp_path / "out"
  out.mkdir()

  def row(name, commit):
    return {"row": name, "label": name, "command": "c", "missing": [], "stale_seeds": [],
            "seeds": [{"seed": 0, "test_accuracy": 0.9, "commit": commit, "machine": "M"}],
            "accuracy_mean": 90.0, "accuracy_std": 0.0}

  (out / "digits.json").write_text(json.dumps({"data": "digits", "machine": "M", "rows": [
      row("float", "ok"), row("prune90", "lib")]}))
  args = [f"--root={tmp_path}/runs", f"--out_dir={out}", "--recheck"]
  quality.main(["--data=digits", *args])
  table = json.loads((out / "digits.json").read_text())
  assert [(e["row"], e["stale_seeds"], e["accuracy_mean"]) for e in table["rows"]] == [
      ("float", [], 90.0), ("prune90", [0], 90.0)]
  assert "STALE: seeds [0]" in (out / "digits.md").read_text()
  with pytest.raises(SystemExit, match="digits_hard.json"):
    quality.main(["--data=digits_hard", *args])
