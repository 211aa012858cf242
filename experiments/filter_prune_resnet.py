r"""Structured filter pruning of a float ResNet: halve the FLOPs, then fine-tune.

  # 1. a float baseline
  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=/tmp/sp_base
  # 2. prune it to half the FLOPs (L1 filter norms) and fine-tune 300 steps
  python experiments/filter_prune_resnet.py --config=experiments/filter_prune_resnet.py:\
data=digits,init_from=/tmp/sp_base,criterion=l1,flops=0.5 --workdir=/tmp/sp_prune

Args: `data`, `model` (resnet20), `criterion` (l1 | bn | taylor; see `jcompress.structured`),
`flops` (the fraction of the original MACs to keep, in (0, 1]), `method` (global | uniform),
`init_from` (the float baseline's workdir), `steps` (fine-tuning steps), `runlocal`.

The pruning itself is `jcompress.structured.apply_to_config(config, params, batch_stats,
calibration_batches)`: it removes the filters, returns the config with
`model_kwargs.channels` set (the pruned widths of every conv) and the cut params. Running this
file as a script (`__main__` below) does the whole pipeline with the existing trainer: it
restores `init_from`, prunes, writes the pruned weights as a step-0 checkpoint in
`WORKDIR/pruned_init`, and fine-tunes from there with `train.train_and_evaluate`;
`WORKDIR/results.json` gets the pruning report (flops/params before and after) and the float
baseline's accuracy. Through `launch.py` the same config works once train.py calls
`apply_to_config` for a config with a `structured` sub-config.
"""

from __future__ import annotations

import json
import os
import sys

from jcompress import config as config_lib
from jcompress import structured
from jcompress.errors import ConfigError


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", criterion="l1", flops=0.5,
                             method="global", init_from="", steps=0, runlocal=False)
  structured.check_criterion(arg.criterion, "criterion")
  structured.check_flops_target(arg.flops, "flops")
  if arg.method not in structured.METHODS:
    raise ConfigError(f"config arg 'method': unknown method {arg.method!r}; known: "
                      f"{', '.join(structured.METHODS)}")
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.init_from = arg.init_from
  c.optimizer.nesterov = True
  c.optimizer.learning_rate = 0.01     # fine-tuning: a tenth of the from-scratch rate
  c.schedule.warmup_steps = 0
  c.total_steps = arg.steps or 20_000
  if arg.data == "digits":
    c.image_size = 32
    c.batch_size = 64
    c.total_steps = arg.steps or 300
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
  c.structured = structured.default_config()
  c.structured.criterion = arg.criterion
  c.structured.flops_target = arg.flops
  c.structured.method = arg.method
  if arg.runlocal:
    config_lib.make_runlocal(c)
  return c


def load_variables(workdir: str):
  """(params, batch_stats) of a workdir's latest checkpoint, read without a target tree (so a
  checkpoint written by an older TrainState layout still loads)."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(path):
    raise ConfigError(f"config key 'init_from': {path} does not exist (a finished float run's "
                      "workdir is expected)")
  mngr = ocp.CheckpointManager(path, item_handlers={"state": ocp.StandardCheckpointHandler()})
  try:
    step = mngr.latest_step()
    if step is None:
      raise ConfigError(f"config key 'init_from': {path} holds no checkpoint")
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    mngr.close()
  return jax.device_get(state["params"]), jax.device_get(state.get("batch_stats", {}))


def run(config, workdir: str) -> dict:
  """Restore `config.init_from`, prune, fine-tune; returns results.json's data."""

  from jcompress import data as data_lib  # noqa: PLC0415
  from jcompress import train  # noqa: PLC0415

  if not config.init_from:
    raise ConfigError("config key 'init_from': give the float baseline's workdir")
  params, batch_stats = load_variables(config.init_from)
  it = data_lib.train_iterator(
      config.data, batch_size=config.batch_size, seed=config.seed + 7919, start_step=0,
      image_size=train.image_size_arg(config), augment=False, data_dir=config.data_dir or None)
  batches = [next(it) for _ in range(config.calibration_batches)]
  new_config, params, batch_stats, report = structured.apply_to_config(
      config, params, batch_stats, batches)
  print(json.dumps(report, indent=1))
  init_dir = os.path.join(workdir, "pruned_init")
  if not os.path.isdir(os.path.join(init_dir, "checkpoints")):
    init_config = new_config.copy_and_resolve_references()
    init_config.init_from = ""
    exp = train.make_experiment(init_config)
    os.makedirs(init_dir, exist_ok=True)
    train.write_json(os.path.join(init_dir, "config.json"), config_lib.to_dict(init_config))
    mngr = train.checkpoint_manager(init_dir, init_config)
    train.save_state(mngr, train.state_from_variables(exp, params, batch_stats), {})
    mngr.wait_until_finished()
    mngr.close()
  new_config.init_from = init_dir
  results = train.train_and_evaluate(new_config, workdir)
  # train's float_test_accuracy is that of its init_from, here the pruned model before
  # fine-tuning; the float baseline's own accuracy comes from its results.json.
  results["pruned_accuracy_before_finetune"] = results.pop("float_test_accuracy", None)
  base_results = os.path.join(config.init_from, "results.json")
  if os.path.exists(base_results):
    with open(base_results) as f:
      results["float_test_accuracy"] = json.load(f)["test_accuracy"]
  results.update({k: v for k, v in report.items() if k != "group_widths"})
  results["flops"] = report["flops_after"]
  # Sizes against the unpruned float model (train's own figures are of the pruned one).
  results["float_bytes"] = 4 * report["params_before"]
  results["compression_ratio"] = results["float_bytes"] / results["model_bytes"]
  train.write_json(os.path.join(workdir, "results.json"), results)
  return results


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  _CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/filter_prune_resnet.py")
  _WORKDIR = flags.DEFINE_string("workdir", None, "output directory")

  def main(argv):
    del argv
    try:
      out = run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(out, indent=1, default=str))

  app.run(main)
