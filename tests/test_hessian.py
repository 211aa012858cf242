"""Hutchinson per-layer Hessian traces and HAWQ-V2 sensitivities (jcompress.hessian)."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress import hessian
from jcompress import models
from jcompress import quantize as Q
from jcompress import transforms
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing   # the numbers a method gives: XLA optimizations off

# A parameter tree with three selected kernels, a bias (not a kernel) and a classifier (excluded
# by default), as the quantizers select them.
SHAPES = {"a/kernel": (3, 4), "b/bias": (5,), "b/kernel": (2, 3, 2), "c/kernel": (6, 2),
          "head/kernel": (4, 3)}
SELECTED = ("a/kernel", "b/kernel", "c/kernel")


def _params(seed=0):
  rng = np.random.default_rng(seed)
  flat = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  out = {}
  for k, v in flat.items():
    layer, leaf = k.split("/")
    out.setdefault(layer, {})[leaf] = v
  return out


def _blocks(params):
  """{path: slice} of each leaf in the ravel_pytree vector."""
  out, off = {}, 0
  for path, x in zip(transforms.leaf_paths(params), jax.tree.leaves(params)):
    out[path] = slice(off, off + x.size)
    off += x.size
  return out


def _quadratic(params, a):
  """0.5 x^T A x of the whole raveled tree (every leaf coupled to every other)."""
  def loss(p):
    x = ravel_pytree(p)[0]
    return 0.5 * x @ a @ x
  return loss


def _coupled_matrix(params, seed=0):
  """A symmetric A with distinct per-block traces and off-diagonal (cross-block) coupling."""
  n = ravel_pytree(params)[0].size
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((n, n))
  a = 0.15 * (m + m.T)
  for i, sl in enumerate(_blocks(params).values()):
    a[sl, sl] += np.diag(rng.uniform(1.0, 2.0, sl.stop - sl.start) * (i + 1))
  return jnp.asarray(a, jnp.float32)


def test_converges_to_the_block_traces_of_a_quadratic():
  params = _params()
  a = _coupled_matrix(params)
  r = hessian.hutchinson_traces(_quadratic(params, a), params, tol=0.02, max_probes=4000)
  assert r.converged and r.probes < 4000
  assert tuple(r.traces) == SELECTED                    # kernels only, head excluded
  blocks = _blocks(params)
  for path in SELECTED:
    sl = blocks[path]
    exact = float(jnp.trace(a[sl, sl]))
    assert r.sizes[path] == sl.stop - sl.start
    assert 0 < r.stderr[path] <= 0.02 * abs(r.traces[path])
    # the mean is within 4 standard errors (and so within ~8%) of the block's trace
    assert abs(r.traces[path] - exact) <= 4 * r.stderr[path] + 1e-6, (path, r.traces[path], exact)


def test_diagonal_hessian_is_exact_in_one_probe_and_stops_at_min_probes():
  params = _params(1)
  d = {p: np.random.default_rng(3).uniform(0.5, 2.0, x.shape).astype(np.float32)
       for p, x in zip(transforms.leaf_paths(params), jax.tree.leaves(params))}

  def loss(p):   # separable: H = diag(d_i + cosh(x_i)), no off-diagonal entries
    return sum(jnp.sum(0.5 * d[path] * x ** 2 + jnp.cosh(x))
               for path, x in zip(transforms.leaf_paths(p), jax.tree.leaves(p)))

  r = hessian.hutchinson_traces(loss, params, tol=1e-3, min_probes=3, max_probes=50)
  assert r.converged and r.probes == 3
  flat = dict(zip(transforms.leaf_paths(params), jax.tree.leaves(params)))
  for path in SELECTED:
    exact = float(np.sum(d[path] + np.cosh(np.asarray(flat[path], np.float64))))
    np.testing.assert_allclose(r.traces[path], exact, rtol=1e-5)
    assert r.stderr[path] <= 1e-5 * exact


def test_tol_sets_the_number_of_probes_and_max_probes_caps_it():
  params = _params()
  loss = _quadratic(params, _coupled_matrix(params))
  loose = hessian.hutchinson_traces(loss, params, tol=0.3, min_probes=2, max_probes=4000)
  tight = hessian.hutchinson_traces(loss, params, tol=0.05, min_probes=2, max_probes=4000)
  assert loose.converged and tight.converged
  assert loose.probes < tight.probes
  for r, tol in ((loose, 0.3), (tight, 0.05)):
    assert all(r.stderr[p] <= tol * abs(r.traces[p]) for p in SELECTED)
  capped = hessian.hutchinson_traces(loss, params, tol=1e-4, min_probes=2, max_probes=7)
  assert capped.probes == 7 and not capped.converged
  # the same seed gives the same probes
  again = hessian.hutchinson_traces(loss, params, tol=1e-4, min_probes=7, max_probes=7)
  assert again.traces == capped.traces


def _tanh_mlp_parts():
  """A small nonlinear network: its params, apply_fn(params, x) -> logits, a batch, labels."""
  rng = np.random.default_rng(5)
  params = {"dense1": {"kernel": jnp.asarray(rng.standard_normal((4, 6)) * 0.7, jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal(6) * 0.1, jnp.float32)},
            "dense2": {"kernel": jnp.asarray(rng.standard_normal((6, 5)) * 0.7, jnp.float32)},
            "dense3": {"kernel": jnp.asarray(rng.standard_normal((5, 3)) * 0.7, jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)

  def apply_fn(p, xs):
    h = jnp.tanh(xs @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    return jnp.tanh(h @ p["dense2"]["kernel"]) @ p["dense3"]["kernel"]

  return params, apply_fn, x, y


def _tanh_mlp():
  params, apply_fn, x, y = _tanh_mlp_parts()

  def loss(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))

  return params, loss


def test_each_probe_is_v_l_times_the_exact_hessian_times_v():
  """t_l(v) = v_l^T (H v)_l with H the exact (dense) Hessian of a small network and v the
  probe's Rademacher vector (leaf i drawn from fold_in(key, i), zero on unselected leaves)."""
  params, loss = _tanh_mlp()
  vec, unravel = ravel_pytree(params)
  h = np.asarray(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(vec), np.float64)
  blocks = _blocks(params)
  paths = transforms.leaf_paths(params)
  selected = [i for i, p in enumerate(paths) if p.endswith("kernel")]
  probe = hessian.make_probe_fn(loss, params, selected)
  leaves = jax.tree.leaves(params)
  for k in range(3):
    key = jax.random.key(k)
    v = np.zeros(vec.size)
    for i in selected:
      v[blocks[paths[i]]] = np.asarray(
          jax.random.rademacher(jax.random.fold_in(key, i), leaves[i].shape), np.float64
      ).reshape(-1)
    assert set(np.unique(v[v != 0])) == {-1.0, 1.0}
    hv = h @ v
    want = [float(v[blocks[paths[i]]] @ hv[blocks[paths[i]]]) for i in selected]
    np.testing.assert_allclose(np.asarray(probe(params, key)), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # ~10-15 s on 2 cores: x64 compiles of small_cnn's HVP and gradient
def test_hvp_equals_the_finite_difference_of_gradients():
  """H v of small_cnn (eval-mode cross-entropy, the default CPU conv with its custom VJP)
  against (g(w + eps v) - g(w - eps v)) / 2eps, in float64 (eps small enough that no ReLU
  changes side). The float32 HVP algebra is checked against jax.hessian above."""
  with jax.enable_x64(True):
    model = models.get_model("small_cnn", 5, width=0.25, dtype=jnp.float64)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float64)
    labels = jnp.asarray([0, 1, 2], jnp.int32)
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), jax.jit(
        lambda k: model.init(k, images, train=False))(jax.random.key(0)))

    def loss(p):
      logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images,
                              train=False)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    params = variables["params"]
    leaves, treedef = jax.tree.flatten(params)
    v = jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(x.shape), x.dtype)
                                     for x in leaves])
    hv = jax.jit(lambda p, v: hessian.hvp(loss, p, v))(params, v)
    grad = jax.jit(jax.grad(loss))
    eps = 1e-5
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps),
                      grad(jax.tree.map(lambda p, t: p + eps * t, params, v)),
                      grad(jax.tree.map(lambda p, t: p - eps * t, params, v)))
    a, b = ravel_pytree(hv)[0], ravel_pytree(fd)[0]
    assert float(jnp.linalg.norm(a)) > 1.0
    assert float(jnp.linalg.norm(a - b)) <= 1e-3 * float(jnp.linalg.norm(a))


