r"""Knowledge-distillation losses: Hinton KD, the seed's TensorFlow variant, logit MSE, FitNets,
Decoupled KD, and deep mutual learning.

Every loss is a pure function of float32 logits (N, K) and features; teacher inputs are
wrapped in `jax.lax.stop_gradient` again here, so no gradient ever reaches a teacher. Reductions:
sums over classes, means over the batch (PyTorch's `reduction="batchmean"`), except where stated.

Notation: s, t are student and teacher logits, T the temperature,
p^T = softmax(z / T), y the integer label, B the batch size.

* `kd_loss` (Hinton et al. 2015): `T^2 * mean_b KL(p_t^T || p_s^T)`. The T^2 keeps the
  gradient's scale independent of T: d/ds_b = T (p_s^T - p_t^T) / B.
* `tf_kd_loss` (seed 001's TensorFlow example): a *different* loss, not Hinton's; see its
  docstring for what was kept from the snippet and why.
* `logit_mse_loss`: `mean (s - t)^2` over batch and classes (logit regression, Ba & Caruana 2014).
* `fitnet_loss` (Romero et al. 2015): `mean (r(f_s) - f_t)^2` with r a learned 1x1 convolution
  (with bias) from the student's channels to the teacher's; spatial sizes must agree.
* `dkd_loss` (Zhao et al., CVPR 2022): `alpha * TCKD + beta * NCKD`, both times T^2, following
  mdistiller's `dkd_loss`.
* `dml_losses` (Zhang et al. 2018): each of two peers' CE plus T^2 KL to the other's prediction.
* `deit_hard_loss` (DeiT, Touvron et al. 2021): `CE(s_cls, y) / 2 + CE(s_dist, argmax t) / 2`,
  the class head on the labels and the distillation token's head on the teacher's decisions.

A student with a distillation token (a ViT with `distill_token`: feature `dist_logits`, its
second head) learns the labels through its class head and the teacher through that head: the
teacher-matching term of every loss reads `dist_logits` instead of the logits (DeiT's "soft
distillation" for kd), and `deit_hard` needs it.

`make_distill_loss(cfg)` turns the config sub-config `distill` into the whole student loss
(hard-label cross-entropy included); `validate_distill` checks that sub-config against the
student and teacher models before anything is compiled; `init_aux` creates the learned
parameters a loss needs (FitNets' regressor).
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jcompress.errors import ConfigError

PyTree = Any

LOSSES = ("kd", "tf_kd", "mse", "fitnet", "dkd", "deit_hard")

#: The student feature holding the distillation token's logits (`models.vit.ViT`).
DIST_LOGITS = "dist_logits"

#: Added to the target class's logit (scaled by 1/T) to remove it from NCKD's softmax, as
#: mdistiller's `dkd_loss` does (`- 1000.0 * gt_mask`).
DKD_MASK_LOGIT = 1000.0


def default_config() -> ml_collections.ConfigDict:
  """The `distill` sub-config with every key it accepts, at its default."""
  c = ml_collections.ConfigDict()
  c.loss = "kd"                 # kd | tf_kd | mse | fitnet | dkd | deit_hard
  c.temperature = 4.0           # T > 0 (kd, tf_kd, dkd, fitnet's optional KD)
  c.alpha = 0.9                 # weight of the distillation term, in [0, 1] (see make_distill_loss)
  c.beta = 8.0                  # dkd: weight of NCKD (mdistiller's CIFAR default)
  c.fitnet_weight = 100.0       # fitnet: weight of the hint loss (RepDistiller's default)
  c.student_feature = "stage2"  # fitnet: student feature fed to the regressor
  c.teacher_feature = "stage2"  # fitnet: teacher feature it must match
  c.tempered_hard = False       # tf_kd: hard sigmoid CE on s/T (the snippet) instead of s
  c.warmup_steps = 0            # distillation terms ramp up linearly over this many steps
  return c


# ----------------------------------------------------------------------------- losses


def _check_logits(student_logits, teacher_logits):
  if student_logits.shape != teacher_logits.shape:
    raise ConfigError(
        f"distillation: student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} differ in shape (the two models must have the same classes)")


def label_targets(labels: jax.Array, num_classes: int) -> jax.Array:
  """Class distributions `(B, num_classes)` of `labels`: integer labels `(B,)` one-hot, or
  already distributions (a mixup batch's mixed labels) as they are."""
  if labels.ndim == 2:
    return labels.astype(jnp.float32)
  return jax.nn.one_hot(labels, num_classes)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy against integer labels or class distributions (mixup's),
  optionally smoothed."""
  targets = label_targets(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float) -> jax.Array:
  r"""Hinton's KD: `T^2 * (1/B) sum_b KL(softmax(t_b/T) || softmax(s_b/T))`.

  KL(p || q) = sum_k p_k (log p_k - log q_k). Gradient with respect to the student logits:
  `d/ds_b = T (softmax(s_b/T) - softmax(t_b/T)) / B`.
  """
  _check_logits(student_logits, teacher_logits)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  s = student_logits.astype(jnp.float32)
  log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def tf_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               temperature: float, lam: float = 0.5,
               tempered_hard: bool = False) -> tuple[jax.Array, dict]:
  r"""Seed 001's TensorFlow KD: sigmoid CE with the hard labels plus an MSE of tempered logits.

      hard_b = sum_k sigmoid_ce(z_bk, onehot(y_b)_k),   z = s (or s/T with `tempered_hard`)
      soft_b = sum_k 0.5 (s_bk/T - t_bk/T)^2
      loss = (1/B) sum_b [lam * hard_b + (1 - lam) * soft_b]

  What the snippet computes is kept (its comment calls it "cross-entropy with soft labels",
  which it is not: it is a sigmoid cross-entropy against one-hot labels plus a logit MSE,
  Ba & Caruana's logit regression with a hard-label term). Decisions:

  * Reductions as the snippet: summed over classes and batch, divided by the batch size.
  * The hard-label term sees the raw student logits by default, as the hard-label term of
    Hinton et al. (it is computed at T = 1); `tempered_hard=True` reproduces the snippet,
    which applies it to s/T.
  * No T^2 on the MSE term (the snippet has none): its gradient is `(1 - lam) (s - t) / (B T^2)`,
    so T only rescales that term's weight.

  Returns the loss and its parts `{"sigmoid_ce_loss": mean hard_b, "logit_mse_loss": mean soft_b}`.
  """
  _check_logits(student_logits, teacher_logits)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  s = student_logits.astype(jnp.float32)
  onehot = label_targets(labels, s.shape[-1])
  z = s / temperature if tempered_hard else s
  hard = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(z, onehot), axis=-1))
  soft = jnp.mean(jnp.sum(0.5 * jnp.square(s / temperature - t / temperature), axis=-1))
  return lam * hard + (1.0 - lam) * soft, {"sigmoid_ce_loss": hard, "logit_mse_loss": soft}


def logit_mse_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  r"""`(1 / (B K)) sum_{b,k} (s_bk - t_bk)^2`; gradient `2 (s - t) / (B K)`."""
  _check_logits(student_logits, teacher_logits)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  return jnp.mean(jnp.square(student_logits.astype(jnp.float32) - t))


def init_regressor(rng: jax.Array, student_channels: int, teacher_channels: int) -> dict:
  r"""FitNets' regressor: a 1x1 convolution with bias, `{"kernel": (1, 1, C_s, C_t), "bias"}`.

  The kernel is He-uniform over the fan-in (`U(-b, b)`, `b = sqrt(6 / C_s)`), the bias zero.
  """
  if student_channels < 1 or teacher_channels < 1:
    raise ConfigError(f"init_regressor: channels must be >= 1, got {student_channels} -> "
                      f"{teacher_channels}")
  bound = float(np.sqrt(6.0 / student_channels))
  kernel = jax.random.uniform(rng, (1, 1, student_channels, teacher_channels), jnp.float32,
                              -bound, bound)
  return {"kernel": kernel, "bias": jnp.zeros((teacher_channels,), jnp.float32)}


def apply_regressor(regressor_params: Mapping[str, jax.Array], feat: jax.Array) -> jax.Array:
  """The 1x1 convolution `feat @ kernel[0, 0] + bias` over the last axis (NHWC or NC)."""
  kernel = regressor_params["kernel"]
  kernel = kernel.reshape(kernel.shape[-2:])
  return jnp.matmul(feat.astype(jnp.float32), kernel) + regressor_params["bias"]


def _check_feature_shapes(student_shape: Sequence[int], teacher_shape: Sequence[int],
                          regressor_shape: Sequence[int] | None = None) -> None:
  student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
  if len(student_shape) != len(teacher_shape) or student_shape[:-1] != teacher_shape[:-1]:
    raise ConfigError(
        f"distill.student_feature / distill.teacher_feature: FitNets needs features of the same "
        f"spatial size, got student {student_shape} and teacher {teacher_shape} (NHWC); choose a "
        "pair of features at the same resolution")
  if regressor_shape is not None and tuple(regressor_shape[-2:]) != (student_shape[-1],
                                                                     teacher_shape[-1]):
    raise ConfigError(
        f"distillation: the FitNets regressor maps {regressor_shape[-2]} -> "
        f"{regressor_shape[-1]} channels, the features have {student_shape[-1]} -> "
        f"{teacher_shape[-1]}")


def fitnet_loss(student_feat: jax.Array, teacher_feat: jax.Array,
                regressor_params: Mapping[str, jax.Array]) -> jax.Array:
  r"""FitNets' hint loss: `mean (r(f_s) - f_t)^2` over every element, r a 1x1 conv.

  `r(f)_{nhw:} = f_{nhw:} W + b` (W: (C_s, C_t)). Mean over N, H, W and C_t, as RepDistiller's
  `HintLoss` (`nn.MSELoss()`). Raises ConfigError when the spatial sizes differ.
  """
  _check_feature_shapes(student_feat.shape, teacher_feat.shape, regressor_params["kernel"].shape)
  t = jax.lax.stop_gradient(teacher_feat).astype(jnp.float32)
  return jnp.mean(jnp.square(apply_regressor(regressor_params, student_feat) - t))


def dkd_parts(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
              temperature: float) -> tuple[jax.Array, jax.Array]:
  r"""Decoupled KD's two terms `(TCKD, NCKD)`, each times T^2 and averaged over the batch.

  With p = softmax(z / T) and g the target class:
      b = (p_g, 1 - p_g)                         binary target / non-target probabilities
      TCKD = T^2 mean_b KL(b_t || b_s)
      p~ = softmax(z / T - 1000 [k == g])        the non-target classes, renormalised
      NCKD = T^2 mean_b KL(p~_t || p~_s)
  The target class is masked out with a large negative logit, as mdistiller's code does (its
  teacher probability is then exactly 0 in float32). log(1 - p_g) is computed as
  `logsumexp_{k != g}(z_k/T) - logsumexp_k(z_k/T)`, which is stable where p_g is near 1.
  """
  _check_logits(student_logits, teacher_logits)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  if labels.ndim != 1:
    raise ConfigError("distill.loss 'dkd' needs one target class per image; got labels of "
                      f"shape {labels.shape} (mixup's mixed labels have two: set mixup=0)")
  gt = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)

  def binary_log_probs(z):
    log_all = jax.nn.logsumexp(z, axis=-1)
    log_gt = jnp.sum(jnp.where(gt, z, 0.0), axis=-1) - log_all
    log_other = jax.nn.logsumexp(jnp.where(gt, -jnp.inf, z), axis=-1) - log_all
    return jnp.stack([log_gt, log_other], axis=-1)

  def kl(log_p, log_q):
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

  tckd = kl(binary_log_probs(t), binary_log_probs(s))
  mask = DKD_MASK_LOGIT * gt.astype(jnp.float32)
  log_pt2 = jax.nn.log_softmax(t - mask, axis=-1)
  log_ps2 = jax.nn.log_softmax(s - mask, axis=-1)
  # The target's teacher probability underflows to 0: drop its 0 * (-1000 - ...) term exactly.
  nckd = jnp.sum(jnp.where(gt, 0.0, jnp.exp(log_pt2) * (log_pt2 - log_ps2)), axis=-1)
  scale = temperature ** 2
  return scale * jnp.mean(tckd), scale * jnp.mean(nckd)


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
             temperature: float, alpha: float, beta: float) -> jax.Array:
  """Decoupled KD (Zhao et al. 2022): `alpha * TCKD + beta * NCKD` (see `dkd_parts`)."""
  tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature)
  return alpha * tckd + beta * nckd


def deit_hard_loss(cls_logits: jax.Array, dist_logits: jax.Array, teacher_logits: jax.Array,
                   labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  r"""DeiT's hard-label distillation: `CE(s_cls, y) / 2 + CE(s_dist, argmax_k t_k) / 2`.

  The class token's head learns the labels (smoothed by `label_smoothing`), the distillation
  token's head the teacher's argmax decisions (unsmoothed). Returns the loss and its parts
  `{"ce_loss": CE(s_cls, y), "deit_hard_loss": CE(s_dist, argmax t)}`.
  """
  _check_logits(dist_logits, teacher_logits)
  _check_logits(cls_logits, teacher_logits)
  teacher_labels = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  ce = cross_entropy(cls_logits, labels, label_smoothing)
  hard = cross_entropy(dist_logits, teacher_labels)
  return 0.5 * ce + 0.5 * hard, {"ce_loss": ce, "deit_hard_loss": hard}


def dml_losses(logits_a: jax.Array, logits_b: jax.Array, labels: jax.Array,
               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  r"""Deep mutual learning (Zhang et al. 2018): each peer's CE plus KD towards the other.

      loss_a = CE(a, y) + kd_loss(a, stop_gradient(b), T)
      loss_b = CE(b, y) + kd_loss(b, stop_gradient(a), T)
  With T = 1 this is the paper's `L_CE + D_KL(p_b || p_a)`. Each loss's gradient reaches only
  its own network, so `jax.grad(lambda pa, pb: sum(dml_losses(...)))` updates both peers as the
  paper's alternating steps do (with simultaneous updates).
  """
  if not temperature > 0:
    raise ConfigError(f"dml_losses: temperature must be > 0, got {temperature}")
  loss_a = cross_entropy(logits_a, labels) + kd_loss(logits_a, logits_b, temperature)
  loss_b = cross_entropy(logits_b, labels) + kd_loss(logits_b, logits_a, temperature)
  return loss_a, loss_b


# ----------------------------------------------------------------------------- config


def _get(cfg, key):
  defaults = default_config()
  return cfg[key] if key in cfg else defaults[key]


def validate_distill(cfg: ml_collections.ConfigDict,
                     student_feature_names: Sequence[str] | None = None,
                     teacher_feature_names: Sequence[str] | None = None,
                     student_classes: int | None = None,
                     teacher_classes: int | None = None) -> None:
  """Checks the `distill` sub-config; raises ConfigError naming the key (`distill.<key>`).

  Refuses: keys it does not know, an unknown `loss`, `temperature <= 0`, `alpha` outside
  [0, 1], negative `beta` / `fitnet_weight` / `warmup_steps`, FitNets features that the models
  do not produce (the message lists those they do), `deit_hard` for a student without a
  distillation token (feature `dist_logits`), and a teacher whose class count differs from the
  student's. Names and class counts that are None are not checked.
  """
  known = default_config()
  unknown = sorted(set(cfg.keys()) - set(known.keys()) - {"enabled"})
  if unknown:
    raise ConfigError(f"config key 'distill.{unknown[0]}' is unknown; the distill sub-config "
                      f"accepts: {', '.join(sorted(known.keys()))}")
  loss = _get(cfg, "loss")
  if loss not in LOSSES:
    raise ConfigError(f"config key 'distill.loss': unknown loss {loss!r}; choose one of "
                      f"{', '.join(LOSSES)}")
  temperature = _get(cfg, "temperature")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      temperature > 0 and np.isfinite(temperature)):
    raise ConfigError(f"config key 'distill.temperature': must be a number > 0, got "
                      f"{temperature!r}")
  alpha = _get(cfg, "alpha")
  if not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"config key 'distill.alpha': must be in [0, 1], got {alpha!r}")
  for key in ("beta", "fitnet_weight", "warmup_steps"):
    if not _get(cfg, key) >= 0:
      raise ConfigError(f"config key 'distill.{key}': must be >= 0, got {_get(cfg, key)!r}")
  if loss == "fitnet":
    for key, names, who in (("student_feature", student_feature_names, "student"),
                            ("teacher_feature", teacher_feature_names, "teacher")):
      name = _get(cfg, key)
      if names is not None and name not in names:
        raise ConfigError(f"config key 'distill.{key}': the {who} model has no feature "
                          f"{name!r}; it produces: {', '.join(names)}")
  if loss == "deit_hard" and student_feature_names is not None and (
      DIST_LOGITS not in student_feature_names):
    raise ConfigError(_no_token_message(student_feature_names))
  if student_classes is not None and teacher_classes is not None and (
      int(student_classes) != int(teacher_classes)):
    raise ConfigError(f"config key 'teacher': the teacher has {teacher_classes} classes, the "
                      f"student {student_classes}; distillation needs the same classes")


def _no_token_message(names: Sequence[str]) -> str:
  return ("config key 'distill.loss': 'deit_hard' trains the student's distillation head, "
          f"feature '{DIST_LOGITS}', which the student model does not produce (it produces: "
          f"{', '.join(names)}); give it a distillation token (a ViT with "
          "model_kwargs.distill_token=True) or choose another loss")


def init_aux(cfg: ml_collections.ConfigDict, student_feats_shapes: Mapping[str, Any],
             teacher_feats_shapes: Mapping[str, Any], rng: jax.Array) -> PyTree:
  """The learned parameters of the loss: `{"regressor": ...}` for FitNets, `{}` otherwise.

  `*_feats_shapes` map feature names to shapes (tuples, arrays or `jax.ShapeDtypeStruct`s),
  e.g. from `jax.eval_shape` of the models. These parameters train with the student (the
  optimizer must see them) and are not part of the exported student.
  """
  if _get(cfg, "loss") != "fitnet":
    return {}
  validate_distill(cfg, list(student_feats_shapes), list(teacher_feats_shapes))

  def shape(x):
    return tuple(getattr(x, "shape", x))

  s_shape = shape(student_feats_shapes[_get(cfg, "student_feature")])
  t_shape = shape(teacher_feats_shapes[_get(cfg, "teacher_feature")])
  _check_feature_shapes(s_shape, t_shape)
  return {"regressor": init_regressor(rng, s_shape[-1], t_shape[-1])}


def make_distill_loss(cfg: ml_collections.ConfigDict,
                      label_smoothing: float = 0.0) -> Callable[..., tuple[jax.Array, dict]]:
  r"""The whole student loss of the `distill` sub-config.

  Returns `fn(student_logits, student_feats, teacher_logits, teacher_feats, labels, aux_params,
  step=None) -> (loss, metrics)`, with CE the (optionally smoothed) softmax cross-entropy with
  the labels and `a = alpha * w(step)`, `w(step) = min(1, step / warmup_steps)` (1 when
  `warmup_steps` is 0 or `step` is None):

      kd:     (1 - a) CE + a kd_loss(s, t, T)
      mse:    (1 - a) CE + a logit_mse_loss(s, t)
      tf_kd:  (1 - a) sigmoid_CE + a MSE(s/T, t/T)    (tf_kd_loss with the seed's lambda = 1 - a;
                                                       CE is reported but not trained)
      dkd:    CE + w(step) (alpha TCKD + beta NCKD)   (mdistiller's DKD, its warm-up included)
      fitnet: (1 - a) CE + a kd_loss(s, t, T) + w(step) fitnet_weight hint   (alpha = 0: FitNets)
      deit_hard: CE(s, y) / 2 + CE(s_dist, argmax t) / 2        (DeiT; alpha, T unused)

  With a distillation token (`student_feats["dist_logits"]`, `s_dist`), the terms that match the
  teacher (kd, mse, the MSE of tf_kd, TCKD / NCKD, fitnet's KD) take `s_dist` in place of `s`,
  and CE stays on `s`: DeiT's soft distillation for kd. `deit_hard` needs `s_dist`.

  `metrics` holds the parts: `ce_loss` always, and `kd_loss`, `logit_mse_loss`,
  `sigmoid_ce_loss`, `tckd_loss`, `nckd_loss`, `hint_loss`, `deit_hard_loss` where they apply;
  `distill_loss` is the total. Teacher logits and features are stop-gradient'ed here.
  """
  validate_distill(cfg)
  loss_name = _get(cfg, "loss")
  temperature = float(_get(cfg, "temperature"))
  alpha = float(_get(cfg, "alpha"))
  beta = float(_get(cfg, "beta"))
  fitnet_weight = float(_get(cfg, "fitnet_weight"))
  s_name, t_name = _get(cfg, "student_feature"), _get(cfg, "teacher_feature")
  tempered_hard = bool(_get(cfg, "tempered_hard"))
  warmup = int(_get(cfg, "warmup_steps"))

  def fn(student_logits, student_feats, teacher_logits, teacher_feats, labels, aux_params,
         step=None):
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    w = 1.0
    if warmup and step is not None:
      w = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)
    a = alpha * w
    # The logits that face the teacher: the distillation token's head where there is one.
    s_t = student_feats.get(DIST_LOGITS, student_logits) if student_feats else student_logits
    if loss_name == "deit_hard":
      if not student_feats or DIST_LOGITS not in student_feats:
        raise ConfigError(_no_token_message(list(student_feats or ())))
      loss, metrics = deit_hard_loss(student_logits, s_t, teacher_logits, labels,
                                     label_smoothing)
      metrics["distill_loss"] = loss
      return loss, metrics
    ce = cross_entropy(student_logits, labels, label_smoothing)
    metrics = {"ce_loss": ce}
    if loss_name == "kd":
      kd = kd_loss(s_t, teacher_logits, temperature)
      loss = (1.0 - a) * ce + a * kd
      metrics["kd_loss"] = kd
    elif loss_name == "mse":
      mse = logit_mse_loss(s_t, teacher_logits)
      loss = (1.0 - a) * ce + a * mse
      metrics["logit_mse_loss"] = mse
    elif loss_name == "tf_kd":
      loss, parts = tf_kd_loss(student_logits, teacher_logits, labels, temperature,
                               lam=1.0 - a, tempered_hard=tempered_hard)
      if s_t is not student_logits:   # the MSE term on the distillation head
        soft = tf_kd_loss(s_t, teacher_logits, labels, temperature)[1]["logit_mse_loss"]
        loss = (1.0 - a) * parts["sigmoid_ce_loss"] + a * soft
        parts = {**parts, "logit_mse_loss": soft}
      metrics.update(parts)
    elif loss_name == "dkd":
      tckd, nckd = dkd_parts(s_t, teacher_logits, labels, temperature)
      loss = ce + w * (alpha * tckd + beta * nckd)
      metrics.update(tckd_loss=tckd, nckd_loss=nckd)
    else:  # fitnet
      s_feat = student_feats[s_name]
      t_feat = jax.lax.stop_gradient(teacher_feats[t_name])
      hint = fitnet_loss(s_feat, t_feat, aux_params["regressor"])
      loss = (1.0 - a) * ce + w * fitnet_weight * hint
      metrics["hint_loss"] = hint
      if alpha > 0:
        kd = kd_loss(s_t, teacher_logits, temperature)
        loss = loss + a * kd
        metrics["kd_loss"] = kd
    metrics["distill_loss"] = loss
    return loss, metrics

  return fn
