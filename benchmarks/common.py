"""Timing code shared by the benchmarks: the device string, compiled train-step runners, and
timed blocks run in alternation so that every variant sees the same load on a shared machine.

A *runner* is a function `run_block(steps) -> seconds` that runs `steps` calls of an already
compiled function and blocks on the result; `alternate({name: runner}, steps, repeats)` calls
them in turn (a, b, c, a, b, c, ...) and returns every block's seconds, so that ratios between
variants are taken block by block (`ratios`) rather than between runs minutes apart.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jcompress import config as config_lib
from jcompress import experiment
from jcompress import models
from jcompress import optim
from jcompress import structured
from jcompress import train
from jcompress import transforms
from jcompress.methods import binary as binary_method


def cpu_model() -> str:
  """The CPU model from /proc/cpuinfo (or platform.processor()), e.g. 'AMD EPYC 7B13'; where
  the name has no model number (a virtual machine's 'AMD EPYC' covers several generations), its
  family and model numbers are added: 'AMD EPYC (family 25, model 1)'."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():   # the first processor's block is enough
          break
  except OSError:
    pass
  name = fields.get("model name")
  if not name:
    return platform.processor() or platform.machine()
  if not any(ch.isdigit() for ch in name) and "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  return name


def device_info() -> dict:
  """What the figures were measured on: platform, device kind and count, CPU model and cores,
  jax version, and a one-line `device` string."""
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  from jcompress import fastconv  # noqa: PLC0415
  info = {"platform": d.platform, "device_kind": kind, "device_count": jax.device_count(),
          "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "conv_impl_auto": fastconv.default_conv_impl()}
  if d.platform == "cpu":
    info["device"] = f"cpu: {info['cpu']} ({info['cpu_cores']} cores)"
  else:
    info["device"] = f"{d.platform}: {kind} x{jax.device_count()} (host {info['cpu']})"
  return info


def device_name() -> str:
  return device_info()["device"]


def block_runner(fn: Callable, *args) -> Callable[[int], float]:
  """A runner of `fn(*args)` (already compiled or jitted): `steps` calls, then blocks."""

  def run_block(steps: int) -> float:
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0

  return run_block


def alternate(runners: dict, steps: int, repeats: int) -> dict:
  """Seconds of `repeats` blocks of `steps` calls of every runner, the runners taking turns."""
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      times[name].append(run(steps))
  return times


def rates(seconds, steps: int, batch_size: int) -> dict:
  """images/s of each block and their median."""
  r = [steps * batch_size / t for t in seconds]
  return {"images_per_second": round(float(np.median(r)), 1),
          "images_per_second_all": [round(v, 1) for v in r]}


def ratio(num, den) -> dict:
  """The per-block ratios num[i] / den[i] of two alternating runners' times and their median."""
  r = [a / b for a, b in zip(num, den)]
  return {"median": round(float(np.median(r)), 3), "all": [round(v, 3) for v in r]}


def matmul_rates(n: int, repeats: int = 5) -> dict:
  """Best-of-`repeats` rate (GFLOP/s, GOP/s for int8) of an n x n x n matmul per dtype."""
  out = {}
  for name, dt, acc in (("float32", jnp.float32, None), ("bfloat16", jnp.bfloat16, jnp.float32),
                        ("int8", jnp.int8, jnp.int32)):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(dt) if dt != jnp.int8 else \
        jax.random.randint(jax.random.PRNGKey(0), (n, n), -127, 127).astype(jnp.int8)
    f = jax.jit(lambda a, b, acc=acc: jax.lax.dot(a, b, preferred_element_type=acc))
    jax.block_until_ready(f(a, a))
    best = min(block_runner(f, a, a)(1) for _ in range(repeats))
    out[name] = round(2 * n ** 3 / best / 1e9, 1)
  return out


def utilisation(flops: float | None, calls_per_second: float, matmul: dict) -> dict:
  """FLOP utilisation of a computation of `flops` model FLOPs per call (a train step: 6 x MACs
  x batch; inference: 2 x MACs per image) run `calls_per_second` times a second: achieved
  GFLOP/s and its share of the machine's measured float32 and bfloat16 matmul rates
  (`matmul_rates`, GFLOP/s: the peak proxy); {} without a FLOP count."""
  if not flops:
    return {}
  achieved = flops * calls_per_second / 1e9
  return {"gflop_per_call": round(flops / 1e9, 3), "achieved_gflops": round(achieved, 1),
          "share_of_f32_matmul": achieved / matmul["float32"],
          "share_of_bf16_matmul": achieved / matmul["bfloat16"]}


def utilisation_cells(row: dict) -> str:
  """`utilisation`'s figures as two markdown cells (GFLOP per call | f32 / bf16 shares)."""
  if "gflop_per_call" not in row:
    return " | "
  return (f"{row['gflop_per_call']:.2f} | {100 * row['share_of_f32_matmul']:.1f}% / "
          f"{100 * row['share_of_bf16_matmul']:.1f}%")


def train_config(model_name: str, dtype: str = "float32", binary_bits: int = 0,
                 qat_bits: int = 0, qat_act: str = "pact",
                 model_kwargs: dict | None = None) -> ml_collections.ConfigDict:
  """The config of a benchmarked train step: base config, `model_name`, and

  * `binary_bits`: the BNN's activation bits (model field `num_bits`) and binary weights (the
    `binary` sub-config: STE sign of every conv but the stem and the head);
  * `qat_bits`: k-bit uniform per-channel weight fake-quant (`quant`) and k-bit activations
    (`qat_act`) at every conv input but the stem;
  * `model_kwargs`: further model fields (e.g. `conv_impl`).
  """
  config = config_lib.base_config()
  config.model, config.dtype = model_name, dtype
  for k, v in (model_kwargs or {}).items():
    config.model_kwargs[k] = v
  if binary_bits:
    config.model_kwargs.num_bits = binary_bits
    config.binary = ml_collections.ConfigDict(
        {"method": "ste_sign", "include": (".*",), "exclude": transforms.DEFAULT_EXCLUDE})
  if qat_bits:
    config.model_kwargs.act_quant = ml_collections.ConfigDict(
        {"kind": qat_act, "bits": qat_bits})
    config.quant = ml_collections.ConfigDict(
        {"method": "uniform", "bits": qat_bits, "per_channel": True})
  return config


def make_train_runner(config, batch_size: int = 64, image_size: int = 32,
                      num_classes: int = 10, teacher_config=None, seed: int = 0,
                      feed=None):
  """(run_block, info) for jcompress's `make_train_step` of `config` on a fixed synthetic batch,
  compiled (state donated), warmed up by one step. With `teacher_config`, the step distills
  from that (randomly initialised) teacher: Hinton's KD, teacher forward only. With `feed` (an
  iterator of {"image", "label"} numpy batches of the same shapes, e.g. `data.train_iterator`),
  every step takes the next batch from it, as the train loop does, instead of the fixed one.

  `info`: model, params, compile_seconds, the step's FLOPs from XLA's cost analysis
  (`flops_per_step`, None where the backend gives none; on a GPU it leaves out the library
  convolutions), the model's MACs per image and model FLOPs per step (`model_flops_per_step`:
  6 x MACs x batch, plus 2 x the teacher's MACs x batch), and a BNN's `binary_compute`
  (its "auto" resolved by `binary_method.resolve_binary_compute`, as
  `experiment.make_experiment` does).
  """
  from jcompress import distill  # noqa: PLC0415

  model = experiment.build_model(config, num_classes)
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)
  rng = jax.random.PRNGKey(seed)
  x = jax.random.normal(rng, (batch_size, image_size, image_size, 3), jnp.float32)
  y = jax.random.randint(rng, (batch_size,), 0, num_classes)
  batch = {"image": x, "label": y}
  variables = jax.jit(lambda r: model.init(r, x[:1], train=False))(rng)
  params = variables["params"]
  transform = experiment.build_transform(config, params)
  model = binary_method.resolve_binary_compute(config, model, params)   # as make_experiment does
  extra, kd = (), None
  if teacher_config is not None:
    teacher = experiment.build_model(teacher_config, num_classes)
    tv = jax.jit(lambda r: teacher.init(r, x[:1], train=False))(jax.random.PRNGKey(seed + 1))
    extra = ([{"params": tv["params"], "batch_stats": tv["batch_stats"]}],)
    kd = experiment.Teachers(workdirs=("synthetic",), experiments=[], models=[teacher],
                            loss_fn=distill.make_distill_loss(distill.default_config()),
                            init_aux=lambda r: {})
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      compression=transform.init(params, rng), rng=rng)
  step_fn = jax.jit(train.make_train_step(model, tx, transform, schedule, 0.0, kd),
                    donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, *extra)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def run_block(steps: int) -> float:
    t0 = time.perf_counter()
    m = None
    for _ in range(steps):
      box["state"], m = compiled(box["state"], batch if feed is None else next(feed), *extra)
    jax.block_until_ready((box["state"], m))
    return time.perf_counter() - t0

  run_block(1)   # warm-up
  # Model FLOPs (the MFU convention): 6 x MACs per image (forward 2, backward 4), plus the
  # teacher's forward (2 x its MACs)
  shape = (1, image_size, image_size, 3)
  macs = structured.count_flops(model, shape, params, variables.get("batch_stats"))
  model_flops = 6 * macs * batch_size
  if teacher_config is not None:
    model_flops += 2 * structured.count_flops(teacher, shape) * batch_size
  info = {"model": config.model, "batch_size": batch_size, "image_size": image_size,
          "dtype": config.dtype, "params": models.count_params(params),
          "binary_compute": getattr(model, "binary_compute", None),
          "compile_seconds": round(compile_s, 2), "flops_per_step": xla_flops(compiled),
          "macs_per_image": macs, "model_flops_per_step": model_flops}
  return run_block, info


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled computation from XLA's cost analysis (None if it has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (backends without a cost model)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


