r"""Inference speed of every kind of exported artifact, against the float artifact.

  python benchmarks/inference.py
  python benchmarks/inference.py --models=resnet20 --artifacts=float,w8a8 --json=out.json

For each --models (CIFAR-stem ResNets at 32x32x3, 10 classes), builds the artifacts of

* `float`: the float model (the export of a run without compression);
* `w8a8`: 8-bit symmetric per-channel weight codes, 8-bit PACT activations at every conv input
  but the stem (the int8 PTQ artifact of `experiments/quant_resnet.py:mode=ptq,bits=8,abits=8`);
  `w4a8`, `w4a4`: 4-bit weight codes with 8- or 4-bit activations; these compute on integers
  where `intinfer.integer_layers` says so (int8 products, int32 sums), by the AVX-512 VNNI
  kernel of `jcompress.native` where it runs (`--native`), and then also by XLA's int8
  `dot_general` as `<kind>_xla` (`--xla_route`);
* `w1a1`, `w1a2`: the binary ResNet of the same shape (`bnn_<model>`: binary weights, 1- or
  2-bit activations), its packed artifact (`bnn_infer`, XNOR-popcount on a CPU);
  `ternary_a1`, `ternary_a2`: the same with ternary (-1/0/+1) weights, two bit planes;
* `nm24`: 2:4 sparse kernels (`prune.n_m`), stored as a bitmask and the kept values;
* `half_flops`: the model with filters physically removed down to half its MACs
  (`structured.plan_for_flops`, uniform, kept channels in multiples of 8, or of 4 or 2 where
  8 would keep under 45% of the MACs; the artifact of a smaller model);

with He-initialised weights and random BatchNorm statistics (speed does not depend on training)
through `export.artifact_arrays`, and times `export.inference_fn` on each (stored codes decoded
once when the artifact is loaded, as a runtime unpacks weights; --decode_per_call decodes them
inside every call instead; the packed BNN computes from its packed words); with --float_route the
quantized ones also on their decoded float weights (`integer=False`: the fake-quant model's
arithmetic). Before timing, every artifact's argmax is checked against its trainer's eval path
(`export._reference_logits`) on the same images (the float one must agree exactly). The runners
take turns in blocks (--repeats blocks of --steps calls each), so the ratios to `float` are
measured under the same load. Prints images/s, the ratio, artifact bytes, the integer layers,
the agreement; --json writes it all.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jcompress import config as config_lib  # noqa: E402
from jcompress import experiment  # noqa: E402
from jcompress import export  # noqa: E402
from jcompress import models  # noqa: E402
from jcompress import prune  # noqa: E402
from jcompress import structured  # noqa: E402
from jcompress import train  # noqa: E402
from jcompress import transforms  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["resnet18_cifar", "resnet20"], "CIFAR-stem models.")
KINDS = ("float", "w8a8", "w4a8", "w4a4", "w1a1", "w1a2", "ternary_a1", "ternary_a2", "nm24",
         "half_flops")
_KINDS = flags.DEFINE_list("artifacts", list(KINDS),
                           f"Artifacts: {', '.join(KINDS)} (wXaY: any X, Y in 2..8).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Calls per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed blocks per runner (median reported).")
_FLOAT_ROUTE = flags.DEFINE_bool("float_route", False,
                                 "Also time the quantized artifacts on float (integer=False).")
_NATIVE = flags.DEFINE_enum("native", "auto", ["auto", "true", "false"],
                           "The integer layers' matmuls by jcompress.native's AVX-512 VNNI kernel "
                           "(export.inference_fn native=...; auto: where it runs).")
_XLA_ROUTE = flags.DEFINE_bool("xla_route", True, "Where the native kernel runs, also time the "
                               "quantized artifacts with XLA's int8 dot_general (`<kind>_xla`).")
_PER_CALL = flags.DEFINE_bool("decode_per_call", False, "Decode the stored tensors inside every "
                              "call (export.inference_fn decode_once=False).")
_MIN_DEPTH = flags.DEFINE_integer("min_depth", None, "Integer layers' least matmul depth "
                                  "(default: intinfer.MIN_DEPTH).")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "Side of the square float32 / bfloat16 matmuls "
                                 "whose measured rates the utilisation column divides by.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_MD = flags.DEFINE_string("md", "", "Also write the tables to this markdown file (e.g. "
                          "docs/inference.md), with the date, the commit and the machine.")
PEERS = ("torch_float", "torch_int8_static", "torch_int8_dynamic")
_PEERS = flags.DEFINE_list("peers", list(PEERS),
                           "PyTorch inference peers for resnet18_cifar (peers/torch_inference.py).")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", "", "The Python that runs the peers (a venv with torch; default: this one).")
_PEER_MALLOC = flags.DEFINE_bool("peer_malloc", True, "Start the peers with the glibc malloc "
                                 "settings this process runs with (runtime.malloc_env()).")
HERE = os.path.dirname(os.path.abspath(__file__))


def start_peers(model: str, params: int) -> tuple[dict, dict]:
  """({name: Peer}, {name: info or the reason it is skipped}) for `model` (ResNet-18 only)."""
  runners, info = {}, {}
  for name in _PEERS.value:
    if model != "resnet18_cifar":
      continue
    env = dict(os.environ, **(runtime.malloc_env() if _PEER_MALLOC.value else {}))
    try:
      peer = common.Peer([os.path.join("peers", "torch_inference.py"),
                          f"--mode={name[len('torch_'):]}", f"--batch_size={_BATCH.value}"],
                         env=env, cwd=HERE, python=_PEER_PYTHON.value or None)
    except RuntimeError as e:
      info[name] = {"skipped": str(e)}
      continue
    info[name] = peer.info
    if peer.info.get("params") != params:
      info[name]["skipped"] = (f"the peer's network has {peer.info.get('params')} params, "
                               f"ours {params}: not the same network")
      peer.close()
      continue
    runners[name] = peer
  return runners, info


def artifact_config(model: str, kind: str) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data, c.image_size, c.model = "digits", 32, model
  c.batch_size, c.eval_batch_size = 64, 64
  if kind in ("w1a1", "w1a2", "ternary_a1", "ternary_a2"):
    c.model = f"bnn_{model}"
    c.model_kwargs.num_bits = int(kind[-1])
    c.binary = ml_collections.ConfigDict({
        "method": "ternary" if kind.startswith("ternary") else "ste_sign",
        "include": (".*",), "exclude": transforms.DEFAULT_EXCLUDE})
  elif kind == "nm24":
    c.prune = prune.default_config()
    c.prune.n_m, c.prune.sparsity = "2:4", 0.5
  elif kind == "half_flops":
    m = models.get_model(model, 10)
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    graph = structured.build_graph(m, v["params"], v["batch_stats"], (1, 32, 32, 3))
    full = structured.count_flops(m, (1, 32, 32, 3), v["params"], v["batch_stats"])
    for round_to in (8, 4, 2):   # the coarsest rounding that keeps about half the MACs
      keep = structured.plan_for_flops(m, v["params"], v["batch_stats"], flops_target=0.5,
                                       method="uniform", graph=graph, round_to=round_to)
      override, p2, s2 = structured.prune_channels(m, v["params"], v["batch_stats"], keep,
                                                   graph=graph)
      pruned = structured.with_channels(m, override)
      if structured.count_flops(pruned, (1, 32, 32, 3), p2, s2) >= 0.45 * full:
        break
    c.model_kwargs.channels = override
  elif kind != "float":
    wbits, abits = (int(v) for v in kind[1:].split("a"))
    c.model_kwargs.act_quant = ml_collections.ConfigDict(
        {"kind": "pact", "bits": abits, "calibrate": False})
    c.quant = ml_collections.ConfigDict({"method": "uniform", "bits": wbits, "mode": "ptq",
                                         "per_channel": True})
  return c


def randomize_stats(state, seed: int):
  """BatchNorm statistics drawn at random (mean N(0, 0.5), var U(0.5, 2)), so that the
  artifact's arithmetic is not the initial identity."""
  rng = np.random.RandomState(seed)

  def draw(path, x):
    name = str(path[-1].key)
    if name == "mean":
      return jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype)
    return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)

  return state.replace(batch_stats=jax.tree_util.tree_map_with_path(draw, state.batch_stats))


