r"""BRECQ: AdaRound's learned rounding over a whole block at once (block reconstruction).

Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction"
(ICLR 2021). AdaRound (`jcompress.adaround`) chooses each layer's up/down rounding from that
layer's own output error; BRECQ optimises the rounding variables V of every quantized layer of a
block (a residual block of a ResNet) jointly, on the error of the block's output:

  min_V  mean_x w(x) * (B(W~(V); x_q) - B(W; x))^2 + lambda * sum_layers sum_i reg(V_i, beta)

B is the block (its convolutions, BatchNorms, ReLUs and shortcut, as the model runs them, so an
activation quantizer of the model, `model_kwargs.act_quant`, is in the loop: the "activations
quantized during reconstruction" case), W~(V) is AdaRound's soft-quantized weight (the
rectified sigmoid on the floor grid of the uniform quantizer, per output channel by default),
the regularizer, its weight lambda and the beta annealing (20 -> 2 after a warm-up with the
regularizer off) are `jcompress.adaround`'s own (imported, not copied). The cross-layer
dependence inside a block (conv2 can correct the rounding error of conv1) is what a layer-wise
objective cannot see; the paper shows the block is the right granularity between the layer and
the whole network.

Inputs and targets follow AdaRound's asymmetric reconstruction, as BRECQ's own code does
(`asym=True`): blocks run in forward order; each block's input x_q comes from the model whose
earlier blocks are already rounded (so a block corrects the error of those before it) and its
target is always the float model's block output on the float input. w(x) is 1 (plain MSE), or
with `fisher=True` the paper's diagonal Fisher weighting as its code computes it
(`save_grad_data`): w = (|g| + 1)^2 per output value, g the gradient with respect to the block
output of KL(p_float || p_quant) (batch mean over minibatches of 32 images), p_quant the
softmax of the model whose blocks up to this one are quantized (earlier ones as learned, this
one round-to-nearest) and later ones float. The KL to the float model stands in for the task
loss (no labels needed); the damping 1 keeps w near 1 where the gradient is small (the squared
gradient alone puts all the weight on the few images the float model gets wrong: 2-bit digits
ResNet-20 dropped to 93.6% with it, against 99.2% with MSE).

Blocks (`find_blocks`): a quantized kernel at `a/b/.../layer/kernel` belongs to the module
`a` (the first `depth` path components, never the layer itself unless the layer sits at the
root): in a ResNet `stage1_block0/conv1`, `stage1_block0/conv2` and `stage1_block0/
shortcut_conv` form the block `stage1_block0`; a quantized layer at the root (a stem
convolution or a classifier, when not excluded) is a block of its own (its own output, i.e.
AdaRound's layer objective). A block must be a module the forward pass calls exactly once.

How a block runs: not as a standalone copy (the models read fields of the root module, such as
`channels`, `padding` or `act_quant`, through the module tree) but as the whole model under
`flax.linen.intercept_methods`, with the block's call given the stored input and its output
taken out; everything before and after the block is dead code that XLA removes under `jit`, so
a step costs the block's forward and backward on a minibatch of `batch` images (the block is not
quadratic in its weights, so AdaRound's quadratic route does not apply). One compile per block;
the Adam steps are separate calls of that compiled step (`_adam_loop`), not a `lax.scan`.

The error is a mean over the block's output values and the regularizer a sum over the block's
weights, AdaRound's (`jcompress.adaround`) normalisation, so `reg_weight` (lambda, 0.01), `lr`,
`warmup` and the beta range are those of `adaround_layer`. (The paper's code sums the squared
error over the channels at each output position: for Adam, the same as lambda / C_out. On
2-bit digits_hard ResNet-20 that weaker regularizer did worse, 84.3% against 86.9%.)

Steps: each step sees a minibatch of the calibration images through a non-quadratic block, so
BRECQ needs more Adam steps than AdaRound's exact full-batch quadratic route (the paper runs
20k). 2-bit per-channel digits_hard ResNet-20 (float 92.6%, round-to-nearest 9.7%), test
accuracy of AdaRound / BRECQ at 500, 1500 and 3000 steps per layer / block: 88.2 / 86.9,
88.3 / 88.6, 88.9 / 89.6%.

`brecq_tree` returns the params with the selected kernels on the quantizer's grid (every code
is floor(W / s) or floor(W / s) + 1, the channel's min and max weights keep their nearest codes,
so quantizing the result again gives the same scales and exactly these codes), the same format
as `adaround.adaround_tree`, and a report per block.
"""

