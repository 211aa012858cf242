r"""All the speed figures of issue 8 in one process and one run, as a markdown table and JSON.

  python benchmarks/suite.py --out_dir=runs/bench             # everything (about 15 min on 2 CPUs)
  python benchmarks/suite.py --only=float,w1a1 --steps=1 --repeats=2 --peers=   # quick

Measured on the current default device (CPU or GPU), batch --batch_size of 32x32 images:

* machine rates: a --matmul_n square `jnp.dot` timed in float32, bfloat16 (float32
  accumulation) and int8 (int32 accumulation): the yardstick for achieved FLOP/s;
* train steps (`train.make_train_step`, state donated, one synthetic batch), all timed in
  alternating blocks of --steps steps (a, b, c, ..., then the same in a new order every round;
  median of --repeats) so that their ratios see the same load: `float` (resnet18_cifar),
  `float_fed` (the same step fed by the real input pipeline, `data.train_iterator` of the offline
  `digits` at 32x32x3 with its augmentation, the in-memory path CIFAR-10 takes: its step time over
  `float`'s says whether the pipeline starves the step), `float_xla` (the same with
  `conv_impl="xla"`: XLA's own convolution gradients), `float_fast` (`conv_impl="fast"`: the
  matmul kernel gradient; `float` uses "auto": "staged" on a CPU with Eigen convolutions, XLA's
  gradients with stored operands; see `device.conv_impl_auto`), `qat`
  (W4A4: uniform per-channel weights, PACT activations), `w1a1` and `w1a2` (bnn_resnet18_cifar
  with binary weights; the block convolutions' forward as the model field `binary_compute`'s
  default "auto" picks: XNOR-popcount on a CPU, bf16 on GPU/TPU), `w1a1_f32`, `w1a1_bf16`,
  `w1a1_int8` and `w1a1_xnor` (W1A1 with that forward in float32, in exact bf16 / int8
  products, or by XNOR-popcount), `kd` (bnn_resnet18_cifar W1A1 distilled from a ResNet-18
  teacher, teacher forward in the step), and the lightweight students: `resnet20`,
  `mobilenetv2` (mobilenetv2_cifar: its depthwise convolutions as `fastconv.depthwise_conv`
  on a CPU), `mobilenetv2_xla` (the same with XLA's grouped convolutions; not by default) and
  `shufflenetv2` (shufflenetv2_cifar, 1.0x);
* peers, each in its own process speaking benchmarks/peers/protocol.py and timed in the same
  alternation: `torch_float`, `torch_w1a1`, `torch_mobilenetv2`, `torch_shufflenetv2` (PyTorch
  eager; the last two on every core and in the faster memory format, benchmarks/peers/
  torch_mobile.py) and `larq_w1a1` (Keras/Larq on TF); each peer's parameter count is
  compared with the jcompress step it computes the same network as (`PEER_OF`).
  A peer that is not installed or fails is listed as skipped with its reason, never as a figure;
* inference (eval mode, median of --repeats calls): the float ResNet-18 and the packed binary
  network (`bnn_infer.load(freeze(...), compute=--bnn_compute)` + `packed_apply`);
* compile times of every jcompress step, and each step's model FLOPs (6 x the network's MACs
  per image x batch, `structured.count_flops`) over its step time as a share of the measured
  float32 and bfloat16 matmul rates (XLA's own cost analysis, kept as `flops_per_step` in the
  JSON, leaves out library convolutions on a GPU).

The table ends with the issue's targets, each marked reached or not from this run's figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
#: The environment the peers start with: this process's before its own XLA:CPU tuning, so they
#: run as their users run them (`--peer_malloc` adds the malloc settings).
PEER_ENV = dict(os.environ)

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jcompress import binary as binarize  # noqa: E402
from jcompress import bnn_infer  # noqa: E402
from jcompress import config as config_lib  # noqa: E402
from jcompress.models import get_model  # noqa: E402

STEPS = ("float", "float_fed", "float_xla", "float_fast", "qat", "w1a1", "w1a1_f32", "w1a1_bf16",
         "w1a1_int8", "w1a1_xnor", "w1a2", "kd", "resnet20", "mobilenetv2", "mobilenetv2_xla",
         "shufflenetv2")
#: Timed unless --only says otherwise: all but `w1a1_int8`, which XLA:CPU's Eigen convolutions
#: run ~15x slower than float32 (its int8 convolution is not vectorised), minutes per block,
#: `w1a1_xnor`, what `w1a1` computes on a CPU anyway (`binary_compute="auto"`), and
#: `mobilenetv2_xla` (XLA:CPU's own grouped convolutions: about 7 s a step at batch 64).
DEFAULT_STEPS = tuple(s for s in STEPS if s not in ("w1a1_int8", "w1a1_xnor", "mobilenetv2_xla"))
PEERS = ("torch_float", "torch_w1a1", "larq_w1a1", "torch_mobilenetv2", "torch_shufflenetv2")
#: Which jcompress step each peer computes the same network as (parameter counts compared).
PEER_OF = {"torch_float": "float", "torch_w1a1": "w1a1", "larq_w1a1": "w1a1",
           "torch_mobilenetv2": "mobilenetv2", "torch_shufflenetv2": "shufflenetv2"}
HERE = os.path.dirname(os.path.abspath(__file__))

_OUT = flags.DEFINE_string("out_dir", "runs/bench", "Where bench.md and bench.json go.")
_ONLY = flags.DEFINE_list("only", list(DEFAULT_STEPS), f"Train steps to time, from {STEPS}.")
_PEERS = flags.DEFINE_list("peers", list(PEERS), f"Peers to time, from {PEERS} ('' for none).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 2, "Train steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed blocks per step (median reported).")
_INFER = flags.DEFINE_boolean("inference", True, "Time float and packed-binary inference.")
_BNN_COMPUTE = flags.DEFINE_string("bnn_compute", "auto", "bnn_infer compute of the packed net.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "Side of the square matmuls timed.")
_PEER_TIMEOUT = flags.DEFINE_integer("peer_timeout", 900, "Seconds a peer may take to start.")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", "", "The Python that runs the peers: a venv holding them with all their "
    "dependencies (README: .venv-peers); default: this one.")
_PEER_MALLOC = flags.DEFINE_boolean(
    "peer_malloc", True, "Start the peers with the glibc malloc settings that "
    "`runtime.configure_cpu()` gives this process (runtime.configure_cpu_malloc; not with "
    "JCOMPRESS_CPU_MALLOC=0): run both sides with them to compare like with like.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "TFDS data_dir of `float_fed`'s `digits` (default: a temp dir).")


# ----------------------------------------------------------------------------- machine rates


# ----------------------------------------------------------------------------- train steps


def step_config(name: str):
  if name == "float":
    return common.train_config("resnet18_cifar"), None
  if name == "float_fed":
    return common.train_config("resnet18_cifar"), None
  if name in ("float_xla", "float_fast"):
    return common.train_config("resnet18_cifar", model_kwargs={
        "conv_impl": name.split("_")[1]}), None
  if name == "qat":
    return common.train_config("resnet18_cifar", qat_bits=4, qat_act="pact"), None
  if name == "w1a1":
    return common.train_config("bnn_resnet18_cifar", binary_bits=1), None
  if name in ("w1a1_f32", "w1a1_bf16", "w1a1_int8", "w1a1_xnor"):
    return common.train_config("bnn_resnet18_cifar", binary_bits=1, model_kwargs={
        "binary_compute": name.split("_")[1]}), None
  if name == "w1a2":
    return common.train_config("bnn_resnet18_cifar", binary_bits=2), None
  if name in ("resnet20", "mobilenetv2", "shufflenetv2"):
    return common.train_config(name if name == "resnet20" else f"{name}_cifar"), None
  if name == "mobilenetv2_xla":
    return common.train_config("mobilenetv2_cifar", model_kwargs={"conv_impl": "xla"}), None
  if name == "kd":
    teacher = config_lib.base_config()
    teacher.model = "resnet18_cifar"
    return common.train_config("bnn_resnet18_cifar", binary_bits=1), teacher
  raise ValueError(name)


def pipeline_feed(batch: int, data_dir: str | None):
  """The train loop's input pipeline: `digits` at 32x32x3, augmented, batches of `batch`."""
  import tempfile  # noqa: PLC0415

  from jcompress import data as data_lib  # noqa: PLC0415
  return data_lib.train_iterator("digits", batch_size=batch, seed=0, image_size=32,
                                 augment=True, data_dir=data_dir or tempfile.mkdtemp())


