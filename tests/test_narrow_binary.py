"""Exact narrow forward of the binary convolutions (`binary_compute`, issue 8 item 3).

+-1 kernels times activations on the grid k / levels are integer products: in bfloat16 (f32
accumulation) or int8 (int32 accumulation) they are exact, and on the levels-1 grid (-1/+1,
-1/0/+1) so are packed sign bits with XOR and popcount ("xnor"). Checked here: the conv and the
whole BNN give the float32 values and gradients, the jaxpr really holds bf16 / int8
convolutions or uint32 popcounts in place of the float32 forward convolutions, and the config
check refuses the narrow forward where the kernels are not +-1 (or, for xnor, the activations
have more than 2 bits).
"""

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jcompress import binary as binarize
from jcompress import config as config_lib
from jcompress import fastconv
from jcompress import jaxpr_utils
from jcompress import train
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.models import get_model

NARROW = {"bf16": (jnp.bfloat16, jnp.float32), "int8": (jnp.int8, jnp.int32)}
DN = ("NHWC", "HWIO", "NHWC")


def conv_eqns(jaxpr):
  """Every conv_general_dilated equation of a (closed) jaxpr, sub-jaxprs included."""
  return jaxpr_utils.primitive_eqns(jaxpr, "conv_general_dilated")


def narrow_eqns(jaxpr, compute):
  dt, acc = NARROW[compute]
  return [e for e in conv_eqns(jaxpr)
          if all(v.aval.dtype == dt for v in e.invars)
          and e.params["preferred_element_type"] == acc]


def popcount_eqns(jaxpr):
  """The uint32 popcounts of a jaxpr (what `fastconv.xnor_conv` computes with)."""
  return [e for e in jaxpr_utils.primitive_eqns(jaxpr, "population_count")
          if e.invars[0].aval.dtype == jnp.uint32]


def float_convs(jaxpr):
  return [e for e in conv_eqns(jaxpr) if all(v.aval.dtype == jnp.float32 for v in e.invars)]


@pytest.mark.parametrize("compute", ["bf16", "int8"])
@pytest.mark.parametrize("levels,stride", [(1, 1), (1, 2), (3, 1), (127, 1)])
def test_narrow_conv_equals_float32_conv(compute, levels, stride):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(levels + stride), 3)
  x = jax.random.randint(kx, (2, 8, 8, 16), -levels, levels + 1) / levels
  if levels == 1:
    x = jnp.where(x == 0, 1.0, x)   # sign activations: +-1
  w = jnp.sign(jax.random.normal(kw, (3, 3, 16, 8)))
  pad = ((1, 1), (1, 1))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN)
  fn = fastconv.narrow_conv_general_dilated(compute, levels)
  narrow = lambda x, w: fn(x, w, (stride, stride), pad, dimension_numbers=DN)
  y_ref, y = ref(x, w), jax.jit(narrow)(x, w)
  assert y.dtype == jnp.float32
  if levels == 1:
    np.testing.assert_array_equal(y, y_ref)   # integer sums: bitwise
  else:
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  grads_ref = jax.vjp(ref, x, w)[1](g)
  grads = jax.jit(lambda x, w, g: jax.vjp(narrow, x, w)[1](g))(x, w, g)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
  # The forward really is a narrow convolution; the backward stays float32. int8 carries two
  # forwards (`fastconv.int8_conv`): int32 sums on a CPU, cuDNN's float32 output elsewhere.
  jaxpr = jax.make_jaxpr(lambda x, w, g: jax.vjp(narrow, x, w)[1](g))(x, w, g)
  convs = conv_eqns(jaxpr)
  assert len(narrow_eqns(jaxpr, compute)) == 1
  narrow_forwards = 2 if compute == "int8" else 1
  assert sum(all(v.aval.dtype == NARROW[compute][0] for v in e.invars)
             for e in convs) == narrow_forwards
  assert sum(all(v.aval.dtype == jnp.float32 for v in e.invars)
             for e in convs) == len(convs) - narrow_forwards


def _cpu_conv(x, w, stride, pad):
  """The float32 convolution computed on the CPU backend, where sums of integers (< 2^24) are
  exact in any order; cuDNN's float32 algorithms are not exact even at `highest` precision
  (45.999996 for 46 on an H200), so on a GPU the reference is still the CPU's."""
  cpu = jax.devices("cpu")[0]
  x, w = jax.device_put(x, cpu), jax.device_put(w, cpu)
  return np.asarray(lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN))


