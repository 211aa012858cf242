"""Mixed precision from second-order sensitivity: the `quant` budget keys (allocation before the
run, `jcompress.methods.quant.prepare`), the exported bytes against the budget, config errors
before anything compiles, and experiments/mixed_precision.py's sweep and its plot series.

Tiny runs on the real digits data (native 8x8 images): a float small CNN (two quantized
convs), trained once per module, and PTQ runs from it.
"""

import itertools
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jcompress import bitalloc
from jcompress import config as config_lib
from jcompress import experiment
from jcompress import export
from jcompress import sweep
from jcompress import train
from jcompress import transforms
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("stage1_conv/kernel", "stage2_conv/kernel")


def _base(data_dir, steps):
  c = config_lib.base_config()
  c.data = "digits"
  c.data_dir = data_dir
  c.image_size = 0
  c.model = "small_cnn"
  c.width = 0.5
  c.batch_size = 32
  c.eval_batch_size = 360
  c.total_steps = steps
  c.log_every = 10
  c.eval_every = 0
  c.checkpoint_every = 10
  c.keep_checkpoints = 1
  c.calibration_batches = 2
  c.optimizer.learning_rate = 0.1
  return c


def _ptq(runs, **quant):
  c = _base(runs["data_dir"], 0)
  c.init_from = runs["float"]
  c.quant = ml_collections.ConfigDict({"method": "uniform", "bits": 8, "mode": "ptq", **quant})
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The float run, uniform 2- and 8-bit PTQ from it, and a byte-budget run between them."""
  root = tmp_path_factory.mktemp("mp")
  out = {"root": root, "data_dir": str(root / "tfds"), "float": str(root / "float")}
  train.train_and_evaluate(_base(out["data_dir"], 30), out["float"])
  for b in (2, 8):
    out[f"u{b}"] = train.train_and_evaluate(_ptq(out, bits=b), str(root / f"u{b}"))
  low, high = out["u2"]["model_bytes"], out["u8"]["model_bytes"]
  out["budget"] = low + (high - low) // 3
  out["bytes_dir"] = str(root / "bytes")
  out["bytes"] = train.train_and_evaluate(_ptq(out, budget_bytes=out["budget"]),
                                          out["bytes_dir"])
  return out


def test_byte_budget_holds_for_the_exported_artifact(runs):
  r, budget = runs["bytes"], runs["budget"]
  assert r["budget_bytes"] == budget and r["within_budget"]
  assert r["model_bytes"] <= r["allocation_bytes"] <= budget
  summary = export.export_run(runs["bytes_dir"], check_examples=0)
  files = summary["files"]
  assert files["manifest.json"] + files["weights.bin"] == summary["artifact_bytes"]
  assert summary["artifact_bytes"] == r["model_bytes"] <= budget
  with open(os.path.join(runs["bytes_dir"], "export", "manifest.json")) as f:
    manifest = json.load(f)
  # the artifact stores each layer at the width the allocation chose (config.json carries it)
  assert set(r["bit_allocation"]) == set(LAYERS)
  for layer, bits in r["bit_allocation"].items():
    assert manifest["params"][layer]["bits"] == bits
  # the predicted sum is that of the recorded sensitivities at the chosen widths, and no
  # other allocation that fits (bytes as the uniform 2-bit artifact's plus the layers'
  # difference, with a margin for the manifest's digits) predicts less
  sens = {p: {int(b): v for b, v in s.items()} for p, s in r["sensitivities"].items()}
  np.testing.assert_allclose(r["allocation_objective"],
                             sum(sens[p][b] for p, b in r["bit_allocation"].items()), rtol=1e-9)
  params = experiment.MethodContext().restore_params(runs["float"], "x")
  shapes = {p: np.shape(x) for p, x in zip(transforms.leaf_paths(params),
                                            jax.tree.leaves(params))}
  cost = lambda p, b: bitalloc.layer_nbytes(shapes[p], b)  # noqa: E731
  fixed = runs["u2"]["model_bytes"] - sum(cost(p, 2) for p in LAYERS)
  for combo in itertools.product((2, 3, 4, 8), repeat=len(LAYERS)):
    if fixed + sum(cost(p, b) for p, b in zip(LAYERS, combo)) <= budget - 200:
      assert r["allocation_objective"] <= sum(sens[p][b] for p, b in zip(LAYERS, combo)) + 1e-12
  # sensitivities fall with the width (Gauss-Newton: >= 0)
  for s in sens.values():
    assert s[2] >= s[3] >= s[4] >= s[8] >= 0
  assert r["float_test_accuracy"] == runs["u2"]["float_test_accuracy"]
  # a rerun resumes: the allocation comes back from config.json, the run is the same
  again = train.train_and_evaluate(_ptq(runs, budget_bytes=budget), runs["bytes_dir"])
  assert again["bit_allocation"] == r["bit_allocation"]
  assert again["test_accuracy"] == r["test_accuracy"]
  assert again["model_bytes"] == r["model_bytes"]


def test_avg_bits_budget_is_the_optimum_of_the_recorded_sensitivities(runs):
  r = train.train_and_evaluate(_ptq(runs, budget_avg_bits=3.0, bit_candidates=(2, 4)),
                               str(runs["root"] / "avg3"))
  assert r["weight_bits"] <= 3.0 + 1e-6
  assert set(r["bit_allocation"].values()) <= {2, 4}
  params = experiment.MethodContext().restore_params(runs["float"], "x")
  sens = {p: {int(b): v for b, v in s.items()} for p, s in r["sensitivities"].items()}
  alloc = bitalloc.allocate_bits(sens, params, avg_bits=3.0, bits_candidates=(2, 4))
  assert alloc.bits == r["bit_allocation"]
  np.testing.assert_allclose(r["allocation_avg_bits"], r["weight_bits"], rtol=1e-6)
  # the uniform runs carry no allocation
  assert "bit_allocation" not in runs["u2"]
  np.testing.assert_allclose(r["uniform_objective"]["2"], sum(s[2] for s in sens.values()))


def test_hawq_with_exact_gauss_newton_traces_allocates(runs):
  """sensitivity hawq_gn: Omega from the per-example Gauss-Newton traces of the source model
  (its eval-mode logits one calibration image at a time): >= 0, falling with the width."""
  r = train.train_and_evaluate(_ptq(runs, budget_avg_bits=3.0, bit_candidates=(2, 4),
                                    sensitivity="hawq_gn"), str(runs["root"] / "gn3"))
  assert r["sensitivity"] == "hawq_gn" and r["weight_bits"] <= 3.0 + 1e-6
  sens = {p: {int(b): v for b, v in s.items()} for p, s in r["sensitivities"].items()}
  assert set(sens) == set(LAYERS)
  for s in sens.values():
    assert s[2] > s[4] > 0


@pytest.mark.parametrize("quant,top,match", [
    ({"budget_bytes": 1000}, {}, r"'quant.budget_bytes': 1000 is below the smallest artifact"),
    ({"budget_avg_bits": 3.0, "bit_candidates": (2, 9)}, {}, r"'quant.bit_candidates'.*9"),
    ({"budget_avg_bits": 3.0, "bit_candidates": (0, 4)}, {}, r"'quant.bit_candidates'.*0"),
    ({"budget_avg_bits": 3.0, "bit_candidates": (1, 4)}, {}, r"'quant.bit_candidates'.*2\.\.8"),
    ({"budget_avg_bits": 1.5}, {}, r"'quant.budget_avg_bits': 1.5 is below"),
    ({"budget_avg_bits": 3.0, "budget_bytes": 10 ** 6}, {}, r"'quant.budget_bytes'.*one budget"),
    ({"budget_bytes": -1}, {}, r"'quant.budget_bytes'"),
    ({"budget_avg_bits": 3.0, "method": "kmeans"}, {}, r"'quant.method'"),
    ({"budget_avg_bits": 3.0, "sensitivity": "hessian"}, {}, r"'quant.sensitivity'"),
    ({"budget_avg_bits": 3.0, "bits_by_path": ("stage1=4",)}, {}, r"'quant.bits_by_path'"),
    ({"budget_avg_bits": 3.0}, {"init_from": "", "total_steps": 5}, r"'init_from'"),
])
def test_bad_budgets_are_refused_before_anything_compiles(runs, monkeypatch, quant, top, match):
  def compiles(*args, **kwargs):
    raise AssertionError("the source model was loaded (its evaluation compiles)")
  monkeypatch.setattr(experiment.MethodContext, "load_source", compiles)
  c = _ptq(runs, **quant)
  for k, v in top.items():
    c[k] = v
  workdir = str(runs["root"] / "bad")
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(c, workdir)
  assert not os.path.exists(workdir)


def test_the_sweep_runs_budgets_beside_uniform_widths_as_two_series(runs, tmp_path):
  path = os.path.join(ROOT, "experiments", "mixed_precision.py")
  spec = f"{path}:data=digits,init_from={runs['float']},avg_bits=2.5"
  config = config_lib.load_config_file(spec)
  assert config.quant.budget_avg_bits == 2.5 and config.total_steps == 0
  points = sweep.expand(config, spec, str(tmp_path))
  mixed = [p for p in points if p["config"].quant.budget_avg_bits]
  uniform = [p for p in points if not p["config"].quant.budget_avg_bits]
  assert [p["config"].quant.budget_avg_bits for p in mixed] == [
      2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0]
  assert [p["config"].quant.bits for p in uniform] == [2, 3, 4, 8]
  for p in points:   # the same PTQ and calibration otherwise
    for key in ("init_from", "calibration_batches", "batch_size", "seed"):
      assert p["config"][key] == config[key]
    assert p["config"].quant.mode == "ptq" and p["config"].quant.adaround is False
  # candidates without 2 bits drop the budgets below the lowest width
  spec3 = f"{path}:data=digits,init_from={runs['float']},candidates=3+4+8"
  assert min(p.get("quant.budget_avg_bits") or 9 for p in sweep.load_sweep(spec3)) == 3.0
  # sweep.png: one series per set of keys the points turn on, each joined by a line
  for i, p in enumerate(points):
    os.makedirs(p["workdir"])
    with open(os.path.join(p["workdir"], "results.json"), "w") as f:
      json.dump({"test_accuracy": 0.5 + 0.01 * i, "model_bytes": 1000 * (i + 1),
                 "float_test_accuracy": 0.99}, f)
  rows, keys, _ = sweep.collect(points)
  series = sweep._Series(rows, keys)  # noqa: SLF001
  assert series.lines
  assert {series.of(r) for r in rows[:len(mixed)]} == {"budget_avg_bits"}
  assert {series.of(r) for r in rows[len(mixed):]} == {"bits"}
  assert series.label(rows[-1]) == "bits=8"
  out = sweep.summarize_sweep(points, str(tmp_path))
  assert out["finished"] == len(points) and os.path.getsize(out["plot"]) > 10_000
  with pytest.raises(ConfigError, match="'init_from'"):
    config_lib.load_config_file(f"{path}:data=digits")
