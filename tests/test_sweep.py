"""Sweeps: expansion helpers, point names, refusal of bad sweeps, runs, skips, resumes, summary."""

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from jcompress import config as config_lib
from jcompress import sweep
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny experiment on the real digits data (small CNN on the native 8x8 images, 4 steps) whose
# `bad` arg makes get_sweep return a sweep that must be refused.
EXPERIMENT = textwrap.dedent("""
    import ml_collections
    from jcompress import config as config_lib
    from jcompress import sweep

    ARGS = dict(data_dir="", quant=False, bad="")

    def get_config(arg=None):
      arg = config_lib.parse_arg(arg, **ARGS)
      c = config_lib.base_config()
      c.data = "digits"
      c.data_dir = arg.data_dir
      c.image_size = 0
      c.model = "small_cnn"
      c.width = 0.25
      c.augment = False
      c.batch_size = 32
      c.eval_batch_size = 360
      c.total_steps = 4
      c.log_every = 2
      c.eval_every = 0
      c.checkpoint_every = 4
      c.keep_checkpoints = 1
      if arg.quant:
        c.quant = ml_collections.ConfigDict({"method": "uniform", "bits": 8})
      return c

    def get_sweep(arg=None):
      arg = config_lib.parse_arg(arg, **ARGS)
      if arg.bad == "key":     # a typo in the last point's key
        return sweep.sweep("width", [0.25, 0.5]) + [{"optimizer.learning_rat": 0.1}]
      if arg.bad == "type":
        return sweep.sweep("batch_size", [32, "big"])
      if arg.bad == "value":   # refused by config.validate
        return sweep.sweep("batch_size", [32, 0])
      if arg.bad == "bits":    # refused by the quant transform's builder
        return sweep.product({"quant.bits": [8, 0]})
      if arg.bad == "twice":
        return [{"width": 0.5}, {"width": 0.5}]
      return sweep.zipit({"width": [0.25, 0.5], "optimizer.learning_rate": [0.1, 0.2]})
""")


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("experiments") / "tiny.py"
  path.write_text(EXPERIMENT)
  return str(path)


def spec_and_config(experiment_file, arg):
  spec = f"{experiment_file}:{arg}"
  return spec, config_lib.load_config_file(spec)


# ----------------------------------------------------------------------------- helpers


