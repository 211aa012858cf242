"""Checkpoint analysis (--mode=analyze): figures checked against the masks, codes and signs.

Runs are tiny (the small CNN or a quarter-width BNN ResNet-20 on the native 8x8 digits, tens of
steps), built once per module. Every figure the analysis reports is recomputed here from the
restored state itself: the pruning masks, the quantizer's codes (from the transform's export),
the binarized weights, the model's jaxpr.
"""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from jcompress import analysis
from jcompress import checkpoint
from jcompress import config as config_lib
from jcompress import packing
from jcompress import quantize
from jcompress import structured
from jcompress import train
from jcompress import transforms
from jcompress.errors import WorkdirError

pytestmark = pytest.mark.plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRUNE_SPARSITY = 0.75
QUANT_BITS = 4
STAGE2_BITS = 3           # bits_by_path: stage2_conv gets 3 bits, stage1_conv the default 4


def tiny_config(data_dir, steps, **kw):
  c = config_lib.base_config()
  c.data = "digits"
  c.data_dir = data_dir
  c.image_size = 0
  c.model = kw.pop("model", "small_cnn")
  c.width = kw.pop("width", 0.5)
  c.batch_size = 32
  c.eval_batch_size = 128
  c.total_steps = steps
  c.log_every = max(steps, 1)
  c.eval_every = 0
  c.checkpoint_every = kw.pop("checkpoint_every", max(steps, 1))
  c.keep_checkpoints = 3
  c.optimizer.learning_rate = kw.pop("lr", 0.1)
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """{name: workdir} of a float run (checkpoints at 20 and 40) and the pruned, quantized and
  binary runs, the first two fine-tuned or quantized from the float one."""
  base = tmp_path_factory.mktemp("runs")
  out = {"float": str(base / "float")}
  train.train_and_evaluate(tiny_config(data_dir, 40, checkpoint_every=20), out["float"])

  c = tiny_config(data_dir, 4, init_from=out["float"], lr=0.02)
  c.prune = ml_collections.ConfigDict({"sparsity": PRUNE_SPARSITY, "schedule": "oneshot",
                                       "begin_step": 0})
  out["pruned"] = str(base / "pruned")
  train.train_and_evaluate(c, out["pruned"])

  c = tiny_config(data_dir, 0, init_from=out["float"])
  c.quant = ml_collections.ConfigDict({
      "method": "uniform", "bits": QUANT_BITS, "mode": "ptq", "include": (r".*",),
      "exclude": transforms.DEFAULT_EXCLUDE, "bits_by_path": (f"stage2_conv={STAGE2_BITS}",)})
  out["quant"] = str(base / "quant")
  train.train_and_evaluate(c, out["quant"])

  # One step: what is checked does not depend on training (and the BNN compiles slowly).
  c = tiny_config(data_dir, 1, model="bnn_resnet20", width=0.25, lr=2e-3)
  c.optimizer.name = "adam"
  c.optimizer.weight_decay = 0.0
  c.model_kwargs.num_bits = 1
  c.binary = ml_collections.ConfigDict({"method": "ste_sign", "include": (r".*",),
                                        "exclude": transforms.DEFAULT_EXCLUDE})
  out["binary"] = str(base / "binary")
  train.train_and_evaluate(c, out["binary"])
  return out


@pytest.fixture(scope="module")
def reports(runs):
  """{name: (summary, rows by layer)} of `analysis.analyze` on each run."""
  out = {}
  for name, workdir in runs.items():
    # plots (seconds each on a busy CPU) for two runs: the float one, and the BNN's big grid
    summary = analysis.analyze(workdir, plots=name in ("float", "binary"))
    with open(os.path.join(workdir, "analysis", "layers.json")) as f:
      rows = {r["layer"]: r for r in json.load(f)["rows"]}
    out[name] = (summary, rows)
  return out


def restored(workdir):
  """The run's experiment and latest state, restored independently of the analysis."""
  exp, state = train.restore_run(workdir, "test")
  return exp, jax.device_get(state)


def kernels(params):
  return {p: np.asarray(w) for p, w in zip(transforms.leaf_paths(params), jax.tree.leaves(params))
          if np.ndim(w) >= 2}


# ----------------------------------------------------------------------------- pruned


