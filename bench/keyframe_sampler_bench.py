"""Key frame sampler cost against a plain KSampler img2img of the same frame and steps, measured in the same run.

Model: random-weight UNet at SD1.5's real width (320/640 channels, SD1.5's block types, two levels), so attention
and convolutions weigh about what they weigh in SD1.5; the cache is measured on the full SD1.5 layout. The VAE's
share is counted apart (the reference needs 3 encodes and 4 decodes per key frame; on a CPU they can dominate) and
its calls are counted and timed. Prints, per sampler, seconds per key frame (the anchor excluded) with every
constraint on, the ratio outside the VAE against KSampler img2img with the same sampler (target <= 2.2x), the cost
of each constraint alone, and the cross-frame attention cache at 512x512. `--layout full` samples on the full SD1.5
layout instead; `--device cuda` runs on the GPU (bench/gpu_suite.py). Needs $COMFYUI_PATH. Usage:
    COMFYUI_PATH=/path/to/ComfyUI python bench/keyframe_sampler_bench.py [--size 256] [--steps 4] [--skip-each]
        [--samplers ddim euler_ancestral dpmpp_2m] [--layout width|full|tiny] [--device cuda|cpu] [--json]
"""
import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from gpu_suite import add_suite_arguments, device_label, emit, start_host, unet_layout  # noqa: E402

CLIP = "man_talking_512x640_25fps.mp4"
SEED = 7
MiB = 2 ** 20


def read_frames(path: Path, count: int, stride: int, size: int) -> torch.Tensor:
    """`count` frames `stride` apart, centre-cropped square and resized to size x size (random if no clip)."""
    if not path.is_file():
        return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(0))
    cap, frames, index = cv2.VideoCapture(str(path)), [], 0
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        if index % stride == 0:
            h, w = frame.shape[:2]
            side = min(h, w)
            crop = frame[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
            frames.append(cv2.cvtColor(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA),
                                       cv2.COLOR_BGR2RGB))
        index += 1
    return torch.from_numpy(np.stack(frames)).float() / 255.0


