"""Training: TrainState, the train and eval steps, the loop, checkpoints, metrics.

One train step serves every experiment (DESIGN.md, "The core idea"):

  eff = transform.apply(state.params, state.compression)
  (logits, feats), stats = model.apply({"params": eff, "batch_stats": ...}, images, train=True)
  loss = task_loss (+ the losses later methods add)
  params <- optimizer step on the latent params;  params, compression <- transform.update(...)

`train_and_evaluate(config, workdir)` runs a whole experiment: it checks the
config and the workdir before anything is compiled, resumes from the latest
checkpoint in `DIR/checkpoints`, writes `DIR/metrics.jsonl`, TensorBoard events
in `DIR/tensorboard`, and `DIR/results.json` at the end. SIGTERM saves a
checkpoint and returns; rerunning the same command resumes.

Data parallelism: a `jax.sharding.Mesh` over the devices with one axis, `data`;
batches are split along it, the state is replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any
from typing import Callable
from typing import Iterator

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jcompress import config as config_lib
from jcompress import data as data_lib
from jcompress import models as models_lib
from jcompress import pretrained as pretrained_lib
from jcompress import transforms as transforms_lib
from jcompress.errors import ConfigError
from jcompress.errors import WorkdirError

PyTree = Any

#: Config keys that may change between a run and its resumption in the same workdir.
RESUMABLE_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "eval_batch_size", "data_dir", "num_devices", "distributed", "teacher_config")


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, and nothing else (it is checkpointed)."""
  step: jax.Array             # int32 scalar: optimizer steps taken
  params: PyTree              # latent float params (what the optimizer moves)
  batch_stats: PyTree         # BatchNorm running statistics
  opt_state: PyTree
  compression: PyTree         # the ParamTransform's state (masks, codebooks, ...)
  rng: jax.Array              # uint32[2] key; step keys are fold_in(rng, step)
  # Trained parameters of the loss that are not the model's (FitNets' regressor), and their
  # optimizer state; {} when the loss has none. Not exported with the model.
  aux: PyTree = dataclasses.field(default_factory=dict)
  aux_opt_state: PyTree = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- optimizer


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning-rate schedule of `config.schedule` over `config.total_steps`."""
  s, lr, total = config.schedule, config.optimizer.learning_rate, config.total_steps
  warmup = s.warmup_steps
  if s.name == "constant":
    main = optax.constant_schedule(lr)
  elif s.name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1),
                                       alpha=s.end_value / lr)
  elif s.name == "step":
    bounds = {int(b * total) - warmup: s.decay_factor for b in s.boundaries}
    main = optax.piecewise_constant_schedule(lr, bounds)
  else:
    raise ConfigError(f"config key 'schedule.name': unknown schedule '{s.name}'")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def weight_decay_mask(params: PyTree, decay_norm_and_bias: bool = False) -> PyTree:
  """True for the leaves weight decay applies to: kernels (ndim >= 2) unless told otherwise."""
  return jax.tree.map(lambda x: decay_norm_and_bias or x.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """sgd (momentum), adam or adamw from `config.optimizer`, weight decay masked to kernels."""
  o = config.optimizer
  mask = functools.partial(weight_decay_mask, decay_norm_and_bias=o.decay_norm_and_bias)
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == "sgd":
    if o.weight_decay:
      parts.append(optax.add_decayed_weights(o.weight_decay, mask))
    parts.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  elif o.name == "adam":
    if o.weight_decay:   # L2 on the gradient, as torch.optim.Adam's weight_decay
      parts.append(optax.add_decayed_weights(o.weight_decay, mask))
    parts.append(optax.adam(schedule, b1=o.b1, b2=o.b2))
  elif o.name == "adamw":
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask))
  else:
    raise ConfigError(f"config key 'optimizer.name': unknown optimizer '{o.name}'")
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy against integer labels, optionally smoothed."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_train_step(model, tx: optax.GradientTransformation,
                    transform: transforms_lib.ParamTransform,
                    schedule: optax.Schedule, label_smoothing: float = 0.0,
                    distill: Distillation | None = None) -> Callable:
  """`train_step(state, batch, teacher_variables=None) -> (state, metrics)`, to be jit-compiled.

  With `distill`, the frozen teachers run forward (eval mode, outside the differentiated
  function, so no backward pass of theirs is computed) on the same augmented batch, and the
  loss is `distill.loss_fn`'s mixture of the hard-label and distillation terms.
  `teacher_variables` is the list of the teachers' `{"params", "batch_stats"}`.
  """

  def train_step(state: TrainState, batch: dict,
                 teacher_variables: list | None = None) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    teacher_out = None
    if distill is not None:
      outs = [m.apply(v, batch["image"], train=False)
              for m, v in zip(distill.models, teacher_variables)]
      t_logits = sum(o[0] for o in outs) / len(outs)    # several teachers: mean logits
      teacher_out = jax.lax.stop_gradient((t_logits, outs[0][1]))

    def loss_fn(params, aux):
      eff = transform.apply(params, state.compression)
      (logits, feats), mutated = model.apply(
          {"params": eff, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": step_rng})
      if teacher_out is None:
        loss, parts = cross_entropy(logits, batch["label"], label_smoothing), {}
      else:
        loss, parts = distill.loss_fn(logits, feats, *teacher_out, batch["label"], aux,
                                      state.step)
      return loss, (logits, mutated["batch_stats"], parts)

    (loss, (logits, batch_stats, parts)), (grads, aux_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.aux)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux, aux_opt_state = state.aux, state.aux_opt_state
    if jax.tree.leaves(aux):
      aux_updates, aux_opt_state = tx.update(aux_grads, aux_opt_state, aux)
      aux = optax.apply_updates(aux, aux_updates)
    params, compression = transform.update(params, state.compression, state.step + 1)
    metrics = {
        "train_loss": loss,
        "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": schedule(state.step),
        **parts,
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, compression=compression, aux=aux,
                              aux_opt_state=aux_opt_state)
    return new_state, metrics

  return train_step


def primitive_eqns(jaxpr, name: str) -> list:
  """The equations of primitive `name` in a jaxpr (or closed jaxpr) and all its sub-jaxprs
  (pjit, custom_vjp, cond branches, ...), in program order."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      out.append(eqn)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          out.extend(primitive_eqns(sub, name))
  return out


