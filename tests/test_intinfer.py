"""Integer inference (`jcompress.intinfer`): exact int8 convolutions and matmuls, and an
exported quantized model computed on integers (products int8, sums int32)."""

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jcompress import config as config_lib
from jcompress import export
from jcompress import intinfer
from jcompress import native
from jcompress import packing
from jcompress import train
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing

_DN = ("NHWC", "HWIO", "NHWC")
#: The matmul routes: XLA's int8 dot_general, and the AVX-512 VNNI kernel where it runs here.
_ROUTES = [False, pytest.param(True, marks=pytest.mark.skipif(
    not native.available(), reason=f"jcompress.native: {native.unavailable_reason()}"))]


def _reference(codes, wq, strides, padding):
  """The convolution of the integer values in float32: exact, every partial sum is an integer
  below 2^24 at these sizes."""
  return np.asarray(lax.conv_general_dilated(
      np.asarray(codes, np.float32), np.asarray(wq, np.float32), strides, padding,
      dimension_numbers=_DN, precision=lax.Precision.HIGHEST)).astype(np.int64)


@pytest.mark.parametrize("native_route", _ROUTES)
@pytest.mark.parametrize("code_range", [(0, 255), (0, 15), (-128, 127)])
@pytest.mark.parametrize("kernel,strides,padding,chunk", [
    (3, (1, 1), ((1, 1), (1, 1)), None),
    (3, (2, 2), ((1, 1), (1, 1)), 2),
    (1, (2, 2), ((0, 0), (0, 0)), None),
    (3, (1, 1), "SAME", 1),
])
def test_int_conv_is_exact(code_range, kernel, strides, padding, chunk, native_route):
  """Unsigned 8-bit codes (shifted into int8, the shift put back through the weight sums and
  the padding), 4-bit and signed codes; strides, 1x1, string padding, chunked or not; by
  XLA's dot_general and by the native kernel (depth 45 or 5: padded to a multiple of 4)."""
  rng = np.random.RandomState(0)
  codes = rng.randint(code_range[0], code_range[1] + 1, (4, 7, 7, 5))
  wq = rng.randint(-127, 128, (kernel, kernel, 5, 6)).astype(np.int8)
  xq, shift = intinfer.to_int8(jnp.asarray(codes), code_range)
  assert shift == (128 if code_range[1] > 127 else 0)
  got = intinfer.int_conv(xq, shift, jnp.asarray(wq), strides, padding, chunk=chunk,
                          native=native_route)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), _reference(codes, wq, strides, padding))


@pytest.mark.parametrize("native_route", _ROUTES)
@pytest.mark.parametrize("code_range", [(0, 255), (-128, 127)])
def test_int_dense_is_exact(code_range, native_route):
  rng = np.random.RandomState(1)
  codes = rng.randint(code_range[0], code_range[1] + 1, (3, 4, 9))
  wq = rng.randint(-127, 128, (9, 5)).astype(np.int8)
  xq, shift = intinfer.to_int8(jnp.asarray(codes), code_range)
  got = intinfer.int_dense(xq, shift, jnp.asarray(wq), native=native_route)
  np.testing.assert_array_equal(np.asarray(got), codes.astype(np.int64) @ wq.astype(np.int64))


def test_codes_that_do_not_fit_int8_are_refused():
  with pytest.raises(ValueError, match="int8"):
    intinfer.to_int8(jnp.zeros((2,), jnp.int32), (-1, 255))


def test_chunk_images_divides_the_batch_and_keeps_under_the_limit():
  assert intinfer.chunk_images(64, 1000, limit=8000) == 8
  assert intinfer.chunk_images(60, 1000, limit=7000) == 6
  assert intinfer.chunk_images(7, 10_000, limit=100) == 1     # one image over the limit
  assert intinfer.chunk_images(64, 1, limit=10**6) == 64


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_unpack_codes_matches_packing(bits, signed):
  rng = np.random.RandomState(bits)
  lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  codes = rng.randint(lo, hi + 1, 37)
  packed = packing.pack(codes, bits, signed=signed)
  got = export._unpack_codes(jnp.asarray(packed), bits, 37, signed)  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(got), codes)


