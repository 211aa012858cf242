"""`Method`: everything the rest of jcompress needs to know about one compression method.

A method module (`jcompress/methods/<name>.py`) defines one `METHOD = Method(...)`; the
registry (`jcompress.methods.registry`) lists the modules. The trainer, export, analysis and
sweep code loop over the registered methods and call the hooks below; none of them names a
method. Every hook is optional except `name` and `summary`, and a method has at least one of
`transform`, `rewrite_model`, `prepare` and `make_loss` (what it does to a run).

Hooks receive the run's objects duck-typed (an `Experiment` has `.config`, `.info`, `.model`,
`.transform`, `.plans`; a `TrainState` has `.params`, `.batch_stats`, `.compression`, `.step`),
so method modules never import the trainer. Where a hook needs the trainer's services (restore
another run, evaluate a model), it gets them through a `ctx` argument (`experiment.MethodContext`).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import NamedTuple

#: What a method must do to a run: at least one of these hooks.
ACTIONS = ("transform", "rewrite_model", "prepare", "make_loss")


class Prepared(NamedTuple):
  """What a `prepare` hook hands to the run it prepared (see `Method.prepare`)."""
  variables: tuple        # (params, batch_stats, message): the run's starting weights
  meta: dict              # kept with the checkpoints; `float_test_accuracy` and the method's
                          # own report, read back by its `results` hook


class Loss(NamedTuple):
  """A training loss a method contributes when the run has teachers (`Method.make_loss`)."""
  fn: Callable            # (logits, feats, teacher_logits, teacher_feats, labels, aux, step)
                          #   -> (loss, metrics)
  init_aux: Callable      # rng -> the loss's own trained params ({} for most losses)


@dataclasses.dataclass(frozen=True)
class Method:
  """One compression method (see the module docstring).

  Attributes:
    name: the config sub-config key that turns it on (`quant`, `prune`, ...).
    summary: one line saying what it does.
    default_config: () -> its sub-config with defaults.
    validate: (sub_config, config) -> None; ConfigError naming the key. Called by
      `experiment.make_experiment` before anything is compiled.
    is_active: (config) -> bool; default: the sub-config is present and not `enabled=False`.
    transform: (sub_config, params_like, config) -> ParamTransform acting during training
      (chained in registry order).
    rewrite_model: (config, info, model, ctx) -> (model, plan): a model of another shape (a
      factorized one); `plan` is kept in `Experiment.plans[name]`.
    adjust_model: (config, model, abstract_params) -> model: fields resolved once the params'
      shapes are known (the BNN's compute). Called whether the method is on or off (a model
      field may depend on the method being off).
    convert_init: (exp, source_exp, params) -> (params, message suffix): an `init_from` run's
      params brought to this method's model (factorized), or None to leave them.
    prepare: (config, workdir, resuming, ctx) -> (config, Prepared | None): work before the
      experiment is built (structured pruning removes filters and returns the smaller model's
      config and weights). A resumed run gets `resuming=True` and returns `(config, None)`.
    make_loss: (config, LossContext) -> Loss, for runs with teachers (`config.teacher`).
    results: (exp, state, results, meta) -> dict of figures added to results.json (may
      replace `float_bytes`; the caller recomputes `compression_ratio`).
    model_spec: (exp) -> dict added to the exported manifest's "model" entry.
    rebuild_model: (model_spec, model) -> model: the module an artifact describes.
    artifact: (exp, state) -> (arrays, layout, kind) or None: the method's own artifact layout
      instead of the per-leaf one (a packed BNN).
    artifact_apply: (manifest) -> apply(arrays, images) or None, for artifacts of its kind.
    artifact_check: (manifest, arrays, model) -> None for artifacts not of its kind, else an
      error string, empty when the artifact fits `model`.
  """
  name: str
  summary: str
  default_config: Callable | None = None
  validate: Callable | None = None
  is_active: Callable | None = None
  transform: Callable | None = None
  rewrite_model: Callable | None = None
  adjust_model: Callable | None = None
  convert_init: Callable | None = None
  prepare: Callable | None = None
  make_loss: Callable | None = None
  results: Callable | None = None
  model_spec: Callable | None = None
  rebuild_model: Callable | None = None
  artifact: Callable | None = None
  artifact_apply: Callable | None = None
  artifact_check: Callable | None = None

  def active(self, config: Any) -> bool:
    """Whether `config` turns this method on."""
    if self.is_active is not None:
      return bool(self.is_active(config))
    return self.name in config and bool(config[self.name].get("enabled", True))

  def sub_config(self, config: Any) -> Any:
    """The method's sub-config in `config`, or its defaults when the config has none."""
    if self.name in config:
      return config[self.name]
    return self.default_config() if self.default_config is not None else None


class LossContext(NamedTuple):
  """What `Method.make_loss` may look at: the models' feature shapes and classes."""
  student_features: dict      # name -> ShapeDtypeStruct
  teacher_features: dict
  num_classes: int
  teacher_num_classes: list   # one per teacher
  label_smoothing: float
