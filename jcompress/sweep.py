r"""Ablation sweeps: expansion, runs in sub-workdirs, result tables and plots.

An experiment file may define `get_sweep(arg)` beside `get_config(arg)`: the list of
points to run, each a dict of dotted config keys to values that override the config
`--config` produced (`{"quant.bits": 4, "quant.method": "kmeans"}`). The helpers below
build such lists as big_vision's `hyper` module does:

  product(sweep("quant.bits", [8, 4, 2]), sweep("quant.method", ["uniform", "kmeans"]))
  product({"quant.bits": [8, 4, 2], "quant.method": ["uniform", "kmeans"]})   # the same
  zipit({"quant.method": ["uniform", "kmeans"], "optimizer.weight_decay": [5e-4, 0.0]})

  python launch.py --config=experiments/quant_resnet.py:data=digits --workdir=DIR --mode=sweep
  python launch.py ... --mode=sweep --sweep_index=$SLURM_ARRAY_TASK_ID   # one point per job
  python launch.py ... --mode=sweep --summarize                          # gather the results

Every point is checked before any runs (an unknown key, a value of the wrong type or an
impossible one refuses the whole sweep, naming the key and the point). Point i runs in
`DIR/<name>`, its name made of its overrides (`quant.bits=4,quant.method=kmeans`), with
`jcompress.train.train_and_evaluate`: a point whose directory holds `results.json` is
skipped, an interrupted one resumes. `DIR/sweep.json` lists the points and their
directories. After a full run (and with `--summarize`) the points' `results.json` are
gathered into `DIR/sweep.csv`, `DIR/sweep.md` and `DIR/sweep.png` (test accuracy against
model size, the Pareto front marked); unfinished points are listed as missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import csv
import hashlib
import itertools
import json
import math
import os
import re
import textwrap
from typing import Any

from absl import logging
import ml_collections

from jcompress import checkpoint
from jcompress import config as config_lib
from jcompress import experiment
from jcompress import train
from jcompress.errors import ConfigError
from jcompress.errors import JCompressError
from jcompress.methods import registry

Point = dict   # dotted config key -> value

#: results.json keys shown first (in this order) in sweep.csv; the method's own figures follow.
RESULT_KEYS = ("test_accuracy", "float_test_accuracy", "model_bytes", "compression_ratio",
               "float_bytes", "params", "wall_seconds")
#: The columns of sweep.md after the overrides (those that some finished point has).
TABLE_KEYS = ("test_accuracy", "float_test_accuracy", "model_bytes", "compression_ratio",
              "wall_seconds")

# ----------------------------------------------------------------------------- helpers


def sweep(key: str, values: Sequence[Any]) -> list[Point]:
  """`[{key: v} for v in values]`: one key taking each value in turn."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ConfigError(f"sweep key '{key}': expected a list of values, got {values!r}")
  return [{key: v} for v in values]


def _as_sweeps(args: Sequence[Any], kwargs: Mapping[str, Sequence[Any]]) -> list[list[Point]]:
  """Each argument as a list of points: a list of dicts stays, a dict {key: values} (and the
  keyword arguments) becomes one `sweep(key, values)` per key."""
  out = []
  for a in args:
    if isinstance(a, Mapping):
      out.extend(sweep(k, v) for k, v in a.items())
    elif isinstance(a, Sequence) and not isinstance(a, (str, bytes)) and all(
        isinstance(p, Mapping) for p in a):
      out.append([dict(p) for p in a])
    else:
      raise ConfigError(f"sweep: expected a list of override dicts or a dict of value lists, "
                        f"got {a!r}")
  out.extend(sweep(k, v) for k, v in kwargs.items())
  return out


def _merge(points: Sequence[Point]) -> Point:
  merged: Point = {}
  for p in points:
    for k, v in p.items():
      if k in merged and merged[k] != v:
        raise ConfigError(f"sweep: key '{k}' is set twice in one point ({merged[k]!r} and {v!r})")
      merged[k] = v
  return merged