def _grid(key, shape, zeros):
  """-1/+1 (or -1/0/+1 with `zeros`) float32 values."""
  v = jax.random.randint(key, shape, -1, 2).astype(jnp.float32)
  return v if zeros else jnp.where(v == 0, 1.0, v)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("shape,k,stride,pad", [
    ((2, 8, 8, 16), 3, 1, ((1, 1), (1, 1))),     # 16 channels: one word, 16 pad bits
    ((2, 9, 7, 64), 3, 2, ((1, 1), (1, 1))),     # two words, odd sizes, stride 2
    ((1, 6, 6, 40), 3, 2, ((0, 1), (1, 0))),     # uneven padding, 40 channels
    ((2, 5, 5, 33), 1, 1, ((0, 0), (0, 0))),     # 1x1
    ((1, 4, 4, 32), 3, 1, ((2, 2), (2, 2))),     # taps wholly in the padding
    # more popcount terms than one fusion sums (XNOR_TERMS_PER_FUSION): stored partial sums
    ((1, 5, 5, 100), 3, 1, ((1, 1), (1, 1))),    # 36 terms
    ((1, 6, 6, 70), 3, 2, ((1, 1), (1, 1))),     # 27 terms
])
def test_xnor_conv_equals_float32_conv(zeros, shape, k, stride, pad):
  kx, kw = jax.random.split(jax.random.PRNGKey(shape[-1] + k + stride))
  x = _grid(kx, shape, zeros)
  w = _grid(kw, (k, k, shape[-1], 24), zeros=False)
  ref = _cpu_conv(x, w, stride, pad)
  xnor = jax.jit(fastconv.xnor_conv, static_argnums=(2, 3, 4))
  y = xnor(x, w, (stride, stride), pad, zeros)
  assert y.dtype == jnp.int32
  np.testing.assert_array_equal(y, ref)
  # The kernel already packed (what packed inference passes): the same sums.
  words = binarize.pack_signs(w, axis=2)
  np.testing.assert_array_equal(xnor(x, words, (stride, stride), pad, zeros), ref)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("shape,k,stride,pad", [
    ((2, 9, 7, 64), 3, 2, ((1, 1), (1, 1))),
    ((1, 6, 6, 40), 3, 2, ((0, 1), (1, 0))),
    ((2, 5, 5, 33), 1, 1, ((0, 0), (0, 0))),
    ((1, 4, 4, 32), 3, 1, ((2, 2), (2, 2))),
    ((1, 5, 5, 100), 3, 1, ((1, 1), (1, 1))),    # partial sums (XNOR_TERMS_PER_FUSION)
])
def test_xnor_conv_of_ternary_kernels_equals_float32_conv(zeros, shape, k, stride, pad):
  """-1/0/+1 kernels: a second (nonzero) bit plane, given packed or as the kernel itself."""
  kx, kw, kz = jax.random.split(jax.random.PRNGKey(shape[-1] + 7 * k + stride), 3)
  x = _grid(kx, shape, zeros)
  w = _grid(kw, (k, k, shape[-1], 24), zeros=False) * jax.random.bernoulli(
      kz, 0.6, (k, k, shape[-1], 24))
  ref = _cpu_conv(x, w, stride, pad)
  xnor = jax.jit(fastconv.xnor_conv, static_argnums=(2, 3, 4))
  np.testing.assert_array_equal(xnor(x, w, (stride, stride), pad, zeros, w), ref)
  one = jnp.ones((), jnp.float32)
  words, nonzero = (binarize.pack_signs(v, axis=2) for v in (w, jnp.where(w != 0, one, -one)))
  np.testing.assert_array_equal(xnor(x, words, (stride, stride), pad, zeros, nonzero), ref)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_xnor_narrow_conv_gives_the_float32_values_and_gradients(zeros, stride):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(3 + stride), 3)
  x = _grid(kx, (2, 8, 8, 48), zeros)
  w = _grid(kw, (3, 3, 48, 16), zeros=False)
  pad = ((1, 1), (1, 1))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN)
  fn = fastconv.narrow_conv_general_dilated("xnor", 1, zeros=zeros)
  xnor = lambda x, w: fn(x, w, (stride, stride), pad, dimension_numbers=DN)
  y_ref, y = ref(x, w), jax.jit(xnor)(x, w)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, y_ref)
  g = jax.random.normal(kg, y.shape)
  grads_ref = jax.vjp(ref, x, w)[1](g)
  grads = jax.jit(lambda x, w, g: jax.vjp(xnor, x, w)[1](g))(x, w, g)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
  # The forward is popcounts of uint32 words, no convolution; the backward's are float32.
  forward = jax.make_jaxpr(xnor)(x, w)
  assert len(popcount_eqns(forward)) >= 9 * 2 and not conv_eqns(forward)
  jaxpr = jax.make_jaxpr(lambda x, w, g: jax.vjp(xnor, x, w)[1](g))(x, w, g)
  assert len(float_convs(jaxpr)) == len(conv_eqns(jaxpr)) >= 2
  # A convolution xnor_conv does not cover (dilation) takes the float32 forward: same values.
  dil = lambda x, w: fn(x, w, (1, 1), pad, rhs_dilation=(2, 2), dimension_numbers=DN)
  np.testing.assert_array_equal(
      jax.jit(dil)(x, w), lax.conv_general_dilated(x, w, (1, 1), pad, rhs_dilation=(2, 2),
                                                   dimension_numbers=DN))