def count_primitive(jaxpr, name: str) -> int:
  """Occurrences of primitive `name` in a jaxpr and all its sub-jaxprs (`primitive_eqns`):
  what a compiled step really computes, e.g. `count_primitive(jax.make_jaxpr(step)(...).jaxpr,
  "conv_general_dilated")` tells a teacher's forward-only pass from a forward + backward one."""
  return len(primitive_eqns(jaxpr, name))


def make_eval_step(model, transform: transforms_lib.ParamTransform) -> Callable:
  """`eval_step(state, batch) -> sums` of loss, correct predictions and examples (masked)."""

  def eval_step(state: TrainState, batch: dict) -> dict:
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


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Distillation:
  """Offline distillation: the frozen teachers of `config.teacher` and the student's loss."""
  workdirs: tuple            # the teachers' workdirs (`teacher` may list several, comma-separated)
  experiments: list          # each teacher's Experiment, from its workdir's config.json
  models: list               # their Flax modules
  loss_fn: Callable          # distill.make_distill_loss(config.distill)
  init_aux: Callable         # rng -> the loss's trained params ({} for most losses)


@dataclasses.dataclass
class Experiment:
  """What a config turns into before anything is compiled."""
  config: ml_collections.ConfigDict
  info: Any                       # data.DatasetInfo
  model: Any                      # flax.linen.Module
  transform: transforms_lib.ParamTransform
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_state: TrainState      # shapes, dtypes and shardings of the state
  init_variables: Callable        # rng -> (params, batch_stats) of a fresh model
  distill: Distillation | None = None
  lowrank_plan: tuple | None = None   # the factorized layers and ranks (`lowrank` sub-config)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def data_sharding(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh, axis `data`, over the first `num_devices` devices (0: all of them)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"config key 'num_devices': {num_devices} asked for, "
                        f"but jax sees {len(devices)} device(s)")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ConfigError("config key 'num_devices': must be 0 (all devices) with several hosts")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def image_size_arg(config) -> int | None:
  return config.image_size or None


#: Compression methods in the order their transforms are chained: a config sub-config of
#: this name turns the method on, and `<module>.transform_from_config(sub_config, params,
#: config)` builds its ParamTransform. Pruning comes first (later methods see the pruned
#: weights, as Deep Compression's prune -> quantize pipeline), binarization last.
TRANSFORM_METHODS = (
    ("prune", "jcompress.prune"),
    ("lowrank", "jcompress.lowrank"),
    ("pq", "jcompress.pq"),
    ("quant", "jcompress.quantize"),
    ("binary", "jcompress.binarize"),
)


def build_transform(config, params) -> transforms_lib.ParamTransform:
  """The compression transform a config asks for, from its method sub-configs.

  Each method present in the config (see `TRANSFORM_METHODS`) contributes a
  ParamTransform; they are chained in that fixed order. A config with none trains a
  float model. `params` may be abstract (shapes only): transforms select leaves by path
  and shape. A sub-config may set `enabled = False` to keep its keys but turn it off.
  """
  import importlib  # noqa: PLC0415

  parts = []
  for key, module_name in TRANSFORM_METHODS:
    if key not in config or not config[key].get("enabled", True):
      continue
    module = importlib.import_module(module_name)
    parts.append(module.transform_from_config(config[key], params, config))
  return transforms_lib.chain(*parts) if parts else transforms_lib.identity()


def build_model(config, num_classes: int):
  """The model of `config.model`, with `width`, `dtype` and the fields in `model_kwargs`."""
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  kwargs = dict(config.get("model_kwargs", {}))
  source = pretrained_lib.pretrained_source(config.get("init_from", ""))
  if source:
    # Weights published elsewhere (directly, or at the root of the init_from chain): the
    # fields under which the model computes the source's function (padding, BN epsilon,
    # stride placement) and the input preprocessing those weights expect, under what the
    # config sets explicitly.
    stats = data_lib.dataset_defaults(config.data)
    kwargs = {**pretrained_lib.model_fields(source),
              "input_norm": pretrained_lib.input_norm(source, stats.mean, stats.std),
              **kwargs}
  return models_lib.get_model(config.model, num_classes, width=config.width, dtype=dtype,
                              **kwargs)


def make_experiment(config: ml_collections.ConfigDict, load_teacher: bool = True) -> Experiment:
  """Validates `config` and builds model, optimizer and abstract state. Compiles nothing."""
  config_lib.validate(config)
  mesh = make_mesh(config.num_devices)
  n_dev = mesh.devices.size
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % n_dev:
      raise ConfigError(f"config key '{key}': {config[key]} is not divisible by the "
                        f"{n_dev} devices of the mesh")
    if config[key] % jax.process_count():
      raise ConfigError(f"config key '{key}': {config[key]} is not divisible by the "
                        f"{jax.process_count()} processes")
  info = data_lib.dataset_info(config.data, image_size=image_size_arg(config),
                               data_dir=config.data_dir or None)
  model = build_model(config, info.num_classes)
  lowrank_plan = None
  if "lowrank" in config and config.lowrank.get("enabled", True):
    model, lowrank_plan = lowrank_model(config, info, model)
  schedule = make_schedule(config)
  tx = make_optimizer(config, schedule)
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *info.image_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})

  abstract_params, _ = jax.eval_shape(init, jax.random.PRNGKey(0))
  transform = build_transform(config, abstract_params)
  if lowrank_plan is None:
    model = resolve_binary_compute(config, model, abstract_params)
  elif config.get("model_kwargs", {}).get("binary_compute") in ("bf16", "int8", "xnor"):
    raise ConfigError("config key 'model_kwargs.binary_compute': the narrow forward needs the "
                      "binary block convolutions, which `lowrank` factorizes; leave it unset")
  distill = None
  if load_teacher and config.get("teacher"):
    distill = make_distillation(config, info, model, init)
  exp = Experiment(config, info, model, transform, schedule, tx, mesh, None, init, distill,
                   lowrank_plan)
  abstract = jax.eval_shape(functools.partial(init_state, exp), jax.random.PRNGKey(config.seed))
  exp.abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=exp.replicated), abstract)
  return exp