def test_pruned_run_sparsity_is_that_of_the_masks(runs, reports):
  _, state = restored(runs["pruned"])
  masks = kernels(state.compression["masks"])
  _, rows = reports["pruned"]
  pruned = {p: m for p, m in masks.items() if m.ndim >= 2}
  assert set(pruned) == {"stage1_conv/kernel", "stage2_conv/kernel"}
  for path, mask in pruned.items():
    row = rows[path[: -len("/kernel")]]
    assert row["mask_sparsity"] == pytest.approx(1 - mask.mean(), abs=1e-12)
    assert row["sparsity"] == pytest.approx(1 - mask.mean(), abs=1e-12)
    assert row["sparsity"] == pytest.approx(PRUNE_SPARSITY, abs=1.0 / mask.size)
    # structured sparsity from the mask itself: all-pruned filters, input channels, rows
    cout = mask.shape[-1]
    assert row["filters"] == pytest.approx(np.mean(~mask.reshape(-1, cout).any(0)))
    assert row["channels"] == pytest.approx(
        np.mean(~np.moveaxis(mask, -2, 0).reshape(mask.shape[-2], -1).any(1)))
    assert row["rows"] == pytest.approx(np.mean(~mask.reshape(-1, cout).any(1)))
    assert row["bits"] == 32 and row["methods"] == "prune"
    # the distinct values: the surviving weights and the zero
    w = np.asarray(state.params["stage1_conv" if "stage1" in path else "stage2_conv"]["kernel"])
    assert row["distinct"] == np.unique(np.where(mask, w, 0)).size
  for layer in ("stem_conv", "head"):
    assert rows[layer]["sparsity"] == 0 and rows[layer]["mask_sparsity"] is None
    assert rows[layer]["bits"] == 32
  summary, _ = reports["pruned"]
  zeros = sum((~m).sum() for m in pruned.values())
  size = sum(w.size for w in kernels(state.params).values())
  assert summary["kernel_sparsity"] == pytest.approx(zeros / size)


# ----------------------------------------------------------------------------- quantized


def test_quantized_run_bits_and_distinct_values_are_those_of_the_codes(runs, reports):
  exp, state = restored(runs["quant"])
  art = exp.transform.export(state.params, state.compression)["params"]
  _, rows = reports["quant"]
  for layer, bits in (("stage1_conv", QUANT_BITS), ("stage2_conv", STAGE2_BITS)):
    packed = art[layer]["kernel"]
    q = quantize.unpack_qtensor(packed)
    codes = np.asarray(q.codes)
    row = rows[layer]
    assert row["bits"] == bits == packed["bits"]      # bits_by_path respected
    assert row["methods"] == "quant:uniform"
    # per output channel, the weights are scale_j * codes: as many values as codes
    per_filter = max(np.unique(codes[..., j]).size for j in range(codes.shape[-1]))
    assert row["distinct_per_filter"] == per_filter <= 2 ** bits - 1   # narrow, symmetric
    assert row["distinct"] == np.unique(np.asarray(quantize.dequantize(q))).size
    assert row["sparsity"] == pytest.approx(np.mean(codes == 0))
    # stored bytes: the codes packed at `bits` bits and one float32 scale per output channel
    assert row["stored_bytes"] == packing.packed_nbytes(codes.size, bits) + 4 * codes.shape[-1]
    assert row["float_bytes"] == 4 * codes.size
  for layer in ("stem_conv", "head"):
    assert rows[layer]["bits"] == 32 and rows[layer]["methods"] == "float"
  summary, rows = reports["quant"]
  assert summary["stored_bytes"] == sum(r["stored_bytes"] for r in rows.values())
  assert summary["float_bytes"] == 4 * summary["params"]
  assert summary["compression_ratio"] == pytest.approx(
      summary["float_bytes"] / summary["stored_bytes"])
  # float activations: every MAC is a 32-bit one
  assert summary["macs_by_bits"] == {"32": summary["macs"]}