def test_narrow_conv_refuses_what_it_cannot_compute_exactly():
  with pytest.raises(ValueError, match="levels"):
    fastconv.narrow_conv_general_dilated("int8", 128)
  with pytest.raises(ValueError, match="bf16"):
    fastconv.narrow_conv_general_dilated("int4", 1)
  with pytest.raises(ValueError, match="xnor computes levels 1"):
    fastconv.narrow_conv_general_dilated("xnor", 3)


@pytest.fixture(scope="module")
def bnn():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  out = {}
  for bits in (1, 2):
    model = get_model("bnn_resnet20", 10, num_bits=bits, width=0.5)
    v = jax.jit(lambda r, model=model: model.init(r, x, train=False))(jax.random.PRNGKey(1))
    out[bits] = (v, binarize.binary_weights(v["params"]))
  return x, out, {}   # {}: the compiled results by (bits, compute), shared by the tests


def _loss(model, transform, params, batch_stats, x):
  out, _ = model.apply({"params": transform.apply(params, {}), "batch_stats": batch_stats}, x,
                       train=True, mutable=["batch_stats"])
  return jnp.sum(out[0] ** 2), out[0]


@pytest.mark.slow        # whole BNNs, 1-2 minutes in all (their convolutions alone are checked by
                         # test_narrow_conv_equals_float32_conv and the xnor tests above)
@pytest.mark.plumbing   # a whole model's wiring: XLA optimizations off (tests/conftest.py)
@pytest.mark.parametrize("bits,compute", [
    (1, "xnor"), (1, "bf16"), (1, "int8"), (2, "xnor"), (2, "bf16"), (2, "int8")])
