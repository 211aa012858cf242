r"""Weight quantization (`quant` sub-config): uniform, k-means and power-of-two codes, as PTQ
(`total_steps=0` from `init_from`) or QAT; the math is `jcompress.quantize`. Activation
quantization lives in the models (`model_kwargs.act_quant`).

Mixed precision from second-order sensitivity (HAWQ-V3's recipe): with `quant.budget_bytes`
(the most `model_bytes`, the exported manifest.json + weights.bin) or `quant.budget_avg_bits`
(the most mean code bits per quantized weight), a fresh run's `prepare` hook, before the
experiment is built,

  1. checks the budget against the smallest artifact (every layer at the lowest candidate),
     from the shapes alone, before anything compiles;
  2. loads `init_from`'s float model and computes, on the `calibration_batches` training
     batches (no augmentation), each quantized layer's sensitivity Omega_l(b) for every width b
     of `quant.bit_candidates` (`hessian.layer_sensitivities`, `quant.sensitivity`: the
     Gauss-Newton quadratic 1/2 dW^T G dW by default);
  3. solves min sum_l Omega_l(b_l) under the budget exactly (`bitalloc`; a byte budget against
     the artifact's own byte count, `MethodContext.artifact_bound`);
  4. returns the config with `quant.bits_by_path` set to the allocation, so the quantizer, the
     checkpoints, config.json and `--mode=export` all see static per-layer widths.

A resumed run takes the allocation from its workdir's config.json. The allocation, the
sensitivities and the predicted objective go into results.json (`results`).
"""

from __future__ import annotations

import hashlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import bitalloc
from jcompress import hessian
from jcompress import quantize
from jcompress.errors import ConfigError
from jcompress.methods.base import Method
from jcompress.methods.base import Prepared


def _get(q, key):
  return q[key] if key in q else quantize.QUANT_DEFAULTS[key]


def _budget(q) -> tuple[int, float]:
  return _get(q, "budget_bytes"), _get(q, "budget_avg_bits")


def _has_budget(q) -> bool:
  bb, ab = _budget(q)
  return bool(bb) or bool(ab)


def _candidates(q) -> list[int]:
  cands = _get(q, "bit_candidates")
  if isinstance(cands, (str, bytes)) or not hasattr(cands, "__iter__") or not list(cands):
    raise ConfigError(f"config key 'quant.bit_candidates': a non-empty list of bit widths, got "
                      f"{cands!r}")
  for b in cands:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 8:
      raise ConfigError(f"config key 'quant.bit_candidates': every width must be an int in "
                        f"1..8, got {b!r} in {tuple(cands)!r}")
  return sorted({int(b) for b in cands})


def validate(q, config) -> None:
  """The budget keys: ConfigError naming the key, before anything is built or compiled."""
  bb, ab = _budget(q)
  if isinstance(bb, bool) or not isinstance(bb, (int, np.integer)) or bb < 0:
    raise ConfigError(f"config key 'quant.budget_bytes': a number of bytes >= 0 (0: no budget), "
                      f"got {bb!r}")
  if isinstance(ab, bool) or not isinstance(ab, (int, float, np.integer, np.floating)) or not (
      ab >= 0):
    raise ConfigError(f"config key 'quant.budget_avg_bits': a number of bits >= 0 (0: no "
                      f"budget), got {ab!r}")
  cands = _candidates(q)
  if not (bb or ab):
    return
  if bb and ab:
    raise ConfigError(f"config keys 'quant.budget_bytes' ({bb}) and 'quant.budget_avg_bits' "
                      f"({ab}): give one budget, set the other to 0")
  if _get(q, "method") != "uniform":
    raise ConfigError(f"config key 'quant.method': a bit budget allocates widths of the uniform "
                      f"quantizer, got {_get(q, 'method')!r}")
  if cands[0] < 2:
    raise ConfigError(f"config key 'quant.bit_candidates': the uniform quantizer takes 2..8 "
                      f"bits, got {cands[0]}")
  kind = _get(q, "sensitivity")
  if kind not in hessian.SENSITIVITIES:
    raise ConfigError(f"config key 'quant.sensitivity': must be one of "
                      f"{list(hessian.SENSITIVITIES)}, got {kind!r}")
  probes = _get(q, "hessian_probes")
  if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 2:
    raise ConfigError(f"config key 'quant.hessian_probes': an int >= 2, got {probes!r}")
  if ab and ab < cands[0]:
    raise ConfigError(f"config key 'quant.budget_avg_bits': {ab} is below the smallest mean "
                      f"width, {cands[0]} bits (every layer at the lowest of "
                      f"'quant.bit_candidates' {tuple(cands)})")
  if not config.get("init_from"):
    raise ConfigError("config key 'init_from': a bit budget allocates widths from the "
                      "sensitivities of a trained model; set init_from to a float run's workdir")


