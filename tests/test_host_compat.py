"""The CPU workaround for PyPI's CUDA torchvision must coexist with environments that already declared its schemas."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = """
import sys, torch
sys.path.insert(0, {tests!r})
{before}
from host_compat import define_missing_torchvision_ops
define_missing_torchvision_ops()
define_missing_torchvision_ops()
import torchvision
print("imported", sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("torchvision::")
                         and s.name.split("::")[1] in ("nms", "qnms")))
"""

ALREADY_DECLARED = """
other = torch.library.Library("torchvision", "DEF")   # what another workaround in the same process did
other.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
"""


@pytest.mark.parametrize("before", ["", ALREADY_DECLARED], ids=["fresh process", "nms already declared"])
def test_torchvision_imports_whatever_was_declared_before(before):
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    done = subprocess.run([sys.executable, "-c", PROBE.format(tests=str(TESTS), before=before)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported ['torchvision::nms', 'torchvision::qnms']" in done.stdout, done.stdout