def product(*sweeps: Any, **lists: Sequence[Any]) -> list[Point]:
  """The Cartesian product of sweeps; the first varies slowest.

  Each argument is a list of override dicts (e.g. `sweep(key, values)`, or another
  `product` / `zipit`) or a dict `{key: values}`; keyword arguments are `{key: values}`
  for keys that are Python names.

  >>> product({"bits": [8, 4]}, seed=[0, 1])
  [{'bits': 8, 'seed': 0}, {'bits': 8, 'seed': 1}, {'bits': 4, 'seed': 0}, {'bits': 4, 'seed': 1}]
  """
  return [_merge(combo) for combo in itertools.product(*_as_sweeps(sweeps, lists))]


def zipit(*sweeps: Any, **lists: Sequence[Any]) -> list[Point]:
  """Sweeps zipped together point by point (all of the same length), in the argument forms
  `product` takes.

  >>> zipit({"method": ["uniform", "kmeans"], "wd": [5e-4, 0.0]})
  [{'method': 'uniform', 'wd': 0.0005}, {'method': 'kmeans', 'wd': 0.0}]
  """
  parts = _as_sweeps(sweeps, lists)
  lengths = {len(p) for p in parts}
  if len(lengths) > 1:
    raise ConfigError(f"zipit: the sweeps have different lengths {[len(p) for p in parts]}")
  return [_merge(combo) for combo in zip(*parts)]


# ----------------------------------------------------------------------------- points


def _format_value(v: Any) -> str:
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (list, tuple)):
    return "+".join(_format_value(x) for x in v)
  return str(v)


def point_name(point: Point) -> str:
  """The sub-workdir name of a point: its overrides as `key=value`, sorted by key and joined
  by commas (`quant.bits=4,quant.method=kmeans`); characters unsafe in a file name become
  `_`. Stable under reordering of the keys; an empty point is `base`; a name over 150
  characters is cut and given a hash of the whole."""
  if not point:
    return "base"
  text = ",".join(f"{k}={_format_value(point[k])}" for k in sorted(point))
  name = re.sub(r"[^A-Za-z0-9=.,+_-]+", "_", text).strip(".")
  if len(name) > 150:
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    name = f"{name[:139]}_{digest}"
  return name


def point_label(point: Point, keys: Sequence[str] | None = None) -> str:
  """A short label for plots: the overrides with the last part of each key
  (`bits=4 method=kmeans`), or of `keys` only."""
  keys = [k for k in (point if keys is None else keys) if k in point]
  short = {k: k.rsplit(".", 1)[-1] for k in keys}
  if len(set(short.values())) < len(short):   # two keys end alike: keep them whole
    short = {k: k for k in keys}
  return " ".join(f"{short[k]}={_format_value(point[k])}" for k in keys) or "base"


def load_sweep(spec: str) -> list[Point]:
  """The points of `get_sweep(arg)` in the experiment file of `spec` ("path.py:arg")."""
  path, _, arg = spec.partition(":")
  module = config_lib.load_experiment_module(path, "--config")
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"--mode=sweep: '{path}' defines no get_sweep(arg); add one returning "
                      "the list of config overrides to run (jcompress.sweep.product / zipit)")
  try:
    points = module.get_sweep(arg or None)
  except JCompressError:
    raise
  except Exception as e:  # noqa: BLE001  (a failing get_sweep is a config error)
    raise ConfigError(f"get_sweep of '{path}' failed: {type(e).__name__}: {e}") from e
  if isinstance(points, Mapping) or not isinstance(points, Sequence) or not points:
    raise ConfigError(f"get_sweep of '{path}' must return a non-empty list of override dicts, "
                      f"got {points!r}")
  for i, p in enumerate(points):
    if not isinstance(p, Mapping) or not all(isinstance(k, str) for k in p):
      raise ConfigError(f"get_sweep of '{path}': point {i} is not a dict of config keys to "
                        f"values: {p!r}")
  return [dict(p) for p in points]


