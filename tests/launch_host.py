"""Start ComfyUI's main.py (path in argv[1], its arguments after) with the CPU workarounds of host_compat."""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_compat import define_missing_torchvision_ops  # noqa: E402

if __name__ == "__main__":
    main_py = Path(sys.argv[1]).resolve()
    define_missing_torchvision_ops()
    sys.argv = [str(main_py)] + sys.argv[2:]
    sys.path.insert(0, str(main_py.parent))
    runpy.run_path(str(main_py), run_name="__main__")
