"""Wall time of the same job embedded (`render`, the host in the command's own process) and on a server
(`render --server`, queued over HTTP), in one run, alternating, on the same base directory.

The job is the shipped full pipeline (workflows/api/rerender_full_pipeline.json) on the tests' tiny random-weight
SD1.5 checkpoint and ControlNet and a 6-frame 64x64 clip (as tests/test_cli_render_host.py), so the time is mostly
the host's own start and per-prompt work, which is where an embedding could cost anything. Printed per round:
  embedded   the command's wall time, and the host's start and the workflow's run as it reports them
  server     the server's start (until it answers /object_info), the client's wall time, and the workflow's run as
             the server's history timestamps give it (execution_start -> execution_success)
and the ratios: workflow run embedded / server (target <= 1.05), and the whole command embedded / server start +
client (what a user waits for in each mode, starting from nothing).

    COMFYUI_PATH=... python bench/embedded_bench.py [--rounds 2]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
from host_compat import define_missing_torchvision_ops, find_comfyui, make_base_directory  # noqa: E402
from host_server import HostServer  # noqa: E402

LAUNCHER = [sys.executable, str(TESTS / "launch_cli.py"), "render"]
JOB = ["--checkpoint", "tiny_sd15.safetensors", "--controlnet", "tiny_control.safetensors", "--prompt", "a sketch",
       "--set", "Video Frames.longer_side=64", "--set", "Rerender_KeyframePicker.interval=3",
       "--set", "Rerender_KeyframeSampler.steps=3"]


def prepare_base(comfy_path: Path, base: Path) -> Path:
    """The tests' base directory: the pack, the tiny models, a 6-frame 64x64 clip."""
    import cv2
    define_missing_torchvision_ops()
    sys.path.insert(0, str(comfy_path))
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    from tiny_models import save_tiny_checkpoint, save_tiny_controlnet
    make_base_directory(base)
    for folder in ("checkpoints", "controlnet"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    save_tiny_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    save_tiny_controlnet(base / "models" / "controlnet" / "tiny_control.safetensors")
    capture = cv2.VideoCapture(str(REPO / "tests" / "data" / "videos" / "man_talking_512x640_25fps.mp4"))
    writer = cv2.VideoWriter(str(base / "input" / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
    for _ in range(6):
        writer.write(cv2.resize(capture.read()[1], (64, 64), interpolation=cv2.INTER_AREA))
    writer.release()
    return base / "input" / "clip.mp4"


def run_embedded(base: Path, video: Path, output: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([*LAUNCHER, f"--comfy-args=--base-directory {base}", "--video", str(video), "--output",
                           str(output), *JOB], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"host started in ([\d.]+) s, the workflow ran in ([\d.]+) s", done.stderr)
    return {"wall": wall, "start": float(found.group(1)), "run": float(found.group(2))}


def run_server(comfy_path: Path, base: Path, video: Path, output: Path) -> dict:
    start = time.perf_counter()
    server = HostServer(comfy_path, base).start()
    try:
        while True:
            try:
                server.get_json("/object_info")
                break
            except Exception:  # noqa: BLE001 - listening but not answering yet
                time.sleep(0.5)
        started = time.perf_counter() - start
        history_before = server.history_ids()
        client = time.perf_counter()
        done = subprocess.run([*LAUNCHER, "--server", server.url, "--video", str(video), "--output", str(output),
                               *JOB], capture_output=True, text=True, cwd=REPO)
        client = time.perf_counter() - client
        assert done.returncode == 0, done.stderr[-3000:]
        (prompt_id,) = server.history_ids() - history_before
        messages = dict(server.get_json(f"/history/{prompt_id}")[prompt_id]["status"]["messages"])
        run = (messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"]) / 1000
    finally:
        server.stop()
    return {"start": started, "client": client, "run": run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"embedded_bench: {reason}")
    os.environ["COMFYUI_PATH"] = str(comfy_path)
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base"
        video = prepare_base(comfy_path, base)
        print(f"host {comfy_path}; job: full pipeline, tiny models, 6 frames 64x64; {os.cpu_count()} cores")
        for round_number in range(1, args.rounds + 1):
            embedded = run_embedded(base, video, Path(folder) / "embedded.mp4")
            served = run_server(comfy_path, base, video, Path(folder) / "server.mp4")
            print(f"round {round_number}: embedded {embedded['wall']:.1f} s (host start {embedded['start']:.1f} s, "
                  f"workflow {embedded['run']:.1f} s) | server start {served['start']:.1f} s + client "
                  f"{served['client']:.1f} s (workflow {served['run']:.1f} s) | workflow embedded/server "
                  f"{embedded['run'] / served['run']:.2f}x, whole embedded/(start+client) "
                  f"{embedded['wall'] / (served['start'] + served['client']):.2f}x")


if __name__ == "__main__":
    main()
