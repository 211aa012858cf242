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

The rest of a run lives beside this module: `experiment` (what a config builds), `state` (the
TrainState), `checkpoint` (orbax), `metrics` (metrics.jsonl, TensorBoard, progress), `teacher`
(the teachers' weights), `evaluation` (the eval step), `optim`. Compression methods reach the
loop only through the hooks of `jcompress.methods.registry`; none is named here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jcompress import artifact
from jcompress import checkpoint
from jcompress import config as config_lib
from jcompress import data as data_lib
from jcompress import evaluation
from jcompress import experiment
from jcompress import metrics as metrics_lib
from jcompress import models as models_lib
from jcompress import teacher as teacher_lib
from jcompress import transforms as transforms_lib
from jcompress.distill import cross_entropy
from jcompress.errors import ConfigError
from jcompress.errors import WorkdirError
from jcompress.experiment import Experiment
from jcompress.experiment import make_experiment
from jcompress.experiment import restore_run
from jcompress.methods import registry
from jcompress.state import TrainState
from jcompress.state import create_state
from jcompress.state import state_from_variables

__all__ = ["Experiment", "TrainState", "make_experiment", "make_train_step", "restore_run",
           "train_and_evaluate", "evaluate", "create_state"]


def mixup_images(rng: jax.Array, images: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al. 2018): `(ratio, ratio * x + (1 - ratio) * x')` with one ratio ~
  Beta(alpha, alpha) for the batch and x' each image's batch neighbour (the batch rolled by
  one, as big_vision's mixup)."""
  ratio = jax.random.beta(rng, alpha, alpha).astype(images.dtype)
  return ratio, ratio * images + (1 - ratio) * jnp.roll(images, 1, axis=0)


def mixup_labels(labels: jax.Array, num_classes: int, ratio: jax.Array) -> jax.Array:
  """The class distributions `(B, num_classes)` of a batch mixed by `mixup_images`."""
  onehot = jax.nn.one_hot(labels, num_classes)
  return ratio * onehot + (1 - ratio) * jnp.roll(onehot, 1, axis=0)


def make_train_step(model, tx: optax.GradientTransformation,
                    transform: transforms_lib.ParamTransform,
                    schedule: optax.Schedule, label_smoothing: float = 0.0,
                    teachers: experiment.Teachers | None = None,
                    mixup: float = 0.0) -> Callable:
  """`train_step(state, batch, teacher_variables=None) -> (state, metrics)`, to be jit-compiled.

  With `teachers`, the frozen teachers run forward (eval mode, outside the differentiated
  function, so no backward pass of theirs is computed) on the same augmented batch, and the
  loss is `teachers.loss_fn`'s mixture of the hard-label and distillation terms.
  `teacher_variables` is the list of the teachers' `{"params", "batch_stats"}`.
  With `mixup > 0` the batch is mixed first (`mixup_images`, `mixup_labels`): the student, the
  teachers and the hard-label terms all see the mixed images and labels (with teachers, Beyer
  et al.'s "function matching").
  """

  def train_step(state: TrainState, batch: dict,
                 teacher_variables: list | None = None) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    images, ratio = batch["image"], None
    if mixup:
      ratio, images = mixup_images(jax.random.fold_in(step_rng, 1), images, mixup)
    teacher_out = None
    if teachers is not None:
      outs = [m.apply(v, images, train=False)
              for m, v in zip(teachers.models, teacher_variables)]
      t_logits = sum(o[0] for o in outs) / len(outs)    # several teachers: mean logits
      teacher_out = jax.lax.stop_gradient((t_logits, outs[0][1]))

    def loss_fn(params, aux):
      eff = transform.apply(params, state.compression)
      (logits, feats), mutated = model.apply(
          {"params": eff, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": step_rng})
      labels = batch["label"]
      if ratio is not None:
        labels = mixup_labels(labels, logits.shape[-1], ratio)
      if teacher_out is None:
        loss, parts = cross_entropy(logits, labels, label_smoothing), {}
      else:
        loss, parts = teachers.loss_fn(logits, feats, *teacher_out, labels, aux, state.step)
      # A model without BatchNorm (a ViT) has no batch_stats to update.
      return loss, (logits, mutated.get("batch_stats", state.batch_stats), parts)

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


class Preemption:
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


def compile_steps(exp: Experiment) -> tuple[Callable, Callable]:
  train_step = jax.jit(
      make_train_step(exp.model, exp.tx, exp.transform, exp.schedule,
                      exp.config.label_smoothing, exp.teachers, exp.config.mixup),
      donate_argnums=(0,), out_shardings=(exp.replicated, exp.replicated))
  eval_step = jax.jit(evaluation.make_eval_step(exp.model, exp.transform),
                      out_shardings=exp.replicated)
  return train_step, eval_step


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


def _source_accuracy(init_from: str) -> float | None:
  """The test accuracy `init_from`'s own run reported (its results.json), if any."""
  path = os.path.join(init_from, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("test_accuracy")


def _start_from_init(exp: Experiment, init_vars, prepared) -> tuple[TrainState, dict]:
  """A step-0 state from `init_from` (or a method's prepared weights), and the meta that
  reports the starting model's accuracy: `float_test_accuracy` (the uncompressed model's) and,
  where a method changed the model before training (`rewrite_model`, `prepare`),
  `init_test_accuracy` (that changed model's before fine-tuning)."""
  params, batch_stats, message = init_vars or experiment.load_init_variables(exp)
  logging.info("%s", message)
  state = state_from_variables(exp, params, batch_stats)
  # The starting model as it was: no weight transform, no activation quantizers.
  float_model = exp.model
  if getattr(float_model, "act_quant", None) is not None:
    float_model = float_model.clone(act_quant=None)
  eval_step = jax.jit(evaluation.make_eval_step(float_model, transforms_lib.identity()),
                      out_shardings=exp.replicated)
  accuracy = evaluation.evaluate_state(exp, eval_step, state, "test")["eval_accuracy"]
  meta = {"float_test_accuracy": accuracy}
  if prepared is not None or exp.plans:   # the model above is already compressed
    source = (prepared.meta.get("float_test_accuracy") if prepared is not None
              else _source_accuracy(exp.config.init_from))
    if source is not None:
      meta.update(init_test_accuracy=accuracy, float_test_accuracy=source)
  if prepared is not None:
    meta.update({k: v for k, v in prepared.meta.items() if k != "float_test_accuracy"})
  logging.info("init_from model before compression: test accuracy %.4f", accuracy)
  return state, meta


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
  init_vars = prepared = None
  for m in registry.with_hook(config, "prepare"):
    config, prepared = m.prepare(config, workdir, resuming, experiment.MethodContext())
    if prepared is not None:
      init_vars = prepared.variables
  exp = make_experiment(config)
  c = exp.config
  lead = jax.process_index() == 0
  if c.init_from and not resuming and init_vars is None:
    init_vars = experiment.load_init_variables(exp)   # bad init_from: stop before the workdir
  teacher_variables = (teacher_lib.load_teacher_variables(exp) if exp.teachers is not None
                       else None)
  os.makedirs(workdir, exist_ok=True)
  had_run = checkpoint.check_workdir_config(c, workdir)

  mngr = checkpoint.checkpoint_manager(workdir, c)
  latest = mngr.latest_step()
  meta: dict = {}
  if latest is not None:
    state, meta = checkpoint.restore_state(mngr, latest, exp)
    logging.info("Resumed from %s at step %d", mngr.directory, latest)
  else:
    if had_run:
      logging.info("%s has a config.json but no checkpoint: starting from step 0", workdir)
    if c.init_from:
      state, meta = _start_from_init(exp, init_vars, prepared)
    else:
      state = create_state(exp)
    if exp.transform.calibrate is not None:
      t0 = time.time()
      params, compression = exp.transform.calibrate(
          state.params, state.compression, experiment.calibration_context(exp, state))
      state = jax.device_put(state.replace(params=params, compression=compression),
                             exp.replicated)
      logging.info("calibrated the compression transform in %.1f s", time.time() - t0)
  if lead and not had_run:
    metrics_lib.write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(c))

  start = int(jax.device_get(state.step))
  wall_before = float(meta.get("wall_seconds", 0.0))
  logging.info("%s on %s: %d train / %d eval (%s) / %d test examples, image %s, %d classes; "
               "mesh %s", c.model, c.data, exp.info.train_size, exp.info.eval_size,
               exp.info.eval_split, exp.info.test_size, exp.info.image_shape,
               exp.info.num_classes, dict(exp.mesh.shape))

  train_step, eval_step = compile_steps(exp)
  writer = metrics_lib.MetricWriter(workdir, resume_step=latest, enabled=lead)
  progress = metrics_lib.Progress(start, c.total_steps, enabled=lead)
  batches: Iterator[dict] = data_lib.train_iterator(
      c.data, batch_size=c.batch_size // jax.process_count(), seed=c.seed, start_step=start,
      image_size=evaluation.image_size_arg(c), augment=c.augment, data_dir=c.data_dir or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      train_examples=c.train_examples, validation=c.eval_split == "validation")

  def meta_now(step):
    return {**meta, "step": step, "wall_seconds": wall_before + time.time() - t_start}

  transform_metrics = (jax.jit(exp.transform.metrics) if exp.transform.metrics is not None
                       else None)

  pending: list[dict] = []
  eval_metrics: dict = {}
  step = start
  interrupted = False
  try:
    with Preemption() as preempt:
      while step < c.total_steps:
        state, metrics = train_step(state, evaluation.shard_batch(exp, next(batches)),
                                    teacher_variables)
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
          eval_metrics = evaluation.evaluate_state(exp, eval_step, state)
          writer.write(step, eval_metrics)
          logging.info("step %d: eval_accuracy %.4f, eval_loss %.4f", step,
                       eval_metrics["eval_accuracy"], eval_metrics["eval_loss"])
        if step % c.checkpoint_every == 0 or step == c.total_steps:
          checkpoint.save_state(mngr, state, meta_now(step))
        if preempt.requested and step < c.total_steps:
          checkpoint.save_state(mngr, state, meta_now(step))
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
    eval_metrics = evaluation.evaluate_state(exp, eval_step, state)
    if latest is None and c.total_steps == 0:   # PTQ: keep the compressed state for analysis
      checkpoint.save_state(mngr, state, meta_now(step))
      mngr.wait_until_finished()
  test_metrics = eval_metrics
  if c.eval_split == "validation":   # the test split: read once, here
    test_metrics = evaluation.evaluate_state(exp, eval_step, state, "test")
    logging.info("step %d: test accuracy %.4f (validation %.4f)", step,
                 test_metrics["eval_accuracy"], eval_metrics["eval_accuracy"])
  results = summarize(exp, state, test_metrics, wall_before + time.time() - t_start, meta,
                      val_metrics=eval_metrics if c.eval_split == "validation" else None)
  if lead:
    metrics_lib.write_json(os.path.join(workdir, "results.json"), results)
    logging.info("results: %s", json.dumps(results))
  mngr.close()
  return results


def summarize(exp: Experiment, state: TrainState, eval_metrics: dict, wall: float,
              meta: dict | None = None, val_metrics: dict | None = None) -> dict:
  """results.json: accuracy, sizes in bytes, the compression ratio, and each active method's
  figures (`Method.results`; the transform's `metrics`). `model_bytes` is what --mode=export
  writes (manifest.json + weights.bin: `artifact.artifact_nbytes`); `float_bytes` the float32
  model the compression started from (a method that changed the model's shape says which).
  `eval_metrics` are the test split's; `val_metrics` the validation split's, if any."""
  meta = meta or {}
  params = jax.device_get(state.params)
  n_params = models_lib.count_params(params)
  figures = {}
  if exp.transform.metrics is not None:
    figures.update({k: metrics_lib.to_py(v) for k, v in jax.device_get(
        exp.transform.metrics(state.params, state.compression)).items()})
  results = {
      **figures,
      "test_accuracy": eval_metrics["eval_accuracy"],
      "test_loss": eval_metrics["eval_loss"],
      "test_examples": eval_metrics["eval_examples"],
      **({"val_accuracy": val_metrics["eval_accuracy"], "val_loss": val_metrics["eval_loss"],
          "val_examples": val_metrics["eval_examples"]} if val_metrics else {}),
      "eval_split": exp.config.eval_split,
      "params": n_params,
      "float_bytes": 4 * n_params,
      "model_bytes": artifact.artifact_nbytes(*artifact.artifact_arrays(exp, state)),
      "wall_seconds": round(wall, 2),
      "steps": int(jax.device_get(state.step)),
      "model": exp.config.model,
      "data": exp.config.data,
  }
  for key in ("float_test_accuracy", "init_test_accuracy"):
    if key in meta:
      results[key] = meta[key]
  for m in registry.with_hook(exp.config, "results"):
    results.update(m.results(exp, state, results, meta))
  results["compression_ratio"] = results["float_bytes"] / results["model_bytes"]
  return results


def evaluate(config: ml_collections.ConfigDict | None, workdir: str) -> dict:
  """Evaluates the latest checkpoint of `workdir` (--mode=eval): `eval_accuracy` on the split
  evaluated while training (validation, or test with `eval_split="test"`), `test_accuracy` on
  the test split; written to DIR/eval.json."""
  if config is None:
    config = checkpoint.load_workdir_config(workdir)
  exp = make_experiment(config)
  if not checkpoint.check_workdir_config(exp.config, workdir) and not os.path.isdir(
      os.path.join(workdir, "checkpoints")):
    raise WorkdirError(f"{workdir} holds no run: no config.json and no checkpoints")
  mngr = checkpoint.checkpoint_manager(workdir, exp.config, create=False)
  step = mngr.latest_step()
  if step is None:
    raise WorkdirError(f"{os.path.join(workdir, 'checkpoints')} holds no checkpoint to evaluate")
  state, _ = checkpoint.restore_state(mngr, step, exp)
  _, eval_step = compile_steps(exp)
  metrics = evaluation.evaluate_state(exp, eval_step, state)
  test = (evaluation.evaluate_state(exp, eval_step, state, "test")
          if exp.config.eval_split == "validation" else metrics)
  metrics.update(test_accuracy=test["eval_accuracy"], test_loss=test["eval_loss"],
                 test_examples=test["eval_examples"], eval_split=exp.config.eval_split,
                 step=step)
  if jax.process_index() == 0:
    metrics_lib.write_json(os.path.join(workdir, "eval.json"), metrics)
  mngr.close()
  return metrics
