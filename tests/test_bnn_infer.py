"""Tests for the frozen, bit-packed BNN artifact and its packed inference (jcompress/bnn_infer.py).

The network is a bnn_resnet20 at width 0.25 (4/8/16 channels: fan-ins 36, 72, 144, none a
multiple of 32, so every packed row has padding bits) on 8 images of 16x16, with random params
and random BatchNorm statistics (negative scales included, so both threshold directions occur).
The reference is the latent model: `model.apply` with `binary_weights(...).apply` weights,
train=False.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import binary as binarize
from jcompress import bnn_infer
from jcompress import jaxpr_utils
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.models import get_model

pytestmark = pytest.mark.plumbing

KEY = jax.random.key(0, impl="rbg")


def random_bn(params, batch_stats, seed):
  """BN scales +-U[0.5, 1.5] (20% negative), biases N(0, 0.3^2), means N(0, 0.6^2),
  vars U[0.5, 2]; every other leaf as it is (new trees, inputs untouched)."""
  key = jax.random.key(seed)
  count = {"n": 0}

  def draw(kind, x):
    count["n"] += 1
    k = jax.random.fold_in(key, count["n"])
    if kind == "var":
      return jax.random.uniform(k, x.shape, minval=0.5, maxval=2.0)
    if kind == "mean":
      return 0.6 * jax.random.normal(k, x.shape)
    if kind == "bias":
      return 0.3 * jax.random.normal(k, x.shape)
    mag = jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5)
    return jnp.where(jax.random.bernoulli(jax.random.fold_in(k, 1), 0.8, x.shape), mag, -mag)

  def p_leaf(path, x):
    name = path.rsplit("/", 1)[-1]
    if "bn" in path.rsplit("/", 2)[-2] and name in ("scale", "bias"):
      return draw(name, x)
    if path.startswith("head/"):
      return x + 0.5 * jax.random.normal(jax.random.fold_in(key, 999), x.shape)
    return x

  params = transforms.map_with_path(p_leaf, params)
  stats = transforms.map_with_path(lambda p, x: draw(p.rsplit("/", 1)[-1], x), batch_stats)
  return params, stats


class Net:
  """A tiny bnn_resnet20, its random variables and latent logits, per (num_bits, method)."""

  def __init__(self, num_bits, method, images, width=0.25):
    self.model = get_model("bnn_resnet20", 10, width=width, num_bits=num_bits)
    variables = jax.jit(self.model.init)(KEY, images[:1])
    self.params, self.stats = random_bn(variables["params"], variables["batch_stats"],
                                        seed=num_bits)
    self.method = method
    transform = binarize.binary_weights(self.params, method=method)
    apply = jax.jit(lambda p, s, x: self.model.apply({"params": p, "batch_stats": s}, x,
                                                      train=False))
    # Centre the classifier on this batch (bias = -mean(pre_logits) @ kernel), so that the
    # images' argmaxes differ instead of one class winning on the common part of the features.
    _, feats = apply(transform.apply(self.params, {}), self.stats, images)
    head = dict(self.params["head"])
    head["bias"] = -jnp.mean(feats["pre_logits"], axis=0) @ head["kernel"]
    self.params = {**self.params, "head": head}
    self.latent = np.asarray(apply(transform.apply(self.params, {}), self.stats, images)[0])
    self.frozen = bnn_infer.freeze(self.params, self.stats, self.model, method=method)


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1, impl="rbg"), (8, 16, 16, 3), jnp.float32)


@pytest.fixture(scope="module")
def nets(images):
  cache = {}

  def get(num_bits, method="ste_sign"):
    if (num_bits, method) not in cache:
      cache[num_bits, method] = Net(num_bits, method, images)
    return cache[num_bits, method]

  return get


def assert_matches_latent(out, latent):
  out = np.asarray(out)
  assert out.shape == latent.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, latent, rtol=1e-5, atol=1e-5 * np.abs(latent).max())
  np.testing.assert_array_equal(out.argmax(-1), latent.argmax(-1))


# ----------------------------------------------------------------------------- packing


def test_pack_kernel_layout_and_roundtrip():
  w = np.array(jax.random.normal(jax.random.key(3), (3, 3, 5, 7)), np.float32)
  w[0, 0, 0, 0] = 0.0   # sign(0) = +1
  bits = np.asarray(bnn_infer.pack_kernel(w))
  assert bits.dtype == np.uint32 and bits.shape == (7, 2)   # K = 45 -> 2 words a channel
  flat = w.reshape(45, 7)
  for o in range(7):
    for i in range(64):
      bit = (int(bits[o, i // 32]) >> (i % 32)) & 1
      assert bit == (int(flat[i, o] >= 0) if i < 45 else 0), (o, i)
  signs = np.where(w >= 0, 1.0, -1.0).astype(np.float32)
  np.testing.assert_array_equal(bnn_infer.unpack_kernel(bits, w.shape), signs)
  np.testing.assert_array_equal(bnn_infer.unpack_kernel(bits, w.shape, jnp.int8),
                                signs.astype(np.int8))


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("num_bits,method", [
    (1, "ste_sign"), (2, "ste_sign"), (1, "xnor"), (1, "ternary"), (2, "ternary"),
    pytest.param(2, "xnor", marks=pytest.mark.slow),
])
def test_packed_apply_matches_latent_model(nets, images, num_bits, method):
  net = nets(num_bits, method)
  # The random BN makes the network non-trivial: the images get different logits.
  assert np.std(net.latent, axis=0).min() > 1e-3
  assert len(set(net.latent.argmax(-1).tolist())) > 1
  runtime = bnn_infer.load(net.frozen, net.model)
  assert_matches_latent(bnn_infer.packed_apply(runtime, images), net.latent)


@pytest.mark.slow
def test_imagenet_stem_bnn_resnet18_matches_latent_model():
  """bnn_resnet18: 7x7/2 stem folded with its BN, then the 3x3/2 max pool; 4 stages."""
  x = jax.random.normal(jax.random.key(4, impl="rbg"), (4, 32, 32, 3), jnp.float32)
  model = get_model("bnn_resnet18", 10, width=0.0625, num_bits=1)
  variables = jax.jit(model.init)(KEY, x[:1])
  params, stats = random_bn(variables["params"], variables["batch_stats"], seed=7)
  eff = binarize.binary_weights(params).apply(params, {})
  latent = np.asarray(jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x,
                                                          train=False)[0])(eff, stats, x))
  frozen = bnn_infer.freeze(params, stats, model)
  assert frozen["meta"]["cifar_stem"] is False and len(frozen["meta"]["blocks"]) == 8
  assert_matches_latent(bnn_infer.packed_apply(frozen, x), latent)


def test_packed_bits_give_the_same_logits_as_the_loaded_form(nets, images):
  """From the stored artifact alone (bits unpacked inside the graph): the very same logits."""
  net = nets(1)
  np.testing.assert_array_equal(bnn_infer.packed_apply(net.frozen, images),
                                bnn_infer.packed_apply(bnn_infer.load(net.frozen), images))


@pytest.mark.parametrize("num_bits,method", [(1, "ste_sign"), (2, "ternary")])
def test_compiled_unpacking_is_load(nets, images, num_bits, method):
  """`unpacked_arrays` under jit (how export.inference_fn decodes a packed BNN once) gives
  `load`'s arrays, and the same logits as the packed artifact, for every compute."""
  net = nets(num_bits, method)
  for compute in ("xnor", "int8"):
    meta = bnn_infer.loaded_meta(net.frozen["meta"], compute)
    loaded = bnn_infer.load(net.frozen, compute=compute)
    assert meta == loaded["meta"]
    compiled = jax.jit(lambda f, m=meta: bnn_infer.unpacked_arrays(f, m))(
        {k: v for k, v in net.frozen.items() if k != "meta"})
    jax.tree.map(np.testing.assert_array_equal, compiled,
                 {k: v for k, v in loaded.items() if k != "meta"})
    np.testing.assert_array_equal(
        bnn_infer.packed_apply({"meta": meta, **compiled}, images),
        bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute="int8"), images))


