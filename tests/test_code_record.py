"""benchmarks/code_record.py: what a process ran of the library, and whether a later change
touches it (the quality table's staleness of a point)."""

import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import code_record  # noqa: E402

LIB = textwrap.dedent('''\
    """Module doc."""
    import functools

    import jax

    SCALE = 2


    def used(x):
      """Doc."""
      return helper(x) * SCALE


    def helper(x):
      return [v + 1 for v in x]


    def unused(x):
      return x - 1


    @functools.lru_cache(maxsize=None)
    def cached_unused(x):
      return x


    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def vjp_unused(x, n):
      return x * n


    class Block:
      width: int = 4

      def __call__(self, x):
        f = lambda v: v * self.width  # noqa: E731
        return f(x)

      def other(self):
        return 0
    ''')


def _run_lib(tmp_path, text, calls):
  """Writes `text` as pkg/lib.py under tmp_path and records what `calls` (code run with the
  module imported as `lib`) ran of it."""
  pkg = tmp_path / "pkg"
  pkg.mkdir(parents=True, exist_ok=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "lib.py").write_text(text)
  sys.path.insert(0, str(tmp_path))
  try:
    for name in ("pkg.lib", "pkg"):
      sys.modules.pop(name, None)
    with code_record.Recorder(str(tmp_path), ("pkg/",)) as rec:
      import pkg.lib as lib  # noqa: PLC0415
      exec(calls, {"lib": lib})  # noqa: S102
    return rec.qualnames()
  finally:
    sys.path.remove(str(tmp_path))
    for name in ("pkg.lib", "pkg"):
      sys.modules.pop(name, None)


def test_recorder_lists_the_definitions_that_ran(tmp_path):
  code = _run_lib(tmp_path, LIB, "lib.used([1, 2]); lib.Block()(3)")
  names = code["pkg/lib.py"]
  # a comprehension or a lambda counts through the function around it (`definition`)
  assert names == ["<module>", "Block", "Block.__call__", "helper", "used"], names
  for idle in ("unused", "cached_unused", "vjp_unused", "Block.other"):
    assert idle not in names
  assert code["pkg/__init__.py"] == ["<module>"]
  # a file under `whole` is compared whole once it ran at all
  sys.path.insert(0, str(tmp_path))
  try:
    with code_record.Recorder(str(tmp_path), ("pkg/",), whole=("pkg/lib",)) as rec:
      import pkg.lib  # noqa: F401, PLC0415
    assert code_record.WHOLE_FILE in rec.qualnames()["pkg/lib.py"]
    assert code_record.WHOLE_FILE not in rec.qualnames()["pkg/__init__.py"]
  finally:
    sys.path.remove(str(tmp_path))
    for name in ("pkg.lib", "pkg"):
      sys.modules.pop(name, None)
  # a module imported before the recording began is recorded whole
  sys.path.insert(0, str(tmp_path))
  try:
    import pkg.lib  # noqa: F401, PLC0415
    with code_record.Recorder(str(tmp_path), ("pkg/",)) as rec:
      pass
    assert rec.qualnames()["pkg/lib.py"] == [code_record.WHOLE_FILE]
  finally:
    sys.path.remove(str(tmp_path))
    for name in ("pkg.lib", "pkg"):
      sys.modules.pop(name, None)


def test_recorder_keeps_lines_docs_threads_and_no_bytecode(tmp_path):
  """The marked code keeps the file's line numbers (tracebacks) and docstrings; a function run
  in another thread counts; after the recording nothing more is added; no bytecode of the
  marked code is cached."""
  text = textwrap.dedent('''\
      """Doc."""
      from __future__ import annotations


      def fails(x):
        """Raises."""
        y = x + 1
        raise ValueError(y)


      def in_thread():
        return 1


      def later():
        return 2
      ''')
  pkg = tmp_path / "tpkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "mod.py").write_text(text)
  sys.path.insert(0, str(tmp_path))
  try:
    with code_record.Recorder(str(tmp_path), ("tpkg/",)) as rec:
      import tpkg.mod as mod  # noqa: PLC0415
      try:
        mod.fails(1)
      except ValueError as e:
        tb = e.__traceback__
        while tb.tb_next:
          tb = tb.tb_next
        assert tb.tb_lineno == text.splitlines().index("  raise ValueError(y)") + 1
      thread = threading.Thread(target=mod.in_thread)
      thread.start()
      thread.join()
    mod.later()
    assert mod.__doc__ == "Doc." and mod.fails.__doc__ == "Raises."
    assert rec.qualnames()["tpkg/mod.py"] == ["<module>", "fails", "in_thread"]
    assert not list(pkg.glob("__pycache__/mod*"))
  finally:
    sys.path.remove(str(tmp_path))
    for name in ("tpkg.mod", "tpkg"):
      sys.modules.pop(name, None)