class Peer:
  """A peer benchmark process (benchmarks/peers/protocol.py) as a runner."""

  def __init__(self, args: list, env: dict | None = None, timeout: int = 900,
               cwd: str | None = None, python: str | None = None):
    """Starts `python args...` (default: this interpreter) with environment `env` (default:
    this process's) in `cwd` and waits for its ready line. A relative `python` path is taken
    from this process's working directory (`--peer_python=.venv-peers/bin/python`), not `cwd`."""
    import tempfile  # noqa: PLC0415
    if python and os.sep in python:
      python = os.path.abspath(python)
    self.stderr = tempfile.TemporaryFile("w+")   # a file, so a chatty peer never blocks on it
    self.proc = subprocess.Popen(
        [python or sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=self.stderr, text=True, env=dict(os.environ) if env is None else env, cwd=cwd)
    self.timeout = timeout
    self.lines = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()
    line = self._read()
    if line is None or not line.get("ready"):
      raise RuntimeError(self._reason())
    self.info = line["info"]

  def _pump(self):
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)   # EOF

  def _read(self):
    """The peer's next JSON line (other stdout lines are skipped); None at EOF or timeout."""
    deadline = time.time() + self.timeout
    while True:
      try:
        line = self.lines.get(timeout=max(0.0, deadline - time.time()))
      except queue.Empty:
        return None
      if line is None:
        self.lines.put(None)
        return None
      try:
        out = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(out, dict):
        return out

  def _reason(self) -> str:
    try:   # stdout closed: the process is exiting; give it a moment to report its status
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      pass
    if self.proc.poll() is None:
      self.proc.kill()
      return f"did not start within {self.timeout} s"
    self.stderr.seek(0)
    err = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
    return (err[-1] if err else f"exit code {self.proc.returncode}")[:200]

  def __call__(self, steps: int) -> float:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    line = self._read()
    if line is None or "seconds" not in line:
      raise RuntimeError(self._reason())
    return float(line["seconds"])

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