def test_every_compute_kind_gives_bitwise_equal_logits(nets, images):
  """int8 -> int32, bf16 -> f32, f32 and XNOR-popcount all compute the same exact integers."""
  net = nets(1)
  outs = {c: np.asarray(bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute=c), images))
          for c in bnn_infer.COMPUTE}
  for c in bnn_infer.COMPUTE:
    np.testing.assert_array_equal(outs[c], outs["int8"], err_msg=c)
  assert_matches_latent(outs["xnor"], net.latent)


def test_two_bit_bf16_and_xnor_equal_int8(nets, images):
  net = nets(2)
  b = bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute="int8"), images)
  for compute in ("bf16", "xnor"):
    a = bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute=compute), images)
    np.testing.assert_array_equal(a, b, err_msg=compute)
  assert_matches_latent(b, net.latent)


def test_binary_convs_run_in_int8_with_int32_accumulation(nets, images):
  """Walks the jaxpr: every binary conv reads int8 and accumulates in int32 on a CPU; the graph's
  other branch (a GPU's: cuDNN's int8 convolutions output f32, exact for these sums) reads int8
  too; only the stem is a float conv."""
  net = nets(1)
  runtime = bnn_infer.load(net.frozen, compute="int8")
  jaxpr = jax.make_jaxpr(bnn_infer._forward, static_argnums=(2,))(
      bnn_infer._arrays(runtime), images, bnn_infer._Static(runtime["meta"]))
  convs = jaxpr_utils.primitive_eqns(jaxpr, "conv_general_dilated")
  kinds = [(str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype), str(e.outvars[0].aval.dtype))
           for e in convs]
  # bnn_resnet20: 9 blocks x 2 convs + 2 projection shortcuts, plus the float stem.
  assert kinds.count(("int8", "int8", "int32")) == 20
  assert kinds.count(("int8", "int8", "float32")) == 20
  assert kinds.count(("float32", "float32", "float32")) == 1
  assert len(kinds) == 41