def build(model: str, kind: str, images):
  exp = train.make_experiment(artifact_config(model, kind))
  state = randomize_stats(train.create_state(exp), seed=1)
  if kind == "nm24":   # the 2:4 masks of these weights (a fresh run's calibration)
    params, compression = exp.transform.calibrate(
        state.params, state.compression, experiment.calibration_context(exp, state))
    state = state.replace(params=params, compression=compression)
  arrays, manifest = export.artifact_arrays(exp, state)
  reference = export._reference_logits(exp, state, images)  # noqa: SLF001
  macs = None
  if kind in ("float", "half_flops"):
    macs = structured.count_flops(exp.model, (1, 32, 32, 3), state.params, state.batch_stats)
  return arrays, manifest, reference, macs


def main(argv):
  del argv
  images = np.random.RandomState(0).rand(_BATCH.value, 32, 32, 3).astype(np.float32)
  out = {"device": common.device_info(), "batch_size": _BATCH.value,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "models": {}}
  out["matmul"], out["matmul_n"] = common.matmul_rates(_MATMUL_N.value), _MATMUL_N.value
  print(f"matmul rates (GFLOP/s, GOP/s for int8): {out['matmul']}", flush=True)
  for model in _MODELS.value:
    runners, rows = {}, {}
    for kind in _KINDS.value:
      arrays, manifest, reference, macs = build(model, kind, images)
      quantized = kind[0] == "w" and kind not in ("w1a1", "w1a2")
      native = {"auto": "auto", "true": True, "false": False}[_NATIVE.value]
      routes = [(True, native)] + ([(True, False)] if quantized and native and
                                   _XLA_ROUTE.value else [])
      routes += [(False, False)] if quantized and _FLOAT_ROUTE.value else []
      for integer, nat in routes:
        name = kind if integer is True and nat is native else (
            f"{kind}_xla" if integer else f"{kind}_float_route")
        fn = export.inference_fn((manifest, arrays), integer=integer,
                                 min_depth=_MIN_DEPTH.value,
                                 decode_once=not _PER_CALL.value, native=nat)
        if name.endswith("_xla") and not rows[kind]["native"]:
          continue   # the native kernel does not run here: the first row was XLA's already
        logits = np.asarray(fn(images))
        agree = float(np.mean(logits.argmax(1) == reference.argmax(1)))
        rows[name] = {"artifact_bytes": export.artifact_nbytes(arrays, manifest),
                      "integer_layers": len(fn.apply.integer_layers)
                      if hasattr(fn.apply, "integer_layers") else 0,
                      "native": bool(getattr(fn, "native", False)),
                      "argmax_agreement": agree,
                      "max_abs_logit_diff": float(np.max(np.abs(logits - reference))),
                      "macs_per_image": macs,
                      "params": int(sum(np.prod(arrays[p].shape) for p, e in manifest.get(
                          "params", {}).items() if e.get("encoding") == "float"))}
        if kind == "float" and agree < 1.0:
          raise SystemExit(f"{model} {name}: predictions differ from the trainer's")
        x = jnp.asarray(images)
        runners[name] = common.block_runner(fn, x)
        runners[name](1)   # compile and warm up
    peers, peer_info = start_peers(model, rows["float"]["params"]) if "float" in rows else ({}, {})
    runners.update(peers)
    for name, info in peer_info.items():
      rows[name] = {"peer": info}
    try:
      times = common.alternate(runners, _STEPS.value, _REPEATS.value)
    finally:
      for peer in peers.values():
        peer.close()
    for name, t in times.items():
      rows[name].update(common.rates(t, _STEPS.value, _BATCH.value))
      if "peer" not in rows[name]:   # model FLOPs: 2 x the MACs of the network it computes
        macs = rows[name].get("macs_per_image") or rows.get("float", {}).get("macs_per_image")
        rows[name].update(common.utilisation(2 * macs if macs else None,
                                             rows[name]["images_per_second"], out["matmul"]))
      if "float" in times and name != "float":
        rows[name]["vs_float"] = common.ratio(times["float"], t)
    out["models"][model] = rows
    if rows.get("half_flops", {}).get("macs_per_image") and rows.get("float", {}).get(
        "macs_per_image"):
      rows["half_flops"]["macs_ratio"] = (rows["half_flops"]["macs_per_image"]
                                          / rows["float"]["macs_per_image"])
    print(f"\n{model}, batch {_BATCH.value} ({out['device']['device']}):")
    for name, r in rows.items():
      if "skipped" in r.get("peer", {}):
        print(f"  {name:20s} skipped: {r['peer']['skipped']}")
        continue
      if "peer" in r:
        vs = f"{r['vs_float']['median']:.2f}x float" if "vs_float" in r else ""
        print(f"  {name:20s} {r['images_per_second']:8.1f} images/s  {vs:12s} "
              f"({r['peer'].get('framework')}, {r['peer'].get('memory_format')})")
        continue
      vs = f"{r['vs_float']['median']:.2f}x float" if "vs_float" in r else ""
      print(f"  {name:20s} {r['images_per_second']:8.1f} images/s  {vs:12s} "
            f"{r['artifact_bytes']:>10,} B  int layers {r['integer_layers']:2d}  "
            f"{'(native)' if r['native'] else '        '}  "
            f"argmax agree {r['argmax_agreement']:.3f}  max|dlogit| "
            f"{r['max_abs_logit_diff']:.2e}"
            + (f"  MACs {r['macs_ratio']:.2f}x" if "macs_ratio" in r else "")
            + (f"  {100 * r['share_of_bf16_matmul']:.2f}% of the bf16 matmul rate"
               if "share_of_bf16_matmul" in r else ""), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)
  if _MD.value:
    with open(_MD.value, "w") as f:
      f.write(markdown(out))


