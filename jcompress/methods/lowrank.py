"""Low-rank factorization (`lowrank` sub-config): the model rewritten with factorized layers
(`jcompress.lowrank.Factorized` and its plan), the float weights split by SVD at `init_from`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from jcompress import lowrank
from jcompress.errors import ConfigError
from jcompress.methods.base import Method


def validate(sub, config) -> None:
  lowrank.validate_lowrank(sub)
  if config.get("model_kwargs", {}).get("binary_compute") in ("bf16", "int8", "xnor"):
    raise ConfigError("config key 'model_kwargs.binary_compute': the narrow forward needs the "
                      "binary block convolutions, which `lowrank` factorizes; leave it unset")


def rewrite_model(config, info, model, ctx):
  """The factorized model and its plan. Ranks from `rank` or `param_fraction` follow from
  shapes alone; ranks from `energy` need the weights, those of `init_from` (the same weights on
  every resumption, so the same plan)."""
  x = jnp.zeros((1, *info.image_shape), jnp.float32)
  params = jax.eval_shape(lambda r: model.init(r, x, train=False)["params"],
                          jax.random.PRNGKey(0))
  if config.lowrank.get("energy", 0.0):
    if not config.init_from or config.init_from.startswith("keras:") or (
        config.init_from.endswith(".safetensors")):
      raise ConfigError("config key 'lowrank.energy': ranks by spectral energy need trained "
                        "weights: set init_from to the workdir of a trained run")
    params = ctx.restore_params(config.init_from, "init_from")
  plan = lowrank.make_plan(params, config.lowrank)
  return lowrank.Factorized(model, plan), plan


def convert_init(exp, source, params):
  """A float run's params factorized to the plan (a source already factorized: unchanged)."""
  plan = exp.plans.get(METHOD.name)
  if plan is None or source.plans.get(METHOD.name) is not None:
    return params, ""
  return lowrank.factorize_params(params, plan), f"; factorized {len(plan)} layers (lowrank)"


def results(exp, state, res, meta) -> dict:
  """The plan's summary (`lowrank_*`), and sizes against the unfactorized float model."""
  del state, meta
  summary = lowrank.plan_summary(exp.plans[METHOD.name])
  out = {f"lowrank_{k}": v for k, v in summary.items() if isinstance(v, (int, float, str))}
  out["float_bytes"] = 4 * (res["params"] + summary["original_params"]
                            - summary["factorized_params"])
  return out


def model_spec(exp) -> dict:
  return {"lowrank_plan": json.loads(lowrank.plan_to_json(exp.plans[METHOD.name]))}


def rebuild_model(spec: dict, model):
  if spec.get("lowrank_plan") is None:
    return model
  return lowrank.Factorized(model, lowrank.plan_from_json(json.dumps(spec["lowrank_plan"])))


METHOD = Method(
    name="lowrank",
    summary="layers factorized into low-rank products (SVD, spatial, Tucker-2)",
    default_config=lowrank.default_config,
    validate=validate,
    transform=lowrank.transform_from_config,
    rewrite_model=rewrite_model,
    convert_init=convert_init,
    results=results,
    model_spec=model_spec,
    rebuild_model=rebuild_model,
)