def _installed(module: str, python: str | None) -> bool:
  """Whether `module` imports in `python` (default: this process's)."""
  import importlib.util  # noqa: PLC0415
  if not python:
    try:
      return importlib.util.find_spec(module) is not None
    except ValueError:
      return True
  return subprocess.run([python, "-c", f"import importlib.util as u, sys; "
                         f"sys.exit(u.find_spec({module!r}) is None)"],
                        capture_output=True, check=False).returncode == 0


def start_peer(name: str, batch: int, timeout: int, malloc: bool = False,
               python: str | None = None):
  """(Peer, None) or (None, reason it is skipped); `malloc`: with `runtime.malloc_env()`;
  `python`: the interpreter that runs the peer (default: this one)."""
  if name.startswith("torch"):
    if not _installed("torch", python):
      return None, "torch is not installed (pip install torch)"
    args = [os.path.join("peers", "torch_resnet.py"), f"--batch_size={batch}"]
    if name == "torch_w1a1":
      args.append("--binary")
    if name in ("torch_mobilenetv2", "torch_shufflenetv2"):
      args = [os.path.join("peers", "torch_mobile.py"), f"--batch_size={batch}",
              f"--model={name.split('_')[1]}", "--width=1.0"]
    env = None
  elif name == "larq_w1a1":
    missing = [m for m in ("larq", "tf_keras", "tensorflow") if not _installed(m, python)]
    if missing:
      return None, f"not installed: {', '.join(missing)} (pip install larq tf_keras)"
    args = [os.path.join("peers", "larq_resnet.py"), f"--batch_size={batch}"]
    env = {"TF_USE_LEGACY_KERAS": "1"}
  else:
    return None, f"unknown peer {name!r}"
  if malloc:
    env = {**(env or {}), **runtime.malloc_env()}
  try:
    return common.Peer(args, {**PEER_ENV, **(env or {})}, timeout, cwd=HERE,
                       python=python), None
  except (RuntimeError, OSError) as e:
    return None, f"failed to start: {e}"


