"""Run outputs: metrics.jsonl (+ TensorBoard), the progress line, JSON files, tree sizes."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import numpy as np

PyTree = Any


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl, mirrors to TensorBoard.

  On a resumed run, lines of steps after the restored checkpoint (steps that
  will be run again) are dropped at the first write, so the file reads as the
  uninterrupted run's would.
  """

  def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._resume_step = resume_step
    self._tb = None
    if enabled:
      from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate(self):
    if self._resume_step is None or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= self._resume_step]
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._resume_step = None

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self._truncate()
    record = {"step": int(step), **{k: to_py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.scalar(k, v, step)

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def to_py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def write_json(path: str, data: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def tree_bytes(tree: PyTree) -> int:
  """Bytes of the array leaves of `tree` (Python scalars, e.g. stored shapes, count 0)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


class Progress:
  """tqdm on a terminal; plain log lines with steps/s and ETA otherwise."""

  def __init__(self, start: int, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.tty = enabled and sys.stderr.isatty()
    self._bar = None
    if self.tty:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self._t0, self._s0 = time.time(), start

  def update(self, step: int, metrics: dict | None = None):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if metrics:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                               if isinstance(v, float)}, refresh=False)
    elif self.enabled and metrics is not None:
      rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
      logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self.total, shown, rate,
                   time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 1e7 else "?")

  def close(self):
    if self._bar is not None:
      self._bar.close()