from __future__ import annotations

import time
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress import quantize_core
from jcompress import transforms
from jcompress.adaround import _extremes
from jcompress.adaround import _get
from jcompress.adaround import _soft_weights
from jcompress.adaround import beta_schedule
from jcompress.adaround import init_v
from jcompress.adaround import rectified_sigmoid
from jcompress.adaround import round_reg
from jcompress.errors import ConfigError

PyTree = Any


class Block(NamedTuple):
  """A reconstruction unit: the module at `path` and the quantized kernels inside it."""
  path: str                # module path, "stage1_block0" (or a root layer's own path, "head")
  leaves: tuple            # kernel paths, in forward order: ("stage1_block0/conv1/kernel", ...)


def _path(mod: nn.Module) -> str:
  return "/".join(str(p) for p in mod.scope.path)


def _module_calls(model: nn.Module, variables: dict, images: jax.Array) -> list[str]:
  """The paths of every module `__call__` of the forward pass, in order (with repeats);
  traced abstractly, nothing is computed."""
  calls: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      calls.append(_path(context.module))
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, images)
  return calls


def block_of(leaf: str, depth: int = 1) -> str:
  """The block a kernel path belongs to: its first `depth` path components, at most its parent
  module; a layer at the root is its own block."""
  parts = leaf.split("/")[:-1]           # the layer's module path
  if len(parts) <= 1:
    return "/".join(parts)
  return "/".join(parts[:min(depth, len(parts) - 1)])


def find_blocks(model: nn.Module, variables: dict, images: jax.Array, leaves: Sequence[str], *,
                depth: int = 1, key: str = "quant.brecq") -> list[Block]:
  """The blocks of the quantized kernels `leaves` ({layer path}/kernel), in the order the
  forward pass (`model.apply(variables, images, train=False)`) first calls them. ConfigError
  (naming `key`) for a kernel that is not one, or a block module the forward pass calls never
  or more than once (a shared module: its input is not one tensor)."""
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
    raise ConfigError(f"config key '{key}_depth': an int >= 1, got {depth!r}")
  bad = [p for p in leaves if not p.endswith("/kernel")]
  if bad:
    raise ConfigError(f"config key '{key}': '{bad[0]}' is not a kernel")
  groups: dict[str, list[str]] = {}
  for leaf in leaves:
    groups.setdefault(block_of(leaf, depth), []).append(leaf)
  calls = _module_calls(model, variables, images[:1])
  first = {}
  for i, p in enumerate(calls):
    first.setdefault(p, i)
  for block in groups:
    n = calls.count(block)
    if n != 1:
      raise ConfigError(f"config key '{key}': block '{block}' (of '{groups[block][0]}') is "
                        f"called {n} times in the forward pass; a block must be a module called "
                        "once")
  for members in groups.values():
    members.sort(key=lambda leaf: first.get(leaf[:-len("/kernel")], len(calls)))
  order = sorted(groups, key=lambda b: first[b])
  return [Block(b, tuple(groups[b])) for b in order]


# ----------------------------------------------------------------------------- running a block


