"""The line protocol between benchmarks/suite.py and a peer framework's benchmark process.

The peer builds its model and train step, runs one warm-up step, and prints one JSON line
`{"ready": true, "info": {...}}` on stdout. It then reads lines from stdin: an integer N runs N
train steps and answers `{"seconds": t}` (wall time of the N steps, synchronised); `quit` ends
it. Anything else the peer prints goes to stderr. This lets the suite time the peer's blocks in
alternation with its own, so both see the same load, while an import failure or a crash of the
peer stays in the peer's process.
"""

import json
import sys
import time


def serve(step, info: dict) -> None:
  """Runs the protocol for `step()` (one train step, synchronous)."""
  step()   # warm-up (and first-call compilation/tracing)
  print(json.dumps({"ready": True, "info": info}), flush=True)
  for line in sys.stdin:
    line = line.strip()
    if line == "quit" or not line:
      break
    n = int(line)
    t0 = time.perf_counter()
    for _ in range(n):
      step()
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


def fastest_format(make_step, memory_format: str = "auto"):
  """(format, step, params, {format: seconds of 3 steps}): `make_step(fmt) -> (step, params)`
  for "channels_last" and "contiguous" (or only `memory_format`), the faster of 3 timed steps
  after one untimed (PyTorch's convolutions run faster in one or the other, by layer shape)."""
  fmts = ("channels_last", "contiguous") if memory_format == "auto" else (memory_format,)
  tried = {}
  for fmt in fmts:
    step, params = make_step(fmt)
    step()
    t0 = time.perf_counter()
    for _ in range(3 if len(fmts) > 1 else 0):
      step()
    tried[fmt] = (time.perf_counter() - t0, step, params)
  fmt = min(tried, key=lambda k: tried[k][0])
  return fmt, tried[fmt][1], tried[fmt][2], {k: round(v[0], 3) for k, v in tried.items()}


def torch_train_step(make_model, batch_size: int, image_size: int, fmt: str):
  """(step, params) of a PyTorch train step on one synthetic batch: `make_model()` (seeded),
  in memory format `fmt`, SGD with momentum 0.9 and weight decay, cross-entropy; the step
  synchronises on CUDA. (torch is imported here: this module runs without it.)"""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415, N812

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = make_model().to(dev)
  x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
  y = torch.randint(0, 10, (batch_size,), device=dev)
  if fmt == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()

  return step, sum(p.numel() for p in model.parameters())
