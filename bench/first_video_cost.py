"""What the README's first-video path costs on this machine: the shipped full pipeline ("Rerender - video to video",
its API twin workflows/api/rerender_full_pipeline.json) run on a real server over a real clip, with random-weight
models of SD1.5's full architecture and a matching ControlNet (the same compute as the real files, which cannot be
downloaded here). Prints seconds per node and in total, with the clip's frames x size x steps.

    COMFYUI_PATH=/path/to/ComfyUI python bench/first_video_cost.py --frames 8 --size 128 --steps 5 --interval 7
"""
import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import cv2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from host_compat import SHARED_DATA, find_comfyui, make_base_directory  # noqa: E402
from host_server import HostServer  # noqa: E402


def write_models(comfy_path: Path, base: Path, unet: str) -> None:
    """Random-weight SD1.5 checkpoint and ControlNet, written in-process with the host's classes."""
    from conftest import HostSession
    HostSession(comfy_path, base)
    from tiny_models import FULL_SD15_UNET, SD15_WIDTH_UNET, save_tiny_checkpoint, save_tiny_controlnet
    unet_config = FULL_SD15_UNET if unet == "sd15" else SD15_WIDTH_UNET
    for folder in ("checkpoints", "controlnet"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    save_tiny_checkpoint(base / "models" / "checkpoints" / "sd15_random.safetensors", unet_config=unet_config)
    save_tiny_controlnet(base / "models" / "controlnet" / "control_random.safetensors", unet_config=unet_config)


def write_clip(source: Path, target: Path, frames: int) -> float:
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS)
    first = capture.read()[1]
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, first.shape[1::-1])
    writer.write(first)
    for _ in range(frames - 1):
        ok, frame = capture.read()
        if not ok:
            raise SystemExit(f"{source} has fewer than {frames} frames")
        writer.write(frame)
    writer.release()
    return fps


def the_prompt(args) -> dict:
    prompt = json.loads((REPO / "workflows" / "api" / "rerender_full_pipeline.json").read_text())
    settings = {"LoadVideo": {"file": "bench_clip.mp4"}, "Rerender_VideoFrames": {"longer_side": args.size},
                "CheckpointLoaderSimple": {"ckpt_name": "sd15_random.safetensors"},
                "ControlNetLoader": {"control_net_name": "control_random.safetensors"},
                "Rerender_KeyframePicker": {"interval": args.interval},
                "Rerender_KeyframeSampler": {"steps": args.steps}}
    for node in prompt.values():
        node["inputs"].update(settings.get(node["class_type"], {}))
    return prompt


async def timed_run(url: str, prompt: dict) -> list:
    """(node title, seconds) in execution order, timed from the websocket's `executing` messages."""
    client_id, times = uuid.uuid4().hex, []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}", max_msg_size=0) as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                body = await response.json()
                if response.status != 200:
                    raise SystemExit(f"the server refused the prompt: {json.dumps(body)[:2000]}")
            current, started = None, time.perf_counter()
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                message = json.loads(msg.data)
                if message["type"] == "execution_error":
                    raise SystemExit(f"the run failed: {message['data'].get('exception_message')}")
                if message["type"] != "executing":
                    continue
                now = time.perf_counter()
                if current is not None:
                    times.append((prompt[current]["_meta"]["title"], now - started))
                current, started = message["data"]["node"], now
                if current is None:
                    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128,
                        help="the frames' longer side (Video Frames; the shipped clip is square)")
    parser.add_argument("--steps", type=int, default=5, help="Key Frame Sampler steps (denoise stays 0.75)")
    parser.add_argument("--interval", type=int, default=7, help="Key Frame Picker interval")
    parser.add_argument("--unet", choices=["sd15", "test"], default="sd15",
                        help="sd15: SD1.5's full UNet (the cost figure); test: the test suite's reduced one (a smoke)")
    parser.add_argument("--clip", type=Path, default=SHARED_DATA / "videos" / "car_turn_480x480_10fps.mp4")
    args = parser.parse_args()
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        raise SystemExit(f"first_video_cost: {reason}")
    base = make_base_directory(Path(tempfile.mkdtemp(prefix="rerender_cost_")))
    try:
        write_models(comfy_path, base, args.unet)
        write_clip(args.clip, base / "input" / "bench_clip.mp4", args.frames)
        server = HostServer(comfy_path, base).start()
        try:
            times = asyncio.run(timed_run(server.url, the_prompt(args)))
        finally:
            server.stop()
    finally:
        shutil.rmtree(base)                    # the random checkpoint is several GB
    total = sum(seconds for _, seconds in times)
    print(f"first-video path: {args.frames} frames x {args.size}x{args.size} x {args.steps} steps "
          f"(key frame interval {args.interval}), {args.unet} UNet with random weights")
    for title, seconds in times:
        print(f"  {title:32s} {seconds:8.1f} s")
    print(f"  {'total':32s} {total:8.1f} s  ({total / args.frames:.1f} s per frame)")


if __name__ == "__main__":
    main()
