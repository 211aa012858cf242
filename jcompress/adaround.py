r"""AdaRound: post-training quantization that learns, weight by weight, whether to round up or down.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML 2020). For a
layer with weights W, the uniform quantizer's scale s and zero point z (as `quantize_core.quantize`
finds them: per output channel, min/max range), round-to-nearest is one choice among 2^n; AdaRound
learns a continuous variable V per weight and quantizes

  W~(V) = s * (clip(floor(W / s) + h(V) + z, q_min, q_max) - z),
  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),    zeta = 1.1, gamma = -0.1

(the rectified sigmoid), minimizing the layer's output error on calibration data plus a
regularizer that drives every h to 0 or 1:

  min_V  mean_x || f(W~(V); x_q) - f(W; x) ||^2 + lambda * sum_i (1 - |2 h(V_i) - 1|^beta)

with beta annealed from 20 to 2 after a warm-up without the regularizer (the paper's schedule).
x is the layer's input in the float model and x_q its input in the model whose earlier layers
are already quantized (`asymmetric=True`, the paper's "asymmetric reconstruction", which lets a
layer correct the error of those before it); f is the layer itself (a convolution or a Dense
layer), captured from the model with `flax.linen.intercept_methods`. V starts where h(V) equals
the fractional part of W / s, so the first iterate is W itself. At the end each weight rounds up
where h(V) >= 0.5; the weights holding each channel's range (its min and max) keep their
round-to-nearest codes, so quantizing the result again with the same quantizer gives back the
scales and exactly the chosen codes (`adaround_tree` returns weights on the grid, which the
`quant` method's uniform quantizer and export store as those codes).

Layers run in forward order, one jit-compiled optimization per layer shape, on minibatches drawn
from the calibration images (at most a few hundred images; the paper uses 1024 for ImageNet).
"""

from __future__ import annotations

import functools
import time
from typing import Any
from typing import Callable
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jcompress import quantize_core
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: jax.Array) -> jax.Array:
  """V with h(V) = frac (frac in [0, 1): the fractional part of W / s)."""
  p = jnp.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
  return jnp.log(p) - jnp.log1p(-p)


def round_reg(v: jax.Array, beta: jax.Array) -> jax.Array:
  """sum_i 1 - |2 h(V_i) - 1|^beta: 0 when every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(step: jax.Array, iters: int, warmup: float, start: float = 20.0,
                  end: float = 2.0) -> jax.Array:
  """beta: `start` during the warm-up (when the regularizer is off), then linear to `end`."""
  t0 = warmup * iters
  frac = jnp.clip((step - t0) / jnp.maximum(iters - t0, 1.0), 0.0, 1.0)
  return start + (end - start) * frac


# ----------------------------------------------------------------------------- capture


def capture(model: nn.Module, variables: dict, images: jax.Array,
            paths: Sequence[str]) -> dict[str, tuple[nn.Module, jax.Array, jax.Array]]:
  """{path: (layer, input, output)} of the `nn.Conv` / `nn.Dense` layers whose kernel path is
  `path + "/kernel"`, from one forward pass (train=False) of `model` on `images`. `layer` is
  an unbound copy: `layer.apply({"params": {"kernel": W, ...}}, input)`."""
  wanted = set(paths)
  found: dict[str, tuple] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
      path = "/".join(str(p) for p in mod.scope.path)
      if path in wanted:
        found[path] = (mod.clone(parent=None, name=None), args[0], out)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  missing = wanted - set(found)
  if missing:
    raise ConfigError(f"adaround: no Conv or Dense layer computes with kernel "
                      f"'{sorted(missing)[0]}/kernel' in the model's forward pass")
  return found


# ----------------------------------------------------------------------------- one layer


@functools.partial(jax.jit, static_argnames=("layer_fn", "iters", "batch", "warmup", "lr",
                                             "reg_weight", "q_min", "q_max"))
def _optimize(v0, base, scale, zero_point, rest, x, y, key, *, layer_fn, iters, batch, warmup,
              lr, reg_weight, q_min, q_max):
  """V after `iters` Adam steps on the AdaRound objective (see the module docstring)."""
  opt = optax.adam(lr)
  n = x.shape[0]

  def weights(v):
    codes = jnp.clip(base + rectified_sigmoid(v) + zero_point, q_min, q_max)
    return scale * (codes - zero_point)

  def loss(v, xb, yb, beta, reg_on):
    err = jnp.mean((layer_fn(weights(v), rest, xb) - yb) ** 2)
    return err + reg_on * reg_weight * round_reg(v, beta)

  def step(carry, i):
    v, st = carry
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, n)
    beta = beta_schedule(i.astype(jnp.float32), iters, warmup)
    reg_on = (i >= warmup * iters).astype(jnp.float32)
    g = jax.grad(loss)(v, x[idx], y[idx], beta, reg_on)
    upd, st = opt.update(g, st, v)
    return (optax.apply_updates(v, upd), st), None

  (v, _), _ = jax.lax.scan(step, (v0, opt.init(v0)), jnp.arange(iters))
  return v


def _apply_layer(layer, w, rest, x):
  return layer.apply({"params": {"kernel": w, **rest}}, x)


def _extremes(w: jax.Array, q: quantize_core.QTensor) -> jax.Array:
  """The weights that set each channel's range (its min and max): they keep their codes."""
  axes = tuple(range(w.ndim - 1)) if q.per_channel else None
  hi = jnp.max(w, axis=axes, keepdims=q.per_channel)
  lo = jnp.min(w, axis=axes, keepdims=q.per_channel)
  return (w == hi) | (w == lo)