def test_xnor_binary_convs_are_uint32_popcounts(nets, images):
  """Walks the jaxpr of compute="xnor": no convolution but the float stem; popcounts of uint32
  words in place of the 20 binary ones."""
  net = nets(1)
  runtime = bnn_infer.load(net.frozen, compute="xnor")
  jaxpr = jax.make_jaxpr(bnn_infer._forward, static_argnums=(2,))(
      bnn_infer._arrays(runtime), images, bnn_infer._Static(runtime["meta"]))
  convs = jaxpr_utils.primitive_eqns(jaxpr, "conv_general_dilated")
  assert [str(e.invars[0].aval.dtype) for e in convs] == ["float32"]
  pops = jaxpr_utils.primitive_eqns(jaxpr, "population_count")
  assert pops and all(e.invars[0].aval.dtype == jnp.uint32 for e in pops)


def test_padding_bits_do_not_change_the_result(nets, images):
  """Every fan-in here (36, 72, 144) leaves tail bits in the last word: they are stored as 0, and
  even set to 1 they change nothing (unpacking drops them)."""
  net = nets(1)
  frozen = net.frozen
  garbage = {"meta": frozen["meta"]}
  n_tail = 0
  for name, blk in bnn_infer._arrays(frozen).items():
    garbage[name] = blk
    if not name.startswith("stage"):
      continue
    garbage[name] = dict(blk)
    for conv in ("conv1", "conv2", "shortcut_conv"):
      if conv not in blk:
        continue
      k = int(np.prod(frozen["meta"]["kernels"][f"{name}/{conv}"][:-1]))
      assert k % 32 != 0
      tail = np.uint32(~((1 << (k % 32)) - 1) & 0xFFFFFFFF)
      bits = np.asarray(blk[conv]["bits"])
      assert np.all(bits[:, -1] & tail == 0), f"{name}/{conv}"
      bits = bits.copy()
      bits[:, -1] |= tail
      garbage[name][conv] = {**blk[conv], "bits": bits}
      n_tail += 1
  assert n_tail == 20
  for compute in ("int8", "xnor"):
    np.testing.assert_array_equal(
        bnn_infer.packed_apply(bnn_infer.load(garbage, compute=compute), images),
        bnn_infer.packed_apply(bnn_infer.load(frozen, compute=compute), images), err_msg=compute)