class Bench:
    def __init__(self, host, args):
        from tiny_models import conditioning, tiny_sd15, tiny_sd_vae
        from host_compat import SHARED_DATA
        self.host, self.args = host, args
        self.rendering = host.pack_module("engine.rerender_a_video")
        self.model = tiny_sd15(0, unet_layout(args.layout))
        self.vae = tiny_sd_vae(0)
        self.positive, self.negative = conditioning(0), conditioning(1)
        self.frames = read_frames(SHARED_DATA / "videos" / CLIP, args.keyframes, 10, args.size)
        flow_module = host.pack_module("rerender.flow")
        self.flow = flow_module.VideoFlow(self.frames, flow_module.DISEstimator())
        for index in range(1, len(self.frames)):  # the flow stage's work, done before timing
            self.flow.pair(0, index)
            self.flow.pair(index - 1, index)
        (self.patched,) = host.run_node("Rerender_CrossFrameAttention", model=self.model, layers="all", start=0.0,
                                        end=1.0)
        self.use_sampler("ddim")

    def use_sampler(self, name: str) -> None:
        """ddim with the reference's ddim_uniform timesteps, every other sampler with karras."""
        self.common = dict(seed=SEED, steps=self.args.steps, cfg=7.5, sampler_name=name,
                           scheduler="ddim_uniform" if name == "ddim" else "karras", denoise=self.args.denoise)

    def plain(self) -> dict:
        """KSampler img2img of one frame: VAE Encode, KSampler, VAE Decode."""
        import comfy.sample
        frame = self.frames[1:2]
        start = time.perf_counter()
        latent = self.vae.encode(frame)
        encoded = time.perf_counter()
        samples = comfy.sample.sample(self.model, comfy.sample.prepare_noise(latent, SEED), self.args.steps, 7.5,
                                      self.common["sampler_name"], self.common["scheduler"], self.positive,
                                      self.negative, latent,
                                      denoise=self.args.denoise, disable_pbar=True, seed=SEED)
        sampled = time.perf_counter()
        self.vae.decode(samples)
        done = time.perf_counter()
        return {"total": done - start, "vae": (encoded - start) + (done - sampled), "encodes": 1, "decodes": 1}

    def keyframes(self, patched: bool, **periods) -> dict:
        """Seconds per key frame after the anchor, split into VAE and the rest, with VAE call counts."""
        off = dict(shape_period=(0.0, 0.0), pixel_period=(0.0, 0.0), adain_period=(0.0, 0.0))
        settings = self.rendering.KeyframeSettings(**self.common, **dict(off, **periods))
        selection = self.host.pack_module("rerender.keyframes").KeyFrameSelection(tuple(range(len(self.frames))),
                                                                                  len(self.frames))
        marks = []

        def mark(*_):
            marks.append((time.perf_counter(), renderer.stats.vae_seconds, renderer.stats.vae_encodes,
                          renderer.stats.vae_decodes))

        renderer = self.rendering.KeyframeRenderer(self.patched if patched else self.model, self.positive,
                                                   self.negative, self.vae, self.frames, selection, self.flow,
                                                   settings, on_key_frame=mark)
        renderer.run()
        mark()
        first, last = marks[1], marks[-1]  # from the first key frame after the anchor to the end
        count = len(marks) - 2
        return {"total": (last[0] - first[0]) / count, "vae": (last[1] - first[1]) / count,
                "encodes": (last[2] - first[2]) / count, "decodes": (last[3] - first[3]) / count,
                "cache": renderer.stats.attention_cache_peak_bytes, "report": renderer.stats.report}

    def cache_per_step(self, size: int) -> tuple:
        """(bytes, layers) of the attention cache of one anchor step at size x size, on the full SD1.5 layout."""
        from tiny_models import TINY_SD15_UNET, tiny_sd15
        (patched,) = self.host.run_node("Rerender_CrossFrameAttention", layers="all", start=0.0, end=1.0,
                                        model=tiny_sd15(0, dict(TINY_SD15_UNET, model_channels=320)))
        frames = torch.rand(1, size, size, 3)
        settings = self.rendering.KeyframeSettings(seed=SEED, steps=1, cfg=7.5, sampler_name="euler",
                                                   scheduler="normal", denoise=1.0, shape_period=(0.0, 0.0),
                                                   pixel_period=(0.0, 0.0), adain_period=(0.0, 0.0))
        selection = self.host.pack_module("rerender.keyframes").KeyFrameSelection((0,), 1)
        renderer = self.rendering.KeyframeRenderer(patched, self.positive, self.negative, self.vae, frames,
                                                   selection, None, settings)
        return renderer.run()[2].attention_cache_peak_bytes, len(renderer.attention.layers)


def row(name: str, result: dict, plain: dict) -> str:
    outside = result["total"] - result["vae"]
    plain_outside = plain["total"] - plain["vae"]
    return (f"{name:38s} {result['total']:8.1f} {result['vae']:7.1f} {outside:9.1f} {outside / plain_outside:8.2f}x "
            f"{result['encodes']:4.0f}/{result['decodes']:.0f}")