def test_bnn_with_narrow_forward_gives_the_float32_logits_and_gradients(bnn, compute, bits):
  x, nets, computed = bnn
  v, transform = nets[bits]
  results, jaxprs, forwards = {}, {}, {}
  for c in ("f32", compute):
    if (bits, c) not in computed:   # the float32 reference: once per bits
      model = get_model("bnn_resnet20", 10, num_bits=bits, width=0.5, binary_compute=c)
      loss = lambda p, model=model: _loss(model, transform, p, v["batch_stats"], x)
      fn = jax.value_and_grad(loss, has_aux=True)
      computed[bits, c] = (jax.jit(fn)(v["params"]), jax.make_jaxpr(fn)(v["params"]),
                           jax.make_jaxpr(loss)(v["params"]))
    results[c], jaxprs[c], forwards[c] = computed[bits, c]
  (_, y_ref), g_ref = results["f32"]
  (_, y), g = results[compute]
  np.testing.assert_array_equal(y, y_ref) if bits == 1 else np.testing.assert_allclose(
      y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Every block conv (9 blocks x 2 + 2 projection shortcuts) runs narrow; the stem does not.
  if compute == "xnor":   # the forward: the stem's conv alone, popcounts for the 20 others
    assert len(float_convs(forwards["f32"])) == len(conv_eqns(forwards["f32"])) == 21
    assert len(conv_eqns(forwards[compute])) == 1
    assert popcount_eqns(forwards[compute]) and not popcount_eqns(jaxprs["f32"])
  else:
    assert len(narrow_eqns(jaxprs[compute], compute)) == 20
    assert len(narrow_eqns(jaxprs["f32"], compute)) == 0


def _config(num_bits=1, **binary):
  c = config_lib.base_config()
  c.model, c.data, c.width = "bnn_resnet20", "digits", 0.25
  c.model_kwargs.num_bits = num_bits
  if binary is not None:
    c.binary = ml_collections.ConfigDict({"method": "ste_sign", "include": (r".*",),
                                          "exclude": transforms.DEFAULT_EXCLUDE, **binary})
  return c


@pytest.mark.parametrize("num_bits", [1, 2, 3])
@pytest.mark.parametrize("compute", ["bf16", "int8", "xnor", "auto", None])
def test_make_experiment_keeps_or_resolves_binary_compute(data_dir, compute, num_bits):
  c = _config(num_bits)
  c.data_dir = data_dir
  if compute is not None:   # None: the model's default, "auto"
    c.model_kwargs.binary_compute = compute
  if compute == "xnor" and num_bits > 2:
    with pytest.raises(ConfigError, match=r"`binary_compute` 'xnor'.*`num_bits` is 3"):
      train.make_experiment(c, load_teacher=False)
    return
  exp = train.make_experiment(c, load_teacher=False)
  if compute in ("auto", None):
    accel = jax.default_backend() in ("gpu", "tpu")
    expected = "bf16" if accel else "xnor" if num_bits <= 2 else "f32"
  else:
    expected = compute
  assert exp.model.binary_compute == expected


@pytest.mark.parametrize("change,match", [
    ({"method": "xnor"}, "binary.method 'xnor' does not give"),
    ({"exclude": transforms.DEFAULT_EXCLUDE + ("stage2_block0/conv1",)},
     "stage2_block0/conv1"),
    (None, "no enabled `binary` sub-config"),
])
def test_narrow_binary_compute_needs_sign_kernels_on_every_block_conv(data_dir, change, match):
  c = _config(**(change or {}))
  if change is None:
    del c["binary"]
  c.data_dir = data_dir
  c.model_kwargs.binary_compute = "int8"
  with pytest.raises(ConfigError, match=r"model_kwargs\.binary_compute") as e:
    train.make_experiment(c, load_teacher=False)
  assert match in str(e.value)
  c.model_kwargs.binary_compute = "xnor"
  with pytest.raises(ConfigError, match=r"model_kwargs\.binary_compute"):
    train.make_experiment(c, load_teacher=False)
  c.model_kwargs.binary_compute = "auto"   # auto falls back to float32 instead
  assert train.make_experiment(c, load_teacher=False).model.binary_compute == "f32"


def test_ternary_kernels_train_on_int8_not_xnor(data_dir):
  """-1/0/+1 kernels: int8 products stay exact, the training forward's XNOR is refused, and
  "auto" takes float32 on a CPU."""
  c = _config(method="ternary")
  c.data_dir = data_dir
  c.model_kwargs.binary_compute = "int8"
  assert train.make_experiment(c, load_teacher=False).model.binary_compute == "int8"
  c.model_kwargs.binary_compute = "xnor"
  with pytest.raises(ConfigError, match="ternary"):
    train.make_experiment(c, load_teacher=False)
  c.model_kwargs.binary_compute = "auto"
  want = "f32" if jax.default_backend() == "cpu" else "bf16"
  assert train.make_experiment(c, load_teacher=False).model.binary_compute == want


def test_unknown_binary_compute_is_a_config_error():
  with pytest.raises(ConfigError, match="binary_compute"):
    get_model("bnn_resnet20", 10, binary_compute="fp8")


def test_narrow_binary_compute_with_lowrank_is_refused(data_dir):
  from jcompress import lowrank  # noqa: PLC0415
  c = _config()
  c.data_dir = data_dir
  c.lowrank = lowrank.default_config()
  c.lowrank.rank = 2
  c.model_kwargs.binary_compute = "bf16"
  with pytest.raises(ConfigError, match=r"model_kwargs\.binary_compute.*lowrank"):
    train.make_experiment(c, load_teacher=False)


@pytest.mark.slow
def test_graph_walkers_count_the_xnor_convolutions_as_convolutions():
  """MACs and the channel graph (analysis reports, structured pruning) see the block convs of an
  XNOR-popcount BNN as the float32 convolutions they equal."""
  from jcompress import structured  # noqa: PLC0415
  models = {c: get_model("bnn_resnet20", 10, num_bits=1, width=0.5, binary_compute=c)
            for c in ("f32", "xnor")}
  shape = (1, 16, 16, 3)
  macs = {c: structured.count_flops(m, shape) for c, m in models.items()}
  stem = 16 * 16 * 9 * 3 * 8
  assert macs["xnor"] == macs["f32"] > 20 * stem
  v = jax.jit(lambda r: models["f32"].init(r, jnp.zeros(shape), train=False))(
      jax.random.PRNGKey(0))   # eagerly each initializer op compiles alone
  layers = {c: {k: (layer.kind, layer.macs()) for k, layer in
                structured.build_graph(m, v["params"], v["batch_stats"], shape).layers.items()}
            for c, m in models.items()}
  assert layers["xnor"] == layers["f32"] and len(layers["f32"]) == 22
