"""Experiment building: what a config turns into before anything is compiled.

`make_experiment(config)` validates the config and each active compression method's
sub-config (`jcompress.methods.registry`), builds the model (rewritten by methods that change
its shape), the chained ParamTransform, the optimizer, the mesh and the abstract TrainState, and
the frozen teachers' models and loss where `config.teacher` names any. It also restores other
runs (`restore_run`: an `init_from` or a teacher), loads `init_from` weights, and hands the
methods' hooks the services they may ask for (`MethodContext`). No method is named here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any
from typing import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jcompress import checkpoint
from jcompress import config as config_lib
from jcompress import data as data_lib
from jcompress import evaluation
from jcompress import models as models_lib
from jcompress import optim
from jcompress import pretrained as pretrained_lib
from jcompress import state as state_lib
from jcompress import transforms as transforms_lib
from jcompress.distill import cross_entropy
from jcompress.errors import ConfigError
from jcompress.errors import WorkdirError
from jcompress.methods import base as methods_base
from jcompress.methods import registry

PyTree = Any
TrainState = state_lib.TrainState
image_size_arg = evaluation.image_size_arg


@dataclasses.dataclass
class Teachers:
  """The frozen teachers of `config.teacher` and the student's loss that uses them."""
  workdirs: tuple            # the teachers' workdirs (`teacher` may list several, comma-separated)
  experiments: list          # each teacher's Experiment, from its workdir's config.json
  models: list               # their Flax modules
  loss_fn: Callable          # (logits, feats, t_logits, t_feats, labels, aux, step)
                             #   -> (loss, parts)
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
  abstract_state: Any             # shapes, dtypes and shardings of the TrainState
  init_variables: Callable        # rng -> (params, batch_stats) of a fresh model
  teachers: Teachers | None = None
  plans: dict = dataclasses.field(default_factory=dict)   # method name -> its model rewrite's
                                                          # plan (`Method.rewrite_model`)

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


def build_transform(config, params) -> transforms_lib.ParamTransform:
  """The compression transform a config asks for: the `transform` of every active method
  (`jcompress.methods.registry`), chained in registry order. A config with none trains a float
  model. `params` may be abstract (shapes only): transforms select leaves by path and shape. A
  sub-config may set `enabled = False` to keep its keys but turn it off."""
  parts = [m.transform(config[m.name], params, config)
           for m in registry.with_hook(config, "transform")]
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
  for m in registry.active(config):
    if m.validate is not None:
      m.validate(m.sub_config(config), config)
  mesh = make_mesh(config.num_devices)
  n_dev = mesh.devices.size
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % n_dev:
      raise ConfigError(f"config key '{key}': {config[key]} is not divisible by the "
                        f"{n_dev} devices of the mesh")
    if config[key] % jax.process_count():
      raise ConfigError(f"config key '{key}': {config[key]} is not divisible by the "
                        f"{jax.process_count()} processes")
  # The model before the data: a bad model name or field is refused before TensorFlow starts.
  model = build_model(config, data_lib.dataset_defaults(config.data).num_classes)
  info = data_lib.dataset_info(config.data, image_size=image_size_arg(config),
                               data_dir=config.data_dir or None,
                               validation=config.eval_split == "validation")
  plans = {}
  for m in registry.with_hook(config, "rewrite_model"):
    model, plans[m.name] = m.rewrite_model(config, info, model, MethodContext())
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *info.image_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})

  abstract_params, _ = jax.eval_shape(init, jax.random.PRNGKey(0))
  transform = build_transform(config, abstract_params)
  for m in registry.METHODS:   # on or off: a BNN model without `binary` computes in float32
    if m.adjust_model is not None:
      model = m.adjust_model(config, model, abstract_params)
  teachers = None
  if load_teacher and config.get("teacher"):
    teachers = make_teachers(config, info, model, init)
  exp = Experiment(config, info, model, transform, schedule, tx, mesh, None, init, teachers,
                   plans)
  abstract = jax.eval_shape(functools.partial(state_lib.init_state, exp),
                            jax.random.PRNGKey(config.seed))
  exp.abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=exp.replicated), abstract)
  return exp