def _quantizer_opts(q) -> dict:
  pc = _get(q, "per_channel")
  sym = bool(_get(q, "symmetric"))
  return dict(per_channel=True if pc is None else bool(pc), symmetric=sym,
              narrow_range=_get(q, "narrow_range"), range_method=_get(q, "range_method"),
              percentile=float(_get(q, "percentile")))


def _selection(q) -> dict:
  out = {}
  for k in ("include", "exclude"):
    v = _get(q, k)
    out[k] = (v,) if isinstance(v, str) else tuple(v)
  return out


#: Sensitivities computed in this process, by what they are a function of (`_sensitivity_key`):
#: the points of a sweep over budgets share one computation. A few entries at most.
_SENSITIVITY_CACHE: dict = {}
_CACHE_SIZE = 4


def _sensitivity_key(params, batch_stats, images, labels, *options) -> tuple:
  """A digest of the float weights, statistics and calibration data, and the options."""
  h = hashlib.sha256()
  for x in (*jax.tree.leaves(params), *jax.tree.leaves(batch_stats), images, labels):
    a = np.ascontiguousarray(np.asarray(x))
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return (h.hexdigest(), repr(options))


def _sensitivities(kind, src, images, labels, cands, probes, seed, sel, qopts):
  """`hessian.layer_sensitivities` of the source model, computed once per process for the
  same weights, data and options; returns (sensitivities, seconds spent, cached)."""
  key = _sensitivity_key(src.params, src.batch_stats, images, labels, kind, cands, probes, seed,
                         sorted(sel.items()), sorted(qopts.items()))
  if key in _SENSITIVITY_CACHE:
    return _SENSITIVITY_CACHE[key], 0.0, True
  t0 = time.time()
  sens = hessian.layer_sensitivities(
      kind, lambda p: src.logits_fn(p, images), labels, src.params, cands, probes=probes,
      seed=seed, key="quant.sensitivity", apply_fn=src.logits_fn, images=images, **sel,
      **qopts)
  while len(_SENSITIVITY_CACHE) >= _CACHE_SIZE:
    _SENSITIVITY_CACHE.pop(next(iter(_SENSITIVITY_CACHE)))
  _SENSITIVITY_CACHE[key] = sens
  return sens, time.time() - t0, False


def _with_bits(config, entries):
  new = config.copy_and_resolve_references()
  with new.unlocked():
    new.quant.bits_by_path = tuple(entries)
  return new


