"""FRESCO feature optimisation: memory and time per Adam iteration of the two Gram-loss forms, per layer.

Layers: SD1.5's four decoder up-block inputs at --size (512: 1280x8x8, 1280x16x16, 1280x32x32, 640x64x64), for
--frames key frames x --chunks CFG chunks, random features and smooth random flows (costs do not depend on
the values). For each layer and form ("tokens" = HW x HW Gram matrices, "channels" = the C x C rewrite) it prints
the estimated reference and working memory (`fresco_optimize.feature_optimization_memory`), the measured peak on
CUDA, seconds per iteration with the spatial loss alone and with both losses, the losses before/after the run
(so that one can see the optimisation lowers them), and which form "auto" picks. Usage:
    python bench/fresco_bench.py [--size 512] [--frames 8] [--chunks 2] [--iterations 3] [--device cpu]
                                 [--forms tokens,channels]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rerender.fresco import optimize as fo  # noqa: E402
from rerender.fresco.geometry import CyclicFlows  # noqa: E402

MiB = 2 ** 20
SD15_UP_BLOCK_INPUTS = ((1280, 64), (1280, 32), (1280, 16), (640, 8))  # (channels, image size / feature size)


def smooth_flows(frames: int, size: int, device) -> CyclicFlows:
    g = torch.Generator().manual_seed(0)
    flow = F.interpolate(torch.randn(frames, 2, 4, 4, generator=g) * 4, size=(size, size), mode="bilinear")
    blobs = F.interpolate(torch.rand(frames, 1, 8, 8, generator=g), size=(size, size), mode="bilinear")
    occlusion = (blobs > 0.85).float()  # a few occluded blobs, as moving objects leave
    return CyclicFlows(flow.to(device), occlusion.to(device), -flow.to(device), occlusion.to(device))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(feature, reference, flows, iterations, device):
    """Seconds per iteration (one untimed warm-up iteration first) and the report of the timed run."""
    fo.optimize_feature(feature, reference, flows, iterations=1)
    synchronize(device)
    start = time.perf_counter()
    _, report = fo.optimize_feature(feature, reference, flows, iterations=iterations)
    synchronize(device)
    return (time.perf_counter() - start) / iterations, report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image size the layer sizes follow (multiple of 64)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2, help="CFG chunks optimised jointly (2 = cond + uncond)")
    parser.add_argument("--iterations", type=int, default=3, help="timed Adam iterations per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--forms", default="tokens,channels")
    args = parser.parse_args()
    device = torch.device(args.device)
    forms = [f for f in args.forms.split(",") if f]
    samples = args.frames * args.chunks
    flows = smooth_flows(args.frames, args.size, device)
    print(f"FRESCO feature optimisation, {args.frames} frames x {args.chunks} chunks, image {args.size}^2, "
          f"{args.iterations} iterations per measurement, device {device}")
    print(f"{'layer':>16} {'form':>9} {'auto':>5} {'ref MiB':>9} {'work MiB est':>12} {'peak MiB':>9} "
          f"{'s/it spatial':>12} {'s/it both':>10} {'spatial before->after':>24} {'temporal before->after':>24}")
    g = torch.Generator().manual_seed(1)
    for channels, divisor in SD15_UP_BLOCK_INPUTS:
        side = args.size // divisor
        shape = (channels, side, side)
        feature = torch.randn(samples, *shape, generator=g).to(device)
        reference_feature = torch.randn(samples, *shape, generator=g).to(device)
        auto = fo.choose_gram_form(channels, side * side, samples)
        for form in forms:
            estimate = fo.feature_optimization_memory([shape], args.frames, args.chunks, form)[0]
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            reference = fo.GramReference(reference_feature, form)
            spatial_time, _ = run(feature, reference, None, args.iterations, device)
            both_time, report = run(feature, reference, flows, args.iterations, device)
            peak = f"{torch.cuda.max_memory_allocated(device) / MiB:9.0f}" if device.type == "cuda" else f"{'-':>9}"
            print(f"{'x'.join(map(str, shape)):>16} {form:>9} {'*' if form == auto else '':>5} "
                  f"{estimate.reference_bytes / MiB:9.1f} {estimate.working_bytes / MiB:12.1f} {peak} "
                  f"{spatial_time:12.3f} {both_time:10.3f} "
                  f"{report.spatial_before:11.4g} ->{report.spatial_after:10.4g} "
                  f"{report.temporal_before:11.4g} ->{report.temporal_after:10.4g}", flush=True)
            del reference
    layers = [(channels, args.size // divisor, args.size // divisor) for channels, divisor in SD15_UP_BLOCK_INPUTS]
    for form in ("auto", *forms):
        kept, peak = fo.memory_totals(fo.feature_optimization_memory(layers, args.frames, args.chunks, form))
        print(f"all four layers, {form} form: Gram references kept for the batch {kept / MiB:.1f} MiB, "
              f"peak working set of one layer {peak / MiB:.1f} MiB (estimates)")


if __name__ == "__main__":
    main()