# ----------------------------------------------------------------------------- inference


def inference(batch: int, repeats: int, compute: str) -> dict:
  """images/s (median of `repeats` calls after 2 warm-ups) of the float ResNet-18 and the packed
  binary ResNet-18 W1A1, eval mode, with their first-call (compile) seconds."""
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  out = {}

  def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(2):
      jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
    return {"images_per_second": round(batch / float(np.median(ts)), 1),
            "first_call_seconds": round(first, 2)}

  fm = get_model("resnet18_cifar", 10)
  fv = jax.jit(lambda r: fm.init(r, x[:1]))(jax.random.PRNGKey(0))
  fapply = jax.jit(lambda v, x: fm.apply(v, x, train=False)[0])
  out["float"] = timed(lambda: fapply(fv, x))
  bm = get_model("bnn_resnet18_cifar", 10, num_bits=1)
  bv = jax.jit(lambda r: bm.init(r, x[:1]))(jax.random.PRNGKey(0))
  frozen = bnn_infer.freeze(bv["params"], bv["batch_stats"], bm)
  art = jax.block_until_ready(bnn_infer.load(frozen, bm, compute=compute))
  out["packed_w1a1"] = timed(lambda: bnn_infer.packed_apply(art, x))
  out["packed_w1a1"]["compute"] = compute if compute != "auto" else bnn_infer.fastest_compute()
  bp = jax.jit(binarize.binary_weights(bv["params"]).apply)(bv["params"], {})
  latent = jax.jit(lambda p, s, x: bm.apply({"params": p, "batch_stats": s}, x, train=False)[0])
  out["latent_w1a1_float32"] = timed(lambda: latent(bp, bv["batch_stats"], x))
  return out