def test_default_selection_and_errors():
  model = models.get_model("small_cnn", 5, width=0.25)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                             train=False))["params"]
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)

  def loss(p):   # H = diag(2): every selected layer's trace is 2 n_l
    return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

  r = hessian.hutchinson_traces(loss, params, tol=1e-3, min_probes=2, max_probes=2)
  # the quantizers' selection: kernels, first conv and classifier excluded
  sel = transforms.select(params)
  want = [p for p, s in zip(transforms.leaf_paths(params), jax.tree.leaves(sel)) if s]
  assert list(r.traces) == want == ["stage1_conv/kernel", "stage2_conv/kernel"]
  assert r.traces == {p: 2.0 * n for p, n in r.sizes.items()}
  with pytest.raises(ConfigError, match="include"):
    hessian.hutchinson_traces(loss, params, include="nothing_matches")
  with pytest.raises(ConfigError, match="min_probes"):
    hessian.hutchinson_traces(loss, params, min_probes=1)
  with pytest.raises(ConfigError, match="max_probes"):
    hessian.hutchinson_traces(loss, params, min_probes=5, max_probes=4)
  with pytest.raises(ConfigError, match="tol"):
    hessian.hutchinson_traces(loss, params, tol=0.0)


def test_the_hvp_is_traced_once_whatever_the_number_of_probes():
  params = _params()
  a = _coupled_matrix(params)
  calls = []

  def loss(p):
    calls.append(1)   # runs only while jax traces the function
    return _quadratic(params, a)(p)

  hessian.hutchinson_traces(loss, params, tol=1e-6, min_probes=2, max_probes=3)
  few = len(calls)
  hessian.hutchinson_traces(loss, params, tol=1e-6, min_probes=2, max_probes=12)
  assert few >= 1 and len(calls) == 2 * few