def markdown(out: dict) -> str:
  """The tables of a run, with its date, commit, machine and command."""
  import datetime  # noqa: PLC0415

  import quality  # noqa: PLC0415  (argparse only: no flags of its own to collide)
  lines = ["# Inference speed of the exported artifacts", "",
           f"Generated by `python {' '.join(['benchmarks/inference.py', *sys.argv[1:]])}` on "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} at commit "
           f"{quality.git_commit()}, {out['device']['device']}, batch {out['batch_size']}. "
           "Each artifact runs through `export.inference_fn` (stored codes decoded "
           f"{'inside every call' if _PER_CALL.value else 'once when loaded'}"
           ") and its argmax is checked against its trainer's first; runners take "
           "turns in blocks, so the ratios to `float` (the float artifact) are measured under "
           "the same load. Peers: PyTorch eager in its own process, every core, the faster "
           "memory format, the same glibc malloc settings; `torch_int8_static` is its x86 "
           "post-training static int8 (FX), `torch_int8_dynamic` quantizes the Linear layer "
           "only (all it applies to here).", "",
           "Utilisation: model FLOPs per image (2 x the MACs of the network computed, the float "
           "network's for the quantized and binary artifacts of the same shape) times images/s, "
           f"over this machine's measured matmul rates at {out.get('matmul_n', '?')}^3 "
           f"(GFLOP/s, GOP/s for int8): {out.get('matmul', 'not measured')}.", ""]
  for model, rows in out["models"].items():
    lines += [f"## {model}", "",
              "| artifact | images/s | vs float | bytes | integer layers | argmax agreement "
              "| model GFLOP per image | share of f32 / bf16 matmul rate |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
      vs = f"{r['vs_float']['median']:.2f}x" if "vs_float" in r else ""
      if "peer" in r:
        if "skipped" in r["peer"]:
          lines.append(f"| {name} | skipped: {r['peer']['skipped']} | | | | | | |")
        else:
          lines.append(f"| {name} ({r['peer'].get('framework')}) | "
                       f"{r['images_per_second']:.1f} | {vs} | | | | | |")
        continue
      extra = f" (MACs {r['macs_ratio']:.2f}x)" if "macs_ratio" in r else ""
      lines.append(f"| {name}{extra} | {r['images_per_second']:.1f} | {vs} | "
                   f"{r['artifact_bytes']:,} | {r['integer_layers']}"
                   f"{' (native)' if r.get('native') else ''} | "
                   f"{r['argmax_agreement']:.3f} | {common.utilisation_cells(r)} |")
    lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