# ----------------------------------------------------------------------------- report


def targets(r: dict) -> list:
  """(target, figure, reached or None when a figure is missing) rows from the results."""
  st, pe = r["train_steps"], r["peers"]
  ips = lambda d, k: d.get(k, {}).get("images_per_second")  # noqa: E731
  rows = []

  def add(name, num, den, goal, fmt="{:.2f}x", lower_is_better=False):
    if num is None or den is None:
      rows.append((name, "n/a (a figure is missing)", None))
      return
    v = num / den
    ok = v <= goal if lower_is_better else v >= goal
    rows.append((name, fmt.format(v), ok))

  add("binary W1A1 train step >= 1.5x Keras/Larq", ips(st, "w1a1"), ips(pe, "larq_w1a1"), 1.5)
  add("float train step >= 1.2x PyTorch eager", ips(st, "float"), ips(pe, "torch_float"), 1.2)
  add("MobileNetV2 train step >= 1.2x PyTorch eager", ips(st, "mobilenetv2"),
      ips(pe, "torch_mobilenetv2"), 1.2)
  add("MobileNetV2 step time per image <= 3x ResNet-20's", ips(st, "resnet20"),
      ips(st, "mobilenetv2"), 3.0, lower_is_better=True)
  for k, v in pe.items():
    if "params_match" in v:
      rows.append((f"{k} has {PEER_OF[k]}'s parameter count",
                   f"{v['info'].get('params')} vs {v['ours_params']}", v["params_match"]))
  for k in ("w1a1", "w1a2", "qat"):
    rt = st.get(k, {}).get("step_time_vs_float")
    rows.append((f"{k} step time <= 1.1x float", "n/a" if rt is None else f"{rt:.3f}x",
                 None if rt is None else rt <= 1.1))
  rt = st.get("float_fed", {}).get("step_time_vs_float")
  rows.append(("input pipeline never starves: float_fed step time <= 1.05x float",
               "n/a" if rt is None else f"{rt:.3f}x", None if rt is None else rt <= 1.05))
  share = r.get("float_flops", {}).get("share_of_f32_matmul")
  rows.append(("float step FLOP/s >= 60% of f32 matmul", "n/a" if share is None else
               f"{100 * share:.0f}%", None if share is None else share >= 0.6))
  if r["device"]["platform"] == "gpu":
    mfu = r.get("float_flops", {}).get("share_of_bf16_matmul")
    rows.append(("GPU: float step >= 50% of bf16 matmul rate (peak proxy)",
                 "n/a" if mfu is None else f"{100 * mfu:.0f}%", None if mfu is None else mfu >= .5))
  return rows


