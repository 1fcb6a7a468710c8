"""Tune-A-Video tuning cost against the host's own TrainLoraNode on the same model and batch, measured in one run.

Model: a random-weight SD1.5-architecture checkpoint at SD1.5's real width (320/640 channels, two levels), saved
and loaded through the host's checkpoint loader (TrainLoraNode reloads the model from its file). Batch: `--frames`
real frames (man talking) at `--size`, encoded by a tiny VAE; Tune-A-Video tunes on them as one clip, TrainLoraNode
trains a rank-8 LoRA with batch_size = frames. Same precision and gradient checkpointing for both.

Seconds per step = (time for 1 + `--steps` steps − time for 1 step) / `--steps`, so the setup (model copy, loading)
cancels out for both. Peak memory: CUDA peak allocated on a GPU; on a CPU each measurement runs in its own process
and the peak resident memory above that process's resident memory after setup is reported. `--layout full` saves
the full SD1.5 layout instead; `--layout tiny` builds a 32-channel UNet in each process (no checkpoint file: the
host's detector only knows SD1.5 at 320 channels); `--device cuda` runs on the GPU (bench/gpu_suite.py). Needs
$COMFYUI_PATH.
    COMFYUI_PATH=/path/to/ComfyUI python bench/tune_a_video_bench.py [--frames 8] [--size 128] [--steps 5]
        [--layout width|full|tiny] [--device cuda|cpu] [--json]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from gpu_suite import add_suite_arguments, device_label, emit, resolve_device, start_host, unet_layout  # noqa: E402

CLIP = "man_talking_512x640_25fps.mp4"
MiB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    """One measurement (`args.worker` = tav | lora): seconds for 1 and for 1+steps steps, and the peak memory."""
    from host_compat import SHARED_DATA
    from clips import read_frames
    import torch.nn.functional as F
    host = start_host(args, "tune_a_video_bench")
    import comfy.model_management as mm
    import comfy.sd
    from tiny_models import conditioning, tiny_sd15, tiny_sd_vae
    if args.checkpoint:
        model = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=False)[0]
    else:  # TrainLoraNode rebuilds its copy through the factory a loader registers; this is tiny_sd15's
        def rebuild(layout, disable_dynamic=False):
            return tiny_sd15(0, unet_layout(layout))
        model = rebuild(args.layout)
        model.cached_patcher_init = (rebuild, (args.layout,))
    frames = read_frames(SHARED_DATA / "videos" / CLIP, args.frames, stride=2)
    frames = F.interpolate(frames.movedim(-1, 1), size=(args.size, args.size), mode="area").movedim(1, -1)
    with torch.inference_mode():
        latent = {"samples": tiny_sd_vae(0).encode(frames)}
    cuda = mm.get_torch_device().type == "cuda"

    def run(steps):
        if args.worker == "tav":
            host.run_node("Rerender_TuneAVideo", model=model, positive=conditioning(0), latent=latent,
                          frame_count=args.frames, frame_stride=1, steps=steps, mixed_precision=args.precision,
                          gradient_checkpointing=not args.no_checkpointing)
        else:
            host.run_node("TrainLoraNode", model=model, latents=latent, positive=conditioning(0),
                          batch_size=args.frames, grad_accumulation_steps=1, steps=steps, learning_rate=5e-4,
                          rank=8, optimizer="AdamW", loss_function="MSE", seed=0,
                          training_dtype=args.precision if args.precision != "fp16" else "none",
                          lora_dtype="fp32", quantized_backward=False, algorithm="LoRA",
                          gradient_checkpointing=not args.no_checkpointing, checkpoint_depth=1, offloading=False,
                          existing_lora="[None]", bucket_mode=False, bypass_mode=False)
        mm.unload_all_models()

    run(1)  # warm-up (allocator, first-call caches)
    baseline = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    run(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    run(1 + args.steps)
    many = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - baseline
    return {"seconds_per_step": (many - one) / args.steps, "peak_bytes": peak, "device": device_label(args.device)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels (latent = size/8)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--worker", choices=["tav", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    add_suite_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    resolve_device(args)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = []
        if args.layout != "tiny":
            from conftest import HostSession
            from host_compat import find_comfyui
            HostSession(find_comfyui()[0], Path(folder) / "base")
            from tiny_models import save_tiny_checkpoint
            checkpoint = ["--checkpoint", str(Path(folder) / f"sd15_{args.layout}.safetensors")]
            save_tiny_checkpoint(checkpoint[1], unet_config=unet_layout(args.layout))
        results = {}
        for which in ("tav", "lora"):
            done = subprocess.run([sys.executable, __file__, "--worker", which, *checkpoint, "--layout", args.layout,
                                   "--frames", str(args.frames), "--size", str(args.size), "--steps", str(args.steps),
                                   "--precision", args.precision, "--device", args.device]
                                  + (["--no-checkpointing"] if args.no_checkpointing else []),
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{which} failed:\n{done.stderr[-3000:]}")
            results[which] = json.loads(done.stdout.strip().splitlines()[-1])
    tav, lora = results["tav"], results["lora"]
    print(f"device {tav['device']}, {args.layout} SD1.5 UNet, {args.frames} frames at {args.size}x{args.size}, "
          f"{args.precision}, "
          f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}, {args.steps} timed steps")
    print(f"Tune-A-Video  : {tav['seconds_per_step']:.3f} s/step, peak +{tav['peak_bytes'] / MiB:.0f} MiB")
    print(f"TrainLoraNode : {lora['seconds_per_step']:.3f} s/step, peak +{lora['peak_bytes'] / MiB:.0f} MiB")
    print(f"ratio (Tune-A-Video / TrainLoraNode): time {tav['seconds_per_step'] / lora['seconds_per_step']:.2f}x, "
          f"peak memory {tav['peak_bytes'] / max(lora['peak_bytes'], 1):.2f}x")
    emit(args, "s/tuning step", tav["seconds_per_step"],
         {"TrainLoraNode": tav["seconds_per_step"] / lora["seconds_per_step"],
          "TrainLoraNode peak memory": tav["peak_bytes"] / max(lora["peak_bytes"], 1)},
         f"{args.size}x{args.size} {args.layout}, {args.frames} frames, {args.steps} steps",
         memory=(tav["peak_bytes"] / MiB, "GPU peak allocated above setup" if args.device == "cuda"
                 else "CPU peak RSS above setup"))


if __name__ == "__main__":
    main()
