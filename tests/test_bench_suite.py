"""benchmarks/suite.py's peers (`common.Peer`): a missing or failing peer is skipped with its
reason, never a figure."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

suite = pytest.importorskip("suite")


def test_missing_peer_is_skipped_with_reason(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("larq", "torch") else real(name, *a))
  peer, why = suite.start_peer("larq_w1a1", 8, timeout=30)
  assert peer is None and "not installed: larq" in why
  peer, why = suite.start_peer("torch_float", 8, timeout=30)
  assert peer is None and "torch is not installed" in why


def test_peer_that_crashes_is_skipped_with_its_error(tmp_path):
  script = tmp_path / "bad_peer.py"
  script.write_text("raise ImportError('no module named frobnicate')\n")
  with pytest.raises(RuntimeError, match="frobnicate"):
    suite.common.Peer([str(script)], timeout=60)


def test_peer_protocol_round_trip(tmp_path):
  script = tmp_path / "ok_peer.py"
  script.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks', 'peers')!r})\n"
      "import protocol\n"
      "calls = []\n"
      "protocol.serve(lambda: calls.append(1), {'framework': 'fake'})\n")
  peer = suite.common.Peer([str(script)], timeout=60)
  assert peer.info == {"framework": "fake"}
  assert peer(3) >= 0.0
  peer.close()
  assert peer.proc.wait(10) == 0


def test_targets_without_peers_are_not_claimed():
  r = {"train_steps": {"float": {"images_per_second": 10.0},
                       "w1a1": {"images_per_second": 9.0, "step_time_vs_float": 1.05}},
       "peers": {"larq_w1a1": {"skipped": "not installed: larq"}},
       "float_flops": {"share_of_f32_matmul": 0.3},
       "device": {"platform": "cpu"}}
  rows = {name: (fig, ok) for name, fig, ok in suite.targets(r)}
  assert rows["binary W1A1 train step >= 1.5x Keras/Larq"][1] is None
  assert rows["float train step >= 1.2x PyTorch eager"][1] is None
  assert rows["w1a1 step time <= 1.1x float"] == ("1.050x", True)
  assert rows["float step FLOP/s >= 60% of f32 matmul"] == ("30%", False)
  starve = "input pipeline never starves: float_fed step time <= 1.05x float"
  assert rows[starve] == ("n/a", None)
  r["train_steps"]["float_fed"] = {"images_per_second": 8.0, "step_time_vs_float": 1.25}
  assert {n: (f, ok) for n, f, ok in suite.targets(r)}[starve] == ("1.250x", False)


def test_lightweight_targets_and_peer_parameter_check():
  r = {"train_steps": {"resnet20": {"images_per_second": 300.0},
                       "mobilenetv2": {"images_per_second": 90.0}},
       "peers": {"torch_mobilenetv2": {"images_per_second": 80.0, "info": {"params": 5},
                                       "ours_params": 6, "params_match": False}},
       "device": {"platform": "cpu"}}
  rows = {name: (fig, ok) for name, fig, ok in suite.targets(r)}
  assert rows["MobileNetV2 step time per image <= 3x ResNet-20's"] == ("3.33x", False)
  assert rows["MobileNetV2 train step >= 1.2x PyTorch eager"] == ("1.12x", False)
  assert rows["torch_mobilenetv2 has mobilenetv2's parameter count"] == ("5 vs 6", False)
  r["train_steps"]["mobilenetv2"]["images_per_second"] = 120.0
  rows = {name: (fig, ok) for name, fig, ok in suite.targets(r)}
  assert rows["MobileNetV2 step time per image <= 3x ResNet-20's"] == ("2.50x", True)
  assert rows["MobileNetV2 train step >= 1.2x PyTorch eager"] == ("1.50x", True)