def resolve_binary_compute(config, model, params):
  """`model` with its `binary_compute` field checked and "auto" resolved.

  "bf16", "int8" and "xnor" are exact only where every block convolution's kernel is +-1: the
  config's `binary` sub-config must be enabled with a sign binarizer (not "xnor", whose kernels
  are alpha * sign) and select every block conv kernel (`bnn_infer.block_conv_selection`);
  "xnor" (packed signs, XOR and popcount) also needs activations on the levels-1 grid, 1 or 2
  bits (`num_bits`; the model checks that). Otherwise a ConfigError names
  `model_kwargs.binary_compute`. "auto" (the
  BNN models' default) becomes, where those hold, "bf16" on a GPU or TPU (bf16 products run
  faster there) and "xnor" on a CPU (3-4x faster than the float32 convolutions on the 2-core
  AVX2 CPU, where bf16 and int8 products are not: benchmarks/suite.py's `w1a1_*` rows), and
  "f32" where they do not hold.
  """
  requested = getattr(model, "binary_compute", None)
  if requested in (None, "f32"):
    return model
  from jcompress import binarize  # noqa: PLC0415
  from jcompress import bnn_infer  # noqa: PLC0415
  why = None
  binary = config.get("binary")
  num_bits = getattr(model, "num_bits", 1)
  if binary is None or not binary.get("enabled", True):
    why = "the config has no enabled `binary` sub-config, so the block kernels are float"
  elif binary.method not in binarize.BINARIZERS or binary.method == "xnor":
    why = f"binary.method {binary.method!r} does not give +-1 kernels"
  else:
    selection = bnn_infer.block_conv_selection(params, tuple(binary.include),
                                               tuple(binary.exclude))
    block = [p for p in selection if bnn_infer.is_block_conv(p)]
    missed = [p for p in block if not selection[p]]
    if not block:
      why = "the model has no binary block convolutions"
    elif missed:
      why = (f"binary.include/exclude leave {len(missed)} block conv kernel(s) float, "
             f"e.g. {missed[0]}")
  if requested == "auto":
    if why is not None:
      return model.clone(binary_compute="f32")
    if jax.default_backend() in ("gpu", "tpu"):
      return model.clone(binary_compute="bf16")
    return model.clone(binary_compute="xnor" if num_bits <= 2 else "f32")
  if why is not None:
    raise ConfigError(f"config key 'model_kwargs.binary_compute': {requested!r} computes the "
                      f"binary convolutions exactly only when their kernels are +-1, but {why}")
  return model


def lowrank_model(config, info, model) -> tuple[Any, tuple]:
  """The `lowrank` sub-config's factorized model (`jcompress.lowrank.Factorized`) and its plan.

  Ranks from `rank` or `param_fraction` follow from shapes alone; ranks from `energy` need the
  weights, those of `init_from` (the same weights on every resumption, so the same plan)."""
  from jcompress import lowrank  # noqa: PLC0415
  lowrank.validate_lowrank(config.lowrank)
  x = jnp.zeros((1, *info.image_shape), jnp.float32)
  params = jax.eval_shape(lambda r: model.init(r, x, train=False)["params"],
                          jax.random.PRNGKey(0))
  if config.lowrank.get("energy", 0.0):
    if not config.init_from or config.init_from.startswith("keras:") or (
        config.init_from.endswith(".safetensors")):
      raise ConfigError("config key 'lowrank.energy': ranks by spectral energy need trained "
                        "weights: set init_from to the workdir of a trained run")
    _, source = restore_run(config.init_from, "init_from")
    params = jax.device_get(source.params)
  plan = lowrank.make_plan(params, config.lowrank)
  return lowrank.Factorized(model, plan), plan


def make_distillation(config, info, model, init) -> Distillation:
  """The teachers named by `config.teacher` and the `distill` loss.

  `teacher` lists, comma-separated, workdirs of runs or published weights ("keras:ResNet50",
  a torchvision .safetensors file; see `pretrained_teacher_config`).

  Reads each teacher's config.json and builds its model; checks classes, input shapes and
  the feature names the loss needs. Weights are restored later (`load_teacher_variables`).
  """
  from jcompress import distill as distill_lib  # noqa: PLC0415
  cfg = distill_lib.default_config()
  if "distill" in config:
    cfg.update(dict(config.distill))
  workdirs = tuple(w.strip() for w in str(config.teacher).split(",") if w.strip())
  experiments = []
  for w in workdirs:
    if pretrained_lib.is_pretrained_spec(w):
      experiments.append(make_experiment(pretrained_teacher_config(config, w), load_teacher=False))
      continue
    if not os.path.isdir(w):
      raise ConfigError(f"config key 'teacher': {w} is not a directory (the workdir of the "
                        "teacher's run is expected)")
    try:
      tconfig = load_workdir_config(w)
    except WorkdirError as e:
      raise ConfigError(f"config key 'teacher': {e}") from e
    texp = make_experiment(tconfig, load_teacher=False)
    if tuple(texp.info.image_shape) != tuple(info.image_shape):
      raise ConfigError(f"config key 'teacher': the teacher in {w} takes images of shape "
                        f"{tuple(texp.info.image_shape)}, the student "
                        f"{tuple(info.image_shape)} (set image_size alike)")
    experiments.append(texp)

  x = jnp.zeros((1, *info.image_shape), jnp.float32)
  def features(m, init_fn):   # the feature shapes of model m, traced without any weights
    def fn(rng):
      params, batch_stats = init_fn(rng)
      return m.apply({"params": params, "batch_stats": batch_stats}, x, train=False)[1]
    return jax.eval_shape(fn, jax.random.PRNGKey(0))

  s_feats = features(model, init)
  t_feats = features(experiments[0].model, experiments[0].init_variables)
  for texp in experiments:
    distill_lib.validate_distill(cfg, list(s_feats), list(t_feats), info.num_classes,
                                 texp.info.num_classes)
  return Distillation(
      workdirs=workdirs, experiments=experiments, models=[t.model for t in experiments],
      loss_fn=distill_lib.make_distill_loss(cfg, config.label_smoothing),
      init_aux=lambda rng: distill_lib.init_aux(cfg, s_feats, t_feats, rng))


