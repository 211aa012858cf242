r"""Quantized ResNet: post-training quantization (PTQ) or quantization-aware training (QAT).

  # a float baseline to start from, then 8-bit per-channel PTQ, 4-bit k-means PTQ, W4A4 QAT
  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/b
  python launch.py --workdir=runs/ptq8 \
    --config=experiments/quant_resnet.py:data=digits,mode=ptq,bits=8,init_from=runs/b
  python launch.py --workdir=runs/km4 \
    --config=experiments/quant_resnet.py:data=digits,mode=ptq,method=kmeans,bits=4,init_from=runs/b
  python launch.py --workdir=runs/w4a4 \
    --config=experiments/quant_resnet.py:data=digits,bits=4,abits=4,init_from=runs/b

Weights: the `quant` sub-config (`jcompress.quantize.transform_from_config`) quantizes every
conv kernel but the first (`stem_conv`) and the classifier (`head`), which stay float as the
literature does. `method` uniform (symmetric, narrow range, per output channel; the range of the
current weights every step), kmeans (a per-tensor codebook of 2^bits centroids found by k-means
on the starting weights; QAT trains the centroids as Deep Compression does) or pow2 (levels
0, +-2^e). Activations: `abits` > 0 quantizes the input of every conv but the stem
(`model_kwargs.act_quant`, `jcompress.actquant`) with `act` = pact (learnable clip, calibrated
to the MSE-optimal clip on the first batches), dorefa (clip to [0, 1]) or lsq (learnable step,
LSQ's data-dependent init); 0 keeps them float.

mode=ptq: the weights of `init_from` (a float run's workdir) are quantized and evaluated, no
training (`total_steps` 0; the activation quantizers, if any, are calibrated on
`calibration_batches` training batches). mode=qat (default): fine-tune from `init_from` for
`steps` steps (digits: 300, CIFAR-10: 8,000) with SGD-nesterov, a small cosine learning rate;
k-means fine-tuning has no weight decay (a decay on every member weight would add up on the
shared centroid). results.json has `float_test_accuracy` (the init_from model),
`test_accuracy`, `model_bytes` (packed codes + scales / codebooks + the float stem, head and
BatchNorm params) and `weight_bits`.

Args: data (cifar10 | digits), model, width, method (uniform | kmeans | pow2), bits (weights,
2..8; kmeans 1..8), abits (activation bits, 0 = float), act (pact | dorefa | lsq), mode
(qat | ptq), per_channel (auto: per channel for uniform / pow2, per tensor for kmeans; or
true / false), init_from (a float workdir; required for ptq), steps (QAT steps; 0: the default),
lr (QAT learning rate; 0: the default), adaround (uniform: learned up/down rounding of the
weights on the calibration batches, `jcompress.adaround`, instead of round-to-nearest), brecq
(uniform: the same learned rounding optimised per residual block on the block output's error,
`jcompress.brecq`; `--config.quant.brecq_fisher=true` weights it by the paper's diagonal Fisher
information, from the gradients of the KL divergence to the float model's predictions),
bias_correction (remove each quantized layer's output mean shift through its bias / BatchNorm
beta, `jcompress.bias_correction`; any method), equalize (cross-layer equalization of the float
weights before quantizing, `jcompress.equalize`, for per_channel=false), activation (relu6 |
relu: MobileNetV2's activation, `model_kwargs.activation`; equalization needs relu; empty: the
model's own), runlocal.

  # DFQ on a digits MobileNetV2: the float ReLU model, then per-tensor 8-bit PTQ with
  # equalization and bias correction
  python launch.py --workdir=runs/mnv2 \
    --config=experiments/baseline_resnet.py:data=digits,model=mobilenetv2_cifar,activation=relu
  python launch.py --workdir=runs/dfq8 --config=experiments/quant_resnet.py:data=digits,\
    model=mobilenetv2_cifar,mode=ptq,bits=8,per_channel=false,activation=relu,equalize=true,\
    bias_correction=true,init_from=runs/mnv2
"""