def apply_overrides(config: ml_collections.ConfigDict, point: Point,
                    where: str = "") -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted keys of `point` set. Every key must exist in the
  config (a ConfigError names the key, and `where`, otherwise); values keep the key's type."""
  new = config.copy_and_resolve_references()
  prefix = f"sweep point {where}: " if where else "sweep point: "
  for key, value in point.items():
    node = new
    parts = key.split(".")
    for i, part in enumerate(parts):
      parent = ".".join(parts[:i])
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"{prefix}unknown config key '{key}' ('{parent}' is a "
                          f"{type(node).__name__}, not a sub-config)")
      if part not in node:
        where_keys = f"'{parent}' has" if parent else "the config has"
        raise ConfigError(f"{prefix}unknown config key '{key}' ({where_keys}: "
                          f"{', '.join(sorted(node.keys()))})")
      if i < len(parts) - 1:
        node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict) and not isinstance(
        value, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"{prefix}config key '{key}' is a sub-config; override its keys "
                        f"('{key}.<key>'), not the whole of it")
    try:
      with node.unlocked():
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{prefix}config key '{key}': {value!r} does not fit ({e})") from None
  return new


def expand(config: ml_collections.ConfigDict, spec: str,
           workdir: str) -> list[dict]:
  """Every point of the sweep of `spec`: `{"index", "name", "overrides", "workdir", "config"}`.

  Refuses the whole sweep (ConfigError) if a point names an unknown key, gives a value of
  the wrong type, fails `config.validate`, or has the name of another point."""
  points = load_sweep(spec)
  n = len(points)
  out, names = [], {}
  for i, point in enumerate(points):
    name = point_name(point)
    where = f"{i + 1}/{n} {name}"
    if name in names:
      raise ConfigError(f"sweep point {where}: the same overrides as point "
                        f"{names[name] + 1}/{n}; every point must differ")
    names[name] = i
    c = apply_overrides(config, point, where)
    try:
      config_lib.validate(c)
    except ConfigError as e:
      raise ConfigError(f"sweep point {where}: {e}") from None
    out.append({"index": i, "name": name, "overrides": point,
                "workdir": os.path.join(workdir, name), "config": c})
  return out


def check_buildable(points: Sequence[dict]) -> None:
  """Builds each point's experiment abstractly (`experiment.make_experiment`: model, optimizer,
  compression transform; nothing compiled, no weights): what only the builders check (the
  quant sub-config's keys and bits, a model's fields, the dataset) refuses the sweep before
  any point runs."""
  n = len(points)
  for p in points:
    try:
      experiment.make_experiment(p["config"], load_teacher=False)
    except JCompressError as e:
      raise type(e)(f"sweep point {p['index'] + 1}/{n} {p['name']}: {e}") from None


def _write_json_atomic(path: str, data: Any) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