def structured_prune(config, workdir: str, resuming: bool):
  """Structured pruning with physical removal (`structured` sub-config, `jcompress.structured`).

  A fresh run prunes the filters of its `init_from` model to `structured.flops_target` and
  returns `(config with model_kwargs.channels, {"variables": (params, batch_stats, message),
  "float_test_accuracy", "report"})`: the run then fine-tunes the smaller model. A resumed run
  takes the pruned widths from its workdir's config.json and returns `(config, None)`."""
  from jcompress import structured  # noqa: PLC0415
  if resuming:
    saved = load_workdir_config(workdir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model_kwargs.channels = saved.model_kwargs.get("channels")
    return config, None
  if not config.init_from:
    raise ConfigError("config key 'init_from': structured pruning removes the filters of a "
                      "trained model; set init_from to the workdir of a float run")
  src = make_experiment(config, load_teacher=False)
  params, batch_stats, message = load_init_variables(src)
  src_state = state_from_variables(src, params, batch_stats)
  float_eval = evaluate_state(src, jax.jit(make_eval_step(src.model, transforms_lib.identity()),
                                           out_shardings=src.replicated), src_state)
  batches = jax.device_get(calibration_context(src, src_state).batches)
  new_config, params, batch_stats, report = structured.apply_to_config(
      config, jax.device_get(params), jax.device_get(batch_stats), batches,
      num_classes=src.info.num_classes)
  report = {k: v for k, v in report.items() if k != "group_widths"}
  logging.info("structured pruning: FLOPs %d -> %d (%.3f), params %d -> %d", report["flops_before"],
               report["flops_after"], report["flops_ratio"], report["params_before"],
               report["params_after"])
  return new_config, {"variables": (params, batch_stats, message + "; filters pruned"),
                      "float_test_accuracy": float_eval["eval_accuracy"], "report": report}


def pretrained_teacher_config(config, spec: str) -> ml_collections.ConfigDict:
  """The config of a teacher given as published weights (`teacher=keras:ResNet50` or a
  torchvision .safetensors file): the architecture of those weights on the student's data,
  its input preprocessing (`input_norm`) and model fields from `spec`, no compression."""
  try:
    model = pretrained_lib.source_model(spec)
  except ConfigError as e:
    raise ConfigError(f"config key 'teacher': {e}") from e
  t = config_lib.base_config()
  for key in ("data", "data_dir", "image_size", "eval_batch_size", "batch_size", "num_devices",
              "seed"):
    t[key] = config[key]
  t.model, t.init_from, t.total_steps = model, spec, 0
  return t


def train_missing_teacher(config) -> dict | None:
  """Trains the teacher first when `teacher` names a workdir without a finished run and
  `teacher_config` says how (`"experiments/baseline_resnet.py:model=resnet18_cifar"`), so that
  a distillation experiment runs from one command. A rerun resumes the teacher where it
  stopped."""
  if not config.get("teacher") or not config.get("teacher_config"):
    return None
  workdirs = [w.strip() for w in str(config.teacher).split(",") if w.strip()]
  if len(workdirs) != 1:
    raise ConfigError("config key 'teacher_config': it trains one teacher; 'teacher' names "
                      f"{len(workdirs)} ({config.teacher!r}); train them first, then set "
                      "teacher_config to ''")
  if os.path.exists(os.path.join(workdirs[0], "results.json")):
    return None
  tconfig = config_lib.load_config_file(config.teacher_config, key="teacher_config")
  logging.warning("teacher %s has no finished run: training it first with %s", workdirs[0],
                  config.teacher_config)
  return train_and_evaluate(tconfig, workdirs[0])


def load_teacher_variables(exp: Experiment) -> list:
  """The teachers' frozen `{"params", "batch_stats"}` (the weights their forward pass saw:
  a compressed teacher's transform applied), replicated; errors name `teacher` and the path."""
  out = []
  for w, texp in zip(exp.distill.workdirs, exp.distill.experiments):
    if pretrained_lib.is_pretrained_spec(w):
      eff, batch_stats, message = pretrained_lib.load_pretrained(
          w, texp.model, texp.info.num_classes, jax.random.PRNGKey(0), reinit_head=False)
      logging.info("teacher: %s", message.replace("init_from ", "", 1))
    else:
      _, state = restore_run(w, "teacher")
      eff = jax.jit(texp.transform.apply)(state.params, state.compression)
      batch_stats = state.batch_stats
    out.append(jax.device_put({"params": eff, "batch_stats": batch_stats}, exp.replicated))
  return out


def init_aux(exp: Experiment, rng: jax.Array) -> tuple[PyTree, PyTree]:
  """(aux params, their optimizer state) of the loss: FitNets' regressor, or ({}, {})."""
  if exp.distill is None:
    return {}, {}
  aux = exp.distill.init_aux(jax.random.fold_in(rng, 0x6b64))
  return aux, (exp.tx.init(aux) if jax.tree.leaves(aux) else {})


def init_state(exp: Experiment, rng: jax.Array) -> TrainState:
  init_rng, comp_rng, step_rng = jax.random.split(rng, 3)
  params, batch_stats = exp.init_variables(init_rng)
  aux, aux_opt_state = init_aux(exp, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=exp.tx.init(params),
                    compression=exp.transform.init(params, comp_rng), rng=step_rng,
                    aux=aux, aux_opt_state=aux_opt_state)


def create_state(exp: Experiment) -> TrainState:
  """A fresh TrainState from `config.seed`, replicated over the mesh."""
  fn = jax.jit(functools.partial(init_state, exp), out_shardings=exp.replicated)
  return fn(jax.random.PRNGKey(exp.config.seed))


def state_from_variables(exp: Experiment, params: PyTree, batch_stats: PyTree) -> TrainState:
  """A step-0 TrainState starting from given weights (`init_from`): the optimizer and the
  compression transform are initialised on them, with the rngs `create_state` would use."""

  def build(params, batch_stats, rng):
    _, comp_rng, step_rng = jax.random.split(rng, 3)
    aux, aux_opt_state = init_aux(exp, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=exp.tx.init(params),
                      compression=exp.transform.init(params, comp_rng), rng=step_rng,
                      aux=aux, aux_opt_state=aux_opt_state)

  fn = jax.jit(build, out_shardings=exp.replicated)
  return fn(params, batch_stats, jax.random.PRNGKey(exp.config.seed))


def restore_run(workdir: str, key: str) -> tuple[Experiment, TrainState]:
  """The experiment and latest state of another run's workdir (an `init_from` or a teacher).

  Workdirs written by older versions of jcompress load too: config keys added since are filled
  from `config.base_config()`, and when the checkpoint's tree differs from today's TrainState
  only in fields the model does not need (the loss's `aux`, say), the params, batch_stats and
  compression state are read from the checkpoint as stored. Errors name the config `key` that
  pointed here and the path."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"config key '{key}': {workdir} is not a directory (expected the "
                      "workdir of a run" + (", 'keras:<Application>' or a .safetensors file)"
                                            if key == "init_from" else ")"))
  try:
    config = load_workdir_config(workdir)
  except WorkdirError as e:
    raise ConfigError(f"config key '{key}': {e}") from e
  with config.unlocked():
    for k, v in config_lib.base_config().items():
      if k not in config:
        config[k] = v
  exp = make_experiment(config, load_teacher=False)
  mngr = checkpoint_manager(workdir, config, create=False)
  try:
    step = mngr.latest_step()
    if step is None:
      raise ConfigError(f"config key '{key}': {os.path.join(workdir, 'checkpoints')} holds no "
                        "checkpoint (has that run saved one?)")
    try:
      state, _ = restore_state(mngr, step, exp)
    except (WorkdirError, ValueError) as e:   # an older TrainState layout
      state = _restore_as_stored(mngr, step, exp, e, key)
  finally:
    mngr.close()
  return exp, state


def _restore_as_stored(mngr, step: int, exp: Experiment, error: Exception, key: str) -> TrainState:
  """The checkpoint's params, batch_stats and compression state read as they were saved (a
  TrainState of an older layout); re-raises `error` when those do not fit the model."""
  where = os.path.join(str(mngr.directory), str(step))
  raw = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  if not isinstance(raw, dict) or "params" not in raw:
    raise ConfigError(f"config key '{key}': {error}") from error
  params, batch_stats = raw["params"], raw.get("batch_stats", {})
  check_same_shapes(exp.abstract_state.params, params, key, f"params of {where}")
  compression = raw.get("compression", {})
  if jax.tree.leaves(exp.abstract_state.compression):
    try:
      compression = jax.tree.unflatten(jax.tree.structure(exp.abstract_state.compression),
                                       jax.tree.leaves(compression))
    except Exception:  # noqa: BLE001
      raise ConfigError(f"config key '{key}': {error}") from error
  return TrainState(step=jnp.asarray(raw.get("step", step)), params=params,
                    batch_stats=batch_stats, opt_state={}, compression=compression,
                    rng=jnp.zeros((2,), jnp.uint32))


def check_same_shapes(want: PyTree, have: PyTree, key: str, what: str) -> None:
  """ConfigError naming the first leaf of `have` missing from, or shaped unlike, `want`."""
  w = dict(zip(transforms_lib.leaf_paths(want), (x.shape for x in jax.tree.leaves(want))))
  h = dict(zip(transforms_lib.leaf_paths(have), (np.shape(x) for x in jax.tree.leaves(have))))
  for path, shape in w.items():
    if path not in h:
      raise ConfigError(f"config key '{key}': the {what} have no '{path}' (the model expects "
                        f"shape {tuple(shape)}); it is a different architecture")
    if tuple(h[path]) != tuple(shape):
      raise ConfigError(f"config key '{key}': '{path}' has shape {tuple(h[path])} in the "
                        f"{what}, the model expects {tuple(shape)}")
  extra = sorted(set(h) - set(w))
  if extra:
    raise ConfigError(f"config key '{key}': the {what} hold '{extra[0]}', which the model "
                      "does not have")


def _add_missing_quantizer_params(exp: Experiment, params: PyTree) -> PyTree:
  """A float model's params for a model with activation quantizers (`act_quant`): the
  quantizers' own params (`*_act/alpha`, `*_act/step`) come from a fresh init; any other missing
  leaf is left missing, for `check_same_shapes` to report."""
  want = transforms_lib.leaf_paths(exp.abstract_state.params)
  have = dict(zip(transforms_lib.leaf_paths(params), jax.tree.leaves(params)))
  if not any("_act/" in p and p not in have for p in want):
    return params
  fresh, _ = exp.init_variables(jax.random.PRNGKey(exp.config.seed))
  fresh = jax.device_get(fresh)
  return transforms_lib.map_with_path(
      lambda p, v: have[p] if p in have else (v if "_act/" in p else None), fresh)


def load_init_variables(exp: Experiment) -> tuple[PyTree, PyTree, str]:
  """(params, batch_stats, message) of `config.init_from`: a workdir's latest checkpoint (the
  latent params and BatchNorm statistics of that run), or pretrained weights
  (`jcompress.pretrained.load_pretrained`: "keras:ResNet50", a .safetensors file)."""
  spec = exp.config.init_from
  if not pretrained_lib.is_pretrained_spec(spec):
    src, state = restore_run(spec, "init_from")
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    message = f"init_from: weights of {spec} at step {int(state.step)} ({src.config.model})"
    if exp.lowrank_plan is not None and src.lowrank_plan is None:
      from jcompress import lowrank  # noqa: PLC0415
      params = lowrank.factorize_params(params, exp.lowrank_plan)
      message += f"; factorized {len(exp.lowrank_plan)} layers (lowrank)"
  else:
    params, batch_stats, message = pretrained_lib.load_pretrained(
        spec, exp.model, exp.info.num_classes, jax.random.PRNGKey(exp.config.seed))
  params = _add_missing_quantizer_params(exp, params)
  check_same_shapes(exp.abstract_state.params, params, "init_from", "init_from params")
  check_same_shapes(exp.abstract_state.batch_stats, batch_stats, "init_from",
                    "init_from batch_stats")
  return params, batch_stats, message


def calibration_context(exp: Experiment, state: TrainState) -> transforms_lib.CalibrationContext:
  """Training batches and a loss for `ParamTransform.calibrate` (see transforms.py)."""
  c = exp.config
  it = data_lib.train_iterator(
      c.data, batch_size=c.batch_size // jax.process_count(), seed=c.seed + 7919, start_step=0,
      image_size=image_size_arg(c), augment=False, data_dir=c.data_dir or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      train_examples=c.train_examples)
  batches = [shard_batch(exp, next(it)) for _ in range(c.calibration_batches)]
  model = exp.model

  def loss_fn(params, batch):
    (logits, _), _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                                 batch["image"], train=True, mutable=["batch_stats"])
    return cross_entropy(logits, batch["label"])

  return transforms_lib.CalibrationContext(model=model, batch_stats=state.batch_stats,
                                           batches=batches, loss_fn=loss_fn, config=c)


# ----------------------------------------------------------------------------- workdir


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses a workdir that holds a run of another config. Returns True if one exists."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      old = config_lib.flatten(json.load(f))
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


def restore_state(mngr: ocp.CheckpointManager, step: int,
                  exp: Experiment) -> tuple[TrainState, dict]:
  """The state and meta of checkpoint `step`, after checking its tree against the model."""
  check_checkpoint_tree(mngr, step, exp.abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(exp.abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


def save_state(mngr: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest_valid(mngr: ocp.CheckpointManager,
                         exp: Experiment) -> tuple[TrainState, dict, int, list[str]]:
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


def load_workdir_run(workdir: str, what: str) -> tuple[Experiment, TrainState, int, int, list]:
  """The run in `workdir` for --mode=`what` (analyze, export): its Experiment, from its
  config.json (keys added to jcompress since filled from `config.base_config()`), and its newest
  checkpoint that restores (`restore_latest_valid`). Returns `(exp, state, step, latest_step,
  skipped)`. WorkdirError when `workdir` holds no run or no checkpoint that restores."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir} is not a directory (expected the workdir of a run)")
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise WorkdirError(f"{workdir} holds no run: {os.path.join(workdir, 'config.json')} does "
                       "not exist (give the --workdir a run was trained in)")
  try:
    config = load_workdir_config(workdir)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{os.path.join(workdir, 'config.json')} cannot be read: {e}") from e
  with config.unlocked():
    for k, v in config_lib.base_config().items():
      if k not in config:
        config[k] = v
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    raise WorkdirError(f"{ckpt_dir} holds no checkpoint to {what} (has the run in {workdir} "
                       "saved one?)")
  exp = make_experiment(config, load_teacher=False)
  mngr = checkpoint_manager(workdir, exp.config, create=False)
  try:
    latest = mngr.latest_step()
    state, _, step, skipped = restore_latest_valid(mngr, exp)
  finally:
    mngr.close()
  return exp, state, int(step), int(latest if latest is not None else step), skipped


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
    record = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.scalar(k, v, step)

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _to_py(v):
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


