"""Teacher loading: the frozen weights of the teachers an experiment names (`config.teacher`),
as their forward pass saw them. The teachers' models and the loss are built with the experiment
(`experiment.make_teachers`)."""

from __future__ import annotations

from absl import logging
import jax

from jcompress import experiment
from jcompress import pretrained as pretrained_lib


def load_teacher_variables(exp) -> list:
  """The teachers' frozen `{"params", "batch_stats"}` (the weights their forward pass saw:
  a compressed teacher's transform applied), replicated; errors name `teacher` and the path."""
  out = []
  for w, texp in zip(exp.teachers.workdirs, exp.teachers.experiments):
    if pretrained_lib.is_pretrained_spec(w):
      eff, batch_stats, message = pretrained_lib.load_pretrained(
          w, texp.model, texp.info.num_classes, jax.random.PRNGKey(0), reinit_head=False)
      logging.info("teacher: %s", message.replace("init_from ", "", 1))
    else:
      _, state = experiment.restore_run(w, "teacher")
      eff = jax.jit(texp.transform.apply)(state.params, state.compression)
      batch_stats = state.batch_stats
    out.append(jax.device_put({"params": eff, "batch_stats": batch_stats}, exp.replicated))
  return out