def capture_blocks(model: nn.Module, variables: dict, images: jax.Array,
                   paths: Sequence[str]) -> dict[str, tuple[tuple, dict, Any]]:
  """{block path: (args, kwargs, output)} of the modules at `paths` in one jit-compiled forward
  pass (train=False) of `model` on `images` (arguments that are not arrays, such as
  `train=False`, come back as the Python values they were)."""
  wanted = set(paths)
  static: dict[str, tuple] = {}    # path: (treedef, non-array leaves, which leaves are arrays)

  def forward(variables, images):
    found: dict[str, tuple] = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__":
        p = _path(context.module)
        if p in wanted and p not in found:
          found[p] = (tuple(args), dict(kwargs), out)
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, images, train=False)
    arrays = {}
    for p, call in found.items():
      leaves, tree = jax.tree.flatten(call)
      is_array = [isinstance(a, jax.Array) for a in leaves]
      static[p] = (tree, [None if d else a for a, d in zip(leaves, is_array)], is_array)
      arrays[p] = [a for a, d in zip(leaves, is_array) if d]
    return arrays

  arrays = jax.jit(forward)(variables, images)
  missing = wanted - set(arrays)
  if missing:
    raise ConfigError(f"config key 'quant.brecq': no module '{sorted(missing)[0]}' is called in "
                      "the model's forward pass")
  out = {}
  for p, arrs in arrays.items():
    tree, other, is_array = static[p]
    it = iter(arrs)
    out[p] = jax.tree.unflatten(tree, [next(it) if d else a for a, d in zip(other, is_array)])
  return out


def split_call(args: tuple, kwargs: dict, n: int) -> tuple[list, Callable]:
  """A block call's arguments as (the arrays with `n` rows: the per-image inputs, traced and
  sliced into minibatches; `rebuild(arrays) -> (args, kwargs)` with the other arguments, such
  as `train=False`, kept as the Python values they are)."""
  leaves, tree = jax.tree.flatten((args, kwargs))
  dyn = [getattr(a, "ndim", 0) > 0 and a.shape[0] == n for a in leaves]

  def rebuild(arrays):
    it = iter(arrays)
    return jax.tree.unflatten(tree, [next(it) if d else a for a, d in zip(leaves, dyn)])

  return [a for a, d in zip(leaves, dyn) if d], rebuild


def block_runner(model: nn.Module, path: str, rebuild: Callable) -> Callable:
  """`run(variables, inputs, images)`: the output of the block at `path` when called with
  `rebuild(inputs)` (`split_call`) inside `model.apply(variables, images, train=False)`
  (images only set the shapes of the dead rest)."""

  def run(variables, inputs, images):
    box: list = []
    args, kwargs = rebuild(inputs)

    def interceptor(next_fun, a, kw, context):
      if context.method_name == "__call__" and not box and _path(context.module) == path:
        box.append(next_fun(*args, **kwargs))
        return box[0]
      return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
      model.apply(variables, images, train=False)
    return box[0]

  return run


def _take(tree, idx):
  return jax.tree.map(lambda a: a[idx], tree)


def _sq_err(out, target, weight):
  """The (weighted) squared error, a mean over the output values (of each output array)."""
  leaves = zip(jax.tree.leaves(out), jax.tree.leaves(target), jax.tree.leaves(weight))
  errs = [jnp.mean(w * (o.astype(jnp.float32) - t.astype(jnp.float32)) ** 2)
          for o, t, w in leaves]
  return sum(errs) / len(errs)


def _logits(out):
  return (out[0] if isinstance(out, (tuple, list)) else out).astype(jnp.float32)


