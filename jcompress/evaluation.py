"""Evaluation: the eval step, accuracy over a whole split, batches placed on the mesh."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jcompress import data as data_lib
from jcompress import transforms as transforms_lib


def make_eval_step(model, transform: transforms_lib.ParamTransform) -> Callable:
  """`eval_step(state, batch) -> sums` of loss, correct predictions and examples (masked)."""

  def eval_step(state, batch: dict) -> dict:
    eff = transform.apply(state.params, state.compression)
    logits, _ = model.apply({"params": eff, "batch_stats": state.batch_stats}, batch["image"],
                            train=False)
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             batch["label"])
    return {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }

  return eval_step


def evaluate_state(exp, eval_step: Callable, state, split: str = "eval") -> dict:
  """Accuracy and loss over a whole split of the experiment's dataset: "eval", the split
  evaluated while training (validation, or test with `eval_split="test"`), or "test"."""
  c = exp.config
  if split not in ("eval", "test"):
    raise ValueError(f"split must be 'eval' or 'test', got {split!r}")
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  per_process = c.eval_batch_size // jax.process_count()
  for batch in data_lib.eval_iterator(
      c.data, batch_size=per_process, image_size=image_size_arg(c),
      split=exp.info.eval_split if split == "eval" else exp.info.test_split,
      data_dir=c.data_dir or None, process_index=jax.process_index(),
      process_count=jax.process_count()):
    out = eval_step(state, shard_batch(exp, batch))
    for k, v in jax.device_get(out).items():
      totals[k] += float(v)
  n = max(totals["count"], 1.0)
  return {"eval_accuracy": totals["correct"] / n, "eval_loss": totals["loss"] / n,
          "eval_examples": int(totals["count"])}


def shard_batch(exp, batch: dict) -> dict:
  """The process-local numpy batch as global arrays split along the mesh's `data` axis."""
  return {k: jax.make_array_from_process_local_data(exp.data_sharding, v)
          for k, v in batch.items()}


def image_size_arg(config) -> int | None:
  """`config.image_size` as the data pipelines take it (0: the dataset's own size)."""
  return config.image_size or None
