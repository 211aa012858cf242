"""The matmul kernel gradient of jcompress.fastconv against XLA's own convolution gradients,
and the XLA:CPU flag that `import jcompress` sets (convolutions on Eigen, conv_impl "auto")."""


import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import fastconv
from jcompress import jaxpr_utils
from jcompress import models
from jcompress import train

NHWC = ("NHWC", "HWIO", "NHWC")


def ref_conv(x, w, s, pad):
  return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=NHWC)


def ref_kernel_grad(x, w, g, s, pad):
  return jax.vjp(lambda w_: ref_conv(x, w_, s, pad), w)[1](g)[0]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# (N, H, W, C, Co, k, s, padding): the ResNet shapes (3x3 stride 1 and 2, 1x1 stride-2
# projections, the 7x7/2 ImageNet stem), odd sizes, asymmetric ("SAME"-like) and zero padding.
CASES = [
    (2, 16, 16, 8, 4, 3, 1, ((1, 1), (1, 1))),
    (2, 16, 16, 8, 4, 3, 2, ((1, 1), (1, 1))),
    (2, 16, 16, 8, 4, 1, 2, ((0, 0), (0, 0))),
    (2, 15, 13, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 17, 17, 3, 4, 7, 2, ((3, 3), (3, 3))),
    (1, 16, 16, 4, 4, 3, 2, ((0, 1), (0, 1))),
    (2, 9, 11, 2, 3, 5, 1, ((0, 0), (2, 2))),
    (1, 20, 20, 3, 2, 3, 3, ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_grad_equals_xla(case):
  n, h, w_, c, co, k, s, pad = case
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (n, h, w_, c))
  w = jax.random.normal(kw, (k, k, c, co))
  g = jax.random.normal(kg, ref_conv(x, w, s, pad).shape)
  got = fastconv.kernel_grad(x, g, k, s, pad)
  want = ref_kernel_grad(x, w, g, s, pad)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert rel_err(got, want) < 1e-5
  # One image per chunk (the lax.scan over the batch) gives the same sums.
  chunked = fastconv.kernel_grad(x, g, k, s, pad, chunk_bytes=1)
  assert rel_err(chunked, want) < 1e-5
  if n > 1:
    jaxpr = jax.make_jaxpr(lambda a, b: fastconv.kernel_grad(a, b, k, s, pad, chunk_bytes=1))(
        x, g).jaxpr
    assert jaxpr_utils.count_primitive(jaxpr, "scan") == 1


@pytest.mark.parametrize("case", CASES[:5])
def test_conv2d_values_and_gradients(case):
  n, h, w_, c, co, k, s, pad = case
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (n, h, w_, c))
  w = jax.random.normal(kw, (k, k, c, co))
  g = jax.random.normal(kg, ref_conv(x, w, s, pad).shape)

  def loss(conv_fn):
    return lambda x_, w_: jnp.sum(conv_fn(x_, w_) * g)

  y_fast = fastconv.conv2d(x, w, s, pad)
  np.testing.assert_array_equal(y_fast, ref_conv(x, w, s, pad))   # the same XLA convolution
  dx, dw = jax.grad(loss(lambda a, b: fastconv.conv2d(a, b, s, pad)), argnums=(0, 1))(x, w)
  rdx, rdw = jax.grad(loss(lambda a, b: ref_conv(a, b, s, pad)), argnums=(0, 1))(x, w)
  assert rel_err(dx, rdx) < 1e-6
  assert rel_err(dw, rdw) < 1e-5


def test_bfloat16_kernel_grad_accumulates_in_float32():
  """bf16 operands: products exact in f32, so the result is the f32 reference rounded once."""
  kx, kg = jax.random.split(jax.random.PRNGKey(2))
  x = jnp.sign(jax.random.normal(kx, (2, 16, 16, 8))).astype(jnp.bfloat16)   # +-1, exact
  g = jax.random.normal(kg, (2, 16, 16, 4)).astype(jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  got = fastconv.kernel_grad(x, g, 3, 1, pad, out_dtype=jnp.float32)
  want = ref_kernel_grad(x.astype(jnp.float32), jnp.zeros((3, 3, 8, 4)), g.astype(jnp.float32),
                         1, pad)
  assert rel_err(got, want) < 1e-6
  jaxpr = jax.make_jaxpr(lambda a, b: fastconv.kernel_grad(a, b, 3, 1, pad))(x, g).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for v in dots[0].invars)
  assert dots[0].outvars[0].aval.dtype == jnp.float32