def test_quant_sensitivity_is_trace_per_weight_times_the_ptq_error():
  params = _params(2)
  traces = {"a/kernel": 3.0, "b/kernel": 0.5, "c/kernel": -1.0}
  omega = hessian.quant_sensitivity(traces, params, (2, 4, 8))
  flat = dict(zip(transforms.leaf_paths(params), jax.tree.leaves(params)))
  for b in (2, 4, 8):
    # the weights PTQ stores (export -> dequantize) for b bits, per channel, symmetric
    t = Q.quant_weights(params, bits=b, mode="ptq", exclude=transforms.DEFAULT_EXCLUDE)
    stored = Q.dequantize_export(t.export(params, t.init(params, jax.random.key(0))))
    stored = dict(zip(transforms.leaf_paths(stored), jax.tree.leaves(stored)))
    for path, tr in traces.items():
      w = np.asarray(flat[path], np.float64)
      err = float(np.sum((np.asarray(stored[path], np.float64) - w) ** 2))
      assert err > 0
      np.testing.assert_allclose(omega[path][b], tr / w.size * err, rtol=1e-5)
  for path in ("a/kernel", "b/kernel"):
    assert omega[path][2] > omega[path][4] > omega[path][8] > 0
  assert omega["c/kernel"][2] < 0                         # a negative trace is kept
  r = hessian.HessianTrace(traces, {}, {}, 1, True)
  assert hessian.quant_sensitivity(r, params, (4,))["a/kernel"][4] == omega["a/kernel"][4]


def test_quadratic_sensitivity_is_half_dw_h_dw():
  params = _params(4)
  a = _coupled_matrix(params, seed=1)
  q = hessian.quadratic_sensitivity(_quadratic(params, a), params, (2, 3, 8))
  assert tuple(q) == SELECTED
  blocks = _blocks(params)
  flat = dict(zip(transforms.leaf_paths(params), jax.tree.leaves(params)))
  for path in SELECTED:
    sl = blocks[path]
    for b in (2, 3, 8):
      d = np.asarray(hessian.ptq_weight(flat[path], b), np.float64).reshape(-1) - np.asarray(
          flat[path], np.float64).reshape(-1)
      np.testing.assert_allclose(q[path][b], 0.5 * d @ np.asarray(a, np.float64)[sl, sl] @ d,
                                 rtol=1e-4)
  with pytest.raises(ConfigError, match="bits_candidates"):
    hessian.quadratic_sensitivity(_quadratic(params, a), params, (1,))


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_quant_sensitivity_rejects_widths_the_uniform_quantizer_lacks(bits):
  with pytest.raises(ConfigError, match="bits_candidates"):
    hessian.quant_sensitivity({"a/kernel": 1.0}, _params(), (2, bits))


def test_quant_sensitivity_rejects_unknown_layers_and_empty_traces():
  with pytest.raises(ConfigError, match="'nope/kernel'"):
    hessian.quant_sensitivity({"nope/kernel": 1.0}, _params())
  with pytest.raises(ConfigError, match="traces"):
    hessian.quant_sensitivity({}, _params())


