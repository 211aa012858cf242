r"""Vision Transformers through the same transforms: float training, W4A4 QAT, int8 PTQ,
head and MLP pruning, binary MLP weights, low-rank Dense layers and DeiT distillation from a
CNN teacher.

  # float (digits: vit_digits, CIFAR-10: vit_tiny_cifar, a DeiT-Ti with 4x4 patches)
  python launch.py --config=experiments/vit.py:data=digits --workdir=runs/vit_float_s0
  # W4A4 QAT fine-tuned from it: 4-bit weights on every Dense kernel in the blocks, 4-bit
  # signed LSQ on every Dense input
  python launch.py --workdir=runs/vit_w4a4 \
    --config=experiments/vit.py:data=digits,method=qat,init_from=runs/vit_float_s0
  # int8 PTQ of its weights (abits=8: activations too, LSQ steps calibrated on 4 batches)
  python launch.py --workdir=runs/vit_ptq8 \
    --config=experiments/vit.py:data=digits,method=ptq,init_from=runs/vit_float_s0
  # DeiT distillation through the distillation token, 200 labels, ResNet-20 teacher (digits:
  # the teacher's soft labels on mixed images, 6,000 steps; loss=deit_hard: its decisions)
  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/t_digits
  python launch.py --workdir=runs/vit_deit \
    --config=experiments/vit.py:data=digits,method=kd,teacher=runs/t_digits
  # structured pruning of the float run to half its FLOPs (whole heads and MLP units), tuned
  python launch.py --workdir=runs/vit_prune \
    --config=experiments/vit.py:data=digits,method=prune,init_from=runs/vit_float_s0
  # binary MLP weights / half-parameter low-rank Dense layers, fine-tuned from it
  python launch.py --workdir=runs/vit_binary \
    --config=experiments/vit.py:data=digits,method=binary,init_from=runs/vit_float_s0
  python launch.py --workdir=runs/vit_lowrank \
    --config=experiments/vit.py:data=digits,method=lowrank,init_from=runs/vit_float_s0

Model (`jcompress/models/vit.py`): patch embedding, class token, learned position embeddings,
pre-norm blocks (LayerNorm, multi-head self-attention with `query`/`key`/`value`/`out` Dense
layers, GELU MLP), final LayerNorm, classifier. The patch embedding (with the tokens and
position embeddings) is `stem_conv` and the classifier `head`, so they stay float as a CNN's
first conv and classifier do; `head_dist`, the distillation head, is excluded too.

Recipe: AdamW (b2 0.999, weight decay 0.05 on kernels), linear warm-up then cosine, label
smoothing 0.1, gradient clipping at norm 1. CIFAR-10: batch 128, lr 1e-3, 100 epochs
(35k steps), warm-up 5 epochs. Digits (32x32x3, pad-4 random crop): `vit_digits` (D 64,
depth 4, 4 heads, MLP 128, 8x8 patches: 16 tokens + class), batch 64, lr 2e-3, 2,000 steps.

method:
  float  train from scratch (or from `init_from`).
  qat    W`bits`A`abits` QAT (default W4A4): uniform symmetric per-channel fake-quant of the
         Dense kernels every step (`quant` sub-config), signed LSQ activation quantizers on
         every Dense input inside the blocks (`model_kwargs.act_quant`, LSQ's data-dependent
         step init on the calibration batches); `attn=true` also quantizes q, k and the
         softmax probabilities. From `init_from` (a float run; digits 600 steps at lr 5e-4).
  ptq    `bits` (default 8) weights of `init_from`, quantized and evaluated; no training.
  prune  structured pruning of `init_from` (a float run): whole attention heads (the query,
         key and value columns of a head with the out-projection's rows) and MLP hidden units
         (an fc1 column with its fc2 row) ranked by `criterion` (taylor, the default, or gate,
         Michel et al.'s head importance, both on the calibration batches | l1 | bn;
         `structured` sub-config, `jcompress.structured`) and removed until the MACs are at
         most `flops` (default 0.5) of the original, each block's MLP units kept in
         multiples of `round_to` (default 8: faster; heads are never rounded, a head counts
         its 16 or more channels); the token width (residual stream) is kept. `plan`: uniform
         (the default: the same fraction of every block's heads and of its MLP units, the
         lowest-ranked ones) or global (all blocks' heads and units ranked together, so blocks
         keep uneven widths). On digits seeds 0-2 both plans gave a mean validation accuracy
         of 98.15% after fine-tuning; the uniform plan's model (2 of 4 heads and 48 MLP units
         per block) ran 1.74x the float model's images/s against 1.65x for the global plan's
         (benchmarks/structured_speed.py --workdir --cpu_threads=1, both measured while the
         other core was busy; idle, the three trained uniform runs: 1.71-1.73x on one thread,
         1.53x on two). The pruned model is the same
         ViT built with per-block `model_kwargs.heads` and `mlp_dims`, then fine-tuned (digits
         1,500 steps at lr 1e-3: on seeds 0-2 its mean validation accuracy was 98.15% against
         97.92% at 5e-4). Figures: the quality table's vit_prune_half row
         (benchmarks/quality.py); speed: benchmarks/structured_speed.py --workdir.
  kd     distillation from `teacher` (a CNN run's workdir; several: `dirA;dirB`) through
         DeiT's distillation token (`token`, default true: a second token and head
         `head_dist` that face the teacher while the class head learns the labels; inference
         averages the two heads). `loss` deit_hard (DeiT's hard distillation: CE(cls, y) / 2
         + CE(dist, argmax teacher) / 2; the default off digits, as DeiT trains) or kd
         (DeiT's soft distillation: (1 - alpha) CE(cls, y) + alpha T^2 KL on the distillation
         head at `temperature`; Hinton's KD on the class head with token=false; the default
         on digits). Digits: 200 labelled images, mixup 1.0 (the teacher labels each mixed
         image: function matching) over 6,000 steps by default; seeds 0-2 (2026-12-05): test
         98.89 / 98.89 / 98.89% against hard labels at the same 6,000 steps 96.20 +- 0.98,
         docs/results.md).
  binary binary MLP weights of `init_from`, fine-tuned: every block's fc1 and fc2 kernels
         through the `binary` method's `binarizer` (default xnor: alpha * sign, alpha the mean
         |w| per output unit; ste_sign: +-1), straight-through gradients; attention, patch
         embedding and heads stay float, activations float (digits 1,500 steps at lr 5e-4).
  lowrank every Dense of the blocks (query, key, value, out, fc1, fc2) as two SVD factors of
         `rank_fraction` (default 0.5) of its parameters (`lowrank` method, from `init_from`),
         fine-tuned as `binary` is.

Args: data, model (default vit_digits on digits, vit_tiny_cifar otherwise), width (multiplies
the token width and the MLP), method (float | qat | ptq | prune | kd | binary | lowrank), bits,
abits, attn, init_from, criterion, plan, flops, round_to, binarizer, rank_fraction, teacher,
loss (deit_hard | kd; empty: the data's default), token, temperature, alpha, mixup (-1: the
method's default, 1.0 for kd on digits and 0 otherwise; 0: off), train_examples (-1: all; kd
on digits 200), image_size (0: 32 on digits, the dataset's size otherwise), steps, lr, seed,
runlocal.
A head count that does not divide the token width or a patch that does not divide the image
is refused here, naming the arg.
"""

