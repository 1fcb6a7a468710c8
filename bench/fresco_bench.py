"""FRESCO feature optimisation: memory and time per Adam iteration of the loss forms and Gram memory forms, per
layer.

Layers: SD1.5's four decoder up-block inputs at --size (512: 1280x8x8, 1280x16x16, 1280x32x32, 640x64x64), for
--frames key frames x --chunks CFG chunks, random features and smooth random flows (costs do not depend on
the values). For each layer and form (LOSS:GRAM, LOSS = "code" (L1 Gram, the default) or "paper" (squared L2), GRAM =
"tokens" (HW x HW Gram matrices) or "channels" (the C x C rewrite, squared L2 only)) it prints
the estimated reference and working memory (`fresco_optimize.feature_optimization_memory`), the measured peak on
CUDA, seconds per iteration with the spatial loss alone and with both losses, the losses before/after the run
(so that one can see the optimisation lowers them), and which form "auto" picks. Usage:
    python bench/fresco_bench.py [--size 512] [--frames 8] [--chunks 2] [--iterations 3] [--device cpu]
                                 [--forms code:tokens,paper:tokens,paper:channels]
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


def run(feature, reference, flows, iterations, device, loss_form):
    """Seconds per iteration (one untimed warm-up iteration first) and the report of the timed run."""
    fo.optimize_feature(feature, reference, flows, iterations=1, form=loss_form)
    synchronize(device)
    start = time.perf_counter()
    _, report = fo.optimize_feature(feature, reference, flows, iterations=iterations, form=loss_form)
    synchronize(device)
    return (time.perf_counter() - start) / iterations, report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image size the layer sizes follow (multiple of 64)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2, help="CFG chunks optimised jointly (2 = cond + uncond)")
    parser.add_argument("--iterations", type=int, default=3, help="timed Adam iterations per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--forms", default="code:tokens,paper:tokens,paper:channels")
    args = parser.parse_args()
    device = torch.device(args.device)
    forms = [tuple(f.split(":")) for f in args.forms.split(",") if f]
    samples = args.frames * args.chunks
    flows = smooth_flows(args.frames, args.size, device)
    print(f"FRESCO feature optimisation, {args.frames} frames x {args.chunks} chunks, image {args.size}^2, "
          f"{args.iterations} iterations per measurement, device {device}")
    print(f"{'layer':>16} {'form':>15} {'auto':>5} {'ref MiB':>9} {'work MiB est':>12} {'peak MiB':>9} "
          f"{'s/it spatial':>12} {'s/it both':>10} {'spatial before->after':>24} {'temporal before->after':>24}")
    g = torch.Generator().manual_seed(1)
    for channels, divisor in SD15_UP_BLOCK_INPUTS:
        side = args.size // divisor
        shape = (channels, side, side)
        feature = torch.randn(samples, *shape, generator=g).to(device)
        reference_feature = torch.randn(samples, *shape, generator=g).to(device)
        for loss_form, form in forms:
            distance = fo.LOSS_FORMS[loss_form].gram_distance
            auto = fo.choose_gram_form(channels, side * side, samples, distance)
            estimate = fo.feature_optimization_memory([shape], args.frames, args.chunks, form, distance)[0]
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            reference = fo.GramReference(reference_feature, form, distance)
            spatial_time, _ = run(feature, reference, None, args.iterations, device, loss_form)
            both_time, report = run(feature, reference, flows, args.iterations, device, loss_form)
            peak = f"{torch.cuda.max_memory_allocated(device) / MiB:9.0f}" if device.type == "cuda" else f"{'-':>9}"
            print(f"{'x'.join(map(str, shape)):>16} {loss_form + ':' + form:>15} {'*' if form == auto else '':>5} "
                  f"{estimate.reference_bytes / MiB:9.1f} {estimate.working_bytes / MiB:12.1f} {peak} "
                  f"{spatial_time:12.3f} {both_time:10.3f} "
                  f"{report.spatial_before:11.4g} ->{report.spatial_after:10.4g} "
                  f"{report.temporal_before:11.4g} ->{report.temporal_after:10.4g}", flush=True)
            del reference
    layers = [(channels, args.size // divisor, args.size // divisor) for channels, divisor in SD15_UP_BLOCK_INPUTS]
    for loss_form, form in (("code", "auto"), ("paper", "auto"), *forms):
        distance = fo.LOSS_FORMS[loss_form].gram_distance
        kept, peak = fo.memory_totals(fo.feature_optimization_memory(layers, args.frames, args.chunks, form, distance))
        print(f"all four layers, {loss_form}:{form} form: Gram references kept for the batch {kept / MiB:.1f} MiB, "
              f"peak working set of one layer {peak / MiB:.1f} MiB (estimates)")


if __name__ == "__main__":
    main()