def _bilinear(seed=0, n=12, d=5, h=4, k=3):
  """Logits z = x A B of a fixed batch: z is linear in each kernel alone, so each layer's
  Hessian block of the cross-entropy IS its Gauss-Newton block (d^2 z / dA^2 = 0)."""
  rng = np.random.default_rng(seed)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((d, h)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((h, k)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  y = jnp.asarray(rng.integers(0, k, n), jnp.int32)

  def logits_fn(p):
    return x @ p["a"]["kernel"] @ p["b"]["kernel"]

  def loss_fn(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y))

  return params, logits_fn, loss_fn, x, y


def test_gauss_newton_sensitivity_is_half_dw_g_dw():
  params, logits_fn, loss_fn, x, y = _bilinear()
  sel = dict(exclude=())
  g = hessian.gauss_newton_sensitivity(logits_fn, params, (2, 3, 8), **sel)
  assert tuple(g) == ("a/kernel", "b/kernel")
  # the closed form: (1/2N) sum_i u_i^T (diag(p_i) - p_i p_i^T) u_i, u_i = J_i dW
  z = np.asarray(logits_fn(params), np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  a, b = (np.asarray(params[k]["kernel"], np.float64) for k in ("a", "b"))
  xs = np.asarray(x, np.float64)
  for bits in (2, 3, 8):
    da = np.asarray(hessian.ptq_weight(params["a"]["kernel"], bits), np.float64) - a
    db = np.asarray(hessian.ptq_weight(params["b"]["kernel"], bits), np.float64) - b
    for path, u in (("a/kernel", xs @ da @ b), ("b/kernel", xs @ a @ db)):
      want = 0.5 * np.mean(np.sum(p * u * u, -1) - np.sum(p * u, -1) ** 2)
      np.testing.assert_allclose(g[path][bits], want, rtol=1e-4)
      assert g[path][bits] >= 0
  # each block's Hessian is its Gauss-Newton block here: the HVP form agrees
  q = hessian.quadratic_sensitivity(loss_fn, params, (2, 3, 8), **sel)
  for path in g:
    for bits in (2, 3, 8):
      np.testing.assert_allclose(g[path][bits], q[path][bits], rtol=1e-3, atol=1e-9)


def test_layer_sensitivities_dispatches_by_name():
  params, logits_fn, loss_fn, _, y = _bilinear(1)
  sel = dict(exclude=())
  params, _, _, x, _ = _bilinear(1)
  apply_fn = lambda p, xs: xs @ p["a"]["kernel"] @ p["b"]["kernel"]   # noqa: E731
  got = {kind: hessian.layer_sensitivities(kind, logits_fn, y, params, (2, 4), probes=8,
                                            apply_fn=apply_fn, images=x, **sel)
         for kind in hessian.SENSITIVITIES}
  assert got["gauss_newton"] == hessian.gauss_newton_sensitivity(logits_fn, params, (2, 4),
                                                                 **sel)
  q = hessian.quadratic_sensitivity(loss_fn, params, (2, 4), **sel)
  for path in q:
    for b in (2, 4):
      np.testing.assert_allclose(got["quadratic"][path][b], q[path][b], rtol=1e-5)
      np.testing.assert_allclose(got["mse"][path][b], hessian.quant_perturbation(
          dict(zip(transforms.leaf_paths(params), jax.tree.leaves(params)))[path], b),
          rtol=1e-6)
  traces = hessian.hutchinson_traces(loss_fn, params, min_probes=4, max_probes=8, **sel)
  hawq = hessian.quant_sensitivity(traces, params, (2, 4))   # the same probes (seed 0)
  for path in hawq:
    for b in (2, 4):
      np.testing.assert_allclose(got["hawq"][path][b], hawq[path][b], rtol=1e-5)
  assert got["hawq_gn"] == hessian.quant_sensitivity(
      hessian.gauss_newton_traces(apply_fn, params, x, **sel), params, (2, 4))
  with pytest.raises(ConfigError, match="'quant.sensitivity'.*'hessian'"):
    hessian.layer_sensitivities("hessian", logits_fn, y, params, key="quant.sensitivity")


def _tanh_mlp_apply():
  """`_tanh_mlp`'s network, nonlinear: its Hessian is not its Gauss-Newton matrix."""
  params, apply_fn, x, _ = _tanh_mlp_parts()
  return params, apply_fn, x


def _explicit_gn_traces(apply_fn, params, x):
  """Tr(G_ll) from the dense Jacobian: G = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i."""
  vec, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacfwd(lambda v: apply_fn(unravel(v), x))(vec), np.float64)  # (N, K, P)
  z = np.asarray(apply_fn(params, x), np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = sum(jac[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ jac[i]
          for i in range(len(p))) / len(p)
  return {path: float(np.trace(g[sl, sl])) for path, sl in _blocks(params).items()}


@pytest.mark.slow
def test_gauss_newton_traces_are_the_exact_traces_of_g():
  params, apply_fn, x = _tanh_mlp_apply()
  want = _explicit_gn_traces(apply_fn, params, x)
  r = hessian.gauss_newton_traces(apply_fn, params, x, exclude=())
  assert tuple(r.traces) == ("dense1/kernel", "dense2/kernel", "dense3/kernel")
  for path, t in r.traces.items():
    np.testing.assert_allclose(t, want[path], rtol=1e-4)
    assert t > 0 and r.stderr[path] == 0.0
    assert r.sizes[path] == int(np.prod(params[path.split("/")[0]]["kernel"].shape))
  assert (r.probes, r.converged) == (3, True)       # one reverse pass per class
  # the reverse passes of an example one at a time (a memory bound under one gradient)
  small = hessian.gauss_newton_traces(apply_fn, params, x, exclude=(), memory_bytes=1)
  for path in r.traces:
    np.testing.assert_allclose(small.traces[path], r.traces[path], rtol=1e-5)
  # not the Hessian's traces for this nonlinear network: the exact Hessian differs
  _, loss = _tanh_mlp()
  vec, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(vec), np.float64)
  sl = _blocks(params)["dense1/kernel"]
  assert abs(np.trace(h[sl, sl]) - want["dense1/kernel"]) > 1e-3 * abs(want["dense1/kernel"])


def test_gauss_newton_traces_are_the_hessian_traces_where_logits_are_linear_in_a_layer():
  """z = x A B is linear in A and in B alone: each layer's Hessian block of the cross-entropy
  is its Gauss-Newton block, so the traces match the dense Hessian's (and Hutchinson's limit)."""
  params, _, loss_fn, x, _ = _bilinear(2)
  apply_fn = lambda p, xs: xs @ p["a"]["kernel"] @ p["b"]["kernel"]   # noqa: E731
  r = hessian.gauss_newton_traces(apply_fn, params, x, exclude=())
  vec, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda v: loss_fn(unravel(v)))(vec), np.float64)
  for path, sl in _blocks(params).items():
    np.testing.assert_allclose(r.traces[path], np.trace(h[sl, sl]), rtol=1e-4)


