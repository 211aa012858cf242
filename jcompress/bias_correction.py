r"""Empirical bias correction of quantized weights (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019, section 4.2, its empirical form).

Quantizing a layer's weights W -> W~ shifts the mean of its output: E[W~ x] != E[W x]. The shift
per output channel,

  delta = E[W~ x~] - E[W x]       (the mean over the calibration images and positions)

is estimated on calibration data and subtracted from the layer's output through a parameter
that already adds a constant per channel, so the corrected model computes exactly
`f(W~; x~) - delta` there:

* the layer's own bias:            b  <- b - delta
* else the BatchNorm right after:  beta <- beta - gamma * delta / sqrt(var + eps)
  (eval mode: BN(z - delta) = gamma (z - delta - mu) / sqrt(var + eps) + beta). The running
  mean would do as well (mu <- mu + delta); beta keeps the correction among the params, which
  is what a transform's `calibrate` returns.

Which inputs: x~ is the layer's input in the QUANTIZED model with every earlier layer already
corrected (the layers are corrected in forward order, in one pass: at each quantized layer the
pass measures the shift of the whole calibration batch and removes it before going on), and
E[W x] is the FLOAT model's output mean. So delta also removes the mean shift that the earlier
layers' errors carry into this one, and after correction the mean output of every corrected
layer over the calibration images equals the float model's (up to float32 rounding). The
paper's analytic form (E[x] from BatchNorm statistics) needs no data; the empirical one works
for any layer and any weight quantizer (uniform, k-means, power-of-two): it only compares the
quantized model's outputs with the float ones.

Any model whose quantized layers are `nn.Conv` / `nn.Dense` with a bias or with a BatchNorm
that takes their output as it is; a layer with neither is a ConfigError naming the layer
(before anything is computed). The BatchNorm must be the only reader of the layer's output
(true of every model in jcompress; a second reader would see the uncorrected output).
"""

from __future__ import annotations

from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress import adaround
from jcompress.errors import ConfigError

PyTree = Any


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _channel_mean(y: jax.Array) -> jax.Array:
  y = jnp.asarray(y, jnp.float32)
  return jnp.mean(y.reshape(-1, y.shape[-1]), axis=0)


def plan(model: nn.Module, params: PyTree, batch_stats: PyTree, images: jax.Array,
         layers: Sequence[str], key: str = "quant.bias_correction") -> dict[str, tuple]:
  """{layer path: ("bias", path) or ("bn", bn path, epsilon)}: where each layer's correction
  goes. `layers`: module paths ("stage1_block0/conv1") of Conv / Dense layers. ConfigError
  naming `key` and the layer when a layer is not called, or has neither a bias nor a BatchNorm
  right after it."""
  if not layers:
    raise ConfigError(f"config key '{key}': no quantized layer to correct (quant.include / "
                      "quant.exclude select none, or quant.method is 'none')")
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}
  calls = adaround.trace_calls(model, {"params": params, **extra}, images[:1])
  index = {c.path: i for i, c in enumerate(calls) if c.kind in ("conv", "dense")}
  out = {}
  for layer in layers:
    if layer not in index:
      raise ConfigError(f"config key '{key}': layer '{layer}' is not an nn.Conv or nn.Dense "
                        "called in the model's forward pass")
    i = index[layer]
    node = _get(params, layer)
    if "bias" in node:
      out[layer] = ("bias", layer)
      continue
    bn = next((c for c in calls[i + 1:] if c.kind == "bn" and c.source == i), None)
    if bn is None:
      raise ConfigError(f"config key '{key}': layer '{layer}' has no bias and no BatchNorm "
                        "right after it to absorb the correction")
    bn_node = _get(params, bn.path)
    if "bias" not in bn_node or "scale" not in bn_node:
      raise ConfigError(f"config key '{key}': layer '{layer}': its BatchNorm '{bn.path}' has "
                        "no scale and bias to absorb the correction")
    out[layer] = ("bn", bn.path, float(bn.module.epsilon))
  return out


def _output_means(model, variables, images, layers, float_means=None):
  """{layer: mean output per channel} of a forward pass; with `float_means`, each layer's
  output is corrected to those means as the pass goes (what the corrected model computes)."""
  wanted = set(layers)
  means = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
      path = "/".join(str(p) for p in mod.scope.path)
      if path in wanted:
        mu = _channel_mean(out)
        if float_means is not None:
          delta = mu - float_means[path]
          means[path] = delta
          out = (out - delta).astype(out.dtype)
        else:
          means[path] = mu
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  return means


def correct(model: nn.Module, float_params: PyTree, quant_params: PyTree, batch_stats: PyTree,
            images: jax.Array, layers: Sequence[str], *, target: PyTree | None = None,
            key: str = "quant.bias_correction") -> tuple[PyTree, dict]:
  """Bias correction of `layers` (module paths): (params, report).

  `float_params`: the float model; `quant_params`: the model with quantized weights (as the
  quantizer's `apply` gives them); the corrections go into `target` (default `quant_params`),
  e.g. the latent params of a quantization transform, whose biases and BatchNorm params are
  those of `quant_params`. The report has, per layer, the mean |delta| and max |delta| removed
  and where it went.
  """
  where = plan(model, float_params, batch_stats, images, layers, key)
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}
  layers = list(where)

  @jax.jit
  def deltas(fp, qp, x):
    fm = _output_means(model, {"params": fp, **extra}, x, layers)
    return _output_means(model, {"params": qp, **extra}, x, layers, float_means=fm)

  d = jax.device_get(deltas(float_params, quant_params, images))
  out = quant_params if target is None else target
  report = {}
  for layer, spec in where.items():
    delta = jnp.asarray(d[layer], jnp.float32)
    if spec[0] == "bias":
      leaf, shift = f"{layer}/bias", delta
    else:
      _, bn, eps = spec
      gamma = jnp.asarray(_get(out, bn)["scale"], jnp.float32)
      var = jnp.asarray(_get(batch_stats, bn)["var"], jnp.float32)
      leaf, shift = f"{bn}/bias", gamma * delta / jnp.sqrt(var + eps)
    out = _replace(out, leaf, lambda b, s=shift: (b - s).astype(b.dtype))
    report[layer] = {"into": leaf, "mean_abs_shift": float(jnp.mean(jnp.abs(delta))),
                     "max_abs_shift": float(jnp.max(jnp.abs(delta)))}
  return out, report


def _replace(tree, path, fn):
  """A copy of the nested dict `tree` with the leaf at `path` replaced by fn(leaf)."""
  head, _, rest = path.partition("/")
  new = dict(tree)
  new[head] = fn(tree[head]) if not rest else _replace(tree[head], rest, fn)
  return new


def report_summary(report: dict) -> dict:
  """Scalar figures for metrics.jsonl / results.json."""
  if not report:
    return {}
  return {"bias_corrected_layers": len(report),
          "bias_correction_mean_abs_shift": float(
              sum(r["mean_abs_shift"] for r in report.values()) / len(report))}