def make_teachers(config, info, model, init) -> Teachers:
  """The teachers named by `config.teacher` and the loss of the method that uses them.

  `teacher` lists, comma-separated, workdirs of runs or published weights ("keras:ResNet50",
  a torchvision .safetensors file; see `pretrained_teacher_config`).

  Reads each teacher's config.json and builds its model; checks classes, input shapes and
  the feature names the loss needs (the active methods' `make_loss`; one loss per run). Weights
  are restored later (`teacher.load_teacher_variables`).
  """
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
      tconfig = checkpoint.load_workdir_config(w)
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
  losses = registry.with_hook(config, "make_loss")
  if len(losses) != 1:
    raise ConfigError("config key 'teacher': teachers need exactly one method with a loss, the "
                      f"config turns on {[m.name for m in losses]}")
  ctx = methods_base.LossContext(s_feats, t_feats, info.num_classes,
                                 [t.info.num_classes for t in experiments],
                                 config.label_smoothing)
  loss = losses[0].make_loss(config, ctx)
  return Teachers(workdirs=workdirs, experiments=experiments,
                  models=[t.model for t in experiments], loss_fn=loss.fn,
                  init_aux=loss.init_aux)


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
    config = checkpoint.load_workdir_config(workdir)
  except WorkdirError as e:
    raise ConfigError(f"config key '{key}': {e}") from e
  with config.unlocked():
    for k, v in config_lib.base_config().items():
      if k not in config:
        config[k] = v
  exp = make_experiment(config, load_teacher=False)
  mngr = checkpoint.checkpoint_manager(workdir, config, create=False)
  try:
    step = mngr.latest_step()
    if step is None:
      raise ConfigError(f"config key '{key}': {os.path.join(workdir, 'checkpoints')} holds no "
                        "checkpoint (has that run saved one?)")
    try:
      state, _ = checkpoint.restore_state(mngr, step, exp)
    except (WorkdirError, ValueError) as e:   # an older TrainState layout
      state = _restore_as_stored(mngr, step, exp, e, key)
  finally:
    mngr.close()
  return exp, state


def _restore_as_stored(mngr, step: int, exp, error: Exception, key: str) -> state_lib.TrainState:
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


def _add_missing_quantizer_params(exp, params: PyTree) -> PyTree:
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


def load_init_variables(exp) -> tuple[PyTree, PyTree, str]:
  """(params, batch_stats, message) of `config.init_from`: a workdir's latest checkpoint (the
  latent params and BatchNorm statistics of that run), or pretrained weights
  (`jcompress.pretrained.load_pretrained`: "keras:ResNet50", a .safetensors file)."""
  spec = exp.config.init_from
  if not pretrained_lib.is_pretrained_spec(spec):
    src, state = restore_run(spec, "init_from")
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    message = f"init_from: weights of {spec} at step {int(state.step)} ({src.config.model})"
    for m in registry.with_hook(exp.config, "convert_init"):
      params, note = m.convert_init(exp, src, params)
      message += note
  else:
    params, batch_stats, message = pretrained_lib.load_pretrained(
        spec, exp.model, exp.info.num_classes, jax.random.PRNGKey(exp.config.seed))
  params = _add_missing_quantizer_params(exp, params)
  check_same_shapes(exp.abstract_state.params, params, "init_from", "init_from params")
  check_same_shapes(exp.abstract_state.batch_stats, batch_stats, "init_from",
                    "init_from batch_stats")
  return params, batch_stats, message


def calibration_context(exp, state: TrainState) -> transforms_lib.CalibrationContext:
  """Training batches and a loss for `ParamTransform.calibrate` (see transforms.py)."""
  c = exp.config
  it = data_lib.train_iterator(
      c.data, batch_size=c.batch_size // jax.process_count(), seed=c.seed + 7919, start_step=0,
      image_size=image_size_arg(c), augment=False, data_dir=c.data_dir or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      train_examples=c.train_examples, validation=c.eval_split == "validation")
  batches = [evaluation.shard_batch(exp, next(it)) for _ in range(c.calibration_batches)]
  model = exp.model

  def loss_fn(params, batch):
    (logits, _), _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                                 batch["image"], train=True, mutable=["batch_stats"])
    return cross_entropy(logits, batch["label"])

  return transforms_lib.CalibrationContext(model=model, batch_stats=state.batch_stats,
                                           batches=batches, loss_fn=loss_fn, config=c)


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
    config = checkpoint.load_workdir_config(workdir)
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
  mngr = checkpoint.checkpoint_manager(workdir, exp.config, create=False)
  try:
    latest = mngr.latest_step()
    state, _, step, skipped = checkpoint.restore_latest_valid(mngr, exp)
  finally:
    mngr.close()
  return exp, state, int(step), int(latest if latest is not None else step), skipped