def test_a_change_counts_where_it_touches_what_ran(tmp_path):
  names = _run_lib(tmp_path, LIB, "lib.used([1, 2]); lib.Block()(3)")["pkg/lib.py"]

  def differs(new):
    return code_record.file_differs(LIB, new, names)

  # what ran, and the scopes around it
  assert differs(LIB.replace("[v + 1 for", "[v + 2 for"))           # a comprehension in it
  assert differs(LIB.replace("* SCALE", "* SCALE * 1"))
  assert differs(LIB.replace("SCALE = 2", "SCALE = 3"))              # the module's own code
  assert differs(LIB.replace("width: int = 4", "width: int = 5"))   # a field of its class
  assert differs(LIB.replace("v * self.width", "v + self.width"))    # a lambda in a method
  assert differs(LIB.replace("def helper(x):", "def helper(x, y=0):"))
  assert differs(LIB.replace("def used(x):", "def used_now(x):"))    # gone
  assert differs(LIB.replace("import functools", "import functools\nimport math"))
  assert differs(LIB + "\n\n@register\ndef added(x):\n  return x\n")   # a decorator runs
  assert differs(LIB.replace("def unused(x):", "def helper(x):"))     # a second `helper`
  # a custom_vjp's body need not run where its fwd / bwd do: its header always counts
  assert differs(LIB.replace("nondiff_argnums=(1,)", "nondiff_argnums=(0,)"))
  assert not differs(LIB.replace("return x * n", "return x * n * 1"))
  # what did not run, comments and docstrings
  assert not differs(LIB.replace("return x - 1", "return x - 2"))
  assert not differs(LIB.replace("def unused(x):", "def unused(x, y=1):"))
  assert not differs(LIB.replace("return 0", "return 1"))             # Block.other
  assert not differs(LIB.replace("maxsize=None)\ndef cached_unused(x):\n  return x",
                                 "maxsize=8)\ndef cached_unused(x):\n  return -x"))
  assert not differs(LIB + "\n\ndef added(x):\n  return x\n")
  assert not differs(LIB + "\n\nclass Added:\n  pass\n")
  assert not differs(LIB.replace('"""Doc."""', "# a comment").replace("Module doc.", "Other."))
  # a file it never saw whole, a file gone or new
  assert code_record.file_differs(LIB, LIB.replace("return x - 1", "return x - 2"),
                                  [code_record.WHOLE_FILE])
  assert not code_record.file_differs(LIB, LIB, [code_record.WHOLE_FILE])
  assert code_record.file_differs(LIB, None, names)
  assert code_record.file_differs(None, LIB, names)


def test_records_merge_and_pack():
  a, b = {"x.py": ["f", "<module>"]}, {"x.py": ["g"], "y.py": ["<module>"]}
  merged = code_record.merge(a, b)
  assert merged == {"x.py": ["<module>", "f", "g"], "y.py": ["<module>"]}
  assert code_record.merge(None, b) == code_record.merge({}, b)
  digest, text = code_record.pack(merged)
  assert code_record.unpack(text) == merged
  assert code_record.pack(json.loads(json.dumps(merged)))[0] == digest
  assert code_record.unpack("not base64 zlib") is None


