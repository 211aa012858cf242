"""The optimizer and the learning-rate schedule of a config (optax)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import optax

from jcompress.errors import ConfigError

PyTree = Any


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