def test_frozen_weights_are_the_signs_of_the_latent_weights(nets):
  net = nets(1, "xnor")
  path = "stage2_block0/shortcut_conv"
  w = np.asarray(net.params["stage2_block0"]["shortcut_conv"]["kernel"])
  entry = net.frozen["stage2_block0"]["shortcut_conv"]
  np.testing.assert_array_equal(bnn_infer.unpack_kernel(entry["bits"], w.shape),
                                np.where(w >= 0, 1.0, -1.0))
  np.testing.assert_allclose(entry["scale"], np.abs(w).mean(axis=(0, 1, 2)), rtol=1e-6)
  assert net.frozen["meta"]["kernels"][path] == list(w.shape)


def test_freeze_does_not_modify_its_inputs(images):
  model = get_model("bnn_resnet20", 10, width=0.25, num_bits=1)
  variables = jax.jit(model.init)(KEY, images[:1])
  params, stats = random_bn(variables["params"], variables["batch_stats"], seed=5)
  params = jax.tree.map(np.array, params)
  stats = jax.tree.map(np.array, stats)
  before = jax.tree.map(np.copy, (params, stats))
  bnn_infer.freeze(params, stats, model)
  jax.tree.map(np.testing.assert_array_equal, (params, stats), before)


def test_save_restore_roundtrip(nets, images, tmp_path):
  net = nets(1)
  path = str(tmp_path / "bnn.npz")
  nbytes = bnn_infer.save(net.frozen, path)
  restored = bnn_infer.restore(path)
  assert restored["meta"] == net.frozen["meta"]
  jax.tree.map(np.testing.assert_array_equal, bnn_infer._arrays(restored),
               bnn_infer._arrays(net.frozen))
  np.testing.assert_array_equal(bnn_infer.packed_apply(restored, images),
                                bnn_infer.packed_apply(net.frozen, images))
  # The file is the arrays plus the npz headers and the JSON meta (a few hundred bytes a leaf).
  total = bnn_infer.artifact_nbytes(net.frozen)["total"]
  n_leaves = len(jax.tree.leaves(bnn_infer._arrays(net.frozen)))
  assert total < nbytes < total + 400 * (n_leaves + 1) + 4096


# ----------------------------------------------------------------------------- bad input


def test_artifact_of_another_shape_is_refused_naming_the_leaf(nets):
  net = nets(1)
  wider = get_model("bnn_resnet20", 10, width=0.5, num_bits=1)
  with pytest.raises(ConfigError, match=r"stage1_block0/conv1.*\(3, 3, 8, 8\).*\(3, 3, 4, 4\)"):
    bnn_infer.load(net.frozen, wider)
  bnn_infer.check_artifact(net.frozen, net.model)   # its own model: fine
  # A corrupted bits leaf: named with both shapes.
  bad = dict(net.frozen)
  bad["stage3_block1"] = dict(bad["stage3_block1"])
  bad["stage3_block1"]["conv2"] = {"bits": np.zeros((16, 4), np.uint32)}
  with pytest.raises(ConfigError, match=r"stage3_block1/conv2/bits.*\(16, 5\).*\(16, 4\)"):
    bnn_infer.load(bad, net.model)
  with pytest.raises(ConfigError, match="num_bits"):
    bnn_infer.load(net.frozen, get_model("bnn_resnet20", 10, width=0.25, num_bits=2))