def fisher_weights(model: nn.Module, quant_vars: dict, float_vars: dict, block: str,
                   images: jax.Array, *, chunk: int = 32, damping: float = 1.0) -> PyTree:
  """BRECQ's diagonal Fisher weights of the output of the block at `block`: (|g| + damping)^2,
  g = d KL(p_float || p_quant) / dz with z the block output in the model with `quant_vars`,
  p the softmax of the logits of `float_vars` / `quant_vars` on `images`, the KL averaged over
  minibatches of `chunk` images (the paper's code: `save_grad_data`, batch 32, damping 1)."""

  @jax.jit
  def grads(quant_vars, float_vars, images):
    p_float = jax.nn.softmax(_logits(model.apply(float_vars, images, train=False)))

    def kl(delta):
      def interceptor(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        if context.method_name == "__call__" and _path(context.module) == block:
          out = jax.tree.map(jnp.add, out, delta)
        return out

      with nn.intercept_methods(interceptor):
        logq = jax.nn.log_softmax(_logits(model.apply(quant_vars, images, train=False)))
      return jnp.sum(p_float * (jnp.log(jnp.maximum(p_float, 1e-30)) - logq)) / images.shape[0]

    out = capture_blocks(model, quant_vars, images, [block])[block][2]    # for its shapes
    return jax.grad(kl)(jax.tree.map(jnp.zeros_like, out))

  n = images.shape[0]
  parts = [grads(quant_vars, float_vars, images[i:i + chunk]) for i in range(0, n, chunk)]
  g = jax.tree.map(lambda *p: jnp.concatenate(p), *parts)
  return jax.tree.map(lambda t: (jnp.abs(t) + damping) ** 2, g)


# ----------------------------------------------------------------------------- one block


def _adam_loop(loss: Callable, v0: PyTree, key: jax.Array, data: tuple, *, iters: int,
               warmup: float, lr: float) -> PyTree:
  """V after `iters` Adam steps on `loss(v, beta, reg_on, key_i, *data)`: `adaround._adam_scan`'s
  schedule (beta from `adaround.beta_schedule`, the regularizer off during the warm-up, key
  `fold_in(key, i)` at step i), one jit-compiled step per call instead of a `lax.scan`. XLA:CPU
  runs convolutions inside a loop body far slower than at the top level (with the Eigen
  convolutions `runtime.configure_cpu` selects, a ResNet-20 stage-1 block step at batch 32 took
  ~1 s inside a scan against ~25 ms called step by step), and a step is large enough that the
  calls cost little."""
  opt = optax.adam(lr)

  @jax.jit
  def step(v, st, i, data):
    beta = beta_schedule(i.astype(jnp.float32), iters, warmup)
    reg_on = (i >= warmup * iters).astype(jnp.float32)
    g = jax.grad(loss)(v, beta, reg_on, jax.random.fold_in(key, i), *data)
    upd, st = opt.update(g, st, v)
    return optax.apply_updates(v, upd), st

  v, st = v0, opt.init(v0)
  for i in range(iters):
    v, st = step(v, st, jnp.int32(i), data)
  return v


class _Grid(NamedTuple):
  """One kernel's uniform quantizer (`quantize_core.quantize`): W / scale = base + frac with
  frac in [0, 1); codes are clip(base + {0, 1} + zero_point, q_min, q_max)."""
  scale: jax.Array
  zero_point: jax.Array
  base: jax.Array          # floor(W / scale)
  nearest: jax.Array       # the round-to-nearest codes
  keep: jax.Array          # the weights holding each channel's range: nearest codes kept
  q_min: int
  q_max: int


def _grid(w, bits, symmetric, narrow_range, per_channel, name) -> _Grid:
  q = quantize_core.quantize(w, bits, symmetric=symmetric, narrow_range=narrow_range,
                             per_channel=per_channel, name=name)
  scale = jnp.asarray(q.scale, jnp.float32)
  q_min, q_max = quantize_core.code_range(bits, symmetric, narrow_range)
  return _Grid(scale, jnp.asarray(q.zero_point, jnp.float32), jnp.floor(w / scale),
               jnp.asarray(q.codes, jnp.float32), _extremes(w, q), q_min, q_max)


def _nearest(w, bits, symmetric, narrow_range, per_channel, name):
  """`w` rounded to the nearest point of its grid (`_grid`)."""
  g = _grid(w, bits, symmetric, narrow_range, per_channel, name)
  return (g.scale * (g.nearest - g.zero_point)).astype(w.dtype)


def _hard(v, g: _Grid, dtype):
  codes = jnp.clip(g.base + (rectified_sigmoid(v) >= 0.5) + g.zero_point, g.q_min, g.q_max)
  codes = jnp.where(g.keep, g.nearest, codes)
  return (g.scale * (codes - g.zero_point)).astype(dtype), codes


def _with_leaves(params, new: dict):
  return transforms.map_with_path(lambda name, w: new.get(name, w), params)


def brecq_block(model: nn.Module, params: PyTree, extra: dict, block: Block, inputs: list,
                rebuild: Callable, target: PyTree, images: jax.Array, bits_by_leaf: dict,
                key: jax.Array, *,
                weight: PyTree | None = None, symmetric: bool = True, narrow_range: bool = True,
                per_channel: bool = True, iters: int = 1000, batch: int = 32,
                warmup: float = 0.2, lr: float = 1e-2, reg_weight: float = 0.01,
                ) -> tuple[dict, dict]:
  """The rounding of every kernel of `block`, optimised jointly: ({leaf: weights on its grid},
  report). `inputs` / `rebuild` (`split_call`): the block's call on the calibration images
  (its input from the partly quantized model), `target`: the float model's block output,
  `weight`: the Fisher weights of the output (None: plain MSE); `images` only give the dead
  rest of the model its shapes. Each of `iters` Adam steps (learning rate `lr`) sees a random
  minibatch of `batch` images. The report has the block output error (mean squared, over all
  images; Fisher weighted if `weight`) of round-to-nearest and of the result, the fraction of
  weights rounded away from nearest and the seconds taken."""
  t0 = time.time()
  n = images.shape[0]
  batch = int(min(batch, n))
  grids = {leaf: _grid(_get(params, leaf), bits_by_leaf[leaf], symmetric, narrow_range,
                       per_channel, leaf) for leaf in block.leaves}
  v0 = {leaf: init_v(_get(params, leaf) / g.scale - g.base) for leaf, g in grids.items()}
  run = block_runner(model, block.path, rebuild)
  w_ones = jax.tree.map(lambda t: jnp.ones((), jnp.float32), target) if weight is None else None

  def soft_params(p, v):
    return _with_leaves(p, {leaf: _soft_weights(v[leaf], g.base, g.scale, g.zero_point, g.q_min,
                                                g.q_max).astype(_get(p, leaf).dtype)
                            for leaf, g in grids.items()})

  # The images are only shapes to the dead rest of the model: zeros passed as an argument (a
  # closed-over constant would be folded by XLA through the dead layers, slowly).
  dummy = jnp.zeros((batch,) + images.shape[1:], images.dtype)

  def loss(v, beta, reg_on, k, p, inputs, target, weight, dummy):
    idx = jax.random.randint(k, (batch,), 0, n)
    out = run({"params": soft_params(p, v), **extra}, _take(inputs, idx), dummy)
    wt = w_ones if weight is None else _take(weight, idx)
    err = _sq_err(out, _take(target, idx), wt)
    reg = sum(round_reg(v[leaf], beta) for leaf in grids)
    return err + reg_on * reg_weight * reg

  v = _adam_loop(loss, v0, key, (params, inputs, target, weight, dummy), iters=int(iters),
                 warmup=float(warmup), lr=float(lr))
  hard, codes = {}, {}
  for leaf, g in grids.items():
    hard[leaf], codes[leaf] = _hard(v[leaf], g, _get(params, leaf).dtype)
  nearest = {leaf: _nearest(_get(params, leaf), bits_by_leaf[leaf], symmetric, narrow_range,
                            per_channel, leaf) for leaf in grids}

  @jax.jit
  def error(p, inputs, target, weight, images):
    out = run({"params": p, **extra}, inputs, images)
    return _sq_err(out, target, w_ones if weight is None else weight)

  n_w = sum(int(g.base.size) for g in grids.values())
  report = {
      "leaves": list(block.leaves),
      "weights": n_w,
      "mse_nearest": float(error(_with_leaves(params, nearest), inputs, target, weight,
                                 images)),
      "mse_brecq": float(error(_with_leaves(params, hard), inputs, target, weight,
                               images)),
      "flipped": float(sum(jnp.sum(codes[leaf] != g.nearest) for leaf, g in grids.items())
                       / max(n_w, 1)),
      "seconds": time.time() - t0,
  }
  return hard, report


# ----------------------------------------------------------------------------- the model


def brecq_tree(model: nn.Module, params: PyTree, batch_stats: PyTree, images: jax.Array,
               bits_by_leaf: dict[str, int], *, fisher: bool = False, depth: int = 1,
               seed: int = 0, asymmetric: bool = True,
               log: Callable[[str], None] | None = None, **kwargs) -> tuple[PyTree, dict]:
  """BRECQ of every kernel in `bits_by_leaf` ({"stage1_block0/conv1/kernel": 2, ...}), block
  by block in forward order (`find_blocks` with `depth`): (params with those kernels on their
  grids, report per block path). `images`: the calibration images (all; minibatches are drawn
  inside); `fisher`: the block error weighted by `fisher_weights`. kwargs go to `brecq_block`
  (symmetric, narrow_range, per_channel, iters, batch, warmup, lr, reg_weight). With
  `asymmetric`, each block's input comes from the model whose earlier blocks are already
  rounded; its target is always the float model's block output."""
  if not bits_by_leaf:
    raise ConfigError("config key 'quant.brecq': no quantized kernel selected "
                      "(quant.include / quant.exclude)")
  if images.shape[0] < 2:
    raise ConfigError(f"config key 'quant.brecq': needs at least 2 calibration images, got "
                      f"{images.shape[0]} (config key 'calibration_batches')")
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}
  blocks = find_blocks(model, {"params": params, **extra}, images, list(bits_by_leaf),
                       depth=depth)
  float_caps = capture_blocks(model, {"params": params, **extra}, images,
                              [b.path for b in blocks])
  key = jax.random.key(int(seed))
  n = images.shape[0]
  grid_opts = [kwargs.get(k, True) for k in ("symmetric", "narrow_range", "per_channel")]
  out, report = params, {}
  for i, block in enumerate(blocks):
    args, kw, target = float_caps[block.path]
    if asymmetric and i > 0:
      args, kw, _ = capture_blocks(model, {"params": out, **extra}, images,
                                   [block.path])[block.path]
    inputs, rebuild = split_call(args, kw, n)
    weight = None
    if fisher:
      nearest = {leaf: _nearest(_get(out, leaf), bits_by_leaf[leaf], *grid_opts, leaf)
                 for leaf in block.leaves}
      weight = fisher_weights(model, {"params": _with_leaves(out, nearest), **extra},
                              {"params": params, **extra}, block.path, images)
    new, rep = brecq_block(model, out, extra, block, inputs, rebuild, target, images,
                           bits_by_leaf,
                           jax.random.fold_in(key, i), weight=weight, **kwargs)
    out = _with_leaves(out, new)
    report[block.path] = {"bits": [int(bits_by_leaf[leaf]) for leaf in block.leaves], **rep}
    if log is not None:
      log(f"brecq {block.path} ({len(block.leaves)} layers, {rep['weights']} weights): block "
          f"output mse {rep['mse_nearest']:.3g} (nearest) -> {rep['mse_brecq']:.3g}, "
          f"{100 * rep['flipped']:.1f}% flipped, {rep['seconds']:.1f} s")
  return out, report


def report_summary(report: dict, images: int, seconds: float | None = None) -> dict:
  """Scalar figures for metrics.jsonl and results.json: calibration images, blocks, layers,
  seconds (the whole `brecq_tree` call, or the blocks' own seconds summed), the block output
  error (mean squared, summed over the blocks) of round-to-nearest and of BRECQ, and the
  fraction of weights rounded away from nearest."""
  if not report:
    return {}
  reps = list(report.values())
  n = [float(r["weights"]) for r in reps]
  return {"brecq_images": int(images),
          "brecq_blocks": len(reps),
          "brecq_layers": sum(len(r["leaves"]) for r in reps),
          "brecq_seconds": round(float(sum(r["seconds"] for r in reps) if seconds is None
                                       else seconds), 3),
          "brecq_mse_nearest": float(sum(r["mse_nearest"] for r in reps)),
          "brecq_mse": float(sum(r["mse_brecq"] for r in reps)),
          "brecq_flipped": float(sum(r["flipped"] * k for r, k in zip(reps, n)) / sum(n))}
