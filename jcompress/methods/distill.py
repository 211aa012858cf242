"""Knowledge distillation (`distill` sub-config, on when `teacher` names one or more teachers):
the student's loss mixes the hard labels with the frozen teachers' outputs
(`jcompress.distill`: KD, TF-KD, logit MSE, FitNets, DKD, DeiT's hard distillation through a
ViT's distillation token). Loading the teachers is the trainer's (`jcompress.teacher`); this
module turns their shapes into the loss."""

from __future__ import annotations

import functools

from jcompress import distill
from jcompress.errors import ConfigError
from jcompress.methods.base import Loss
from jcompress.methods.base import Method


def _cfg(config):
  cfg = distill.default_config()
  if "distill" in config:
    cfg.update(dict(config.distill))
  return cfg


def validate(sub, config) -> None:
  distill.validate_distill(sub)
  if config.get("mixup", 0.0) and sub.get("loss") == "dkd":
    raise ConfigError("config key 'mixup': distill.loss 'dkd' needs one target class per image "
                      "and a mixup image has two; set mixup=0 or another distill.loss")


def make_loss(config, ctx) -> Loss:
  """The `distill` sub-config's loss, checked against the models' features and classes."""
  cfg = _cfg(config)
  for classes in ctx.teacher_num_classes:
    distill.validate_distill(cfg, list(ctx.student_features), list(ctx.teacher_features),
                             ctx.num_classes, classes)
  return Loss(fn=distill.make_distill_loss(cfg, ctx.label_smoothing),
              init_aux=functools.partial(distill.init_aux, cfg, ctx.student_features,
                                         ctx.teacher_features))


METHOD = Method(
    name="distill",
    summary="student trained on frozen teachers' outputs (KD, TF-KD, MSE, FitNets, DKD, DeiT)",
    default_config=distill.default_config,
    validate=validate,
    is_active=lambda config: bool(config.get("teacher")),
    make_loss=make_loss,
)