def test_stored_bytes_are_the_exported_artifact_on_disk(runs, reports, tmp_path):
  from jcompress import export  # noqa: PLC0415
  for name in ("quant", "pruned", "binary"):
    exp, state = train.restore_run(runs[name], "test")
    arrays, manifest = export.artifact_arrays(exp, state)
    out = tmp_path / name
    export.write_artifact(arrays, manifest, str(out))
    on_disk = sum(os.path.getsize(out / f) for f in export.ARTIFACT_FILES)
    summary, rows = reports[name]
    assert summary["stored_bytes"] == on_disk
    # per layer: the arrays whose names start with the layer's path
    for layer, row in rows.items():
      if layer not in ("other", "manifest"):
        assert row["stored_bytes"] == sum(a.nbytes for k, a in arrays.items()
                                          if k.startswith(layer + "/"))


# ----------------------------------------------------------------------------- binary


def test_binary_run_has_1_bit_layers_and_binary_macs(runs, reports):
  exp, state = restored(runs["binary"])
  eff = kernels(exp.transform.apply(state.params, state.compression))
  summary, rows = reports["binary"]
  binary = [r for r in rows.values() if r["methods"] == "binary"]
  assert len(binary) == len([p for p in eff if p not in ("stem_conv/kernel", "head/kernel")])
  for row in binary:
    w = eff[row["layer"] + "/kernel"]
    assert set(np.unique(w)) == {-1.0, 1.0}
    assert row["bits"] == 1 and row["distinct"] == 2 and row["distinct_per_filter"] == 2
    assert row["abits"] == 1 and row["mac_bits"] == 1 and row["sparsity"] == 0
    # packed signs: one bit per weight, in 32-bit words along the input axis
  for layer in ("stem_conv", "head"):
    assert rows[layer]["bits"] == 32 and rows[layer]["mac_bits"] == 32
  # MACs: per layer from the jaxpr, adding up to count_flops; the binary share is the binary
  # layers' share of them
  params = state.params
  total = structured.count_flops(exp.model, (1, *exp.info.image_shape), params,
                                 state.batch_stats)
  assert summary["macs"] == total == sum(r["macs"] or 0 for r in rows.values())
  binary_macs = sum(r["macs"] for r in binary)
  assert summary["macs_by_bits"]["1"] == binary_macs
  assert summary["binary_mac_share"] == pytest.approx(binary_macs / total)
  assert 0.5 < summary["binary_mac_share"] < 1.0