def adaround_layer(layer: nn.Module, w: jax.Array, rest: dict, x: jax.Array, y: jax.Array,
                   bits: int, key: jax.Array, *, symmetric: bool = True,
                   narrow_range: bool = True, per_channel: bool = True, iters: int = 1000,
                   batch: int = 32, warmup: float = 0.2, lr: float = 1e-2,
                   reg_weight: float = 0.01, name: str = "kernel") -> tuple[jax.Array, dict]:
  """AdaRound of one layer: (weights on the quantizer's grid, report).

  `layer.apply({"params": {"kernel": w, **rest}}, x)` must give the layer's output; `y` is the
  target (the float model's output of this layer). The report has the output error (mean
  squared) of round-to-nearest and of the result, the fraction of weights rounded the other way
  from nearest, and the seconds taken.
  """
  t0 = time.time()
  q = quantize_core.quantize(w, bits, symmetric=symmetric, narrow_range=narrow_range,
                             per_channel=per_channel, name=name)
  scale = jnp.asarray(q.scale, jnp.float32)
  zp = jnp.asarray(q.zero_point, jnp.float32)
  q_min, q_max = quantize_core.code_range(bits, symmetric, narrow_range)
  ratio = w / scale
  base = jnp.floor(ratio)
  v0 = init_v(ratio - base)
  fn = functools.partial(_apply_layer, layer)
  v = _optimize(v0, base, scale, zp, rest, x, y, key, layer_fn=fn, iters=int(iters),
                batch=int(min(batch, x.shape[0])), warmup=float(warmup), lr=float(lr),
                reg_weight=float(reg_weight), q_min=q_min, q_max=q_max)
  nearest = jnp.asarray(q.codes, jnp.float32)
  codes = jnp.clip(base + (rectified_sigmoid(v) >= 0.5) + zp, q_min, q_max)
  codes = jnp.where(_extremes(w, q), nearest, codes)
  w_q = scale * (codes - zp)
  w_near = scale * (nearest - zp)

  def mse(wt):
    return float(jnp.mean((fn(wt, rest, x) - y) ** 2))

  report = {"mse_nearest": mse(w_near), "mse_adaround": mse(w_q),
            "flipped": float(jnp.mean(codes != nearest)), "seconds": time.time() - t0}
  return w_q.astype(w.dtype), report


# ----------------------------------------------------------------------------- the model


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def adaround_tree(model: nn.Module, params: PyTree, batch_stats: PyTree, images: jax.Array,
                  bits_by_leaf: dict[str, int], *, seed: int = 0, asymmetric: bool = True,
                  log: Callable[[str], None] | None = None, **kwargs) -> tuple[PyTree, dict]:
  """AdaRound of every kernel in `bits_by_leaf` ({"stage1_block0/conv1/kernel": 4, ...}), in
  the order the forward pass meets them: (params with those kernels on their grids, report per
  leaf). `images`: the calibration images (all of them; minibatches are drawn inside).
  kwargs go to `adaround_layer` (symmetric, narrow_range, per_channel, iters, batch, warmup, lr,
  reg_weight). With `asymmetric`, each layer's input comes from the model whose earlier layers
  are already rounded; its target is always the float model's output."""
  if not bits_by_leaf:
    raise ConfigError("adaround: no quantized kernel selected (quant.include / quant.exclude)")
  bad = [p for p in bits_by_leaf if not p.endswith("/kernel")]
  if bad:
    raise ConfigError(f"adaround: '{bad[0]}' is not a kernel")
  if images.shape[0] < 2:
    raise ConfigError(f"adaround: needs at least 2 calibration images, got {images.shape[0]} "
                      "(config key 'calibration_batches')")
  layers = {p[:-len("/kernel")]: p for p in bits_by_leaf}
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}
  float_caps = capture(model, {"params": params, **extra}, images, list(layers))
  order = list(float_caps)   # insertion order: the order of the forward pass
  key = jax.random.key(int(seed))
  out, report = params, {}
  for i, layer_path in enumerate(order):
    leaf = layers[layer_path]
    layer, x_fp, y = float_caps[layer_path]
    x = x_fp
    if asymmetric and i > 0:
      x = capture(model, {"params": out, **extra}, images, [layer_path])[layer_path][1]
    node = _get(out, layer_path)
    rest = {k: v for k, v in node.items() if k != "kernel"}
    w_q, rep = adaround_layer(layer, node["kernel"], rest, x, y, bits_by_leaf[leaf],
                              jax.random.fold_in(key, i), name=leaf, **kwargs)
    out = transforms.map_with_path(
        lambda name, w, leaf=leaf, w_q=w_q: w_q if name == leaf else w, out)
    report[leaf] = {"bits": int(bits_by_leaf[leaf]), **rep}
    if log is not None:
      log(f"adaround {leaf} ({bits_by_leaf[leaf]} bits): output mse {rep['mse_nearest']:.3g} "
          f"(nearest) -> {rep['mse_adaround']:.3g}, {100 * rep['flipped']:.1f}% flipped, "
          f"{rep['seconds']:.1f} s")
  return out, report


def report_summary(report: dict, images: int) -> dict:
  """Figures for results.json: calibration images, total and per-layer seconds, mean errors."""
  return {"adaround_images": int(images),
          "adaround_seconds": float(sum(r["seconds"] for r in report.values())),
          "adaround_layers": {k: {kk: (round(vv, 6) if isinstance(vv, float) else vv)
                                  for kk, vv in r.items()} for k, r in report.items()}}