import ml_collections

from jcompress import config as config_lib
from jcompress import sweep
from jcompress import transforms
from jcompress.errors import ConfigError


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", width=1.0, method="uniform",
                             bits=8, abits=0, act="pact", mode="qat", per_channel="auto",
                             init_from="", steps=0, lr=0.0, adaround=False, brecq=False,
                             bias_correction=False, equalize=False, activation="",
                             runlocal=False)
  if arg.mode not in ("qat", "ptq"):
    raise ConfigError(f"config arg 'mode': must be qat or ptq, got {arg.mode!r}")
  if arg.act not in ("pact", "dorefa", "lsq"):
    raise ConfigError(f"config arg 'act': must be pact, dorefa or lsq, got {arg.act!r}")
  per_channel = {"auto": None, "true": True, "1": True, "false": False, "0": False}.get(
      str(arg.per_channel).lower(), "bad")
  if per_channel == "bad":
    raise ConfigError(f"config arg 'per_channel': auto, true or false, got {arg.per_channel!r}")

  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.width = arg.width
  c.init_from = arg.init_from
  c.optimizer.nesterov = True

  c.quant = ml_collections.ConfigDict()
  c.quant.method = arg.method
  c.quant.bits = arg.bits
  c.quant.per_channel = per_channel
  c.quant.mode = arg.mode
  c.quant.include = (r".*",)
  c.quant.exclude = transforms.DEFAULT_EXCLUDE   # float first conv and classifier
  c.quant.bits_by_path = ()                      # e.g. ("stage3=4",): mixed precision
  c.quant.adaround = arg.adaround                # learned rounding at calibration (uniform)
  c.quant.adaround_iters = 500                   # its Adam steps per layer
  c.quant.brecq = arg.brecq                      # learned rounding per residual block (BRECQ)
  c.quant.brecq_iters = 1500                     # its Adam steps per block
  c.quant.brecq_fisher = False                   # Fisher-weighted block output error
  c.quant.bias_correction = arg.bias_correction  # remove the output mean shift (calibration)
  c.quant.equalize = arg.equalize                # cross-layer equalization first (DFQ)
  if arg.activation:
    c.model_kwargs.activation = arg.activation
  if arg.abits:
    c.model_kwargs.act_quant = ml_collections.ConfigDict(
        {"kind": arg.act, "bits": arg.abits, "calibrate": arg.act == "pact"})

  digits = arg.data in config_lib.OFFLINE_DATASETS
  if digits:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
  if arg.mode == "ptq":
    c.total_steps = 0
    c.log_every = 1
  else:
    c.total_steps = arg.steps or (300 if digits else 8_000)
    c.optimizer.learning_rate = arg.lr or (0.005 if digits else 0.01)
    c.schedule.warmup_steps = 0
    if arg.method == "kmeans":
      c.optimizer.weight_decay = 0.0
  if arg.runlocal:
    config_lib.make_runlocal(c)
    if arg.mode == "ptq":
      c.total_steps = 0
  return c


def get_sweep(arg=None):
  """Weight bits 8 / 4 / 2 x uniform / k-means, on the config of the same `arg`:

    python launch.py --mode=sweep --workdir=runs/sweep_quant \
      --config=experiments/quant_resnet.py:data=digits,mode=ptq,init_from=runs/b

  With mode=qat a k-means point also sets `optimizer.weight_decay` 0 (and a uniform point
  5e-4), as get_config does for method=kmeans, whichever method `arg` names."""
  methods = {"quant.method": ["uniform", "kmeans"]}
  if get_config(arg).quant.mode == "qat":
    methods["optimizer.weight_decay"] = [5e-4, 0.0]
  return sweep.product({"quant.bits": [8, 4, 2]}, sweep.zipit(methods))
