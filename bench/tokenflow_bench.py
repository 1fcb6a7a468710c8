"""TokenFlow cost: seconds per frame of the TokenFlow sampler against plain sampling of the same frames from the same
(inverted) noise, and against per-frame PnP (propagation off: what the paper's "≈20% faster" compares with);
DDIM inversion seconds per frame and inversion step; memory of the key frame store measured at the bench size and
computed for 40 frames at 512x512 on the full SD1.5 layout.

Model: random-weight UNet at SD1.5's real width (320/640 channels, two levels; tests/tiny_models.SD15_WIDTH_UNET)
with unit norm gains; `--layout full` samples on the full SD1.5 layout instead; `--device cuda` runs on the GPU
(bench/gpu_suite.py). Needs $COMFYUI_PATH. Usage:
    COMFYUI_PATH=/path/to/ComfyUI python bench/tokenflow_bench.py [--frames 16] [--size 256] [--steps 4]
        [--inversion-steps 20] [--chunk 8] [--layout width|full|tiny] [--device cuda|cpu] [--json]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from gpu_suite import add_suite_arguments, device_label, emit, start_host, unet_layout  # noqa: E402

MiB = 2 ** 20
# SD1.5's self-attention layers: (count, latent downscale, channels) - input 1,2 / 4,5 / 7,8, middle, output
# 3-5 / 6-8 / 9-11.
SD15_SELF_ATTENTION = [(2, 1, 320), (2, 2, 640), (2, 4, 1280), (1, 8, 1280), (3, 4, 1280), (3, 2, 640), (3, 1, 320)]


def sd15_store_bytes(frames: int, size: int, chunk: int, bytes_per_value: int = 2) -> dict:
    """What TokenFlow holds per step for `frames` frames of size² on full SD1.5 (fp16): the key frames' attention
    outputs (source + uncond + cond branches) and source normed tokens per layer, the largest per-frame NN
    similarity matrix (fp32), and the inversion's states for a 50-step schedule."""
    latent = size // 8
    keys = -(-frames // chunk)
    per_frame = sum(count * (latent // down) ** 2 * channels for count, down, channels in SD15_SELF_ATTENTION)
    tokens = latent ** 2
    return {"key frame store (4 tensors per layer)": keys * 4 * per_frame * bytes_per_value,
            "NN similarity, one frame, finest layer": tokens * tokens * 4,
            "inversion states (51 levels, fp16)": 51 * frames * 4 * latent * latent * 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels (latent = size/8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--inversion-steps", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=8)
    add_suite_arguments(parser)
    args = parser.parse_args()

    host = start_host(args, "tokenflow_bench")
    import comfy.sample
    import comfy.samplers
    from tiny_models import conditioning, tiny_sd15, with_unit_norm_gains

    inversion_nodes = host.pack_module("engine.inversion")
    tokenflow = host.pack_module("engine.tokenflow")
    model = with_unit_norm_gains(tiny_sd15(0, unet_layout(args.layout)))
    latents = torch.randn(args.frames, 4, args.size // 8, args.size // 8,
                          generator=torch.Generator().manual_seed(0)) / 0.18215
    source, positive, negative = conditioning(5), conditioning(0), conditioning(1)
    sigmas = inversion_nodes.editing_sigmas(model, args.steps, "ddim", "ddim_uniform", 1.0)
    schedule = dict(sampler_name="ddim", scheduler="ddim_uniform", steps=args.steps, denoise=1.0)

    with torch.inference_mode():
        started = time.perf_counter()
        inversion = inversion_nodes.invert_latents(model, source, latents, sigmas, args.inversion_steps, schedule,
                                                   batch_size=args.chunk)
        inversion_seconds = time.perf_counter() - started
        grid_steps = len(inversion.grid) - 1

        def timed(**options):
            settings = tokenflow.TokenFlowSettings(steps=args.steps, chunk_size=args.chunk, **options)
            begin = time.perf_counter()
            _, store = tokenflow.sample_tokenflow(model, positive, negative, inversion, settings)
            return time.perf_counter() - begin, store

        noise = inversion_nodes.start_noise(model, inversion.state(0), float(sigmas[0]))
        begin = time.perf_counter()
        for start in range(0, args.frames, args.chunk):
            part = noise[start:start + args.chunk]
            comfy.sample.sample_custom(model, part, 7.5, comfy.samplers.sampler_object("ddim"), sigmas, positive,
                                       negative, torch.zeros_like(part), disable_pbar=True, seed=1)
        plain_seconds = time.perf_counter() - begin
        pnp_seconds, _ = timed(propagation=False)
        tokenflow_seconds, store = timed()

    n = args.frames
    print(f"{n} frames at {args.size}x{args.size}, {args.steps} steps, chunk {args.chunk}, {args.layout} SD1.5 UNet, on "
          f"{device_label(args.device)}")
    print(f"inversion: {inversion_seconds / n:.3f} s per frame, {inversion_seconds / n / grid_steps * 1000:.1f} ms "
          f"per frame and inversion step ({grid_steps} steps)")
    print(f"plain sampling (same noise, chunks of {args.chunk}): {plain_seconds / n:.3f} s per frame")
    print(f"per-frame PnP (propagation off):            {pnp_seconds / n:.3f} s per frame "
          f"({pnp_seconds / plain_seconds:.2f}x plain)")
    print(f"TokenFlow (all on):                         {tokenflow_seconds / n:.3f} s per frame "
          f"({tokenflow_seconds / plain_seconds:.2f}x plain, {tokenflow_seconds / pnp_seconds:.2f}x per-frame PnP)")
    print(f"key frame store measured at this size: {store / MiB:.1f} MiB")
    print("computed for 40 frames at 512x512, full SD1.5 layout:")
    for name, value in sd15_store_bytes(40, 512, args.chunk).items():
        print(f"  {name}: {value / MiB:.0f} MiB")
    emit(args, "s/frame (TokenFlow)", tokenflow_seconds / n,
         {"plain": tokenflow_seconds / plain_seconds, "per-frame PnP": tokenflow_seconds / pnp_seconds},
         f"{args.size}x{args.size} {args.layout}, {n} frames, {args.steps} steps")


if __name__ == "__main__":
    main()
