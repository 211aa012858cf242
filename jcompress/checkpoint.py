"""Checkpoints and workdirs: orbax managers over DIR/checkpoints, the checks that refuse a
checkpoint or a workdir of another model or config (naming the leaf or key), and the fallback
past unreadable checkpoints. Functions take the run's `Experiment` for its abstract state."""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jcompress import config as config_lib
from jcompress import transforms as transforms_lib
from jcompress.errors import WorkdirError

#: Config keys that may change between a run and its resumption in the same workdir.
RESUMABLE_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "eval_batch_size", "data_dir", "num_devices", "distributed", "teacher_config")


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses a workdir that holds a run of another config. Returns True if one exists."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      old = config_lib.flatten({**config_lib.LEGACY_VALUES, **json.load(f)})
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path} cannot be read ({e}); refusing to reuse this workdir") from e
  new = config_lib.flatten(config)
  keys = sorted(set(old) | set(new))
  differ = [k for k in keys if k.split(".")[0] not in RESUMABLE_KEYS and old.get(k) != new.get(k)]
  if differ:
    shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} in the workdir, "
                      f"{new.get(k, '<absent>')!r} now" for k in differ[:6])
    raise WorkdirError(
        f"workdir {workdir} holds a run of a different config ({shown}). "
        f"Use another --workdir, or the config of {path} to resume it.")
  return True


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with (for --mode=eval without --config)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{path} does not exist: {workdir} holds no run (give --config)")
  with open(path) as f:
    return config_lib.from_dict(json.load(f))


def checkpoint_manager(workdir: str, config, create: bool = True) -> ocp.CheckpointManager:
  """Orbax manager of DIR/checkpoints: async saves, the last `keep_checkpoints` kept."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=create, enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def check_checkpoint_tree(mngr: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """Refuses a checkpoint whose tree does not match the model, naming the first bad leaf."""
  where = os.path.join(str(mngr.directory), str(step))
  try:
    meta = mngr.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise WorkdirError(f"checkpoint {where} cannot be read ({type(e).__name__}: {e})") from e
  meta_tree = getattr(meta, "tree", meta)
  have = {transforms_lib.path_str(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(meta_tree)[0]}
  want = {transforms_lib.path_str(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  for path, spec in want.items():
    if path not in have:
      raise WorkdirError(f"checkpoint {where} has no '{path}' (expected shape {spec.shape}): "
                         "it was written by a different model or method")
    shape = tuple(getattr(have[path], "shape", ()) or ())
    if shape != tuple(spec.shape):
      raise WorkdirError(f"checkpoint {where}: '{path}' has shape {shape}, the model expects "
                         f"{tuple(spec.shape)}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise WorkdirError(f"checkpoint {where} holds '{extra[0]}', which the model does not have")


def restore_state(mngr: ocp.CheckpointManager, step: int, exp) -> tuple[object, dict]:
  """The state and meta of checkpoint `step`, after checking its tree against the model."""
  check_checkpoint_tree(mngr, step, exp.abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(exp.abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


def save_state(mngr: ocp.CheckpointManager, state, meta: dict) -> None:
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest_valid(mngr: ocp.CheckpointManager, exp) -> tuple[object, dict, int, list[str]]:
  """The newest checkpoint of `mngr` that restores, passing over unreadable ones.

  Steps are tried newest first with `restore_state`; one that fails (a truncated or corrupted
  file, a tree that does not fit the model) or restores to NaN/Inf params is logged as a warning
  and the previous one is tried. Returns `(state, meta, step, skipped)`, `skipped` holding one
  line per newer checkpoint passed over ("step N: reason"), empty when the latest restored.
  Raises WorkdirError naming the checkpoint directory when it holds no checkpoint or none
  restores.
  """
  where = str(mngr.directory)
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise WorkdirError(f"{where} holds no checkpoint (has the run saved one?)")
  skipped: list[str] = []
  for step in steps:
    try:
      state, meta = restore_state(mngr, step, exp)
      leaves = zip(transforms_lib.leaf_paths(state.params),
                   jax.tree.leaves(jax.device_get(state.params)))
      bad = [p for p, x in leaves
             if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all()]
      if bad:
        raise ValueError(f"params leaf '{bad[0]}' holds NaN or Inf")
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      skipped.append(f"step {step}: {type(e).__name__}: {reason[:300]}")
      logging.warning("checkpoint %s/%d cannot be restored (%s: %s)%s", where, step,
                      type(e).__name__, reason[:300],
                      "; falling back to the previous one" if step != steps[-1] else "")
      continue
    if skipped:
      logging.warning("restored %s/%d instead of the latest checkpoint (step %d)", where, step,
                      steps[0])
    return state, meta, step, skipped
  raise WorkdirError(f"no checkpoint in {where} can be restored: " + "; ".join(skipped))
