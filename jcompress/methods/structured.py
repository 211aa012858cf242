"""Structured pruning with physical removal (`structured` sub-config): filters of a trained
model removed to a FLOPs target before fine-tuning; the math is `jcompress.structured`."""

from __future__ import annotations

from absl import logging

from jcompress import structured
from jcompress.errors import ConfigError
from jcompress.methods.base import Method
from jcompress.methods.base import Prepared

#: The report's figures that go into results.json (besides `flops`).
_REPORTED = ("flops_before", "flops_ratio", "params_before", "params_ratio", "criterion")
#: Model fields besides a CNN's `channels` that hold pruned widths (a ViT's `structured_fields`).
_WIDTH_FIELDS = ("heads", "mlp_dims")


def prepare(config, workdir: str, resuming: bool, ctx):
  """A fresh run prunes the filters of its `init_from` model to `structured.flops_target` and
  returns `(config with model_kwargs.channels, Prepared)` (a ViT: `model_kwargs.heads` and
  `mlp_dims`): the run then fine-tunes the smaller model. A resumed run takes the pruned widths
  from its workdir's config.json and returns `(config, None)`."""
  if resuming:
    saved = ctx.saved_config(workdir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      for field in ("channels", *_WIDTH_FIELDS):
        if saved.model_kwargs.get(field) is not None:
          config.model_kwargs[field] = saved.model_kwargs.get(field)
    return config, None
  if not config.init_from:
    raise ConfigError("config key 'init_from': structured pruning removes the filters of a "
                      "trained model; set init_from to the workdir of a float run")
  src = ctx.load_source(config)
  new_config, params, batch_stats, report = structured.apply_to_config(
      config, src.params, src.batch_stats, src.batches, num_classes=src.num_classes)
  report = {k: v for k, v in report.items() if k != "group_widths"}
  logging.info("structured pruning: FLOPs %d -> %d (%.3f), params %d -> %d", report["flops_before"],
               report["flops_after"], report["flops_ratio"], report["params_before"],
               report["params_after"])
  return new_config, Prepared(variables=(params, batch_stats, src.message + "; pruned"),
                              meta={"float_test_accuracy": src.float_accuracy,
                                    METHOD.name: report})


def results(exp, state, res, meta) -> dict:
  """FLOPs before and after, and sizes against the unpruned model."""
  del exp, state, res
  report = meta.get(METHOD.name)
  if report is None:
    return {}
  out = {k: report[k] for k in _REPORTED}
  out["flops"] = report["flops_after"]
  out["float_bytes"] = 4 * report["params_before"]
  return out


METHOD = Method(
    name="structured",
    summary="filters and channels physically removed to a FLOPs target (L1, BN, Taylor)",
    default_config=structured.default_config,
    prepare=prepare,
    results=results,
)