class SourceModel(NamedTuple):
  """A trained model a method starts from (`MethodContext.load_source`)."""
  params: PyTree
  batch_stats: PyTree
  message: str               # where the weights came from
  float_accuracy: float      # its accuracy on the test split, as it is (a report)
  batches: list              # calibration batches (numpy), `config.calibration_batches` of them
  num_classes: int
  logits_fn: Callable | None = None   # (params, images) -> logits: the float model in eval
                                      # mode with `batch_stats`, differentiable in every mode


class MethodContext:
  """The services a method's hooks may ask of the trainer (`jcompress.methods.base`)."""

  def restore_params(self, workdir: str, key: str) -> PyTree:
    """The latent params of another run's latest checkpoint; errors name config `key`."""
    _, state = restore_run(workdir, key)
    return jax.device_get(state.params)

  def saved_config(self, workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir's run was started with."""
    return checkpoint.load_workdir_config(workdir)

  def load_source(self, config) -> SourceModel:
    """`config.init_from`'s model as `config` builds it: weights, eval accuracy, calibration
    batches."""
    src = make_experiment(config, load_teacher=False)
    params, batch_stats, message = load_init_variables(src)
    src_state = state_lib.state_from_variables(src, params, batch_stats)
    eval_step = jax.jit(evaluation.make_eval_step(src.model, transforms_lib.identity()),
                        out_shardings=src.replicated)
    accuracy = evaluation.evaluate_state(src, eval_step, src_state, "test")["eval_accuracy"]
    batches = jax.device_get(calibration_context(src, src_state).batches)
    params, batch_stats = jax.device_get((params, batch_stats))
    model = src.model
    if getattr(model, "act_quant", None) is not None:   # the float model: no act quantizers
      model = model.clone(act_quant=None)
    if "conv_impl" in {f.name for f in dataclasses.fields(model)}:
      model = model.clone(conv_impl="xla")   # XLA's convolution: forward mode too (jvp)

    def logits_fn(p, images):
      return model.apply({"params": p, "batch_stats": batch_stats}, images, train=False)[0]

    return SourceModel(params, batch_stats, message, accuracy, batches, src.info.num_classes,
                       logits_fn)

  def abstract_variables(self, config) -> tuple[PyTree, PyTree]:
    """The shapes (`jax.ShapeDtypeStruct` trees) of the params and batch_stats of `config`'s
    model; nothing compiled, no weights read."""
    exp = make_experiment(config, load_teacher=False)
    return exp.abstract_state.params, exp.abstract_state.batch_stats

  def artifact_bound(self, config, params: PyTree, batch_stats: PyTree) -> int:
    """The bytes (manifest.json + weights.bin, results.json's `model_bytes`) of the artifact
    of `config`'s run with weights shaped as `params` / `batch_stats`, at their longest: every
    checksum written with 10 digits and the step at `total_steps`. For encodings whose size
    does not depend on the weights' values (quantized codes, float leaves) it bounds the
    artifact of any weights of these shapes; a sparse encoding's size follows the values."""
    from jcompress import artifact  # noqa: PLC0415  (the export layer, for its byte count)

    exp = make_experiment(config, load_teacher=False)
    state = state_lib.state_from_variables(exp, params, batch_stats)
    arrays, manifest = artifact.artifact_arrays(exp, state)
    manifest = {**manifest, "step": max(int(manifest.get("step", 0)), int(config.total_steps))}
    if "tensors" in manifest:
      crc = artifact.TENSOR_FIELDS.index("crc32")
      manifest["tensors"] = {k: [*v[:crc], 0xFFFFFFFF, *v[crc + 1:]]
                             for k, v in manifest["tensors"].items()}
    return artifact.artifact_nbytes(arrays, manifest)
