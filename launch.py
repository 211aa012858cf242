"""jcompress launcher: parses flags and hands the config to jcompress.

  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/base
  python launch.py --config=experiments/baseline_resnet.py --workdir=runs/base --config.seed=1
  python launch.py --mode=eval --workdir=runs/base        # config read from the workdir
  python launch.py --config=experiments/bnn_resnet.py     # workdir: runs/bnn_resnet
  python launch.py --config=experiments/quant_resnet.py:data=digits --workdir=runs/s --mode=sweep
  python launch.py --mode=analyze --workdir=runs/base [--analyze_compare=runs/other]
  python launch.py --mode=export --workdir=runs/base      # writes runs/base/export/
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA:CPU tuning before jax starts a backend (jcompress.runtime: what it changes, how to opt
# out); importing jcompress itself changes nothing.
from jcompress import runtime

runtime.configure_cpu()

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/baseline_resnet.py:data=digits")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results; default for --mode=train: "
    "runs/<experiment>[_<arg>], e.g. runs/baseline_resnet_data=digits.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sweep", "analyze", "export"],
    "train (or resume) the config; eval, analyze or export the run in --workdir (its config read "
    "from there); sweep: run every point of the config file's get_sweep(arg) under --workdir.")
_SWEEP_INDEX = flags.DEFINE_integer(
    "sweep_index", None, "--mode=sweep: run only this point (0-based), e.g. $SLURM_ARRAY_TASK_ID.")
_SUMMARIZE = flags.DEFINE_bool(
    "summarize", False, "--mode=sweep: run nothing, gather the points' results.json into "
    "DIR/sweep.csv, DIR/sweep.md and DIR/sweep.png.")
_ANALYZE_COMPARE = flags.DEFINE_string(
    "analyze_compare", None, "--mode=analyze: a second workdir to put side by side with --workdir.")


def _parse_flags(argv):
  """absl's flag parsing, with config-file failures reported as one line, not a traceback."""
  from jcompress import cli  # noqa: PLC0415  (light: imports no jax or tf)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (every failure to parse becomes one clear line)
    print(f"jcompress: error: {cli.describe_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jcompress import cli  # noqa: PLC0415  (imports jax/tf only after flag parsing)
  return cli.run(_CONFIG, _WORKDIR.value, _MODE.value, sweep_index=_SWEEP_INDEX.value,
                 summarize=_SUMMARIZE.value, analyze_compare=_ANALYZE_COMPARE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