def measure(bench, configs, args) -> tuple:
    """Print the table for the current sampler; returns (the non-VAE ratio, seconds per key frame) with every
    constraint on."""
    name = bench.common["sampler_name"]
    print(f"\n{name}/{bench.common['scheduler']}: seconds per key frame, fastest of {args.repeats} (each against "
          f"KSampler img2img with {name}, runs interleaved: the machine is noisy)")
    print(f"{'':38s} {'total':>8s} {'VAE':>7s} {'non-VAE':>9s} {'vs plain':>9s} enc/dec")
    ratio = seconds = None
    for number, (label, patched, periods) in enumerate(configs):
        plains, results = [], []
        for _ in range(args.repeats):
            plains.append(bench.plain())
            results.append(bench.keyframes(patched, **periods))
        plain = min(plains, key=lambda r: r["total"] - r["vae"])
        result = min(results, key=lambda r: r["total"] - r["vae"])
        print(row("KSampler img2img", plain, plain))
        print(row(label, result, plain), flush=True)
        if number == 0:
            for line in result["report"]:
                print(f"    note: {line}")
            ratio = (result["total"] - result["vae"]) / (plain["total"] - plain["vae"])
            seconds = result["total"]
            print(f"    outside the VAE: {ratio:.2f}x plain (target <= 2.2x); VAE {result['vae']:.1f} s for "
                  f"{result['encodes']:.0f} encodes + {result['decodes']:.0f} decodes per key frame")
    return ratio, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="executed steps (KSampler semantics)")
    parser.add_argument("--denoise", type=float, default=0.8)
    parser.add_argument("--keyframes", type=int, default=2, help="frames rendered (the first is the anchor)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (at most 2 on shared machines)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement (the fastest counts)")
    parser.add_argument("--skip-each", action="store_true", help="skip the cost of each constraint alone")
    parser.add_argument("--cache-size", type=int, default=512, help="frame size of the cache measurement (0: skip)")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "euler_ancestral", "dpmpp_2m"],
                        help="host samplers to measure (each against KSampler img2img with the same sampler)")
    add_suite_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bench = Bench(start_host(args, "keyframe_sampler_bench"), args)
    full_steps = int(args.steps / args.denoise)
    layers = len(bench.rendering.find_cross_frame_attention(bench.patched).layers)
    print(f"{args.layout} SD1.5 random UNet ({layers} decoder attention layers), {args.size}x{args.size}, "
          f"{args.steps} steps at denoise "
          f"{args.denoise} (full schedule {full_steps}), cfg 7.5, {args.keyframes} frames, on "
          f"{device_label(args.device)}")

    bench.plain()  # warm-up: model load, allocator
    late = (0.25, 0.5)  # inside the executed steps, so its cost shows (the default (0, 0.1) is hidden by denoise)
    configs = [("every constraint on (defaults)", True, dict(shape_period=(0.0, 0.1), pixel_period=(0.5, 0.8),
                                                             adain_period=(0.8, 1.0)))]
    if not args.skip_each:
        configs += [("all off (our sampler)", False, {}),
                    ("cross-frame attention alone", True, {}),
                    (f"shape-aware fusion alone {late}", False, {"shape_period": late}),
                    ("pixel-aware fusion alone", False, {"pixel_period": (0.5, 0.8)}),
                    ("AdaIN alone", False, {"adain_period": (0.8, 1.0)})]
    ratios, seconds = {}, {}
    for sampler_name in args.samplers:
        bench.use_sampler(sampler_name)
        ratios[sampler_name], seconds[sampler_name] = measure(bench, configs, args)
    print("\nnon-VAE cost per key frame vs KSampler img2img (every constraint on): "
          + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))

    if args.cache_size:
        per_step, layers = bench.cache_per_step(args.cache_size)
        executed = round(20 * 0.75)
        print(f"\ncross-frame attention cache at {args.cache_size}x{args.cache_size} (SD1.5, fp32, {layers} layers, "
              f"cond + uncond): {per_step / MiB:.1f} MiB per step; the reference's grid (20 steps, denoise 0.75: "
              f"{executed} executed) holds anchor {executed * per_step / MiB:.0f} MiB, at most 2 frames (anchor, "
              f"previous key frame, overwritten as the next one reads it) = {2 * executed * per_step / MiB:.0f} MiB; "
              f"half in fp16")
    first = args.samplers[0]
    emit(args, f"s/key frame ({first}, all on)", seconds[first], {"KSampler img2img (non-VAE)": ratios[first]},
         f"{args.size}x{args.size} {args.layout}, {args.steps} steps, {args.keyframes} frames")


if __name__ == "__main__":
    main()