def test_freeze_refuses_bad_input(nets, images):
  net = nets(1)
  other = get_model("bnn_resnet20", 10, width=0.5, num_bits=1)
  with pytest.raises(ConfigError, match=r"params leaf 'final_bn/bias'.*\(32,\).*\(16,\)"):
    bnn_infer.freeze(net.params, net.stats, other)
  with pytest.raises(ConfigError, match="binary.include.*stage2_block1/conv2/kernel"):
    bnn_infer.freeze(net.params, net.stats, net.model,
                     exclude=transforms.DEFAULT_EXCLUDE + (r"stage2_block1/conv2",))
  with pytest.raises(ConfigError, match="binary.method"):
    bnn_infer.freeze(net.params, net.stats, net.model, method="stochastic")
  with pytest.raises(ConfigError, match="model"):
    bnn_infer.freeze(net.params, net.stats, get_model("resnet20", 10))
  three_bit = {**nets(2).frozen, "meta": {**nets(2).frozen["meta"], "num_bits": 3}}
  with pytest.raises(ConfigError, match="xnor.*num_bits 1 or 2.*num_bits=3"):
    bnn_infer.load(three_bit, compute="xnor")
  with pytest.raises(ConfigError, match="3 channels"):
    bnn_infer.packed_apply(net.frozen, images[..., :2])


# ----------------------------------------------------------------------------- sizes


def expected_binary_bytes(params):
  """sum over binary kernels of C_out * ceil(kh kw C_in / 32) words * 4 bytes."""
  total = 0
  for path, w in zip(transforms.leaf_paths(params), jax.tree.leaves(params)):
    if path.split("/")[-2] in ("conv1", "conv2", "shortcut_conv"):
      total += 4 * w.shape[-1] * -(-int(np.prod(w.shape[:-1])) // 32)
  return total


def test_sizes_per_leaf_and_binary_ratio(nets):
  net = nets(1)
  sizes = bnn_infer.artifact_nbytes(net.frozen)
  # width 0.25: stage1 3x3x4x4, K = 36 -> 2 words per output channel.
  assert sizes["per_leaf"]["stage1_block0/conv1/bits"] == 4 * 2 * 4
  assert sizes["binary_bytes"] == expected_binary_bytes(net.params)
  n_binary = sum(int(np.prod(s)) for s in net.frozen["meta"]["kernels"].values())
  assert sizes["binary_ratio"] == pytest.approx(4 * n_binary / sizes["binary_bytes"])
  leaves = jax.tree.leaves(bnn_infer._arrays(net.frozen))
  assert sizes["total"] == sum(x.nbytes for x in leaves)
  # The abstract artifact (no params) has the same sizes.
  abstract = bnn_infer.artifact_nbytes(bnn_infer.abstract_artifact(net.model))
  assert abstract["per_leaf"] == sizes["per_leaf"]


def test_full_size_binary_ratios():
  """bnn_resnet20: stage-1 fan-in 144 -> 5 words (28.8x), the rest whole words; ResNet-18: 32x."""
  r20 = get_model("bnn_resnet20", 10)
  s20 = bnn_infer.artifact_nbytes(bnn_infer.abstract_artifact(r20))
  assert s20["per_leaf"]["stage1_block0/conv1/bits"] == 16 * 5 * 4   # 28.8x for that layer
  weights = 6 * 9 * 16 * 16 + (9 * 16 * 32 + 5 * 9 * 32 * 32 + 9 * 16 * 32) \
      + (9 * 32 * 64 + 5 * 9 * 64 * 64 + 9 * 32 * 64)
  words_bytes = 4 * (6 * 16 * 5 + (32 * 5 + 5 * 32 * 9 + 32 * 5) + (64 * 9 + 5 * 64 * 18 + 64 * 9))
  assert s20["binary_float32_bytes"] == 4 * weights
  assert s20["binary_bytes"] == words_bytes
  assert s20["binary_ratio"] == pytest.approx(4 * weights / words_bytes)
  assert s20["binary_ratio"] >= 25
  s18 = bnn_infer.artifact_nbytes(bnn_infer.abstract_artifact(get_model("bnn_resnet18_cifar", 10)))
  assert s18["binary_ratio"] == 32.0
  assert s18["binary_bits_per_weight"] == 1.0


def test_auto_compute_takes_the_fastest_exact_kind_where_it_is_loaded(nets, images):
  """The artifact stores "auto"; loading resolves it: XNOR-popcount on a CPU for 1-2 bits (f32
  on a CPU whose XLA convolutions run on Eigen, int8 on YNNPACK for more), bf16 on GPU/TPU;
  same logits."""
  from jcompress import fastconv  # noqa: PLC0415
  net = nets(1)
  assert bnn_infer._meta(net.frozen)["compute"] == "auto"   # noqa: SLF001
  runtime = bnn_infer.load(net.frozen)
  cpu = jax.default_backend() == "cpu"
  want = "xnor" if cpu else "bf16"
  assert runtime["meta"]["compute"] == bnn_infer.fastest_compute() == want
  assert bnn_infer.fastest_compute(2) == want
  assert bnn_infer.fastest_compute(3) == ("bf16" if not cpu else
                                          "f32" if fastconv.cpu_convs_on_eigen() else "int8")
  np.testing.assert_array_equal(
      bnn_infer.packed_apply(runtime, images),
      bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute="int8"), images))


