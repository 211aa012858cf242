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