# ----------------------------------------------------------------------------- loop


class _Progress:
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


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:   # not the main thread: leave signals alone
      self._old = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def evaluate_state(exp: Experiment, eval_step: Callable, state: TrainState) -> dict:
  """Accuracy and loss over the whole eval split of the experiment's dataset."""
  c = exp.config
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  per_process = c.eval_batch_size // jax.process_count()
  for batch in data_lib.eval_iterator(
      c.data, batch_size=per_process, image_size=image_size_arg(c),
      data_dir=c.data_dir or None, process_index=jax.process_index(),
      process_count=jax.process_count()):
    out = eval_step(state, shard_batch(exp, batch))
    for k, v in jax.device_get(out).items():
      totals[k] += float(v)
  n = max(totals["count"], 1.0)
  return {"eval_accuracy": totals["correct"] / n, "eval_loss": totals["loss"] / n,
          "eval_examples": int(totals["count"])}


def shard_batch(exp: Experiment, batch: dict) -> dict:
  """The process-local numpy batch as global arrays split along the mesh's `data` axis."""
  return {k: jax.make_array_from_process_local_data(exp.data_sharding, v)
          for k, v in batch.items()}


def compile_steps(exp: Experiment) -> tuple[Callable, Callable]:
  train_step = jax.jit(
      make_train_step(exp.model, exp.tx, exp.transform, exp.schedule,
                      exp.config.label_smoothing, exp.distill),
      donate_argnums=(0,), out_shardings=(exp.replicated, exp.replicated))
  eval_step = jax.jit(make_eval_step(exp.model, exp.transform), out_shardings=exp.replicated)
  return train_step, eval_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the experiment of `config` in `workdir`; returns results.json's data.

  Everything that can be wrong with the config, the data or the workdir is
  checked before the first compile, and a failed start changes nothing in an
  existing workdir.
  """
  t_start = time.time()
  if config.get("distributed", False):
    jax.distributed.initialize()
  teacher_results = train_missing_teacher(config)
  if teacher_results and "interrupted_at_step" in teacher_results:
    return {**teacher_results, "teacher": str(config.teacher)}   # SIGTERM while training it
  ckpt_dir = os.path.join(workdir, "checkpoints")
  resuming = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
  init_vars = pruned = None
  if "structured" in config and config.structured.get("enabled", True):
    config, pruned = structured_prune(config, workdir, resuming)
    if pruned is not None:
      init_vars = pruned["variables"]
  exp = make_experiment(config)
  c = exp.config
  lead = jax.process_index() == 0
  if c.init_from and not resuming and init_vars is None:
    init_vars = load_init_variables(exp)   # bad init_from: stop before touching the workdir
  teacher_variables = load_teacher_variables(exp) if exp.distill is not None else None
  os.makedirs(workdir, exist_ok=True)
  had_run = check_workdir_config(c, workdir)

  mngr = checkpoint_manager(workdir, c)
  latest = mngr.latest_step()
  meta: dict = {}
  if latest is not None:
    state, meta = restore_state(mngr, latest, exp)
    logging.info("Resumed from %s at step %d", mngr.directory, latest)
  else:
    if had_run:
      logging.info("%s has a config.json but no checkpoint: starting from step 0", workdir)
    if c.init_from:
      params, batch_stats, message = init_vars or load_init_variables(exp)
      logging.info("%s", message)
      state = state_from_variables(exp, params, batch_stats)
      # The starting model as it was: no weight transform, no activation quantizers.
      float_model = exp.model
      if getattr(float_model, "act_quant", None) is not None:
        float_model = float_model.clone(act_quant=None)
      float_eval = evaluate_state(exp, jax.jit(make_eval_step(float_model,
                                                              transforms_lib.identity()),
                                               out_shardings=exp.replicated), state)
      meta["float_test_accuracy"] = float_eval["eval_accuracy"]
      source_results = os.path.join(c.init_from, "results.json")
      if exp.lowrank_plan is not None and os.path.exists(source_results):
        # The model evaluated above is already factorized: report the source's own accuracy
        # as the float one, and the factorized model before fine-tuning beside it.
        meta["init_test_accuracy"] = float_eval["eval_accuracy"]
        with open(source_results) as f:
          meta["float_test_accuracy"] = json.load(f)["test_accuracy"]
      if pruned is not None:   # likewise: the model above has already lost its filters
        meta["init_test_accuracy"] = float_eval["eval_accuracy"]
        meta["float_test_accuracy"] = pruned["float_test_accuracy"]
        meta["structured"] = pruned["report"]
      logging.info("init_from model before compression: eval_accuracy %.4f",
                   float_eval["eval_accuracy"])
    else:
      state = create_state(exp)
    if exp.transform.calibrate is not None:
      t0 = time.time()
      params, compression = exp.transform.calibrate(state.params, state.compression,
                                                    calibration_context(exp, state))
      state = jax.device_put(state.replace(params=params, compression=compression),
                             exp.replicated)
      logging.info("calibrated the compression transform in %.1f s", time.time() - t0)
  if lead and not had_run:
    write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(c))

  start = int(jax.device_get(state.step))
  wall_before = float(meta.get("wall_seconds", 0.0))
  logging.info("%s on %s: %d train / %d eval examples, image %s, %d classes; mesh %s",
               c.model, c.data, exp.info.train_size, exp.info.eval_size, exp.info.image_shape,
               exp.info.num_classes, dict(exp.mesh.shape))

  train_step, eval_step = compile_steps(exp)
  writer = MetricWriter(workdir, resume_step=latest, enabled=lead)
  progress = _Progress(start, c.total_steps, enabled=lead)
  batches: Iterator[dict] = data_lib.train_iterator(
      c.data, batch_size=c.batch_size // jax.process_count(), seed=c.seed, start_step=start,
      image_size=image_size_arg(c), augment=c.augment, data_dir=c.data_dir or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      train_examples=c.train_examples)

  def meta_now(step):
    return {**meta, "step": step, "wall_seconds": wall_before + time.time() - t_start}

  transform_metrics = (jax.jit(exp.transform.metrics) if exp.transform.metrics is not None
                       else None)

  pending: list[dict] = []
  eval_metrics: dict = {}
  step = start
  interrupted = False
  try:
    with _Preemption() as preempt:
      while step < c.total_steps:
        state, metrics = train_step(state, shard_batch(exp, next(batches)), teacher_variables)
        step += 1
        pending.append(metrics)
        if step % c.log_every == 0 or step == c.total_steps:
          stacked = jax.device_get(pending)
          logged = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
          logged["learning_rate"] = float(stacked[-1]["learning_rate"])
          if transform_metrics is not None:
            logged.update({k: float(v) for k, v in jax.device_get(
                transform_metrics(state.params, state.compression)).items()})
          pending = []
          writer.write(step, logged)
          progress.update(step, logged)
        else:
          progress.update(step)
        if (c.eval_every and step % c.eval_every == 0) or step == c.total_steps:
          eval_metrics = evaluate_state(exp, eval_step, state)
          writer.write(step, eval_metrics)
          logging.info("step %d: eval_accuracy %.4f, eval_loss %.4f", step,
                       eval_metrics["eval_accuracy"], eval_metrics["eval_loss"])
        if step % c.checkpoint_every == 0 or step == c.total_steps:
          save_state(mngr, state, meta_now(step))
        if preempt.requested and step < c.total_steps:
          save_state(mngr, state, meta_now(step))
          interrupted = True
          logging.warning("SIGTERM: saved a checkpoint at step %d; rerun the same command "
                          "to resume", step)
          break
  finally:
    mngr.wait_until_finished()
    progress.close()
    writer.close()

  if interrupted:
    return {"interrupted_at_step": step}
  if not eval_metrics:   # resumed at the end, or total_steps 0: nothing was trained here
    eval_metrics = evaluate_state(exp, eval_step, state)
    if latest is None and c.total_steps == 0:   # PTQ: keep the compressed state for analysis
      save_state(mngr, state, meta_now(step))
      mngr.wait_until_finished()
  results = summarize(exp, state, eval_metrics, wall_before + time.time() - t_start)
  for key in ("float_test_accuracy", "init_test_accuracy"):
    if key in meta:
      results[key] = meta[key]
  if "structured" in meta:   # sizes against the unpruned model; FLOPs before and after
    report = meta["structured"]
    results.update({k: report[k] for k in ("flops_before", "flops_ratio", "params_before",
                                           "params_ratio", "criterion")})
    results["flops"] = report["flops_after"]
    results["float_bytes"] = 4 * report["params_before"]
    results["compression_ratio"] = results["float_bytes"] / results["model_bytes"]
  if exp.lowrank_plan is not None:
    from jcompress import lowrank  # noqa: PLC0415
    results.update({f"lowrank_{k}": v for k, v in lowrank.plan_summary(exp.lowrank_plan).items()
                    if isinstance(v, (int, float, str))})
    # Sizes against the unfactorized float model the factorization started from.
    summary = lowrank.plan_summary(exp.lowrank_plan)
    results["float_bytes"] = 4 * (results["params"] + summary["original_params"]
                                  - summary["factorized_params"])
    results["compression_ratio"] = results["float_bytes"] / results["model_bytes"]
  if lead:
    write_json(os.path.join(workdir, "results.json"), results)
    logging.info("results: %s", json.dumps(results))
  mngr.close()
  return results


def packed_bnn_figures(exp: Experiment, state: TrainState) -> dict:
  """A BNN ResNet's frozen, packed artifact (`jcompress.bnn_infer.freeze`: signs 1 bit each,
  BatchNorm folded): its bytes (`model_bytes`), the binary layers' ratio to float32, and the
  test accuracy of the packed inference function, which must equal the latent model's."""
  from jcompress import bnn_infer  # noqa: PLC0415
  c = exp.config
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  frozen = bnn_infer.freeze(params, batch_stats, exp.model, method=c.binary.method,
                            include=tuple(c.binary.include), exclude=tuple(c.binary.exclude))
  sizes = bnn_infer.artifact_nbytes(frozen)
  runtime = bnn_infer.load(frozen, exp.model)
  correct = count = 0
  for batch in data_lib.eval_iterator(c.data, batch_size=c.eval_batch_size,
                                      image_size=image_size_arg(c),
                                      data_dir=c.data_dir or None):
    pred = np.argmax(np.asarray(bnn_infer.packed_apply(runtime, batch["image"])), -1)
    correct += int(np.sum((pred == batch["label"]) * batch["mask"]))
    count += int(np.sum(batch["mask"]))
  return {"model_bytes": int(sizes["total"]), "binary_ratio": float(sizes["binary_ratio"]),
          "binary_bits_per_weight": float(sizes["binary_bits_per_weight"]),
          "packed_test_accuracy": correct / max(count, 1)}