@pytest.mark.parametrize("n,density", [(37, 0.5), (64, 1.0), (1001, 0.1), (9, 0.0)])
def test_scatter_mask_puts_the_values_where_the_bitmask_says(n, density):
  rng = np.random.RandomState(n)
  mask = rng.rand(n) < density
  values = rng.randn(int(mask.sum())).astype(np.float32)
  want = np.zeros(n, np.float32)
  want[mask] = values
  got = export._scatter_mask(jnp.asarray(np.packbits(mask)), jnp.asarray(values), n,  # noqa: SLF001
                             int(mask.sum()), jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- artifacts


def _config(data_dir, act_kind="pact", abits=8, wbits=8, symmetric=True, method="uniform"):
  c = config_lib.base_config()
  c.data, c.data_dir, c.image_size = "digits", data_dir, 0
  c.model, c.width = "resnet20", 0.25
  c.batch_size, c.eval_batch_size, c.total_steps = 32, 128, 1
  if act_kind:
    c.model_kwargs.act_quant = ml_collections.ConfigDict(
        {"kind": act_kind, "bits": abits, "calibrate": False})
  c.quant = ml_collections.ConfigDict({"method": method, "bits": wbits, "mode": "ptq",
                                       "symmetric": symmetric})
  return c


def _artifact(c):
  exp = train.make_experiment(c)
  state = train.create_state(exp)
  rng = np.random.RandomState(0)   # BatchNorm statistics away from the identity
  stats = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype),
                       state.batch_stats)
  state = state.replace(batch_stats=stats)
  arrays, manifest = export.artifact_arrays(exp, state)
  images = rng.rand(32, 8, 8, 1).astype(np.float32)
  return manifest, arrays, images, export._reference_logits(exp, state, images)  # noqa: SLF001


@pytest.fixture(scope="module")
def w8a8(data_dir):
  return _artifact(_config(data_dir))


def test_quantized_artifact_computes_on_int8_and_predicts_as_trained(w8a8):
  manifest, arrays, images, reference = w8a8
  fn = export.inference_fn((manifest, arrays), integer=True, min_depth=0)
  layers = fn.apply.integer_layers
  kernels = [p[:-len("/kernel")] for p, e in manifest["params"].items()
             if p.endswith("/kernel") and e["encoding"] == "quant"]
  assert layers and sorted(layers) == sorted(kernels)      # every quantized conv
  got = np.asarray(fn(images))
  np.testing.assert_allclose(got, reference, rtol=0, atol=1e-3 * np.abs(reference).max())
  assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.995
  # The jaxpr: int8 x int8 products for the integer layers; in float only the stem's conv
  # (float, as the export says) and the classifier's matmul.
  arrays_j = {k: jnp.asarray(v) for k, v in arrays.items()}
  ops = intinfer.products(jax.make_jaxpr(fn.apply)(arrays_j, jnp.asarray(images)))
  int8 = [o for o in ops if o[1] == ("int8", "int8")]
  float_ops = [o for o in ops if o[1] != ("int8", "int8")]
  assert len(int8) >= len(layers)
  assert sorted(float_ops) == [("conv_general_dilated", ("float32", "float32")),
                               ("dot_general", ("float32", "float32"))]


@pytest.mark.skipif(not native.available(),
                    reason=f"jcompress.native: {native.unavailable_reason()}")
def test_native_kernel_gives_the_xla_routes_logits_bitwise(w8a8):
  """inference_fn's default on an AVX-512 VNNI CPU: the integer layers' matmuls by the native
  kernel (uint8 x int8 products in its jaxpr, one per layer), the same int32 sums as XLA's
  int8 dot_general, so bitwise the same logits; fn.apply (what export_stablehlo serializes)
  holds no custom call."""
  manifest, arrays, images, _ = w8a8
  fast = export.inference_fn((manifest, arrays), min_depth=0)
  plain = export.inference_fn((manifest, arrays), min_depth=0, native=False)
  assert fast.native and not plain.native
  np.testing.assert_array_equal(np.asarray(fast(images)), np.asarray(plain(images)))
  run = export.make_apply(manifest, integer=True, min_depth=0, native=True)
  arrays_j = {k: jnp.asarray(v) for k, v in arrays.items()}
  ops = intinfer.products(jax.make_jaxpr(run)(arrays_j, jnp.asarray(images)))
  kernel = [o for o in ops if o[0] == "int8_matmul"]
  assert kernel and all(o[1] == ("uint8", "int8") for o in kernel)
  assert len(kernel) == len(fast.apply.integer_layers)
  assert not [o for o in ops if o[1] == ("int8", "int8")]   # no XLA int8 dot left
  portable = intinfer.products(jax.make_jaxpr(fast.apply)(arrays_j, jnp.asarray(images)))
  assert not [o for o in portable if o[0] == "int8_matmul"]


def test_native_true_where_the_kernel_cannot_run_names_why(w8a8, monkeypatch):
  manifest, arrays, _, _ = w8a8
  monkeypatch.setattr(native, "unavailable_reason", lambda: "the CPU lacks avx512_vnni")
  with pytest.raises(ConfigError, match="native=True.*lacks avx512_vnni"):
    export.inference_fn((manifest, arrays), min_depth=0, native=True)
  assert not export.inference_fn((manifest, arrays), min_depth=0, native="auto").native
  with pytest.raises(ConfigError, match="native='fast'"):
    export.inference_fn((manifest, arrays), native="fast")


def _int8_products_in_stablehlo(apply, arrays, images, platform: str) -> int:
  """int8 x int8 dot_generals in `apply`'s StableHLO lowered for `platform` alone."""
  from jax import export as jax_export  # noqa: PLC0415
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)  # noqa: E731
  exported = jax_export.export(jax.jit(apply), platforms=[platform])(
      jax.tree.map(spec, arrays), spec(images))
  return sum(1 for line in exported.mlir_module().splitlines()
             if "stablehlo.dot_general" in line and "xi8>, tensor<" in line)