import ml_collections

from jcompress import config as config_lib
from jcompress import distill
from jcompress import lowrank
from jcompress import models
from jcompress import structured
from jcompress import transforms
from jcompress.errors import ConfigError

METHODS = ("float", "qat", "ptq", "prune", "kd", "binary", "lowrank")
KD_LOSSES = ("deit_hard", "kd")


def _image_size(data: str, image_size: int) -> int:
  if image_size:
    return image_size
  if data in config_lib.OFFLINE_DATASETS:
    return config_lib.offline_image_size(data) or 32
  from jcompress import data as data_lib  # noqa: PLC0415  (TensorFlow: only when needed)

  return data_lib.dataset_defaults(data).image_size


def check_model(model: str, width: float, image_size: int) -> None:
  """ConfigError naming the arg when `model`'s heads do not divide its token width at `width`
  or its patch does not divide `image_size`; nothing is built or compiled."""
  if model not in models.MODELS:
    raise ConfigError(f"config arg 'model': unknown model {model!r}")
  fields = dict(getattr(models.MODELS[model], "keywords", {}))
  if "num_heads" not in fields:
    raise ConfigError(f"config arg 'model': {model!r} is not a ViT; choose one of "
                      f"{', '.join(m for m in models.MODELS if m.startswith('vit'))}")
  if not width > 0:
    raise ConfigError(f"config arg 'width': must be > 0, got {width!r}")
  dim = max(1, int(round(fields["embed_dim"] * width)))
  if dim % fields["num_heads"]:
    raise ConfigError(f"config arg 'width': {model} at width {width} has tokens of {dim} "
                      f"features, which its {fields['num_heads']} heads (num_heads) do not "
                      "divide")
  if image_size % fields["patch_size"]:
    raise ConfigError(f"config arg 'image_size': {model}'s {fields['patch_size']}x"
                      f"{fields['patch_size']} patches (patch_size) do not divide "
                      f"{image_size}x{image_size} images")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="", width=1.0, method="float", bits=0,
                             abits=-1, attn=False, init_from="", teacher="", loss="",
                             token=True, temperature=4.0, alpha=0.5, mixup=-1.0,
                             train_examples=-1, image_size=0,
                             criterion="taylor", plan="uniform", flops=0.5, round_to=8,
                             binarizer="xnor", rank_fraction=0.5,
                             steps=0, lr=0.0, seed=0, runlocal=False)
  if arg.method not in METHODS:
    raise ConfigError(f"config arg 'method': must be one of {', '.join(METHODS)}, got "
                      f"{arg.method!r}")
  digits = arg.data in config_lib.OFFLINE_DATASETS
  loss = arg.loss or ("kd" if digits else "deit_hard")
  if loss not in KD_LOSSES:
    raise ConfigError(f"config arg 'loss': must be one of {', '.join(KD_LOSSES)}, got "
                      f"{arg.loss!r}")
  if loss == "deit_hard" and not arg.token:
    raise ConfigError("config arg 'token': loss=deit_hard trains the distillation token's head "
                      "on the teacher's decisions; it needs token=true")
  if arg.mixup != -1.0 and not arg.mixup >= 0.0:
    raise ConfigError(f"config arg 'mixup': must be >= 0 (0: off; -1: the method's default), "
                      f"got {arg.mixup!r}")
  if arg.method == "ptq" and not arg.init_from:
    raise ConfigError("config arg 'init_from': method=ptq quantizes a trained model; give the "
                      "workdir of a float run")
  if arg.method == "prune":
    if not arg.init_from:
      raise ConfigError("config arg 'init_from': method=prune removes heads and MLP units of a "
                        "trained model; give the workdir of a float run")
    structured.check_criterion(arg.criterion, "criterion")
    if arg.plan not in structured.METHODS:
      raise ConfigError(f"config arg 'plan': must be one of {', '.join(structured.METHODS)}, "
                        f"got {arg.plan!r}")
    structured.check_flops_target(arg.flops, "flops")
  if arg.method in ("binary", "lowrank") and not arg.init_from:
    raise ConfigError(f"config arg 'init_from': method={arg.method} fine-tunes a trained model; "
                      "give the workdir of a float run")
  if arg.method == "lowrank" and not 0.0 < arg.rank_fraction <= 1.0:
    raise ConfigError(f"config arg 'rank_fraction': must be in (0, 1], got "
                      f"{arg.rank_fraction!r}")
  if arg.method == "kd" and not arg.teacher:
    raise ConfigError("config arg 'teacher': method=kd needs a teacher run's workdir "
                      "(teacher=runs/t_digits); the hard-label baseline is method=float")
  model = arg.model or ("vit_digits" if digits else "vit_tiny_cifar")
  image_size = _image_size(arg.data, arg.image_size)
  check_model(model, arg.width, image_size)

  c = config_lib.base_config()
  c.data = arg.data
  c.model = model
  c.width = arg.width
  c.seed = arg.seed
  c.init_from = arg.init_from
  c.image_size = arg.image_size or (config_lib.offline_image_size(arg.data) if digits else 0)
  c.label_smoothing = 0.1
  c.optimizer.name = "adamw"
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "cosine"
  if digits:
    c.batch_size = 64
    c.total_steps = 2_000
    c.eval_every = 500
    c.checkpoint_every = 500
    c.log_every = 50
    c.optimizer.learning_rate = 2e-3
    c.schedule.warmup_steps = 100
  else:
    c.batch_size = 128
    c.total_steps = 35_000      # 100 epochs of CIFAR-10's 45,000 training images
    c.eval_every = 2_500
    c.checkpoint_every = 2_500
    c.optimizer.learning_rate = 1e-3
    c.schedule.warmup_steps = 1_750
  c.train_examples = max(arg.train_examples, 0)

  if arg.method in ("qat", "ptq"):
    bits = arg.bits or (4 if arg.method == "qat" else 8)
    abits = arg.abits if arg.abits >= 0 else (bits if arg.method == "qat" else 0)
    c.quant = ml_collections.ConfigDict()
    c.quant.method = "uniform"
    c.quant.bits = bits
    c.quant.per_channel = True
    c.quant.mode = arg.method
    c.quant.include = (r".*",)
    # float patch embedding (with tokens and positions), classifier and distillation head
    c.quant.exclude = (*transforms.DEFAULT_EXCLUDE, r"(^|/)head_dist/")
    if abits:
      c.model_kwargs.act_quant = ml_collections.ConfigDict(
          {"kind": "lsq", "bits": abits, "signed": True})
    if arg.attn:
      c.model_kwargs.quantize_attention = True
    if arg.method == "ptq":
      c.total_steps = 0
      c.log_every = 1
      c.schedule.warmup_steps = 0
    else:
      c.total_steps = 600 if digits else 10_000
      c.optimizer.learning_rate = 5e-4 if digits else 1e-4
      c.schedule.warmup_steps = 0 if arg.init_from else c.schedule.warmup_steps
      c.eval_every = 200 if digits else c.eval_every
      c.checkpoint_every = c.eval_every
  elif arg.method == "prune":
    c.structured = structured.default_config()
    c.structured.criterion = arg.criterion
    c.structured.method = arg.plan
    c.structured.flops_target = arg.flops
    c.structured.round_to = arg.round_to
    c.total_steps = 1_500 if digits else 10_000
    c.optimizer.learning_rate = 1e-3 if digits else 1e-4
    c.schedule.warmup_steps = 0
    c.eval_every = 500 if digits else c.eval_every
    c.checkpoint_every = c.eval_every
  elif arg.method in ("binary", "lowrank"):
    if arg.method == "binary":
      # binary MLP weights (fc1, fc2 of every block); attention, embedding and heads float
      c.binary = ml_collections.ConfigDict()
      c.binary.method = arg.binarizer
      c.binary.include = (r"(^|/)mlp/fc[12]/kernel$",)
      c.binary.exclude = (*transforms.DEFAULT_EXCLUDE, r"(^|/)head_dist/")
      c.binary.float_steps = 0
    else:
      # every Dense of the blocks (q, k, v, out, fc1, fc2) as two factors at `rank_fraction`
      # of its parameters, split by SVD from init_from
      c.lowrank = lowrank.default_config()
      c.lowrank.method = "svd"
      c.lowrank.param_fraction = arg.rank_fraction
      c.lowrank.exclude = (*transforms.DEFAULT_EXCLUDE, r"(^|/)head_dist/")
    c.total_steps = 1_500 if digits else 10_000
    c.optimizer.learning_rate = 5e-4 if digits else 1e-4
    c.schedule.warmup_steps = 0
    c.eval_every = 500 if digits else c.eval_every
    c.checkpoint_every = c.eval_every
  elif arg.method == "kd":
    c.teacher = arg.teacher.replace(";", ",")
    c.distill = distill.default_config()
    c.distill.loss = loss
    c.distill.temperature = arg.temperature
    c.distill.alpha = arg.alpha
    if arg.token:
      c.model_kwargs.distill_token = True
    if digits:
      # 200 labels; the teacher labels mixed images (function matching) over a long schedule
      c.train_examples = 200 if arg.train_examples < 0 else c.train_examples
      c.mixup = 1.0
      c.total_steps = 6_000
  if arg.mixup >= 0:
    c.mixup = arg.mixup
  if arg.steps:
    c.total_steps = arg.steps
  if arg.lr:
    c.optimizer.learning_rate = arg.lr
  if arg.runlocal:
    config_lib.make_runlocal(c)
    if arg.method == "ptq":
      c.total_steps = 0
  return c