def markdown(r: dict, command: str) -> str:
  d = r["device"]
  lines = ["# jcompress speed suite", "",
           f"`{command}`", "",
           f"device: {d['device']}; platform {d['platform']} ({d['device_kind']}), "
           f"jax {d['jax']}; load average at start {r['load_start']}, at end {r['load_end']}", "",
           f"XLA_FLAGS `{d.get('xla_flags', '')}`; conv_impl \"auto\" = "
           f"{d.get('conv_impl_auto')!r}", "",
           f"glibc malloc settings (no mmap, no trim; CPU computations run in the calling thread: "
           f"runtime.configure_cpu, off with JCOMPRESS_CPU_MALLOC=0): "
           f"{'on' if r.get('malloc') else 'off'} in this process, "
           f"{'on' if r.get('peer_malloc') else 'off'} in the peers'.", "",
           f"batch {r['batch_size']}, 32x32x3, ResNet-18 with the CIFAR stem; train steps timed in "
           f"alternating blocks of {r['steps']} steps, median of {r['repeats']}.", "",
           "| machine | rate |", "|---|---|"]
  for k, v in r["matmul"].items():
    lines.append(f"| {k} matmul {r['matmul_n']}^3 | {v} G{'OP' if k == 'int8' else 'FLOP'}/s |")
  lines += ["", "| train step | images/s | step time vs float | model GFLOP per step (6 x MACs x "
            "batch) | share of f32 / bf16 matmul rate | compile s | blocks (images/s) |",
            "|---|---|---|---|---|---|---|"]
  for k, v in r["train_steps"].items():
    vs = v.get("step_time_vs_float")
    lines.append(f"| {k} ({v['what']}) | {v['images_per_second']} | "
                 f"{'' if vs is None else f'{vs:.3f}x'} | {common.utilisation_cells(v)} | "
                 f"{v['compile_seconds']} | {v['images_per_second_all']} |")
  for k, v in r["peers"].items():
    if "skipped" in v:
      lines.append(f"| {k} | skipped: {v['skipped']} | | | | | |")
    else:
      vs = v.get("step_time_vs_float")
      lines.append(f"| {k} ({v['info'].get('framework', '')}) | {v['images_per_second']} | "
                   f"{'' if vs is None else f'{vs:.3f}x'} | | | | {v['images_per_second_all']} |")
  ff = r.get("float_flops")
  if ff:
    lines += ["", f"float step: {ff['gflop_per_step']:.1f} GFLOP per step ({ff['flops_from']}), "
              f"{ff['achieved_gflops']:.1f} GFLOP/s achieved by "
              "`float` = "
              f"{100 * ff['share_of_f32_matmul']:.0f}% of the float32 matmul rate."]
  if r.get("inference"):
    lines += ["", "| inference (eval) | images/s | first call s |", "|---|---|---|"]
    for k, v in r["inference"].items():
      lines.append(f"| {k} | {v['images_per_second']} | {v['first_call_seconds']} |")
  lines += ["", "| target | this run | reached |", "|---|---|---|"]
  for name, fig, ok in r["targets"]:
    lines.append(f"| {name} | {fig} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |")
  return "\n".join(lines) + "\n"


WHAT = {"float": "resnet18_cifar float32", "float_fed": "same, fed by the input pipeline",
        "float_xla": "same, conv_impl=xla", "float_fast": "same, conv_impl=fast",
        "qat": "W4A4 uniform/PACT", "w1a1": "bnn_resnet18_cifar W1A1",
        "w1a1_f32": "W1A1, forward in float32", "w1a1_bf16": "W1A1, forward in bf16",
        "w1a1_int8": "W1A1, forward in int8", "w1a1_xnor": "W1A1, forward by XNOR-popcount",
        "w1a2": "bnn_resnet18_cifar W1A2", "kd": "W1A1 student, ResNet-18 teacher",
        "resnet20": "resnet20 float32", "mobilenetv2": "mobilenetv2_cifar float32",
        "mobilenetv2_xla": "same, conv_impl=xla", "shufflenetv2": "shufflenetv2_cifar 1.0x float32"}