def summarize(exp: Experiment, state: TrainState, eval_metrics: dict, wall: float) -> dict:
  """results.json: accuracy, sizes in bytes and the compression ratio."""
  params = jax.device_get(state.params)
  n_params = models_lib.count_params(params)
  float_bytes = 4 * n_params
  # The bytes --mode=export writes (DIR/export/manifest.json + weights.bin): what the
  # compression stores (packed codes, bitmasks, packed signs, codebooks, scales; a float run:
  # its params), the BatchNorm statistics inference needs, and the manifest.
  from jcompress import export  # noqa: PLC0415
  model_bytes = export.artifact_nbytes(*export.artifact_arrays(exp, state))
  figures = {}
  c = exp.config
  if "binary" in c and c.model.startswith("bnn_"):
    figures.update(packed_bnn_figures(exp, state))
    figures.pop("model_bytes")   # the packed artifact's arrays alone; export adds the manifest
  if exp.transform.metrics is not None:
    figures.update({k: _to_py(v) for k, v in jax.device_get(
        exp.transform.metrics(state.params, state.compression)).items()})
  return {
      **figures,
      "test_accuracy": eval_metrics["eval_accuracy"],
      "test_loss": eval_metrics["eval_loss"],
      "test_examples": eval_metrics["eval_examples"],
      "params": n_params,
      "float_bytes": float_bytes,
      "model_bytes": model_bytes,
      "compression_ratio": float_bytes / model_bytes,
      "wall_seconds": round(wall, 2),
      "steps": int(jax.device_get(state.step)),
      "model": exp.config.model,
      "data": exp.config.data,
  }


def evaluate(config: ml_collections.ConfigDict | None, workdir: str) -> dict:
  """Evaluates the latest checkpoint of `workdir` on the eval split (--mode=eval)."""
  if config is None:
    config = load_workdir_config(workdir)
  exp = make_experiment(config)
  if not check_workdir_config(exp.config, workdir) and not os.path.isdir(
      os.path.join(workdir, "checkpoints")):
    raise WorkdirError(f"{workdir} holds no run: no config.json and no checkpoints")
  mngr = checkpoint_manager(workdir, exp.config, create=False)
  step = mngr.latest_step()
  if step is None:
    raise WorkdirError(f"{os.path.join(workdir, 'checkpoints')} holds no checkpoint to evaluate")
  state, _ = restore_state(mngr, step, exp)
  _, eval_step = compile_steps(exp)
  metrics = evaluate_state(exp, eval_step, state)
  metrics["step"] = step
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "eval.json"), metrics)
  mngr.close()
  return metrics