def test_falls_back_where_it_does_not_apply():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 8))
  w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 2, 8))
  args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)
  assert not fastconv.applies(x.shape, w.shape, feature_group_count=4, **args)   # groups
  assert not fastconv.applies(x.shape, (3, 3, 8, 8), rhs_dilation=(2, 2), **args)
  assert not fastconv.applies(x.shape, (3, 3, 8, 8), window_strides=(1, 1), padding="SAME",
                              dimension_numbers=NHWC)
  assert not fastconv.applies((2, 8, 8, 8), (3, 3, 8, 8), **args)   # 10x10 grid for 8x8
  assert fastconv.applies(x.shape, (3, 3, 8, 8), **args)
  y = fastconv.conv_general_dilated(x, w, feature_group_count=4, **args)
  np.testing.assert_array_equal(
      y, lax.conv_general_dilated(x, w, feature_group_count=4, **args))


@pytest.mark.plumbing   # a whole model's wiring: XLA optimizations off (tests/conftest.py)
@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [
    ("resnet18_cifar", {"width": 0.125}),   # about 30 s
    ("bnn_resnet18_cifar", {"width": 0.125})])
def test_model_loss_and_gradients_equal_xla(name, kwargs):
  """A whole model with conv_impl='fast': the same logits and parameter gradients as 'xla', and
  its gradient jaxpr has one convolution fewer per eligible layer (the kernel gradient became a
  dot_general); with 'staged', the same logits and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
  y = jnp.arange(4) % 10
  out = {}
  # one compiled init for the three (eagerly each initializer op compiles alone)
  v = jax.jit(models.get_model(name, 10, conv_impl="xla", **kwargs).init)(jax.random.PRNGKey(0),
                                                                         x[:1])
  for impl in ("xla", "fast", "staged"):
    model = models.get_model(name, 10, conv_impl=impl, **kwargs)

    def loss(p, model=model, v=v):
      logits, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])[0]
      return train.cross_entropy(logits, y), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p)[0]))(v["params"]).jaxpr
    out[impl] = (value, logits, grads, jaxpr_utils.count_primitive(jaxpr, "conv_general_dilated"))
  np.testing.assert_allclose(out["fast"][1], out["xla"][1], rtol=0, atol=0)
  np.testing.assert_allclose(out["fast"][0], out["xla"][0], rtol=1e-6)
  flat_f = jax.tree_util.tree_leaves_with_path(out["fast"][2])
  flat_x = dict(jax.tree_util.tree_leaves_with_path(out["xla"][2]))
  for path, gf in flat_f:
    assert rel_err(gf, flat_x[path]) < 1e-4, jax.tree_util.keystr(path)
  assert out["fast"][3] < out["xla"][3]
  # "staged" runs XLA's own forward: the same logits and loss; its gradients differ only in
  # the summation order of the strided convs' input gradients (`phase_input_grad`).
  np.testing.assert_array_equal(out["staged"][1], out["xla"][1])
  np.testing.assert_array_equal(out["staged"][0], out["xla"][0])
  flat_x = dict(jax.tree_util.tree_leaves_with_path(out["xla"][2]))
  for path, gs in jax.tree_util.tree_leaves_with_path(out["staged"][2]):
    assert rel_err(gs, flat_x[path]) < 1e-5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("dims", [NHWC, ("NCHW", "OIHW", "NCHW")])
def test_staged_conv_gradients_are_xla_s(dims):
  """conv_impl "staged": XLA's own forward and gradients, bitwise (only stored first), for
  stride 1 and 2, a depthwise conv, and another layout."""
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 9, 9, 8))
  g = jax.random.normal(jax.random.PRNGKey(7), (2, 5, 5, 8))
  if dims[0] == "NCHW":
    x, g = x.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)
  for groups, cin in ((1, 8), (8, 1)):
    w = jax.random.normal(jax.random.PRNGKey(8), (3, 3, cin, 8))
    if dims[1] == "OIHW":
      w = w.transpose(3, 2, 0, 1)
    kw = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=dims,
              feature_group_count=groups)

    def run(conv, x=x, w=w, kw=kw):
      y, vjp = jax.vjp(lambda x_, w_: conv(x_, w_, **kw), x, w)
      return (y, *vjp(g))

    ref = jax.jit(lambda x, w: run(lax.conv_general_dilated, x, w))(x, w)
    got = jax.jit(lambda x, w: run(fastconv.staged_conv_general_dilated, x, w))(x, w)
    for a, b in zip(got, ref):
      np.testing.assert_array_equal(a, b)


# (N, H, W, C, Co, kernel (h, w), strides, padding): stride 2 and 3, kernels smaller than the
# stride (a phase no tap reaches), 7x7/2 with padding 3, odd sizes, asymmetric padding.
PHASE_CASES = [
    (2, 16, 16, 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 16, 16, 4, 6, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (1, 17, 15, 3, 5, (7, 7), (2, 2), ((3, 3), (3, 3))),
    (2, 16, 16, 4, 3, (3, 3), (2, 2), ((0, 1), (0, 1))),
    (1, 20, 19, 2, 3, (3, 3), (3, 3), ((1, 1), (1, 1))),
    (1, 12, 14, 3, 2, (3, 2), (2, 1), ((1, 1), (0, 1))),
]


@pytest.mark.parametrize("case", PHASE_CASES)
def test_phase_input_grad_equals_xla(case):
  n, h, w_, c, co, k, s, pad = case
  x = jax.random.normal(jax.random.PRNGKey(9), (n, h, w_, c))
  w = jax.random.normal(jax.random.PRNGKey(10), (*k, c, co))
  conv = lambda x_: lax.conv_general_dilated(x_, w, s, pad, dimension_numbers=NHWC)  # noqa: E731
  y, vjp = jax.vjp(conv, x)
  g = jax.random.normal(jax.random.PRNGKey(11), y.shape)
  got = jax.jit(lambda g: fastconv.phase_input_grad(g, w, x.shape, s, pad))(g)
  assert got.shape == x.shape
  assert rel_err(got, vjp(g)[0]) < 1e-5


def test_staged_takes_the_phase_input_grad_from_256_output_pixels():
  """At a 16x16 output the strided conv's input gradient is phase convolutions (no
  lhs-dilated conv in the gradient's jaxpr); at 8x8, XLA's own."""
  for side, phases in ((32, True), (16, False)):
    x = jnp.ones((1, side, side, 2))
    w = jnp.ones((3, 3, 2, 2))
    f = lambda x_, w_: jnp.sum(fastconv.staged_conv_general_dilated(  # noqa: E731
        x_, w_, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC))
    convs = jaxpr_utils.primitive_eqns(jax.make_jaxpr(jax.grad(f))(x, w), "conv_general_dilated")
    dilated = [e for e in convs if tuple(e.params["lhs_dilation"]) != (1, 1)]
    assert (not dilated) == phases, (side, [e.params["lhs_dilation"] for e in convs])


def test_materialize_keeps_values_and_the_conditional():
  """`materialize` returns its input (also -0.0, inf, nan and bfloat16) and XLA keeps the
  conditional that makes it a fusion boundary (if XLA ever folds it, the staged kernel
  gradient loses its speed, not its values: this test says so)."""
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.array([-0.0, 1.5, -2.0, jnp.inf, -jnp.inf, jnp.nan], dtype)
    np.testing.assert_array_equal(jax.jit(fastconv.materialize)(x), x)
  f = jax.jit(lambda a, b: jnp.transpose(fastconv.materialize(jax.nn.relu(a * b + 1.0))))
  a = jnp.ones((4, 8))
  hlo = f.lower(a, a).compile().as_text()
  if jax.default_backend() == "cpu":
    assert "conditional(" in hlo


def test_unknown_conv_impl_is_a_config_error():
  from jcompress.errors import ConfigError
  model = models.get_model("resnet18_cifar", 10, width=0.125, conv_impl="cudnn")
  with pytest.raises(ConfigError, match="conv_impl"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