def write_index(points: Sequence[dict], spec: str, workdir: str) -> str:
  """DIR/sweep.json: the spec and, per point, its index, name, overrides and directory."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "sweep.json")
  _write_json_atomic(path, {
      "config": spec,
      "points": [{"index": p["index"], "name": p["name"], "overrides": p["overrides"],
                  "workdir": p["workdir"]} for p in points]})
  return path


def is_finished(point: dict) -> bool:
  return os.path.exists(os.path.join(point["workdir"], "results.json"))


# ----------------------------------------------------------------------------- running


def run_point(point: dict, n: int) -> dict:
  """Runs (or resumes) one point with `train.train_and_evaluate`; a finished one is skipped."""
  label = f"sweep point {point['index'] + 1}/{n}: {point['name']}"
  if is_finished(point):
    # A method that prepares the run (filters removed) stores the config it made: not comparable.
    if not registry.with_hook(point["config"], "prepare"):
      try:
        checkpoint.check_workdir_config(point["config"], point["workdir"])
      except JCompressError as e:
        raise type(e)(f"sweep point {point['index'] + 1}/{n} {point['name']}: {e}") from None
    logging.info("%s: finished (results.json), skipped", label)
    return {"status": "skipped"}
  logging.info("%s", label)
  try:
    results = train.train_and_evaluate(point["config"], point["workdir"])
  except JCompressError as e:
    raise type(e)(f"sweep point {point['index'] + 1}/{n} {point['name']}: {e}") from None
  if "interrupted_at_step" in results:
    return {"status": "interrupted", "step": results["interrupted_at_step"]}
  logging.info("%s: done, test_accuracy %.4f, model_bytes %s", label,
               results.get("test_accuracy", float("nan")), results.get("model_bytes"))
  return {"status": "ran"}


def run_sweep(config: ml_collections.ConfigDict, spec: str, workdir: str,
              index: int | None = None, summarize: bool = False) -> dict:
  """`--mode=sweep`: runs every point of `get_sweep(arg)` (or only point `index`) under
  `workdir`, then summarizes; `summarize=True` runs nothing and only summarizes."""
  if not workdir:
    raise ConfigError("--mode=sweep needs --workdir")
  points = expand(config, spec, workdir)
  n = len(points)
  if index is not None and not 0 <= index < n:
    raise ConfigError(f"--sweep_index={index}: the sweep of {spec} has {n} points "
                      f"(indices 0..{n - 1})")
  title = f"Sweep {spec}"
  if summarize:
    if index is not None:
      raise ConfigError("--summarize gathers the whole sweep; drop --sweep_index")
    return summarize_sweep(points, workdir, title=title)
  check_buildable(points)   # all of them, also for one --sweep_index: a bad point refuses all
  write_index(points, spec, workdir)
  todo = points if index is None else [points[index]]
  logging.info("sweep of %s: %d points in %s%s", spec, n, workdir,
               "" if index is None else f"; running point {index + 1} only")
  status = {}
  for p in todo:
    result = run_point(p, n)
    status[p["name"]] = result["status"]
    if result["status"] == "interrupted":   # SIGTERM: stop here; a rerun resumes this point
      logging.warning("sweep interrupted in point %d/%d (%s) at step %d; rerun to resume",
                      p["index"] + 1, n, p["name"], result["step"])
      return {"workdir": workdir, "points": n, "status": status, "interrupted": p["name"]}
  out = {"workdir": workdir, "points": n, "status": status}
  if index is None:
    out["summary"] = summarize_sweep(points, workdir, title=title)
  return out


# ----------------------------------------------------------------------------- summary


def pareto_front(sizes: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
  """Which points are on the Pareto front of (small size, high accuracy): point i is on it
  unless another point is at most as large and at least as accurate, and strictly better
  in one of the two. Equal points are both on it."""
  n = len(sizes)
  on = []
  for i in range(n):
    dominated = any(
        sizes[j] <= sizes[i] and accuracies[j] >= accuracies[i]
        and (sizes[j] < sizes[i] or accuracies[j] > accuracies[i]) for j in range(n) if j != i)
    on.append(not dominated)
  return on


def _scalar(v: Any) -> bool:
  return isinstance(v, (int, float, str, bool)) or v is None


def collect(points: Sequence[dict]) -> tuple[list[dict], list[str], list[str]]:
  """Rows (one per point, results.json read where present), the override columns and the
  result columns."""
  override_keys: list[str] = []
  for p in points:
    override_keys += [k for k in p["overrides"] if k not in override_keys]
  rows = []
  for p in points:
    row = {"index": p["index"], "name": p["name"], "overrides": p["overrides"],
           "workdir": p["workdir"], "results": None}
    path = os.path.join(p["workdir"], "results.json")
    if os.path.exists(path):
      try:
        with open(path) as f:
          row["results"] = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        logging.warning("sweep: %s cannot be read (%s); the point is listed as missing", path, e)
    rows.append(row)
  done = [r["results"] for r in rows if r["results"] is not None]
  result_keys = [k for k in RESULT_KEYS if any(k in d for d in done)]
  extra = sorted({k for d in done for k, v in d.items() if _scalar(v)} - set(result_keys))
  result_keys += extra
  sizes = [r["results"]["model_bytes"] for r in rows if r["results"] is not None]
  accs = [r["results"]["test_accuracy"] for r in rows if r["results"] is not None]
  front = iter(pareto_front(sizes, accs))
  for r in rows:
    r["pareto"] = next(front) if r["results"] is not None else None
  return rows, override_keys, result_keys


def _fmt_csv(v: Any) -> Any:
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v)
  return "" if v is None else v


def write_csv(rows: Sequence[dict], override_keys: Sequence[str], result_keys: Sequence[str],
              path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["index", "name", *override_keys, "status", "pareto", *result_keys])
    for r in rows:
      res = r["results"] or {}
      w.writerow([r["index"], r["name"], *(_fmt_csv(r["overrides"].get(k)) for k in override_keys),
                  "done" if r["results"] is not None else "missing",
                  "" if r["pareto"] is None else int(r["pareto"]),
                  *(_fmt_csv(res.get(k)) for k in result_keys)])


def _fmt_md(key: str, v: Any) -> str:
  if v is None:
    return ""
  if key.endswith("accuracy"):
    return f"{100 * v:.2f}%"
  if key == "model_bytes":
    return f"{v / 1024:.1f}"
  if key == "compression_ratio":
    return f"{v:.2f}x"
  if key == "wall_seconds":
    return f"{v:.0f}"
  return _format_value(v)


_MD_HEADERS = {"test_accuracy": "test acc.", "float_test_accuracy": "float acc.",
               "model_bytes": "size (KiB)", "compression_ratio": "compression",
               "wall_seconds": "time (s)"}


def markdown_table(rows: Sequence[dict], override_keys: Sequence[str],
                   result_keys: Sequence[str]) -> str:
  """sweep.md: one row per point, its overrides, accuracy, size, compression, time; a `*`
  marks the Pareto front, `missing` an unfinished point."""
  cols = [k for k in TABLE_KEYS if k in result_keys]
  head = ["#", *override_keys, *(_MD_HEADERS[k] for k in cols), "Pareto"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---:"] + ["---"] * len(override_keys) + ["---:"] * len(cols)
                          + [":---:"]) + "|"]
  for r in rows:
    over = [_format_value(r["overrides"][k]) if k in r["overrides"] else "" for k in override_keys]
    if r["results"] is None:
      vals = ["missing"] + [""] * (len(cols) - 1) + [""]
    else:
      vals = [_fmt_md(k, r["results"].get(k)) for k in cols] + ["*" if r["pareto"] else ""]
    lines.append("| " + " | ".join([str(r["index"]), *over, *vals]) + " |")
  missing = [r["name"] for r in rows if r["results"] is None]
  done = len(rows) - len(missing)
  lines.append("")
  lines.append(f"{done}/{len(rows)} points finished"
               + (f"; missing: {', '.join(missing)}" if missing else "")
               + ". `*`: on the Pareto front (no other point is as small and as accurate).")
  return "\n".join(lines) + "\n"


def _color_key(rows: Sequence[dict], override_keys: Sequence[str]) -> str | None:
  """The override to colour points by: the first with non-numeric values that differ (a
  numeric key that some points leave unset is not one)."""
  for k in override_keys:
    values = {json.dumps(r["overrides"].get(k)) for r in rows}
    if len(values) > 1 and not all(isinstance(r["overrides"][k], (int, float))
                                   for r in rows if k in r["overrides"]):
      return k
  return None


def _is_set(v: Any) -> bool:
  """An override that turns something on: not None, 0, False, empty."""
  return v is not None and v is not False and v != 0 and v != "" and v != () and v != []


class _Series:
  """How sweep.png groups its points: `of(row)` is a row's series, `legend(series)` its
  legend entry, `label(row)` the overrides written beside the point; `lines`: connect
  each series' points in size order (series that are fronts of their own)."""

  def __init__(self, rows: Sequence[dict], override_keys: Sequence[str]):
    self.color_key = _color_key(rows, override_keys)
    self.lines = False
    self._keys = list(override_keys)
    if self.color_key is None:
      # Points that turn on different keys (a budget swept beside a uniform width, the
      # budget 0 there): one series per set of keys set, each drawn as a line.
      sets = {self._set_keys(r) for r in rows}
      self.lines = len(sets) > 1

  def _set_keys(self, r: dict) -> tuple:
    return tuple(k for k in self._keys if _is_set(r["overrides"].get(k)))

  def of(self, r: dict) -> str:
    if self.color_key is not None:
      return _format_value(r["overrides"].get(self.color_key))
    if self.lines:
      return " ".join(k.rsplit(".", 1)[-1] for k in self._set_keys(r)) or "base"
    return ""

  def legend(self, group: str) -> str:
    if self.color_key is not None:
      return point_label({self.color_key: group})
    return f"{group} swept" if self.lines else "sweep points"

  def label(self, r: dict) -> str:
    if self.color_key is not None:
      return point_label(r["overrides"], [k for k in self._keys if k != self.color_key])
    keys = self._set_keys(r) if self.lines else self._keys
    return point_label(r["overrides"], keys) if keys else ""