def test_quality_point_is_stale_only_where_a_change_touches_what_it_ran(tmp_path, monkeypatch):
  """With a record in point.json, a library change stales the point only where it touches a
  definition the point ran (or a scope around it); a non-Python change, or no record, or a
  changed config, falls back to comparing the whole library."""
  import quality  # noqa: PLC0415

  def git(*args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

  git("init", "-q")
  (tmp_path / "jcompress").mkdir()
  commits = {}
  other = "def g():\n  return 1\n"
  for name, lib, oth, toml in (
      ("base", LIB, other, "a = 1"),
      ("idle", LIB.replace("return x - 1", "return x - 2"), other, "a = 1"),
      ("other_file", LIB.replace("return x - 1", "return x - 2"), "def g():\n  return 2\n",
       "a = 1"),
      ("ran", LIB.replace("* SCALE", "* SCALE * 1"), "def g():\n  return 2\n", "a = 1"),
      ("toml", LIB.replace("* SCALE", "* SCALE * 1"), "def g():\n  return 2\n", "a = 2")):
    (tmp_path / "jcompress" / "lib.py").write_text(lib)
    (tmp_path / "jcompress" / "other.py").write_text(oth)
    (tmp_path / "pyproject.toml").write_text(toml)
    git("add", "-A")
    git("commit", "-q", "-m", name)
    commits[name] = git("rev-parse", "--short=12", "HEAD")
  monkeypatch.setattr(quality, "ROOT", str(tmp_path))
  for fn in (quality._changed_files, quality._git_show, quality._file_differs,
             quality._code_differs):
    fn.cache_clear()
  code = {"jcompress/lib.py": _run_lib(tmp_path / "rec", LIB, "lib.used([1])")["pkg/lib.py"]}
  base = commits["base"]
  assert not quality.code_stale(base, commits["idle"], True, code)        # unused() changed
  assert not quality.code_stale(base, commits["other_file"], True, code)  # never imported
  assert quality.code_stale(base, commits["ran"], True, code)             # used() changed
  assert quality.code_stale(base, commits["toml"], True, code)            # pyproject.toml
  # without a record, or with another config: the whole library, as before
  assert quality.code_stale(base, commits["idle"], True, None)
  assert quality.code_stale(base, commits["idle"], False, code)
  assert quality.code_stale(base + "+dirty", base, True, code)
  assert not quality.code_stale(base, base, True, code)

  # through point_stale: the record point.json keeps
  point = {"row": "float", "seed": 0, "workdir": str(tmp_path / "run"), "float": ""}
  os.makedirs(point["workdir"])
  with open(os.path.join(point["workdir"], "point.json"), "w") as f:
    json.dump({"commit": base, "code": code}, f)
  monkeypatch.setattr(quality, "same_config", lambda p, data: True)
  assert not quality.point_stale(point, "digits", commits["idle"])
  assert quality.point_stale(point, "digits", commits["ran"])


def test_quality_run_point_keeps_the_record_across_a_resumed_run(tmp_path, monkeypatch):
  """run_point writes what the point ran into point.json (`code`), merged over the processes
  of a resumed run at one commit; a run resumed from checkpoints that recorded nothing, or
  from another commit, keeps no record (the whole library decides its staleness)."""
  import quality  # noqa: PLC0415

  from jcompress import train  # noqa: PLC0415

  # a library of its own under a root of its own: the recorder marks a module it imports
  lib_root = tmp_path / "lib"
  (lib_root / "jcompress").mkdir(parents=True)
  (lib_root / "jcompress" / "__init__.py").write_text("")
  (lib_root / "jcompress" / "fake.py").write_text(
      "def make_divisible(x):\n  return x\n\n\ndef scale_channels(c, f):\n  return c * f\n")
  finish = {"now": False}

  def fake_train(config, workdir):   # a checkpoint; results.json only where `finish`
    del config
    fake = importlib.import_module("jcompress.fake")
    os.makedirs(os.path.join(workdir, "checkpoints", "1"), exist_ok=True)
    if finish["now"]:
      fake.scale_channels(8, 0.5)
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({}, f)
    else:
      fake.make_divisible(10.0)

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  monkeypatch.setattr(quality, "build_config", lambda p, data: None)

  def run(name, commit, done):
    point = {"index": 0, "row": "float", "seed": 0, "workdir": str(tmp_path / name),
             "float": str(tmp_path / name)}
    finish["now"] = done
    saved = sys.modules.pop("jcompress.fake", None), sys.modules["jcompress"].__path__
    sys.modules["jcompress"].__path__ = [str(lib_root / "jcompress")]   # a new process's import
    try:
      with code_record.Recorder(str(lib_root), quality.RECORDED) as rec:
        monkeypatch.setattr(quality, "_RECORDER", rec)
        status = quality.run_point(point, "digits", commit)["status"]
    finally:
      sys.modules.pop("jcompress.fake", None)
      sys.modules["jcompress"].__path__ = saved[1]
    assert status == ("done" if done else "interrupted")
    if done:
      assert not os.path.exists(os.path.join(point["workdir"], quality.CODE_FILE))
      with open(os.path.join(point["workdir"], "point.json")) as f:
        return json.load(f)["code"]
    return None

  run("a", "c1", False)
  names = run("a", "c1", True)["jcompress/fake.py"]
  assert {"make_divisible", "scale_channels"} <= set(names), names   # both processes'
  run("b", "c0", False)
  assert run("b", "c1", True) is None          # resumed at another commit
  os.makedirs(tmp_path / "c" / "checkpoints" / "3")
  assert run("c", "c1", True) is None          # resumed from a run that recorded nothing


def _empty_summary() -> dict:
  """A `--rows` summary that ran nothing, at commit "new" (quality.merge then only rechecks)."""
  return {"data": "digits", "date": "d", "commit": "new", "machine": "m", "seeds": [],
          "rows": []}


def _record_code_stale(monkeypatch, quality) -> list:
  """quality.code_stale replaced by one that says fresh and lists its arguments (commit,
  config_unchanged, record) in the list returned."""
  seen = []

  def code_stale(point_commit, commit, config_unchanged, recorded):
    seen.append((point_commit, config_unchanged, recorded))
    return False

  monkeypatch.setattr(quality, "code_stale", code_stale)
  return seen


def _one_seed_table(row, records: dict, digest: str) -> dict:
  """A table file with one seed of `row`, run at commit "old" with config "cfg" and the record
  `digest` (`records`: the file's packed records)."""
  return {"data": "digits", "seeds": [0], "code": records,
          "rows": [{"row": row.name, "label": row.label, "command": row.spec,
                    "seeds": [{"seed": 0, "test_accuracy": 0.99, "model_bytes": 1,
                               "compression_ratio": 1.0, "wall_seconds": 1.0,
                               "commit": "old", "config": "cfg", "code": digest}],
                    "missing": [], "stale_seeds": [], "accuracy_mean": 99.0}]}


def test_quality_table_file_keeps_each_seeds_record(tmp_path, monkeypatch):
  """A table file keeps the record of each seed (packed, by digest): where the run is gone,
  `--recheck` (merge) judges the seed on that record, and the rewritten file keeps it."""
  import quality  # noqa: PLC0415

  code = {"jcompress/train.py": ["<module>", "train_and_evaluate"]}
  digest, text = code_record.pack(code)
  row = quality.ROW_BY_NAME["ptq_uniform8"]
  previous = _one_seed_table(row, {digest: text, "unused": "x"}, digest)
  monkeypatch.setattr(quality, "is_stale", lambda point_commit, commit, config_unchanged=False:
                      False)
  monkeypatch.setattr(quality, "built_digest", lambda p, data, experiments=None: "cfg")
  seen = _record_code_stale(monkeypatch, quality)
  summary = _empty_summary()
  out = quality.merge(summary, previous, "new", str(tmp_path))
  assert seen == [("old", True, code)]
  assert out["code"] == {digest: text}            # the seeds' records, no other
  assert out["rows"][0]["seeds"][0]["code"] == digest and not out["rows"][0]["stale_seeds"]


def test_quality_gone_run_is_judged_on_its_record_after_a_library_change(tmp_path,
                                                                         monkeypatch):
  """Where the run is gone and the library changed since its commit, the seed's config digest
  is still compared with today's, and with the same config its record decides (a change to
  code it never ran leaves it fresh, as `point_stale` judges a run that is still there)."""
  import quality  # noqa: PLC0415

  code = {"jcompress/train.py": ["<module>", "train_and_evaluate"]}
  digest, text = code_record.pack(code)
  row = quality.ROW_BY_NAME["ptq_uniform8"]
  previous = _one_seed_table(row, {digest: text}, digest)
  monkeypatch.setattr(quality, "is_stale", lambda point_commit, commit, config_unchanged=False:
                      True)   # jcompress/ differs between the commits
  seen = _record_code_stale(monkeypatch, quality)
  summary = _empty_summary()
  for built, unchanged in (("cfg", True), ("other", False)):
    monkeypatch.setattr(quality, "built_digest", lambda p, data, experiments=None, b=built: b)
    seen.clear()
    quality.merge(summary, json.loads(json.dumps(previous)), "new", str(tmp_path))
    assert seen == [("old", unchanged, code)]


def test_quality_rerun_unrecorded_moves_the_points_without_a_record(tmp_path, monkeypatch):
  """`--rerun_unrecorded` sets aside, beside the stale points, the fresh finished points that
  have no record of what they ran (and a base of theirs that moves), not the recorded ones."""
  import quality  # noqa: PLC0415

  monkeypatch.setattr(quality, "point_stale", lambda p, data, commit, cache=None: False)
  root = str(tmp_path / "q")
  rows = [quality.ROW_BY_NAME[n] for n in ("float", "ptq_uniform8")]
  pts = quality.points(rows, 2, root, "digits")
  at = {(p["row"], p["seed"]): p for p in pts}

  def finish(row, seed, code):
    d = at[row, seed]["workdir"]
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({}, f)
    with open(os.path.join(d, "point.json"), "w") as f:
      json.dump({"commit": "c", **({"code": code} if code is not None else {})}, f)

  rec = {"jcompress/train.py": ["<module>"]}
  finish("float", 0, None)           # unrecorded base: it moves, its recorded dependent stays
  finish("ptq_uniform8", 0, rec)
  finish("float", 1, rec)            # recorded base: only its unrecorded dependent moves
  finish("ptq_uniform8", 1, None)
  assert quality.set_aside_stale(pts, pts, "digits", "c", root) == []   # all fresh
  moved = quality.set_aside_stale(pts, pts, "digits", "c", root, unrecorded=True)
  assert sorted(src for src, _ in moved) == sorted(
      at[k]["workdir"] for k in (("float", 0), ("ptq_uniform8", 1)))
