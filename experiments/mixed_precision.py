r"""Mixed-precision PTQ: per-layer weight bits chosen from second-order sensitivity under a size
budget (HAWQ-V3's recipe), against uniform bits at the same size.

  # a float baseline, then mixed precision at a mean of 3 bits, then the sweep
  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/b
  python launch.py --workdir=runs/mp3 \
    --config=experiments/mixed_precision.py:data=digits,init_from=runs/b,avg_bits=3
  python launch.py --mode=sweep --workdir=runs/mp_sweep \
    --config=experiments/mixed_precision.py:data=digits,init_from=runs/b

Before the run starts (the `quant` method's `prepare` hook, `jcompress.methods.quant`):

  1. sensitivity: on the `calibration_batches` training batches (digits: 4 x 64 images), for
     every quantized kernel l (all convs but the stem; the classifier stays float) and every
     candidate width b, Omega_l(b), the loss increase that quantizing layer l alone to b bits
     causes to second order. `sensitivity`: gauss_newton (default; 1/2 dW^T G dW, G the
     Gauss-Newton matrix of the cross-entropy, equal to the Hessian's 1/2 dW^T H dW at a
     fitted model and ~10x cheaper), quadratic (1/2 dW^T H dW by Hessian-vector products),
     hawq (HAWQ-V2's Tr(H_ll)/n_l ||dW||^2, Hutchinson traces), hawq_gn (the same with the
     exact Gauss-Newton traces from per-example gradients) or mse (||dW||^2, no curvature:
     the baseline). `jcompress.hessian`.
  2. allocation: min sum_l Omega_l(b_l) over b_l in `candidates` under the budget, exactly (an
     integer program solved by dynamic programming, `jcompress.bitalloc`). `avg_bits`: mean code
     bits per quantized weight (scales not counted, as `weight_bits` reports); `bytes`: the
     most `model_bytes` (the exported manifest.json + weights.bin, what `--mode=export` writes),
     checked against the artifact's own byte count.
  3. the run: per-channel symmetric uniform PTQ (minmax ranges, round-to-nearest, or AdaRound
     with `adaround`) with those widths as `quant.bits_by_path`, evaluated on the test split.

results.json adds `bit_allocation` ({layer: bits}), `allocation_objective` (the predicted sum
of sensitivities), `allocation_bytes`, `allocation_avg_bits`, `uniform_objective` (the same sum
with every layer at each candidate), `sensitivities` and their time, beside `test_accuracy`,
`model_bytes` and `weight_bits`.

Args: data (cifar10 | digits), model, width, init_from (a float run's workdir; required),
avg_bits (the mean-bits budget; default 3 when `bytes` is 0), bytes (a byte budget instead),
candidates (widths joined by '+', default 2+3+4+8), sensitivity, probes (hawq's Hutchinson
probes), adaround, seed, runlocal (one calibration batch).
"""

import ml_collections

from jcompress import config as config_lib
from jcompress import sweep
from jcompress import transforms
from jcompress.errors import ConfigError

#: The mean-bit budgets of the sweep's mixed-precision points, and its uniform widths.
SWEEP_AVG_BITS = (2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0)
SWEEP_UNIFORM_BITS = (2, 3, 4, 8)


def _parse_candidates(text: str) -> tuple:
  try:
    return tuple(int(b) for b in str(text).replace(",", "+").split("+") if b.strip())
  except ValueError:
    raise ConfigError(f"config arg 'candidates': bit widths joined by '+' (2+3+4+8), got "
                      f"{text!r}") from None


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", width=1.0, init_from="",
                             avg_bits=0.0, bytes=0, candidates="2+3+4+8",
                             sensitivity="gauss_newton", probes=16, adaround=False, seed=0,
                             runlocal=False)
  if not arg.init_from:
    raise ConfigError("config arg 'init_from': mixed precision quantizes a trained float model; "
                      "give its workdir (init_from=runs/b)")
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.width = arg.width
  c.init_from = arg.init_from
  c.seed = arg.seed
  c.total_steps = 0                  # PTQ: no training
  c.log_every = 1

  c.quant = ml_collections.ConfigDict()
  c.quant.method = "uniform"
  c.quant.bits = 8                   # unused with a budget: every layer gets an allocated width
  c.quant.per_channel = True
  c.quant.mode = "ptq"
  c.quant.include = (r".*",)
  c.quant.exclude = transforms.DEFAULT_EXCLUDE   # float first conv and classifier
  c.quant.bits_by_path = ()                      # set by the allocation
  c.quant.budget_bytes = arg.bytes
  c.quant.budget_avg_bits = arg.avg_bits or (0.0 if arg.bytes else 3.0)
  c.quant.bit_candidates = _parse_candidates(arg.candidates)
  c.quant.sensitivity = arg.sensitivity
  c.quant.hessian_probes = arg.probes
  c.quant.seed = arg.seed
  c.quant.adaround = arg.adaround
  c.quant.adaround_iters = 500

  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64                # 4 calibration batches: 256 images
  if arg.runlocal:
    c.calibration_batches = 1
  return c


def get_sweep(arg=None):
  """Mean-bit budgets `SWEEP_AVG_BITS` (those the candidates allow) for the mixed-precision
  front, and uniform `SWEEP_UNIFORM_BITS` (every layer at b bits: the same PTQ and
  calibration, no budget) beside it; sweep.png draws the two as separate series.

    python launch.py --mode=sweep --workdir=runs/mp_sweep \
      --config=experiments/mixed_precision.py:data=digits,init_from=runs/b
  """
  c = get_config(arg)
  lowest = min(c.quant.bit_candidates)
  off = {"quant.budget_bytes": 0} if c.quant.budget_bytes else {}
  mixed = [{"quant.budget_avg_bits": b, **off} for b in SWEEP_AVG_BITS if b >= lowest]
  uniform = [{"quant.bits": b, "quant.budget_avg_bits": 0.0, **off} for b in SWEEP_UNIFORM_BITS]
  return sweep.product(mixed + uniform)