def test_stablehlo_of_auto_compute_chooses_where_it_runs(nets, images):
  """A graph exported for CPU and GPU/TPU from here carries both computes (XNOR-popcount for
  the CPU, bf16 products elsewhere) and picks by the platform that runs it: the CPU gets the
  same logits as the XNOR path."""
  from jax import export as jax_export  # noqa: PLC0415
  net = nets(1)
  arrays = bnn_infer._arrays(net.frozen)   # noqa: SLF001
  meta = bnn_infer._Static(bnn_infer._meta(net.frozen))   # noqa: SLF001
  fn = jax.jit(lambda a, x: bnn_infer._forward(a, x, meta))   # noqa: SLF001
  exported = jax_export.export(fn, platforms=("cpu", "cuda"))(arrays, images)
  text = exported.mlir_module()
  assert "popcnt" in text and "bf16" in text
  np.testing.assert_array_equal(
      np.asarray(exported.call(arrays, images)),
      np.asarray(bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute="xnor"), images)))


def test_freeze_and_load_accept_the_same_computes_per_bit_width(nets):
  """xnor takes 1- and 2-bit activations in both; 3 bits are refused by both."""
  net = nets(2)
  frozen = bnn_infer.freeze(net.params, net.stats, net.model, compute="xnor")
  assert bnn_infer.load(frozen)["meta"]["compute"] == "xnor"
  three = get_model("bnn_resnet20", 10, width=0.25, num_bits=3)
  v = three.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  with pytest.raises(ConfigError, match="xnor.*num_bits 1 or 2"):
    bnn_infer.freeze(v["params"], v["batch_stats"], three, compute="xnor")


@pytest.mark.parametrize("num_bits", [1, 2])
@pytest.mark.slow
def test_ternary_weights_every_compute_is_exact_with_two_planes(nets, images, num_bits):
  """Ternary kernels (-1/0/+1) store a sign plane and a nonzero plane (2 bits a weight); the
  XNOR route ANDs both nonzero planes; int8, bf16, f32 and xnor give the same logits, from the
  stored artifact and from its loaded form."""
  net = nets(num_bits, "ternary")
  conv = net.frozen["stage1_block0"]["conv1"]
  assert set(conv) == {"bits", "nonzero"} and conv["nonzero"].shape == conv["bits"].shape
  zeros = 1 - np.asarray(bnn_infer.unpack_kernel(conv["nonzero"], (3, 3, 4, 4))) > 0
  assert 0.2 < zeros.mean() < 0.8   # TWN's threshold zeroes a good part of the weights
  sizes = bnn_infer.artifact_nbytes(net.frozen)
  assert sizes["binary_bits_per_weight"] == pytest.approx(
      2 * bnn_infer.artifact_nbytes(nets(num_bits).frozen)["binary_bits_per_weight"])
  want = np.asarray(bnn_infer.packed_apply(bnn_infer.load(net.frozen, compute="int8"), images))
  assert_matches_latent(want, net.latent)
  for compute in ("bf16", "f32", "xnor"):
    got = bnn_infer.packed_apply(bnn_infer.load(net.frozen, net.model, compute=compute), images)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=compute)
  np.testing.assert_array_equal(np.asarray(bnn_infer.packed_apply(net.frozen, images)), want)