@pytest.mark.slow
def test_binary_layers_really_read_binary_activations(runs, reports):
  """The activation bits are the model's declared quantizer; check them on real inputs: every
  conv the analysis calls 1-bit-input sees only -1 and +1."""
  exp, state = restored(runs["binary"])
  _, rows = reports["binary"]
  eff = exp.transform.apply(state.params, state.compression)
  seen = {}

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      seen["/".join(context.module.path)] = np.unique(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  images = np.random.default_rng(0).normal(size=(4, *exp.info.image_shape)).astype(np.float32)
  with nn.intercept_methods(capture):
    exp.model.apply({"params": eff, "batch_stats": state.batch_stats}, images, train=False)
  one_bit = [r["layer"] for r in rows.values() if r["abits"] == 1]
  assert one_bit and set(one_bit) <= set(seen)
  for layer in one_bit:
    assert set(seen[layer]) <= {-1.0, 1.0}
  assert len(seen["stem_conv"]) > 2 and rows["stem_conv"]["abits"] == 32


# ----------------------------------------------------------------------------- outputs


def test_report_files_table_and_accuracy(runs, reports):
  summary, rows = reports["float"]
  out = os.path.join(runs["float"], "analysis")
  for name in ("report.md", "layers.json", "layers.csv", "weights.png", "sparsity.png",
               "bits.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  for name in ("weights.png", "sparsity.png", "bits.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(runs["float"], "results.json")) as f:
    results = json.load(f)
  # the final state is the latest checkpoint: the re-evaluated accuracy is the run's own
  assert summary["step"] == 40 and "fallback" not in summary
  assert summary["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
  assert summary["params"] == results["params"] == sum(r["params"] for r in rows.values())
  report = open(os.path.join(out, "report.md")).read()
  for layer in rows:
    assert f"| {layer} |" in report
  assert f"{100 * summary['test_accuracy']:.2f}%" in report
  with open(os.path.join(out, "layers.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0].split(",") == list(analysis.CSV_COLUMNS)
  assert len(lines) == 1 + len(rows)


def test_compare_pruned_against_its_float_model(runs, reports):
  summary = analysis.analyze(runs["pruned"], compare=runs["float"], plots=False)
  cmp_path = os.path.join(runs["pruned"], "analysis", "compare_float.json")
  with open(cmp_path) as f:
    cmp = json.load(f)
  assert os.path.exists(cmp_path[: -len(".json")] + ".md")
  assert {r["layer"] for r in cmp["layers"]} == {"stem_conv", "stage1_conv", "stage2_conv",
                                                  "head"}
  assert cmp["only_a"] == cmp["only_b"] == []
  by = {r["layer"]: r for r in cmp["layers"]}
  assert by["stage1_conv"]["d_sparsity"] == pytest.approx(-reports["pruned"][1]["stage1_conv"]
                                                          ["sparsity"])
  assert by["head"]["d_sparsity"] == 0 and by["head"]["d_params"] == 0
  # agreement recomputed from the two runs' own predictions
  pa, la = analysis.predictions(analysis.load_run(runs["pruned"]))
  pb, lb = analysis.predictions(analysis.load_run(runs["float"]))
  assert np.array_equal(la, lb) and la.size == 360
  assert cmp["agreement"] == pytest.approx(np.mean(pa == pb))
  assert summary["compare"]["agreement"] == cmp["agreement"]
  assert cmp["test_accuracy_b"] == pytest.approx(reports["float"][0]["test_accuracy"])


def test_compare_runs_of_different_models_lists_the_layers_of_one_side(runs, reports):
  analysis.analyze(runs["float"], compare=runs["binary"], plots=False)
  with open(os.path.join(runs["float"], "analysis", "compare_binary.json")) as f:
    cmp = json.load(f)
  assert {r["layer"] for r in cmp["layers"]} == {"stem_conv", "head"}
  assert "stage1_conv" in cmp["only_a"] and "stage1_block0/conv1" in cmp["only_b"]
  assert 0.0 <= cmp["agreement"] <= 1.0
  assert cmp["test_accuracy_b"] == pytest.approx(reports["binary"][0]["test_accuracy"])


# ----------------------------------------------------------------------------- bad input


def test_workdir_without_a_run_or_a_checkpoint(runs, tmp_path):
  with pytest.raises(WorkdirError, match="not a directory"):
    analysis.analyze(str(tmp_path / "missing"))
  with pytest.raises(WorkdirError, match="config.json"):
    analysis.analyze(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(runs["float"], "config.json"), empty / "config.json")
  with pytest.raises(WorkdirError, match=str(empty / "checkpoints")):
    analysis.analyze(str(empty))


def _truncate_largest(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, caplog):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs["float"], workdir, ignore=shutil.ignore_patterns("analysis"))
  _truncate_largest(os.path.join(workdir, "checkpoints", "40"))
  with caplog.at_level("WARNING"):
    summary = analysis.analyze(workdir, plots=False)
  assert summary["step"] == 20 and summary["latest_step"] == 40
  assert "step 40" in summary["fallback"] and "analyzed step 20" in summary["fallback"]
  assert "could not be restored" in caplog.text
  report = open(os.path.join(workdir, "analysis", "report.md")).read()
  assert "analyzed step 20" in report
  # the figures are those of the step-20 state
  mngr = checkpoint.checkpoint_manager(workdir, checkpoint.load_workdir_config(workdir),
                                       create=False)
  exp = train.make_experiment(checkpoint.load_workdir_config(workdir), load_teacher=False)
  state, _ = checkpoint.restore_state(mngr, 20, exp)
  mngr.close()
  assert summary["params"] == sum(np.size(w) for w in jax.tree.leaves(state.params))
  # a corrupted metadata file is passed over too; with every checkpoint broken: an error
  with open(os.path.join(workdir, "checkpoints", "20", "state", "_METADATA"), "w") as f:
    f.write("{not json")
  with pytest.raises(WorkdirError, match="no checkpoint in .* can be restored"):
    analysis.analyze(workdir, plots=False)


@pytest.mark.slow
def test_launch_analyze_prints_the_table(runs):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--mode=analyze",
                         f"--workdir={runs['quant']}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  header = next(line for line in lines if line.startswith("layer "))
  assert "bits" in header and "32-bit MACs" in header and "filt" in header
  assert any(line.startswith("stage2_conv ") for line in lines)
  assert any(line.startswith("total ") for line in lines)
  summary = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
  assert summary["stored_bytes"] > 0 and summary["step"] == 0