def prepare(config, workdir: str, resuming: bool, ctx):
  """With a budget, a fresh run allocates per-layer bits (module docstring) and returns
  `(config with quant.bits_by_path, Prepared)`; a resumed run takes them from its workdir's
  config.json; without a budget the config is returned as it is."""
  q = config.quant
  if not _has_budget(q):
    return config, None
  if resuming:
    saved = ctx.saved_config(workdir)
    return _with_bits(config, saved.quant.get("bits_by_path", ())), None
  if tuple(_get(q, "bits_by_path") or ()):
    raise ConfigError("config key 'quant.bits_by_path': a bit budget chooses every layer's "
                      "width; leave bits_by_path empty")
  budget_bytes, budget_avg_bits = _budget(q)
  cands = _candidates(q)
  sel, qopts = _selection(q), _quantizer_opts(q)
  t0 = time.time()
  shapes, stat_shapes = ctx.abstract_variables(config)
  ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), (shapes, stat_shapes))
  measured: dict = {}

  def measure(bits: dict) -> int:       # the artifact's bytes with these widths, at most
    key = tuple(sorted(bits.items()))
    if key not in measured:
      measured[key] = ctx.artifact_bound(_with_bits(config, bitalloc.bits_by_path(bits)), *ones)
    return measured[key]

  if budget_bytes:    # too small a budget: refused from the shapes, before any compile
    low = {p: cands[0] for p in bitalloc.selected_layers(shapes, **sel)}
    minimum = measure(low)
    if budget_bytes < minimum:
      raise ConfigError(f"config key 'quant.budget_bytes': {budget_bytes} is below the smallest "
                        f"artifact, {minimum} bytes (all {len(low)} quantized layers at "
                        f"{cands[0]} bits)")
  src = ctx.load_source(config)
  images = jnp.concatenate([jnp.asarray(b["image"]) for b in src.batches])
  labels = jnp.concatenate([jnp.asarray(b["label"]) for b in src.batches])
  kind = _get(q, "sensitivity")
  t1 = time.time()
  sens, sens_seconds, cached = _sensitivities(kind, src, images, labels, cands,
                                              int(_get(q, "hessian_probes")),
                                              int(_get(q, "seed")), sel, qopts)
  sens_seconds = sens_seconds if not cached else 0.0
  t_sens = time.time() - t1
  alloc_opts = dict(bits_candidates=cands, per_channel=qopts["per_channel"],
                    symmetric=qopts["symmetric"], **sel)
  if budget_bytes:
    alloc = bitalloc.allocate_bits_measured(sens, src.params, int(budget_bytes), measure,
                                            key="quant.budget_bytes", **alloc_opts)
  else:
    alloc = bitalloc.allocate_bits(sens, src.params, avg_bits=float(budget_avg_bits),
                                   **alloc_opts)
    alloc = alloc._replace(nbytes=measure(alloc.bits))
  report = {
      "sensitivity": kind,
      "bit_candidates": cands,
      "budget_bytes": int(budget_bytes),
      "budget_avg_bits": float(budget_avg_bits),
      "bit_allocation": dict(alloc.bits),
      "allocation_avg_bits": alloc.avg_bits,
      "allocation_objective": alloc.objective,          # the predicted sum of sensitivities
      "allocation_bytes": int(alloc.nbytes),            # model_bytes at most (artifact_bound)
      "uniform_objective": {str(b): float(sum(s[b] for s in sens.values())) for b in cands},
      "sensitivities": {p: {str(b): v for b, v in s.items()} for p, s in sens.items()},
      "sensitivity_images": int(images.shape[0]),
      "sensitivity_seconds": round(sens_seconds, 2),   # 0: computed by an earlier run
      "sensitivity_cached": cached,                   # in this process (a sweep)
      "allocation_seconds": round(time.time() - t0 - t_sens, 2),
  }
  counts = {b: sum(1 for v in alloc.bits.values() if v == b) for b in cands}
  logging.info("mixed precision (%s sensitivity, %s on %d images): %s layers at %s bits, "
               "mean %.3f bits, <= %d bytes, predicted sum %.4g", kind,
               "cached" if cached else f"{sens_seconds:.1f} s", report["sensitivity_images"],
               "/".join(str(counts[b]) for b in cands),
               "/".join(str(b) for b in cands), alloc.avg_bits, alloc.nbytes, alloc.objective)
  return (_with_bits(config, alloc.bits_by_path),
          Prepared(variables=(src.params, src.batch_stats, src.message + "; bits allocated"),
                   meta={"float_test_accuracy": src.float_accuracy, METHOD.name: report}))


def results(exp, state, res, meta) -> dict:
  """The allocation's report (per-layer bits, predicted sum of sensitivities, bytes) and, for a
  byte budget, whether `model_bytes` kept to it."""
  del exp, state
  report = (meta or {}).get(METHOD.name)
  if not report:
    return {}
  out = dict(report)
  if report["budget_bytes"]:
    out["within_budget"] = bool(res["model_bytes"] <= report["budget_bytes"])
    if not out["within_budget"]:
      logging.warning("model_bytes %d exceeds quant.budget_bytes %d", res["model_bytes"],
                      report["budget_bytes"])
  return out


METHOD = Method(
    name="quant",
    summary="weights to integer codes (uniform, k-means, power-of-two), PTQ or QAT",
    validate=validate,
    transform=quantize.transform_from_config,
    prepare=prepare,
    results=results,
)
