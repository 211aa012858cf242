"""The TrainState (everything a run checkpoints) and how a run's first state is made."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


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


def init_aux(exp, rng: jax.Array) -> tuple[PyTree, PyTree]:
  """(aux params, their optimizer state) of the loss: FitNets' regressor, or ({}, {})."""
  if exp.teachers is None:
    return {}, {}
  aux = exp.teachers.init_aux(jax.random.fold_in(rng, 0x6b64))
  return aux, (exp.tx.init(aux) if jax.tree.leaves(aux) else {})


def init_state(exp, rng: jax.Array) -> TrainState:
  init_rng, comp_rng, step_rng = jax.random.split(rng, 3)
  params, batch_stats = exp.init_variables(init_rng)
  aux, aux_opt_state = init_aux(exp, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=exp.tx.init(params),
                    compression=exp.transform.init(params, comp_rng), rng=step_rng,
                    aux=aux, aux_opt_state=aux_opt_state)


def create_state(exp) -> TrainState:
  """A fresh TrainState from `config.seed`, replicated over the mesh."""
  fn = jax.jit(functools.partial(init_state, exp), out_shardings=exp.replicated)
  return fn(jax.random.PRNGKey(exp.config.seed))


def state_from_variables(exp, params: PyTree, batch_stats: PyTree) -> TrainState:
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
