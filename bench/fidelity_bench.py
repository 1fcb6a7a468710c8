"""Fidelity-oriented encoding E* against plain VAE encoding, with the real taef2 autoencoder on real frames.

Prints, per clip: PSNR of decode(E(I)) and decode(E*(I)) against I, and after ten encode-decode round trips.
Needs a ComfyUI checkout ($COMFYUI_PATH) for the host's VAE loader. Usage:
    COMFYUI_PATH=/path/to/ComfyUI python bench/fidelity_bench.py [--frames 3] [--round-trips 10]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CLIPS = ["man_talking_512x640_25fps.mp4", "car_turn_480x480_10fps.mp4"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1, help="frames per clip (spread over the clip)")
    parser.add_argument("--round-trips", type=int, default=10)
    args = parser.parse_args()

    from clips import psnr, read_frames
    from host_compat import SHARED_DATA, find_comfyui
    from conftest import HostSession
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"fidelity_bench: {reason}")
    HostSession(comfy_path, Path(tempfile.mkdtemp()))
    from tiny_models import taef2_vae
    from rerender.fidelity import fidelity_encode
    vae = taef2_vae()

    def fidelity(images):
        return fidelity_encode(vae.encode, vae.decode, images)[0]

    print(f"taef2 ({vae.latent_channels} latent channels), λ=1, threshold 0.25, {args.round_trips} round trips")
    print(f"{'clip':34s} {'E: 1 trip':>10s} {'E*: 1 trip':>10s} {'E: N trips':>10s} {'E*: N trips':>11s} {'E* time/E':>9s}")
    for clip in CLIPS:
        frames = read_frames(SHARED_DATA / "videos" / clip, args.frames, stride=max(1, 30 // args.frames))
        t0 = time.perf_counter()
        plain_once = vae.decode(vae.encode(frames))
        t1 = time.perf_counter()
        fidel_once = vae.decode(fidelity(frames))
        t2 = time.perf_counter()
        plain, fidel = frames, frames
        for _ in range(args.round_trips):
            plain = vae.decode(vae.encode(plain))
            fidel = vae.decode(fidelity(fidel))
        print(f"{clip:34s} {psnr(plain_once, frames):9.2f}dB {psnr(fidel_once, frames):9.2f}dB "
              f"{psnr(plain, frames):9.2f}dB {psnr(fidel, frames):10.2f}dB {(t2 - t1) / (t1 - t0):8.2f}x")


if __name__ == "__main__":
    with torch.inference_mode():  # as ComfyUI runs nodes; without it autograd keeps every round trip alive
        main()
