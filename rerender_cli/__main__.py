"""The pack's console command (`comfyui-rerender`, or `python -m rerender_cli` from the repository root):

    propagate   painted key frames -> video, no model and no host (`propagate --demo` runs on a fresh machine)
    render      the full video-to-video job in process on an embedded ComfyUI host (or --server HOST:PORT)

Exit codes: 0 done, 1 the workflow failed, 2 no server (render --server), 3 bad input (nothing written),
130 interrupted with Ctrl-C (no partial output is left).
"""
import argparse
import sys
from pathlib import Path

from .errors import INTERRUPTED_EXIT, UserError



def add_propagate(subparsers) -> None:
    from rerender.flow import DIS_PRESETS, RAFT_ITERATIONS
    from rerender.propagate import HOLE_FILLS, PropagationSettings
    defaults = PropagationSettings()
    parser = subparsers.add_parser(
        "propagate", help="painted key frames -> video (no model, no host)",
        description="Propagate painted key frames over a video with the Patch Propagator (EbSynth-style guided "
                    "PatchMatch, two passes per interval, temporal-aware blending), streamed interval by interval. "
                    "Options default to the Patch Propagator node's defaults.")
    parser.add_argument("--demo", action="store_true",
                        help="propagate the shipped demo (rerender_cli/demo: a 1 s clip and two painted key frames)")
    parser.add_argument("--video", type=Path, help="input video file")
    parser.add_argument("--key", action="append", default=[], metavar="INDEX=FILE",
                        help="a painted key frame (the video's size) for frame INDEX (0-based); repeat for each")
    parser.add_argument("--output", type=Path,
                        help="output video (.mp4: H.264; .mkv/.avi: lossless FFV1); --demo: propagate_demo.mp4")
    parser.add_argument("--raft", type=Path, metavar="FILE",
                        help="RAFT checkpoint (raft-sintel.pth; princeton-vl or torchvision layout); default: DIS")
    parser.add_argument("--raft-iterations", type=int, default=RAFT_ITERATIONS)
    parser.add_argument("--dis-preset", choices=list(DIS_PRESETS), default="medium")
    option = lambda name, kind, **extra: parser.add_argument(  # noqa: E731 - one line per node input
        f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name), **extra)
    for name in ("colour_weight", "edge_weight", "temporal_weight", "positional_weight", "uniformity",
                 "stop_threshold"):
        option(name, float)
    for name in ("patch_size", "search_vote_iters", "patchmatch_iters", "descriptor_size", "seed"):
        option(name, int)
    parser.add_argument("--pyramid-levels", type=int, default=0,
                        help="0: each frame's search starts from the previous frame's matches carried along the "
                             "flow, at half and full size; N: every frame searched from scratch over N levels "
                             "(EbSynth's way)")
    parser.add_argument("--hole-fill", choices=HOLE_FILLS, default=defaults.hole_fill)
    parser.add_argument("--histogram-blend", action=argparse.BooleanOptionalAction, default=defaults.histogram_blend)
    parser.add_argument("--poisson-fusion", action=argparse.BooleanOptionalAction, default=defaults.poisson)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_propagate)


def run_propagate(args) -> Path:
    from rerender.propagate import settings_from_widgets
    from . import propagate_video
    if args.demo:
        video = propagate_video.DEMO_VIDEO
        keys = list(propagate_video.DEMO_KEYS.items())
        output = args.output or Path("propagate_demo.mp4")
    else:
        if args.video is None or not args.key or args.output is None:
            raise UserError("propagate needs --video, at least one --key INDEX=FILE and --output (or --demo)", 3)
        video, keys, output = args.video, [propagate_video.parse_key(k) for k in args.key], args.output
    if args.patch_size % 2 == 0:
        raise UserError(f"--patch-size must be odd (a patch is centred on its pixel), got {args.patch_size}", 3)
    try:
        settings = settings_from_widgets(
            args.colour_weight, args.edge_weight, args.temporal_weight, args.positional_weight, args.patch_size,
            args.search_vote_iters, args.patchmatch_iters, args.hole_fill, args.histogram_blend,
            args.poisson_fusion, args.uniformity, args.stop_threshold, args.pyramid_levels, args.descriptor_size,
            args.seed)
    except ValueError as error:
        raise UserError(str(error), 3) from None
    estimator = propagate_video.flow_estimator(args.raft, args.dis_preset, args.raft_iterations)
    return propagate_video.propagate_file(video, keys, output, settings, estimator, show_progress=not args.quiet)


def add_render(subparsers) -> None:
    from . import embedded
    embedded.add_arguments(subparsers.add_parser(
        "render", help="the full video-to-video job, in process on an embedded ComfyUI host",
        description=embedded.__doc__.split("\n\n")[0]))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="comfyui-rerender", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_propagate(subparsers)
    add_render(subparsers)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        output = args.run(args)
    except UserError as error:
        print(f"comfyui-rerender {args.command}: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"\ncomfyui-rerender {args.command}: interrupted; no output written", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"wrote {Path(output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