def _nice_ticks(lo: float, hi: float) -> list[float]:
  """Tick values 1, 1.5, 2, 3, 5, 7 x 10^k within [lo, hi] (a log axis spanning less than a
  decade gets more than one or two labels)."""
  ticks = []
  for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
    ticks += [m * 10.0 ** k for m in (1, 1.5, 2, 3, 5, 7) if lo <= m * 10.0 ** k <= hi]
  if len(ticks) > 8:
    ticks = [t for t in ticks if round(t / 10 ** math.floor(math.log10(t)), 1) in (1, 2, 5)]
  return ticks


def _draw(ax, done: Sequence[dict], series: _Series, ylim: tuple[float, float], floats: set,
          legend: bool, unlabelled: tuple[float, float] | None = None) -> None:
  """One panel of sweep.png: the points inside `ylim`, labelled with their overrides and
  accuracy (but those within `unlabelled`, an accuracy band another panel zooms on), coloured
  by series (`_Series`), the Pareto front as a step line, the float model's accuracy as a
  dashed line."""
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from matplotlib.ticker import FixedLocator  # noqa: PLC0415
  from matplotlib.ticker import FuncFormatter  # noqa: PLC0415
  from matplotlib.ticker import NullFormatter  # noqa: PLC0415

  cmap = plt.get_cmap("tab10")
  groups: dict[str, list[dict]] = {}
  for r in done:
    groups.setdefault(series.of(r), []).append(r)
  all_x = [r["results"]["model_bytes"] / 1024 for r in done]
  lo, hi = min(all_x) / 1.3, max(all_x) * 1.3
  if hi / lo < 3:   # a narrow range: widen it to show a few ticks
    mid = math.sqrt(lo * hi)
    lo, hi = mid / math.sqrt(3), mid * math.sqrt(3)
  for gi, (g, rs) in enumerate(groups.items()):
    color = cmap(gi % 10)
    xs = [r["results"]["model_bytes"] / 1024 for r in rs]
    ys = [100 * r["results"]["test_accuracy"] for r in rs]
    ax.scatter(xs, ys, s=40, color=color, zorder=3, label=series.legend(g))
    if series.lines and len(rs) > 1:
      order = sorted(range(len(rs)), key=lambda i: xs[i])
      ax.plot([xs[i] for i in order], [ys[i] for i in order], color=color, linewidth=1,
              alpha=0.6, zorder=2)
    for r, x, y in zip(rs, xs, ys):
      if not ylim[0] <= y <= ylim[1] or (unlabelled and unlabelled[0] <= y <= unlabelled[1]):
        continue
      text = series.label(r)
      text = f"{'' if text in ('', 'base') else text + ': '}{y:.2f}%"
      right = math.log(x / lo) / math.log(hi / lo) > 0.6   # label left of the point
      ax.annotate(text, (x, y), textcoords="offset points", fontsize=8, color=color,
                  ha="right" if right else "left",
                  xytext=(-7 if right else 7, 5 if gi % 2 == 0 else -12))
  front = sorted((r for r in done if r["pareto"]),
                 key=lambda r: (r["results"]["model_bytes"], -r["results"]["test_accuracy"]))
  if front:
    fx = [r["results"]["model_bytes"] / 1024 for r in front]
    fy = [100 * r["results"]["test_accuracy"] for r in front]
    ax.plot(fx, fy, drawstyle="steps-post", color="k", linewidth=1.2, alpha=0.7, zorder=2,
            label="Pareto front")
    ax.scatter(fx, fy, s=170, facecolors="none", edgecolors="k", linewidths=1.4, zorder=4)
  if len(floats) == 1:
    (fa,) = floats
    ax.axhline(100 * fa, color="gray", linestyle="--", linewidth=1,
               label=f"float model ({100 * fa:.2f}%)")
  ax.set_xscale("log")
  ax.set_xlim(lo, hi)
  ax.xaxis.set_major_locator(FixedLocator(_nice_ticks(lo, hi)))
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_ylim(*ylim)
  ax.set_xlabel("model size (KiB, log scale)")
  ax.grid(True, which="major", alpha=0.3)
  if legend:
    ax.legend(fontsize=8, loc="lower right")


