"""FRESCO Key Frames cost against plain batched img2img of the same frames (KSampler on the batch, same seed, steps
and sampler), measured interleaved in the same run, and its memory at 512x512.

Model: random-weight UNet at SD1.5's real width (320/640 channels, SD1.5's block types, two levels), so attention,
convolutions and the optimised decoder features weigh about what they weigh in SD1.5. The VAE's share is counted
apart (smoothing decodes and encodes x̂0; on a CPU the VAE can dominate). Prints seconds per key frame outside the
VAE with every component on (target <= 3x plain, aim <= 2x), each component alone, the feature optimisation's
losses before/after, and the node's own cache / Gram accounting. `--memory-size 512` then runs one executed step of
a batch of 8 on the full SD1.5 layout in a subprocess and prints its peak resident memory beside the same run with
every component off (CPU RSS; on CUDA the peak allocated memory). `--layout full` samples on the full SD1.5 layout
instead; `--device cuda` runs on the GPU (bench/gpu_suite.py). Needs $COMFYUI_PATH. Usage:
    COMFYUI_PATH=/path/to/ComfyUI python bench/fresco_keyframes_bench.py [--size 256] [--frames 8] [--steps 4]
        [--sampler ddim] [--skip-each] [--memory-size 512] [--layout width|full|tiny] [--device cuda|cpu] [--json]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from gpu_suite import add_suite_arguments, device_label, emit, start_host, unet_layout  # noqa: E402
from keyframe_sampler_bench import CLIP, SEED, read_frames  # noqa: E402

MiB = 2 ** 20
OFF = dict(cross_frame_period=(0.0, 0.0), spatial_guided_steps=0, temporal_guided_period=(0.0, 0.0),
           optimization_period=(0.0, 0.0), smoothing_period=(0.0, 0.0))
ON = dict(cross_frame_period=(0.0, 1.0), spatial_guided_steps=1, temporal_guided_period=(0.0, 0.6),
          optimization_period=(0.0, 0.7), smoothing_period=(0.8, 0.85))
EACH = [("efficient cross-frame attention", dict(OFF, cross_frame_period=(0.0, 1.0))),
        ("spatial-guided attention", dict(OFF, spatial_guided_steps=1)),
        ("temporal-guided attention", dict(OFF, temporal_guided_period=(0.0, 0.6))),
        ("feature optimisation (both losses)", dict(OFF, optimization_period=(0.0, 0.7))),
        ("background smoothing of x̂0", dict(OFF, smoothing_period=(0.8, 0.85)))]


class Bench:
    def __init__(self, host, args, unet_config=None):
        from host_compat import SHARED_DATA
        from tiny_models import conditioning, tiny_sd15, tiny_sd_vae
        self.host, self.args = host, args
        self.rendering = host.pack_module("engine.fresco")
        self.model = tiny_sd15(0, unet_config or unet_layout(args.layout))
        self.vae = tiny_sd_vae(0)
        self.positive, self.negative = conditioning(0), conditioning(1)
        self.frames = read_frames(SHARED_DATA / "videos" / CLIP, args.frames, 3, args.size)
        self.mask = torch.zeros(1, args.size, args.size)  # all background: smoothing acts everywhere
        flow_module = host.pack_module("rerender.flow")
        self.flow = flow_module.VideoFlow(self.frames, flow_module.DISEstimator())
        for index in range(len(self.frames)):  # the flow stage's work (the batch's cyclic pairs), before timing
            self.flow.pair(index, (index + 1) % len(self.frames))
            self.flow.pair((index + 1) % len(self.frames), index)
        self.common = dict(seed=SEED, steps=args.steps, cfg=7.5, sampler_name=args.sampler,
                           scheduler="ddim_uniform" if args.sampler == "ddim" else "karras", denoise=args.denoise,
                           batch_size=args.frames, iterations=args.iterations)

    def plain(self) -> dict:
        """Batched img2img: VAE Encode per frame, KSampler on the batch (shared noise), VAE Decode."""
        import comfy.sample
        start = time.perf_counter()
        latent = torch.cat([self.vae.encode(self.frames[i:i + 1]) for i in range(len(self.frames))])
        encoded = time.perf_counter()
        noise = comfy.sample.prepare_noise(latent[:1], SEED).repeat(len(self.frames), 1, 1, 1)
        samples = comfy.sample.sample(self.model, noise, self.args.steps, 7.5, self.common["sampler_name"],
                                      self.common["scheduler"], self.positive, self.negative, latent,
                                      denoise=self.args.denoise, disable_pbar=True, seed=SEED)
        sampled = time.perf_counter()
        self.vae.decode(samples)
        done = time.perf_counter()
        count = len(self.frames)
        return {"total": (done - start) / count, "vae": ((encoded - start) + (done - sampled)) / count}

    def fresco(self, components: dict) -> dict:
        settings = self.rendering.FrescoSettings(**self.common, **components)
        selection = self.host.pack_module("rerender.keyframes").KeyFrameSelection(tuple(range(len(self.frames))),
                                                                                  len(self.frames))
        start = time.perf_counter()
        renderer = self.rendering.FrescoRenderer(self.model, self.positive, self.negative, self.vae, self.frames,
                                                 selection, self.flow, self.mask, settings)
        _, _, stats = renderer.run()
        count = len(self.frames)
        return {"total": (time.perf_counter() - start) / count, "vae": stats.vae_seconds / count,
                "report": stats.report}


def row(label, result, plain):
    outside, plain_outside = result["total"] - result["vae"], plain["total"] - plain["vae"]
    return (f"{label:40s} {result['total']:8.2f} {result['vae']:7.2f} {outside:9.2f} "
            f"{outside / plain_outside:8.2f}x")


def memory_child(args) -> None:
    """One executed step of a batch on the full SD1.5 layout; prints the peak memory as JSON."""
    from tiny_models import FULL_SD15_UNET
    torch.set_num_threads(args.threads)
    host = start_host(args, "fresco_keyframes_bench")
    args.size, args.steps, args.denoise = args.memory_size, 1, 1.0  # one step, every component's period on it
    bench = Bench(host, args, FULL_SD15_UNET)
    on = {"on": ON, "off": OFF}[args.memory_child]
    on = {k: ((0.0, 1.0) if isinstance(v, tuple) and v != (0.0, 0.0) else v) for k, v in on.items()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = bench.fresco(on)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = torch.cuda.max_memory_allocated() / MiB if cuda else None
    print(json.dumps({"rss_before_mib": before / 1024, "rss_peak_mib": peak / 1024, "cuda_peak_mib": cuda,
                      "report": result["report"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8, help="key frames, rendered as one batch")
    parser.add_argument("--steps", type=int, default=4, help="executed steps (KSampler semantics)")
    parser.add_argument("--denoise", type=float, default=0.75)
    parser.add_argument("--iterations", type=int, default=20, help="Adam iterations (the reference: 20)")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-each", action="store_true", help="skip the cost of each component alone")
    parser.add_argument("--memory-size", type=int, default=0, help="frame size of the memory run (0: skip)")
    parser.add_argument("--memory-child", choices=["on", "off"], help=argparse.SUPPRESS)
    add_suite_arguments(parser)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    bench = Bench(start_host(args, "fresco_keyframes_bench"), args)
    print(f"{args.layout} SD1.5 random UNet, {args.frames} key frames of {args.size}x{args.size} in one batch, "
          f"{args.steps} steps at denoise {args.denoise} ({args.sampler}), cfg 7.5, {args.iterations} Adam "
          f"iterations, on {device_label(args.device)}; seconds per key frame, each against plain batched img2img "
          f"run just before it")
    print(f"{'':40s} {'total':>8s} {'VAE':>7s} {'non-VAE':>9s} {'vs plain':>9s}")
    bench.plain()  # warm-up
    configs = [("every component on (defaults)", ON)] + ([] if args.skip_each else
                                                          [("every component off", OFF), *EACH])
    for number, (label, components) in enumerate(configs):
        plain = bench.plain()
        result = bench.fresco(components)
        print(row("plain batched img2img", plain, plain))
        print(row(label, result, plain), flush=True)
        if number == 0:
            headline = result["total"], ((result["total"] - result["vae"]) / (plain["total"] - plain["vae"]))
            for line in result["report"]:
                print(f"    note: {line}")

    if args.memory_size:
        print(f"\nmemory, full SD1.5 layout, {args.frames} frames at {args.memory_size}x{args.memory_size}, one "
              f"executed step, cfg 7.5 (each in its own process):")
        for which in ("off", "on"):
            done = subprocess.run([sys.executable, __file__, "--memory-child", which, "--frames", str(args.frames),
                                   "--memory-size", str(args.memory_size), "--threads", str(args.threads),
                                   "--iterations", str(args.iterations), "--sampler", args.sampler,
                                   "--device", args.device],
                                  capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:])
                continue
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  components {which}: peak RSS {figures['rss_peak_mib']:.0f} MiB (after setup "
                  f"{figures['rss_before_mib']:.0f} MiB)"
                  + (f", CUDA peak {figures['cuda_peak_mib']:.0f} MiB" if figures["cuda_peak_mib"] else ""))
            print(f"    report: {figures['report'][0]}")
    emit(args, "s/key frame (all on)", headline[0], {"plain batched img2img (non-VAE)": headline[1]},
         f"{args.size}x{args.size} {args.layout}, batch {args.frames}, {args.steps} steps")


if __name__ == "__main__":
    main()