def test_gauss_newton_traces_by_sampled_labels_are_unbiased():
  params, apply_fn, x = _tanh_mlp_apply()
  exact = hessian.gauss_newton_traces(apply_fn, params, x, exclude=())
  mc = hessian.gauss_newton_traces(apply_fn, params, x, exclude=(), samples=400, seed=3)
  assert mc.probes == 400
  for path, t in exact.traces.items():
    assert 0 < mc.stderr[path] < 0.2 * t
    assert abs(mc.traces[path] - t) < 4 * mc.stderr[path]
  again = hessian.gauss_newton_traces(apply_fn, params, x, exclude=(), samples=400, seed=3)
  assert again.traces == mc.traces


def test_gauss_newton_traces_errors():
  params, apply_fn, x = _tanh_mlp_apply()
  with pytest.raises(ConfigError, match="samples"):
    hessian.gauss_newton_traces(apply_fn, params, x, samples=-1)
  with pytest.raises(ConfigError, match="include"):
    hessian.gauss_newton_traces(apply_fn, params, x, include="nothing_matches")
  with pytest.raises(ConfigError, match="images"):
    hessian.gauss_newton_traces(apply_fn, params, x[:0])
  with pytest.raises(ConfigError, match="not finite"):
    hessian.gauss_newton_traces(apply_fn, params, x.at[0, 0].set(jnp.nan), exclude=())
  with pytest.raises(ConfigError, match="'quant.sensitivity'.*apply_fn"):
    hessian.layer_sensitivities("hawq_gn", lambda p: apply_fn(p, x), jnp.zeros(16, jnp.int32),
                                params, (2, 4), key="quant.sensitivity")


def test_hawq_gn_is_omega_with_the_gauss_newton_traces():
  params, apply_fn, x = _tanh_mlp_apply()
  got = hessian.layer_sensitivities("hawq_gn", lambda p: apply_fn(p, x), jnp.zeros(16, jnp.int32),
                                    params, (2, 4), exclude=(), apply_fn=apply_fn, images=x)
  want = hessian.quant_sensitivity(
      hessian.gauss_newton_traces(apply_fn, params, x, exclude=()), params, (2, 4))
  assert got == want