def main(argv):
  del argv
  t_start = time.time()
  batch, steps, repeats = _BATCH.value, _STEPS.value, _REPEATS.value
  r = {"device": common.device_info(), "batch_size": batch, "steps": steps, "repeats": repeats,
       "load_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
       "matmul_n": _MATMUL_N.value, "malloc": runtime.malloc_configured,
       "peer_malloc": _PEER_MALLOC.value}
  print(f"device: {r['device']['device']}", flush=True)
  r["matmul"] = common.matmul_rates(_MATMUL_N.value)
  print(f"matmul rates: {r['matmul']}", flush=True)

  runners, infos = {}, {}
  for name in _ONLY.value:
    if name not in STEPS:
      raise app.UsageError(f"--only: unknown step {name!r}, expected some of {STEPS}")
    config, teacher = step_config(name)
    feed = pipeline_feed(batch, _DATA_DIR.value) if name == "float_fed" else None
    runners[name], infos[name] = common.make_train_runner(config, batch, teacher_config=teacher,
                                                          feed=feed)
    print(f"compiled {name}: {infos[name]['compile_seconds']} s", flush=True)
  peers, skipped = {}, {}
  for name in [p for p in _PEERS.value if p]:
    peer, why = start_peer(name, batch, _PEER_TIMEOUT.value, _PEER_MALLOC.value,
                           _PEER_PYTHON.value or None)
    if peer is None:
      skipped[name] = why
      print(f"peer {name} skipped: {why}", flush=True)
    else:
      peers[name] = peer
      print(f"peer {name} ready: {peer.info}", flush=True)

  times = {k: [] for k in (*runners, *peers)}
  order = [*runners.items(), *peers.items()]
  for name, run in order:   # one untimed step each: every process warm before the first block
    try:
      run(1)
    except RuntimeError as e:
      skipped[name] = f"failed while running: {e}"
      peers[name].close()
  for rep in range(repeats):
    # A new order every round, so that no variant always follows the same one (a peer's
    # thread pools may still spin for a moment after its block), and a short pause after each
    # peer block for the same reason.
    for i in np.random.default_rng(rep).permutation(len(order)) if rep else range(len(order)):
      name, run = order[i]
      if name in skipped:
        continue
      try:
        times[name].append(run(steps))
      except RuntimeError as e:   # a peer that died mid-run
        skipped[name] = f"failed while running: {e}"
        peers[name].close()
      if name in peers:
        time.sleep(0.5)
  for p in peers.values():
    p.close()

  base = times.get("float")
  r["train_steps"] = {}
  for name in runners:
    what = WHAT[name]
    if infos[name].get("binary_compute") and name in ("w1a1", "w1a2", "kd"):
      what += f", binary_compute auto = {infos[name]['binary_compute']}"
    e = {"what": what, **infos[name], **common.rates(times[name], steps, batch)}
    e.update(common.utilisation(infos[name].get("model_flops_per_step"),
                                e["images_per_second"] / batch, r["matmul"]))
    if base and name != "float":
      rt = common.ratio(times[name], base)
      e["step_time_vs_float"], e["step_time_vs_float_all"] = rt["median"], rt["all"]
    r["train_steps"][name] = e
  r["peers"] = {}
  for name in [p for p in _PEERS.value if p]:
    if name in skipped:
      r["peers"][name] = {"skipped": skipped[name]}
      continue
    e = {"info": peers[name].info, **common.rates(times[name], steps, batch)}
    ours = infos.get(PEER_OF[name], {}).get("params")
    if ours is not None and "params" in peers[name].info:
      e["ours_params"], e["params_match"] = ours, peers[name].info["params"] == ours
    if base:
      rt = common.ratio(times[name], base)
      e["step_time_vs_float"], e["step_time_vs_float_all"] = rt["median"], rt["all"]
    r["peers"][name] = e

  # The float step's utilisation, as every step's: model FLOPs (6 x MACs x batch), which the
  # `float` step computes whatever its conv_impl, over the measured matmul rates.
  fl = r["train_steps"].get("float", {})
  if "gflop_per_call" in fl:
    r["float_flops"] = {"flops_from": "model FLOPs, 6 x MACs x batch",
                        "gflop_per_step": fl["gflop_per_call"],
                        "achieved_gflops": fl["achieved_gflops"],
                        "share_of_f32_matmul": fl["share_of_f32_matmul"],
                        "share_of_bf16_matmul": fl["share_of_bf16_matmul"]}
  if _INFER.value:
    r["inference"] = inference(batch, max(repeats, 3), _BNN_COMPUTE.value)
  r["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  r["wall_seconds"] = round(time.time() - t_start, 1)
  r["targets"] = targets(r)
  command = "python benchmarks/suite.py " + " ".join(sys.argv[1:])
  r["command"] = command
  os.makedirs(_OUT.value, exist_ok=True)
  md = markdown(r, command)
  with open(os.path.join(_OUT.value, "bench.md"), "w") as f:
    f.write(md)
  with open(os.path.join(_OUT.value, "bench.json"), "w") as f:
    json.dump(r, f, indent=2, default=str)
  print(md)


if __name__ == "__main__":
  app.run(main)