def plot(rows: Sequence[dict], override_keys: Sequence[str], path: str, title: str = "") -> None:
  """sweep.png: test accuracy against model size (KiB, log scale), each point labelled with
  its overrides and accuracy, coloured by a categorical override, or, where the points turn
  on different keys (a swept budget beside swept uniform widths), by the keys they set, each
  such series joined by a line; the Pareto front as a step line. When a few points fall far
  below the rest, a second panel zooms on the top ones."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  done = [r for r in rows if r["results"] is not None]
  title = "\n".join(textwrap.wrap(title or "Sweep: accuracy against model size", 90))
  if not done:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.text(0.5, 0.5, "no finished points yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return
  series = _Series(done, override_keys)
  floats = {r["results"].get("float_test_accuracy") for r in done} - {None}
  ys = [100 * r["results"]["test_accuracy"] for r in done]
  best = max(ys + [100 * f for f in floats])
  span = max(max(ys + [best]) - min(ys), 1.0)
  full = (min(ys) - 0.08 * span, best + 0.1 * span)
  top = [y for y in ys if y >= best - 5.0]
  zoom = span > 10.0 and len(top) >= 2
  fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(15 if zoom else 9.5, 5.8),
                           squeeze=False)
  zlim = None
  if zoom:
    zspan = max(best - min(top), 0.2)
    zlim = (min(top) - 0.25 * zspan, best + 0.25 * zspan)
    _draw(axes[0, 1], done, series, zlim, floats, legend=False)
    axes[0, 1].set_title(f"zoom: the {len(top)} points within 5 percentage points of the best",
                         fontsize=9)
    axes[0, 0].axhspan(*zlim, color="0.85", alpha=0.5, zorder=1, linewidth=0)
    axes[0, 0].set_title("all points (the shaded band is zoomed on the right)", fontsize=9)
  _draw(axes[0, 0], done, series, full, floats, legend=True, unlabelled=zlim)
  axes[0, 0].set_ylabel("test accuracy (%)")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summarize_sweep(points: Sequence[dict], workdir: str, title: str = "") -> dict:
  """Gathers the points' results.json into DIR/sweep.csv, DIR/sweep.md and DIR/sweep.png;
  unfinished points are listed as missing. Returns the paths and the missing names."""
  os.makedirs(workdir, exist_ok=True)
  rows, override_keys, result_keys = collect(points)
  csv_path = os.path.join(workdir, "sweep.csv")
  md_path = os.path.join(workdir, "sweep.md")
  png_path = os.path.join(workdir, "sweep.png")
  write_csv(rows, override_keys, result_keys, csv_path)
  with open(md_path, "w") as f:
    f.write(markdown_table(rows, override_keys, result_keys))
  plot(rows, override_keys, png_path,
       title=title or f"Sweep {os.path.basename(workdir.rstrip('/'))}")
  missing = [r["name"] for r in rows if r["results"] is None]
  best = max((r for r in rows if r["results"] is not None),
             key=lambda r: r["results"]["test_accuracy"], default=None)
  logging.info("sweep summary: %d/%d points finished; %s, %s, %s", len(rows) - len(missing),
               len(rows), csv_path, md_path, png_path)
  return {"csv": csv_path, "markdown": md_path, "plot": png_path,
          "finished": len(rows) - len(missing), "missing": missing,
          "pareto": [r["name"] for r in rows if r["pareto"]],
          "best": None if best is None else {"name": best["name"],
                                             "test_accuracy": best["results"]["test_accuracy"]}}
