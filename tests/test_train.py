"""The training harness: loop, checkpoints, resumption, bad input, data parallelism."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jcompress import checkpoint
from jcompress import config as config_lib
from jcompress import distill
from jcompress import jaxpr_utils
from jcompress import optim
from jcompress import teacher as teacher_lib
from jcompress import train
from jcompress.errors import ConfigError
from jcompress.errors import WorkdirError
from jcompress.methods import base as methods_base
from jcompress.methods import registry

pytestmark = pytest.mark.plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny experiment on the real digits data: small CNN on the native 8x8 images, seconds per run.
EXPERIMENT = textwrap.dedent("""
    from jcompress import config as config_lib

    def get_config(arg=None):
      arg = config_lib.parse_arg(arg, data_dir="", steps=200, width=0.5)
      c = config_lib.base_config()
      c.data = "digits"
      c.data_dir = arg.data_dir
      c.image_size = 0
      c.model = "small_cnn"
      c.width = arg.width
      c.batch_size = 32
      c.eval_batch_size = 128
      c.total_steps = arg.steps
      c.log_every = 1
      c.eval_every = 100
      c.checkpoint_every = 20
      c.keep_checkpoints = 2
      c.optimizer.learning_rate = 0.1
      return c
""")


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("experiments") / "tiny.py"
  path.write_text(EXPERIMENT)
  return str(path)


def tiny_config(experiment_file, data_dir, **overrides):
  spec = {}
  exec(compile(open(experiment_file).read(), experiment_file, "exec"), spec)  # noqa: S102
  arg = ",".join([f"data_dir={data_dir}"] + [f"{k}={v}" for k, v in overrides.items()])
  return spec["get_config"](arg)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir):
  return {m["step"]: m["train_loss"] for m in read_metrics(workdir) if "train_loss" in m}


def launch(args, env=None, **kwargs):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def snapshot(workdir):
  """Path -> content hash of every file under workdir."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def reference_run(experiment_file, data_dir, tmp_path_factory):
  """One uninterrupted in-process run of the tiny experiment."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  results = train.train_and_evaluate(tiny_config(experiment_file, data_dir), workdir)
  return workdir, results


# ----------------------------------------------------------------------------- the loop


def test_run_writes_metrics_results_and_checkpoints(reference_run):
  workdir, results = reference_run
  metrics = read_metrics(workdir)
  steps = [m["step"] for m in metrics if "train_loss" in m]
  assert steps == list(range(1, 201))
  evals = [m for m in metrics if "eval_accuracy" in m]
  assert [m["step"] for m in evals] == [100, 200]
  # While training: the 144 validation images; the 360 test images once, at the end.
  assert all(m["eval_examples"] == 144 for m in evals)
  assert results["eval_split"] == "validation" and results["test_examples"] == 360
  assert results["val_accuracy"] == evals[-1]["eval_accuracy"]
  assert results["val_examples"] == 144
  # 200 steps of SGD on real digits learn the task, far above chance (10%)
  assert results["test_accuracy"] > 0.85
  assert np.mean([m["train_loss"] for m in metrics[-10:] if "train_loss" in m]) < \
      np.mean([m["train_loss"] for m in metrics[:10] if "train_loss" in m])
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  for key in ("test_accuracy", "params", "float_bytes", "model_bytes", "compression_ratio",
              "wall_seconds"):
    assert key in on_disk
  # A float run's artifact (what --mode=export writes): its float32 params, the BatchNorm
  # statistics and the manifest, a little more than the params alone.
  assert on_disk["float_bytes"] == 4 * on_disk["params"]
  assert 0 < on_disk["model_bytes"] - on_disk["float_bytes"] < 0.1 * on_disk["float_bytes"]
  assert on_disk["compression_ratio"] == on_disk["float_bytes"] / on_disk["model_bytes"]
  # keep_checkpoints=2: steps 180 and 200 remain
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert kept == [180, 200]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"] == "small_cnn"


def test_rerun_of_a_finished_run_trains_nothing(reference_run, experiment_file, data_dir):
  workdir, results = reference_run
  before = len(read_metrics(workdir))
  again = train.train_and_evaluate(tiny_config(experiment_file, data_dir), workdir)
  assert again["steps"] == 200
  assert again["test_accuracy"] == pytest.approx(results["test_accuracy"])
  assert len(read_metrics(workdir)) == before


def test_eval_mode_reads_config_from_workdir(reference_run):
  workdir, results = reference_run
  metrics = train.evaluate(None, workdir)
  assert metrics["step"] == 200
  assert metrics["test_accuracy"] == pytest.approx(results["test_accuracy"])
  assert metrics["eval_accuracy"] == pytest.approx(results["val_accuracy"])


# two launcher processes, about 45 s; the SIGTERM test below stays in the default run
@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_losses(reference_run, experiment_file,
                                                           data_dir, tmp_path):
  """Killed with SIGKILL after a checkpoint, the rerun resumes and reproduces every loss."""
  ref_workdir, _ = reference_run
  workdir = str(tmp_path / "killed")
  args = [f"--config={experiment_file}:data_dir={data_dir}", f"--workdir={workdir}"]
  proc = launch(args)
  first_checkpoint = os.path.join(workdir, "checkpoints", "20")   # renamed there once final
  deadline = time.time() + 240
  killed = False
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(first_checkpoint):
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.005)
  proc.wait()
  assert killed, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  done = [int(d) for d in os.listdir(os.path.dirname(first_checkpoint)) if d.isdigit()]
  assert max(done) < 200

  proc = launch(args)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "Resumed from" in err
  losses, ref = train_losses(workdir), train_losses(ref_workdir)
  assert sorted(losses) == list(range(1, 201))   # no step lost, none logged twice
  np.testing.assert_allclose([losses[s] for s in range(1, 201)], [ref[s] for s in range(1, 201)],
                             rtol=1e-5)
  results = json.loads(out)
  with open(os.path.join(ref_workdir, "results.json")) as f:
    assert results["test_accuracy"] == pytest.approx(json.load(f)["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(experiment_file, data_dir, tmp_path):
  workdir = str(tmp_path / "term")
  proc = launch([f"--config={experiment_file}:data_dir={data_dir},steps=100000",
                 f"--workdir={workdir}"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_path) and sum(1 for _ in open(metrics_path)) >= 5:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "SIGTERM: saved a checkpoint at step" in err
  last = max(m["step"] for m in read_metrics(workdir))
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert max(saved) == last and last < 100000
  assert not os.path.exists(os.path.join(workdir, "results.json"))


# ----------------------------------------------------------------------------- bad input


def test_workdir_of_another_config_is_refused_and_untouched(reference_run, experiment_file,
                                                            data_dir):
  workdir, _ = reference_run
  before = snapshot(workdir)
  with pytest.raises(WorkdirError, match=r"different config \(width: 0.5 in the workdir, 1.0 now"):
    train.train_and_evaluate(tiny_config(experiment_file, data_dir, width=1.0), workdir)
  assert snapshot(workdir) == before


def test_checkpoint_that_does_not_match_the_model_is_refused(reference_run, experiment_file,
                                                             data_dir, tmp_path):
  import shutil  # noqa: PLC0415
  workdir = str(tmp_path / "mismatch")
  shutil.copytree(os.path.join(reference_run[0], "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  before = snapshot(workdir)
  with pytest.raises(WorkdirError, match=r"checkpoint .*/200: 'params/.*' has shape"):
    train.train_and_evaluate(tiny_config(experiment_file, data_dir, width=1.0), workdir)
  assert snapshot(workdir) == before


def test_eval_of_an_empty_workdir_is_refused(tmp_path):
  with pytest.raises(WorkdirError, match="config.json does not exist"):
    train.evaluate(None, str(tmp_path))


def test_impossible_config_stops_before_compiling(experiment_file, data_dir, tmp_path):
  c = tiny_config(experiment_file, data_dir)
  c.batch_size = 0
  with pytest.raises(ConfigError, match="config key 'batch_size'"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.parametrize("args, fragment", [
    (["--config=experiments/baseline_resnet.py:data=digits", "--config.no_such_key=1"],
     "no_such_key"),
    (["--config=experiments/does_not_exist.py"], "does_not_exist.py"),
    (["--config=experiments/baseline_resnet.py:colour=red"], "unknown config arg 'colour'"),
    (["--config=experiments/baseline_resnet.py:data=no_such_dataset"],
     "`data`: unknown dataset 'no_such_dataset'"),
    (["--config=experiments/baseline_resnet.py:data=digits", "--config.model=resnet9000"],
     "resnet9000"),
])
def test_launcher_bad_input_is_one_clear_error(args, fragment, tmp_path):
  proc = launch(args + [f"--workdir={tmp_path / 'w'}"])
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert fragment in err
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_launcher_malformed_config_file_names_the_file(tmp_path):
  bad = tmp_path / "broken.py"
  bad.write_text("def get_config(:\n")
  proc = launch([f"--config={bad}", f"--workdir={tmp_path / 'w'}"])
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "broken.py" in err
  assert "Traceback" not in err


# ----------------------------------------------------------------------------- data parallelism


SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax
    from jcompress import train
    spec = {{}}
    exec(open({experiment!r}).read(), spec)
    out = {{"devices": jax.device_count()}}
    for n in (1, 4):
      c = spec["get_config"]("data_dir={data_dir},steps=8")
      c.num_devices = n
      c.eval_every = 0
      workdir = {tmp!r} + f"/dev{{n}}"
      train.train_and_evaluate(c, workdir)
      out[n] = [json.loads(l)["train_loss"] for l in open(workdir + "/metrics.jsonl")
                if "train_loss" in l]
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_four_devices_follow_the_one_device_trajectory(experiment_file, data_dir, tmp_path):
  script = SHARDING_SCRIPT.format(root=ROOT, experiment=experiment_file, data_dir=data_dir,
                                  tmp=str(tmp_path))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT")[-1])
  assert out["devices"] == 4
  assert len(out["1"]) == len(out["4"]) == 8
  np.testing.assert_allclose(out["4"], out["1"], rtol=2e-4)


# ----------------------------------------------------------------------------- optimizer


def test_cosine_schedule_with_warmup_matches_closed_form():
  c = config_lib.base_config()
  c.total_steps, c.schedule.warmup_steps, c.optimizer.learning_rate = 110, 10, 0.2
  s = optim.make_schedule(c)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.1)
  for t in (10, 35, 60, 109):
    expected = 0.2 * 0.5 * (1 + np.cos(np.pi * (t - 10) / 100))
    assert float(s(t)) == pytest.approx(expected, rel=1e-5, abs=1e-7)   # float32 near 0


def test_step_schedule_decays_at_the_boundaries():
  c = config_lib.base_config()
  c.total_steps, c.schedule.name, c.optimizer.learning_rate = 100, "step", 1.0
  s = optim.make_schedule(c)
  assert [float(s(t)) for t in (0, 49, 50, 74, 75, 99)] == pytest.approx(
      [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_sgd_weight_decay_reaches_kernels_only():
  c = config_lib.base_config()
  c.schedule.name, c.optimizer.learning_rate = "constant", 0.1
  c.optimizer.momentum, c.optimizer.weight_decay = 0.0, 0.5
  tx = optim.make_optimizer(c, optim.make_schedule(c))
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 1.0 - 0.1 * 0.5)   # w - lr * wd * w
  np.testing.assert_allclose(new["bias"], 1.0)


# ----------------------------------------------------------------------------- compression wiring


@pytest.mark.slow
def test_binary_subconfig_trains_binary_weights_and_sizes_the_packed_artifact(
    experiment_file, data_dir, tmp_path):
  import ml_collections  # noqa: PLC0415

  from jcompress import transforms  # noqa: PLC0415
  c = tiny_config(experiment_file, data_dir, steps=20)
  c.binary = ml_collections.ConfigDict({"method": "ste_sign", "include": (".*",),
                                        "exclude": transforms.DEFAULT_EXCLUDE})
  workdir = str(tmp_path / "binary")
  results = train.train_and_evaluate(c, workdir)

  exp = train.make_experiment(c)
  mngr = checkpoint.checkpoint_manager(workdir, c)
  state, _ = checkpoint.restore_state(mngr, mngr.latest_step(), exp)
  selected = transforms.select(state.params)
  eff = exp.transform.apply(state.params, state.compression)
  expected_bytes = 0
  for sel, latent, w in zip(jax.tree.leaves(selected), jax.tree.leaves(state.params),
                            jax.tree.leaves(eff)):
    if sel:   # binarized: the forward pass sees +-1, latents stay in [-1, 1]
      assert set(np.unique(np.asarray(w)).tolist()) <= {-1.0, 1.0}
      assert float(jnp.max(jnp.abs(latent))) <= 1.0
      *_, c_in, c_out = latent.shape
      kernel = int(np.prod(latent.shape[:-2]))
      expected_bytes += kernel * -(-c_in // 32) * 4 * c_out   # uint32 words along C_in
    else:     # stem, head, BatchNorm and biases stay float32
      np.testing.assert_array_equal(w, latent)
      expected_bytes += 4 * latent.size
  assert any(jax.tree.leaves(selected))
  from jcompress import export  # noqa: PLC0415
  arrays, manifest = export.artifact_arrays(exp, state)
  # The exported params take exactly those bytes; the artifact adds BatchNorm stats + manifest.
  assert sum(a.nbytes for n, a in arrays.items() if n not in manifest["batch_stats"]) == \
      expected_bytes
  assert results["model_bytes"] == export.artifact_nbytes(arrays, manifest)
  assert results["compression_ratio"] == pytest.approx(results["float_bytes"] /
                                                       results["model_bytes"])
  assert results["compression_ratio"] > 1.5


@pytest.fixture(scope="module")
def student_runs(reference_run, experiment_file, data_dir, tmp_path_factory, default_emitters):
  """The tiny student trained 30 steps alone, and with the reference run as KD teacher at
  alpha 0 (the distillation term weighted out) and at alpha 0.9; compiled with XLA's own
  emitters, whose rounding the alpha-0 trajectory check relies on."""
  teacher, _ = reference_run
  runs = {}
  for name, alpha in (("alone", None), ("alpha0", 0.0), ("kd", 0.9)):
    c = tiny_config(experiment_file, data_dir, steps=30, width=0.25)
    if alpha is not None:
      c.teacher = teacher
      c.distill = ml_collections.ConfigDict({"loss": "kd", "temperature": 4.0, "alpha": alpha})
    workdir = str(tmp_path_factory.mktemp(name))
    with default_emitters():
      runs[name] = (workdir, train.train_and_evaluate(c, workdir), c)
  return runs


def test_kd_with_alpha_zero_follows_the_hard_label_trajectory(student_runs):
  alone = train_losses(student_runs["alone"][0])
  alpha0 = train_losses(student_runs["alpha0"][0])
  assert alone.keys() == alpha0.keys()
  np.testing.assert_allclose([alpha0[k] for k in alone], [alone[k] for k in alone], rtol=1e-5)


def test_kd_logs_its_terms_and_changes_the_trajectory(student_runs):
  logged = [m for m in read_metrics(student_runs["kd"][0]) if "train_loss" in m]
  assert all({"ce_loss", "kd_loss", "distill_loss"} <= m.keys() for m in logged)
  for m in logged:   # train_loss is the mixture the loss function reports
    assert m["train_loss"] == pytest.approx(0.1 * m["ce_loss"] + 0.9 * m["kd_loss"], rel=1e-4)
  alone = train_losses(student_runs["alone"][0])
  assert abs(logged[-1]["ce_loss"] - alone[30]) > 1e-4
  results = student_runs["kd"][1]
  assert results["test_accuracy"] > 0.3 and results["params"] == student_runs["alone"][1]["params"]


def test_offline_teacher_runs_forward_only(student_runs):
  _, _, c = student_runs["kd"]
  exp = train.make_experiment(c)
  state = train.create_state(exp)
  tvars = teacher_lib.load_teacher_variables(exp)
  batch = {"image": jnp.zeros((c.batch_size, *exp.info.image_shape)),
           "label": jnp.zeros((c.batch_size,), jnp.int32)}
  with_teacher = jax.make_jaxpr(train.make_train_step(exp.model, exp.tx, exp.transform,
                                                      exp.schedule, 0.0, exp.teachers))
  alone = jax.make_jaxpr(train.make_train_step(exp.model, exp.tx, exp.transform, exp.schedule))
  n_with = jaxpr_utils.count_primitive(with_teacher(state, batch, tvars).jaxpr,
                                       "conv_general_dilated")
  n_alone = jaxpr_utils.count_primitive(alone(state, batch).jaxpr, "conv_general_dilated")
  # small_cnn has 3 convolutions: the student's forward + backward are in both steps; the
  # teacher adds its 3 forward convolutions and no gradient convolution.
  assert n_alone == 3 + 3 + 2
  assert n_with == n_alone + 3


@pytest.mark.slow
def test_mixup_step_feeds_student_teacher_and_labels_the_mixed_batch(student_runs):
  """With `mixup`, the student and the teacher both see the mixed images and the hard-label
  term the mixed labels. Beta(a, a) with a = 1e6 puts the ratio at 0.5 (within ~1e-3), so the
  step's logged terms are checked against a hand computation on (x + x') / 2."""
  workdir, _, c = student_runs["kd"]
  exp = train.make_experiment(c)
  state = train.restore_run(workdir, "test")[1]     # a trained student: confident logits
  tvars = teacher_lib.load_teacher_variables(exp)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(c.batch_size, *exp.info.image_shape)), jnp.float32)
  mixed = 0.5 * (images + jnp.roll(images, 1, axis=0))
  eff = exp.transform.apply(state.params, state.compression)
  (s_logits, _), _ = exp.model.apply({"params": eff, "batch_stats": state.batch_stats}, mixed,
                                     train=True, mutable=["batch_stats"])
  t_logits, _ = exp.teachers.models[0].apply(tvars[0], mixed, train=False)
  # labels the student's own decisions on the mixed images: mixing them with the neighbour's
  # raises the cross-entropy, so the check tells mixed labels from unmixed ones
  labels = jnp.argmax(s_logits, -1).astype(jnp.int32)
  targets = 0.5 * (jax.nn.one_hot(labels, 10) + jax.nn.one_hot(jnp.roll(labels, 1), 10))
  want_kd = float(distill.kd_loss(s_logits, t_logits, 4.0))
  want_ce = float(distill.cross_entropy(s_logits, targets))
  assert abs(float(distill.cross_entropy(s_logits, labels)) - want_ce) > 0.1 * want_ce
  batch = {"image": images, "label": labels}
  step = jax.jit(train.make_train_step(exp.model, exp.tx, exp.transform, exp.schedule, 0.0,
                                       exp.teachers, mixup=1e6))
  _, m = step(state, batch, tvars)
  assert float(m["kd_loss"]) == pytest.approx(want_kd, rel=2e-2)
  assert float(m["ce_loss"]) == pytest.approx(want_ce, rel=2e-2)
  _, plain = jax.jit(train.make_train_step(exp.model, exp.tx, exp.transform, exp.schedule, 0.0,
                                           exp.teachers))(state, batch, tvars)
  assert abs(float(plain["kd_loss"]) - want_kd) > 0.1 * want_kd   # unmixed: another value


def test_teacher_without_checkpoint_stops_before_compiling(experiment_file, data_dir, tmp_path):
  teacher = tmp_path / "teacher"
  teacher.mkdir()
  c = tiny_config(experiment_file, data_dir)
  (teacher / "config.json").write_text(json.dumps(config_lib.to_dict(c)))
  c.teacher = str(teacher)
  workdir = str(tmp_path / "w")
  with pytest.raises(ConfigError, match="config key 'teacher'.*holds no checkpoint"):
    train.train_and_evaluate(c, workdir)
  assert not os.path.exists(workdir)
  c.teacher = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="config key 'teacher'.*is not a directory"):
    train.train_and_evaluate(c, workdir)


def _scaling_method_module():
  """A registered compression method for the wiring tests: the forward pass sees the kernels
  times `state["scale"]`; `calibrate` sets the scale to 1 and records the batches' loss;
  `metrics` reports both."""
  import types  # noqa: PLC0415

  from jcompress import transforms  # noqa: PLC0415

  def transform_from_config(cfg, params_like, config):
    mask = transforms.select(params_like)

    def apply(params, state):
      return jax.tree.map(lambda m, w: w * state["scale"] if m else w, mask, params)

    def calibrate(params, state, ctx):
      assert len(ctx.batches) == config.calibration_batches
      loss = jnp.mean(jnp.stack([ctx.loss_fn(params, b) for b in ctx.batches]))
      return params, {"scale": jnp.ones(()), "calib_loss": loss}

    return transforms.ParamTransform(
        init=lambda params, rng: {"scale": jnp.full((), cfg.init_scale),
                                  "calib_loss": jnp.zeros(())},
        apply=apply,
        update=lambda params, state, step: (params, state),
        export=lambda params, state: {"params": params},
        calibrate=calibrate if cfg.calibrate else None,
        metrics=lambda params, state: {"scale": state["scale"],
                                       "calib_loss": state["calib_loss"]})

  module = types.ModuleType("jc_test_scaling")
  module.METHOD = methods_base.Method(name="scaling", summary="scales the weights (test)",
                                      transform=transform_from_config)
  return module


@pytest.fixture
def scaling_method(monkeypatch):
  """A method registered as a user would (one module with a METHOD), for this test only."""
  monkeypatch.setitem(sys.modules, "jc_test_scaling", _scaling_method_module())
  monkeypatch.setattr(registry, "METHODS", registry.METHODS + registry.load(["jc_test_scaling"]))


def test_init_from_calibrate_and_metrics_with_zero_steps(reference_run, experiment_file, data_dir,
                                                         tmp_path, scaling_method):
  import ml_collections  # noqa: PLC0415
  source, source_results = reference_run
  c = tiny_config(experiment_file, data_dir, steps=0)
  c.init_from = source
  c.calibration_batches = 2
  c.scaling = ml_collections.ConfigDict({"init_scale": 0.0, "calibrate": True})
  workdir = str(tmp_path / "ptq")
  results = train.train_and_evaluate(c, workdir)
  # The float model is the source run's; calibration turned the scale 0 -> 1, so the
  # "compressed" model is that float model again, and the metrics say so.
  assert results["float_test_accuracy"] == pytest.approx(source_results["test_accuracy"])
  assert results["test_accuracy"] == pytest.approx(source_results["test_accuracy"])
  assert results["scale"] == 1.0 and 0.0 < results["calib_loss"] < 1.0
  assert results["steps"] == 0
  # The zero-step run keeps a checkpoint whose params are the source's latest.
  exp = train.make_experiment(c)
  mngr = checkpoint.checkpoint_manager(workdir, c, create=False)
  assert mngr.latest_step() == 0
  state, meta = checkpoint.restore_state(mngr, 0, exp)
  _, src_state = train.restore_run(source, "init_from")
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(src_state.params)):
    np.testing.assert_array_equal(a, b)
  assert meta["float_test_accuracy"] == results["float_test_accuracy"]


def test_init_from_trains_on_and_logs_transform_metrics(reference_run, experiment_file, data_dir,
                                                        tmp_path, scaling_method):
  import ml_collections  # noqa: PLC0415
  source, _ = reference_run
  c = tiny_config(experiment_file, data_dir, steps=10)
  c.init_from = source
  c.scaling = ml_collections.ConfigDict({"init_scale": 0.5, "calibrate": False})
  workdir = str(tmp_path / "ft")
  results = train.train_and_evaluate(c, workdir)
  logged = [m for m in read_metrics(workdir) if "train_loss" in m]
  assert [m["scale"] for m in logged] == [0.5] * 10
  assert results["scale"] == 0.5 and "float_test_accuracy" in results
  # Starting from a trained model, the first loss is far below a fresh model's (~2.3).
  assert logged[0]["train_loss"] < 1.0


@pytest.mark.parametrize("mutate, fragment", [
    (lambda c, src, tmp: setattr(c, "init_from", str(tmp / "nowhere")), "is not a directory"),
    (lambda c, src, tmp: (setattr(c, "init_from", src), setattr(c, "width", 0.25)),
     "has shape"),
    (lambda c, src, tmp: (os.makedirs(tmp / "empty", exist_ok=True),
                          setattr(c, "init_from", str(tmp / "empty"))), "config.json"),
])
def test_init_from_bad_input_names_the_key(reference_run, experiment_file, data_dir, tmp_path,
                                           mutate, fragment):
  source, _ = reference_run
  c = tiny_config(experiment_file, data_dir, steps=5)
  mutate(c, source, tmp_path)
  workdir = str(tmp_path / "w")
  with pytest.raises(ConfigError, match="config key 'init_from'.*" + fragment):
    train.train_and_evaluate(c, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_init_from_reads_a_workdir_of_an_older_layout(reference_run, tmp_path):
  """A run written before `train_examples` / `aux` existed still serves as init_from/teacher."""
  import shutil  # noqa: PLC0415
  source, _ = reference_run
  old = str(tmp_path / "old")
  shutil.copytree(source, old, ignore=shutil.ignore_patterns("checkpoints"))
  with open(os.path.join(old, "config.json")) as f:
    cfg = json.load(f)
  for k in ("train_examples", "calibration_batches", "init_from"):
    cfg.pop(k)
  with open(os.path.join(old, "config.json"), "w") as f:
    json.dump(cfg, f)
  _, state = train.restore_run(source, "init_from")
  mngr = checkpoint.checkpoint_manager(old, config_lib.base_config())
  legacy = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "compression": {}, "rng": state.rng}
  mngr.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(legacy), meta=ocp.args.JsonSave({})))
  mngr.wait_until_finished()
  mngr.close()
  _, restored = train.restore_run(old, "init_from")
  assert int(restored.step) == int(state.step)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_lowrank_subconfig_factorizes_init_from_weights(reference_run, experiment_file, data_dir,
                                                        tmp_path):
  from jcompress import lowrank  # noqa: PLC0415
  source, source_results = reference_run
  c = tiny_config(experiment_file, data_dir, steps=0)
  c.init_from = source
  c.lowrank = lowrank.default_config()
  c.lowrank.rank = 1000   # above every layer's maximum: refused, naming the layer
  with pytest.raises(ConfigError, match="rank"):
    train.train_and_evaluate(c, str(tmp_path / "bad"))
  c.lowrank.rank = 0
  c.lowrank.param_fraction = 0.5
  results = train.train_and_evaluate(c, str(tmp_path / "lr"))
  assert results["float_test_accuracy"] == source_results["test_accuracy"]
  assert results["lowrank_param_fraction"] <= 0.5
  assert results["params"] < source_results["params"]
  assert results["float_bytes"] == 4 * source_results["params"]
  assert results["init_test_accuracy"] == results["test_accuracy"]   # no step taken


def test_init_from_a_float_run_into_a_model_with_activation_quantizers(
    reference_run, experiment_file, data_dir, tmp_path):
  source, source_results = reference_run
  c = tiny_config(experiment_file, data_dir, steps=0)
  c.init_from = source
  c.model_kwargs.act_quant = ml_collections.ConfigDict({"kind": "pact", "bits": 2})
  results = train.train_and_evaluate(c, str(tmp_path / "a2"))
  # The float accuracy is the source's own (quantizers off); 2-bit activations cost some.
  assert results["float_test_accuracy"] == source_results["test_accuracy"]
  assert results["test_accuracy"] < results["float_test_accuracy"]


@pytest.mark.slow
def test_structured_subconfig_removes_filters_of_init_from_and_resumes(
    reference_run, experiment_file, data_dir, tmp_path):
  from jcompress import structured  # noqa: PLC0415
  source, source_results = reference_run
  c = tiny_config(experiment_file, data_dir, steps=4)
  c.init_from = source
  c.structured = structured.default_config()
  c.structured.flops_target = 0.5
  workdir = str(tmp_path / "sp")
  results = train.train_and_evaluate(c, workdir)
  assert results["float_test_accuracy"] == source_results["test_accuracy"]
  assert results["flops_ratio"] <= 0.5 and results["flops"] < results["flops_before"]
  assert results["params"] < source_results["params"] == results["params_before"]
  assert results["float_bytes"] == 4 * source_results["params"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model_kwargs"]["channels"]
  # A rerun resumes the pruned model (its widths come from the workdir's config.json).
  again = train.train_and_evaluate(c, workdir)
  assert again["test_accuracy"] == results["test_accuracy"] and again["steps"] == 4