def test_product_and_zipit():
  # The first sweep varies slowest; dicts of value lists, lists of points and kwargs mix.
  assert sweep.product({"quant.bits": [8, 4]}, sweep.sweep("quant.method", ["u", "k"])) == [
      {"quant.bits": 8, "quant.method": "u"}, {"quant.bits": 8, "quant.method": "k"},
      {"quant.bits": 4, "quant.method": "u"}, {"quant.bits": 4, "quant.method": "k"}]
  assert sweep.product({"a": [1, 2], "b": [3]}, seed=[0, 1]) == [
      {"a": 1, "b": 3, "seed": 0}, {"a": 1, "b": 3, "seed": 1},
      {"a": 2, "b": 3, "seed": 0}, {"a": 2, "b": 3, "seed": 1}]
  assert sweep.product() == [{}]
  # zipit pairs the i-th values; nested in a product it ties two keys together.
  tied = sweep.zipit({"m": ["u", "k"], "wd": [5e-4, 0.0]})
  assert tied == [{"m": "u", "wd": 5e-4}, {"m": "k", "wd": 0.0}]
  assert sweep.product({"bits": [8, 2]}, tied) == [
      {"bits": 8, "m": "u", "wd": 5e-4}, {"bits": 8, "m": "k", "wd": 0.0},
      {"bits": 2, "m": "u", "wd": 5e-4}, {"bits": 2, "m": "k", "wd": 0.0}]
  assert sweep.zipit(sweep.sweep("a", [1, 2]), b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert len(sweep.product([{"t": ""}] + sweep.sweep("loss", ["kd", "dkd"]), seed=[0, 1, 2])) == 9
  with pytest.raises(ConfigError, match="different lengths"):
    sweep.zipit({"a": [1, 2], "b": [1, 2, 3]})
  with pytest.raises(ConfigError, match="'a' is set twice"):
    sweep.product({"a": [1]}, {"a": [2]})
  with pytest.raises(ConfigError, match="list of values"):
    sweep.sweep("a", "abc")


def test_point_names():
  assert sweep.point_name({"quant.method": "kmeans", "quant.bits": 4}) == \
      "quant.bits=4,quant.method=kmeans"
  # Stable under reordering of the keys; floats keep their repr; lists joined by '+'.
  assert sweep.point_name({"quant.bits": 4, "quant.method": "kmeans"}) == \
      "quant.bits=4,quant.method=kmeans"
  assert sweep.point_name({"optimizer.weight_decay": 5e-4, "exclude": ("a", "b")}) == \
      "exclude=a+b,optimizer.weight_decay=0.0005"
  assert sweep.point_name({}) == "base"
  # File-name safe: slashes, spaces and the like become '_'; empty values stay visible.
  assert sweep.point_name({"teacher": "runs/t 1", "seed": 0}) == "seed=0,teacher=runs_t_1"
  assert sweep.point_name({"teacher": "", "seed": 0}) == "seed=0,teacher="
  long_a = sweep.point_name({"init_from": "x" * 300})
  long_b = sweep.point_name({"init_from": "x" * 299 + "y"})
  assert len(long_a) <= 150 and long_a != long_b
  assert sweep.point_label({"quant.bits": 4, "quant.method": "kmeans"}) == "bits=4 method=kmeans"
  assert sweep.point_label({"a.bits": 4, "b.bits": 2}) == "a.bits=4 b.bits=2"


def test_pareto_front():
  # (size, accuracy): the front is the best accuracy for at most that size.
  sizes = [100, 50, 50, 25, 200, 25, 300]
  accs = [0.90, 0.85, 0.80, 0.60, 0.90, 0.70, 0.95]
  assert sweep.pareto_front(sizes, accs) == [True, True, False, False, False, True, True]
  # Equal points are both on it; a single point is; none is none.
  assert sweep.pareto_front([10, 10], [0.5, 0.5]) == [True, True]
  assert sweep.pareto_front([10], [0.1]) == [True]
  assert sweep.pareto_front([], []) == []


def test_apply_overrides_keeps_the_config_and_types():
  c = config_lib.base_config()
  c.lock()
  new = sweep.apply_overrides(c, {"optimizer.learning_rate": 1, "seed": 3})
  assert new.optimizer.learning_rate == 1.0 and isinstance(new.optimizer.learning_rate, float)
  assert new.seed == 3 and c.seed == 0 and c.optimizer.learning_rate == 0.1
  with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr'"):
    sweep.apply_overrides(c, {"optimizer.lr": 0.1})
  with pytest.raises(ConfigError,
                     match=r"unknown config key 'seed.x' \('seed' is a int, not a sub-config"):
    sweep.apply_overrides(c, {"seed.x": 1})
  with pytest.raises(ConfigError, match="'optimizer' is a sub-config"):
    sweep.apply_overrides(c, {"optimizer": "adam"})
  with pytest.raises(ConfigError, match="config key 'seed': 'one' does not fit"):
    sweep.apply_overrides(c, {"seed": "one"})


def test_the_experiments_sweeps_expand():
  """The repository's get_sweep functions give points that all apply to their configs."""
  cfg_spec = "experiments/quant_resnet.py:data=digits,mode=ptq,init_from=runs/b"
  points = sweep.expand(config_lib.load_config_file(os.path.join(ROOT, cfg_spec)),
                        os.path.join(ROOT, cfg_spec), "/nonexistent")
  assert [p["name"] for p in points] == [
      f"quant.bits={b},quant.method={m}" for b in (8, 4, 2) for m in ("uniform", "kmeans")]
  assert [(p["config"].quant.bits, p["config"].quant.method) for p in points][-1] == (2, "kmeans")
  assert all(p["config"].total_steps == 0 and p["config"].quant.mode == "ptq" for p in points)
  # QAT: k-means fine-tunes without weight decay (as get_config's method=kmeans does).
  qat = os.path.join(ROOT, "experiments/quant_resnet.py:data=digits,init_from=runs/b")
  points = sweep.expand(config_lib.load_config_file(qat), qat, "/nonexistent")
  assert {(p["config"].quant.method, p["config"].optimizer.weight_decay) for p in points} == {
      ("uniform", 5e-4), ("kmeans", 0.0)}
  # Every point is the config get_config gives for that method and bits (PTQ and QAT).
  for arg in ("data=digits,mode=ptq,init_from=runs/b", "data=digits,init_from=runs/b",
              "data=digits,method=kmeans,init_from=runs/b"):
    spec = os.path.join(ROOT, f"experiments/quant_resnet.py:{arg}")
    for p in sweep.expand(config_lib.load_config_file(spec), spec, "/nonexistent"):
      q = p["config"].quant
      direct = config_lib.load_config_file(f"{spec},method={q.method},bits={q.bits}")
      assert config_lib.to_dict(p["config"]) == config_lib.to_dict(direct), (arg, p["name"])
  kd = os.path.join(ROOT, "experiments/kd_mobilenet.py:data=digits,teacher=runs/t")
  points = sweep.expand(config_lib.load_config_file(kd), kd, "/nonexistent")
  assert len(points) == 12
  assert [(p["config"].seed, p["config"].teacher, p["config"].distill.loss, p["config"].mixup)
          for p in points[:4]] == [(0, "", "kd", 0.0), (0, "runs/t", "kd", 1.0),
                                   (0, "runs/t", "tf_kd", 1.0), (0, "runs/t", "dkd", 0.0)]


# ----------------------------------------------------------------------------- bad sweeps


@pytest.mark.parametrize("bad,match", [
    ("key", r"sweep point 3/3 optimizer.learning_rat=0.1: unknown config key "
            r"'optimizer.learning_rat'"),
    ("type", r"sweep point 2/2 batch_size=big: config key 'batch_size': 'big' does not fit"),
    ("value", r"sweep point 2/2 batch_size=0: config key 'batch_size': must be > 0"),
    ("bits", r"sweep point 2/2 quant.bits=0: .*bits"),
    ("twice", r"sweep point 2/2 width=0.5: the same overrides as point 1/2"),
])
def test_a_bad_point_refuses_the_whole_sweep(experiment_file, data_dir, tmp_path, bad, match):
  spec, config = spec_and_config(experiment_file, f"data_dir={data_dir},quant,bad={bad}")
  workdir = tmp_path / "sweep"
  with pytest.raises(ConfigError, match=match):
    sweep.run_sweep(config, spec, str(workdir))
  assert not workdir.exists()   # nothing run, no sub-workdir, no index
  with pytest.raises(ConfigError, match=match.split(":")[0]):
    sweep.run_sweep(config, spec, str(workdir), index=0)   # point 0 itself is fine
  assert not workdir.exists()


def test_no_get_sweep_and_bad_index(tmp_path, experiment_file, data_dir):
  path = tmp_path / "nosweep.py"
  path.write_text(EXPERIMENT.split("def get_sweep")[0])
  spec = f"{path}:data_dir={data_dir}"
  with pytest.raises(ConfigError, match="defines no get_sweep"):
    sweep.run_sweep(config_lib.load_config_file(spec), spec, str(tmp_path / "s"))
  spec, config = spec_and_config(experiment_file, f"data_dir={data_dir}")
  with pytest.raises(ConfigError, match=r"--sweep_index=2: .* has 2 points \(indices 0..1\)"):
    sweep.run_sweep(config, spec, str(tmp_path / "s"), index=2)
  assert not (tmp_path / "s").exists()


def test_cli_refuses_a_sweep_with_an_unknown_key(experiment_file, data_dir, tmp_path):
  workdir = tmp_path / "sweep"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--mode=sweep", f"--workdir={workdir}",
       f"--config={experiment_file}:data_dir={data_dir},bad=key"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("jcompress: error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "unknown config key 'optimizer.learning_rat'" in errors[0]
  assert "sweep point 3/3" in errors[0]
  assert not workdir.exists()


# ----------------------------------------------------------------------------- summary


def fake_results(workdir, name, acc, size, **extra):
  os.makedirs(os.path.join(workdir, name), exist_ok=True)
  with open(os.path.join(workdir, name, "results.json"), "w") as f:
    json.dump({"test_accuracy": acc, "model_bytes": size, "float_bytes": 4000,
               "compression_ratio": 4000 / size, "wall_seconds": 1.5, "params": 1000,
               "float_test_accuracy": 0.95, **extra}, f)


def test_summary_of_given_results(tmp_path):
  """csv / md / png from hand-written results.json: rows, missing points, the Pareto column."""
  points = [{"index": i, "name": sweep.point_name(o), "overrides": o,
             "workdir": str(tmp_path / sweep.point_name(o))}
            for i, o in enumerate(sweep.product({"quant.bits": [8, 4, 2]},
                                                {"quant.method": ["uniform", "kmeans"]}))]
  fake_results(tmp_path, points[0]["name"], 0.95, 1000, weight_bits=8.0)
  fake_results(tmp_path, points[1]["name"], 0.96, 1000, weight_bits=8.0)
  fake_results(tmp_path, points[2]["name"], 0.94, 500, weight_bits=4.0)
  fake_results(tmp_path, points[3]["name"], 0.90, 600, weight_bits=4.0)   # dominated by 2
  fake_results(tmp_path, points[4]["name"], 0.20, 250, weight_bits=2.0)
  # points[5] never ran: listed as missing, not failing the summary.
  out = sweep.summarize_sweep(points, str(tmp_path))
  assert out["finished"] == 5 and out["missing"] == [points[5]["name"]]
  assert out["pareto"] == [points[i]["name"] for i in (1, 2, 4)]
  with open(tmp_path / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [p["name"] for p in points]
  assert list(rows[0])[:6] == ["index", "name", "quant.bits", "quant.method", "status", "pareto"]
  assert [r["pareto"] for r in rows] == ["0", "1", "1", "0", "1", ""]
  assert [r["status"] for r in rows] == ["done"] * 5 + ["missing"]
  assert rows[3]["quant.bits"] == "4" and rows[3]["quant.method"] == "kmeans"
  assert float(rows[3]["test_accuracy"]) == 0.90 and rows[3]["model_bytes"] == "600"
  assert rows[3]["weight_bits"] == "4.0" and rows[3]["float_test_accuracy"] == "0.95"
  assert rows[5]["test_accuracy"] == ""
  md = (tmp_path / "sweep.md").read_text().splitlines()
  assert md[0] == ("| # | quant.bits | quant.method | test acc. | float acc. | size (KiB) | "
                   "compression | time (s) | Pareto |")
  assert md[2] == "| 0 | 8 | uniform | 95.00% | 95.00% | 1.0 | 4.00x | 2 |  |"
  assert md[3] == "| 1 | 8 | kmeans | 96.00% | 95.00% | 1.0 | 4.00x | 2 | * |"
  assert md[7] == "| 5 | 2 | kmeans | missing |  |  |  |  |  |"
  assert "5/6 points finished; missing: quant.bits=2,quant.method=kmeans" in md[9]
  assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- runs


def test_index_run_skip_resume_and_summary(experiment_file, data_dir, tmp_path, caplog):
  """--sweep_index runs only its point; a full run skips it, runs the other and summarizes;
  a point without results.json resumes from its checkpoint instead of starting over."""
  caplog.set_level(logging.INFO)
  spec, config = spec_and_config(experiment_file, f"data_dir={data_dir}")
  workdir = str(tmp_path / "sweep")
  names = ["optimizer.learning_rate=0.1,width=0.25", "optimizer.learning_rate=0.2,width=0.5"]

  out = sweep.run_sweep(config, spec, workdir, index=1)
  assert out["status"] == {names[1]: "ran"} and "summary" not in out
  assert sorted(os.listdir(workdir)) == [names[1], "sweep.json"]
  with open(os.path.join(workdir, "sweep.json")) as f:
    index = json.load(f)
  assert [p["name"] for p in index["points"]] == names
  assert index["points"][1]["workdir"] == os.path.join(workdir, names[1])
  assert index["points"][1]["overrides"] == {"width": 0.5, "optimizer.learning_rate": 0.2}
  with open(os.path.join(workdir, names[1], "config.json")) as f:
    saved = json.load(f)
  assert saved["width"] == 0.5 and saved["optimizer"]["learning_rate"] == 0.2
  assert "sweep point 2/2: " + names[1] in caplog.text

  # Summarize while point 0 is missing.
  out = sweep.run_sweep(config, spec, workdir, summarize=True)
  assert out["missing"] == [names[0]] and out["finished"] == 1
  assert os.listdir(workdir).count(names[0]) == 0   # summarizing runs nothing

  results1 = os.path.join(workdir, names[1], "results.json")
  mtime = os.path.getmtime(results1)
  caplog.clear()
  out = sweep.run_sweep(config, spec, workdir)
  assert out["status"] == {names[0]: "ran", names[1]: "skipped"}
  assert os.path.getmtime(results1) == mtime
  assert f"sweep point 2/2: {names[1]}: finished (results.json), skipped" in caplog.text
  assert f"sweep point 1/2: {names[0]}" in caplog.text
  assert out["summary"]["finished"] == 2 and out["summary"]["missing"] == []
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  for row, name in zip(rows, names):
    with open(os.path.join(workdir, name, "results.json")) as f:
      res = json.load(f)
    assert row["name"] == name and float(row["test_accuracy"]) == res["test_accuracy"]
    assert int(row["model_bytes"]) == res["model_bytes"] and res["steps"] == 4
  # A wider model is bigger: 0.25-wide has fewer bytes.
  assert int(rows[0]["model_bytes"]) < int(rows[1]["model_bytes"])
  sizes = [int(r["model_bytes"]) for r in rows]
  accs = [float(r["test_accuracy"]) for r in rows]
  assert [r["pareto"] == "1" for r in rows] == sweep.pareto_front(sizes, accs)
  assert os.path.getsize(os.path.join(workdir, "sweep.png")) > 10_000

  # An interrupted point (checkpoint at the end, results.json not yet written) is resumed,
  # not restarted: its metrics are not logged twice.
  os.remove(results1)
  metrics = os.path.join(workdir, names[1], "metrics.jsonl")
  with open(metrics) as f:
    before = f.read()
  out = sweep.run_sweep(config, spec, workdir, index=1)
  assert out["status"] == {names[1]: "ran"} and os.path.exists(results1)
  with open(metrics) as f:
    assert f.read() == before
  with open(results1) as f:
    assert json.load(f)["steps"] == 4


def test_a_changed_base_config_is_not_silently_skipped(experiment_file, data_dir, tmp_path):
  """A finished point whose config.json differs from the point's config now (the base config
  changed under the same --workdir) refuses, naming the point, instead of reusing it."""
  spec, config = spec_and_config(experiment_file, f"data_dir={data_dir}")
  workdir = tmp_path / "sweep"
  name = "optimizer.learning_rate=0.1,width=0.25"
  points = sweep.expand(config, spec, str(workdir))
  os.makedirs(workdir / name)
  other = points[0]["config"].copy_and_resolve_references()
  with other.unlocked():
    other.seed = 7
  (workdir / name / "config.json").write_text(json.dumps(config_lib.to_dict(other)))
  fake_results(workdir, name, 0.5, 100)
  with pytest.raises(Exception, match=r"sweep point 1/2 .*seed: 7 in the workdir, 0 now"):
    sweep.run_point(points[0], 2)