def test_auto_computes_on_integers_on_a_cpu_and_in_float_elsewhere(w8a8):
  """integer="auto" (the default): on a CPU bitwise the integer route; the graph chooses by
  the platform it runs on, so its StableHLO for cuda has no int8 products, for cpu it has."""
  manifest, arrays, images, _ = w8a8
  auto = export.inference_fn((manifest, arrays), min_depth=0)
  forced = export.inference_fn((manifest, arrays), integer=True, min_depth=0)
  assert auto.apply.integer_layers == forced.apply.integer_layers != []
  np.testing.assert_array_equal(np.asarray(auto(images)), np.asarray(forced(images)))
  assert _int8_products_in_stablehlo(auto.apply, arrays, images, "cpu") >= len(
      auto.apply.integer_layers)
  assert _int8_products_in_stablehlo(auto.apply, arrays, images, "cuda") == 0
  assert _int8_products_in_stablehlo(forced.apply, arrays, images, "cuda") > 0
  with pytest.raises(ConfigError, match="integer='yes'"):
    export.inference_fn((manifest, arrays), integer="yes")


@pytest.mark.parametrize("integer", [True, False])
def test_decoding_once_at_load_gives_the_per_call_logits(w8a8, integer):
  """inference_fn decodes the stored codes once (default) or inside every call: the same
  computation on the same decoded tensors, so bitwise the same logits."""
  manifest, arrays, images, _ = w8a8
  once = export.inference_fn((manifest, arrays), integer=integer, min_depth=0)
  per_call = export.inference_fn((manifest, arrays), integer=integer, min_depth=0,
                                 decode_once=False)
  np.testing.assert_array_equal(np.asarray(once(images)), np.asarray(per_call(images)))


def test_float_route_is_the_fake_quant_model_exactly(w8a8):
  manifest, arrays, images, reference = w8a8
  fn = export.inference_fn((manifest, arrays), integer=False)
  assert fn.apply.integer_layers == []
  np.testing.assert_array_equal(np.asarray(fn(images)), reference)


@pytest.mark.parametrize("kind,abits,wbits", [("lsq", 4, 4), ("dorefa", 2, 8)])
@pytest.mark.slow
def test_other_activation_quantizers_and_bits(data_dir, kind, abits, wbits):
  manifest, arrays, images, reference = _artifact(
      _config(data_dir, act_kind=kind, abits=abits, wbits=wbits))
  fn = export.inference_fn((manifest, arrays), min_depth=0)
  assert fn.apply.integer_layers
  got = np.asarray(fn(images))
  np.testing.assert_allclose(got, reference, rtol=0, atol=1e-3 * np.abs(reference).max())


def test_layers_that_cannot_run_on_integers_say_why(data_dir):
  manifest = _artifact(_config(data_dir, act_kind=None))[0]
  ok, why = intinfer.integer_layers(manifest, min_depth=0)
  assert not ok and why and all("not quantized" in w for w in why.values())
  manifest = _artifact(_config(data_dir, symmetric=False))[0]
  ok, why = intinfer.integer_layers(manifest, min_depth=0)
  assert not ok and all("asymmetric" in w for w in why.values())
  manifest = _artifact(_config(data_dir))[0]      # 4-16 channels: too shallow by default
  ok, why = intinfer.integer_layers(manifest)
  assert not ok and all("depth" in w for w in why.values())


def test_int_conv_exports_with_a_symbolic_batch():
  """jax.export (the artifact's StableHLO) traces with a symbolic batch: no chunking there."""
  from jax import export as jax_export  # noqa: PLC0415
  wq = jnp.asarray(np.random.RandomState(2).randint(-127, 128, (3, 3, 4, 6)), jnp.int8)
  f = jax.jit(lambda x: intinfer.int_conv(x, 128, wq, (1, 1), ((1, 1), (1, 1))))
  b = jax_export.symbolic_shape("b")[0]
  exported = jax_export.export(f)(jax.ShapeDtypeStruct((b, 8, 8, 4), jnp.int8))
  x = jnp.asarray(np.random.RandomState(3).randint(-128, 128, (5, 8, 8, 4)), jnp.int8)
  np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(f(x)))


@pytest.mark.slow
def test_signed_activation_codes_run_on_integers(data_dir):
  """MobileNetV2's expand convolutions read signed activation codes (`conv(signed_input=True)`:
  the linear bottleneck): the integer route takes each layer's code range from its quantizer,
  int8 without an offset there, and predicts as the fake-quant model."""
  c = _config(data_dir)
  c.model, c.width = "mobilenetv2_cifar", 0.35
  manifest, arrays, images, reference = _artifact(c)
  fn = export.inference_fn((manifest, arrays), integer=True, min_depth=0)
  assert any(layer.endswith("expand_conv") for layer in fn.apply.integer_layers)
  got = np.asarray(fn(images))
  np.testing.assert_allclose(got, reference, rtol=0, atol=1e-3 * np.abs(reference).max())
