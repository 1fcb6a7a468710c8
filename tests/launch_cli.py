"""Run the pack's console command (`python -m rerender_cli`, argv after this script's name) with the CPU
workarounds of host_compat, as launch_host.py starts the server, so that `render` can embed the host here."""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_compat import REPO_ROOT, define_missing_torchvision_ops  # noqa: E402

if __name__ == "__main__":
    define_missing_torchvision_ops()
    sys.path.insert(0, str(REPO_ROOT))
    sys.argv = ["rerender_cli", *sys.argv[1:]]
    runpy.run_module("rerender_cli", run_name="__main__", alter_sys=True)
