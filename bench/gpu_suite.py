"""One GPU command: every bench that has a GPU form, each in its own process, at 512x512 on SD1.5's full layout
(random weights: no model file is needed), fitted into one time budget, and one table of their figures:

  propagator        frames per second (bench/propagator_gpu_bench.py)
  keyframe_sampler  seconds per key frame against KSampler img2img (bench/keyframe_sampler_bench.py)
  fresco            seconds per key frame against plain batched img2img (bench/fresco_keyframes_bench.py)
  tokenflow         seconds per frame against plain sampling and per-frame PnP (bench/tokenflow_bench.py)
  tune_a_video      seconds per tuning step against the host's TrainLoraNode (bench/tune_a_video_bench.py)

and the peak memory of each (GPU peak allocated on CUDA; CPU peak resident memory on a CPU, labelled so).

Each case has sizes from the largest down, with an estimated duration; before a case starts the suite takes the
largest size that fits the budget left after keeping the smallest size of every later case, and prints what it
shrank or skipped. A case that fails (or runs past its share) shows as FAILED with the tail of its stderr, and the
suite then exits non-zero. `--smoke` runs the same code at tiny sizes on the CPU (under 2 minutes): the test suite
runs it, so the GPU command cannot rot while no GPU is at hand. Needs $COMFYUI_PATH. Usage:
    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_suite.py [--budget 480] [--cases tokenflow fresco ...]
    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_suite.py --smoke [--device cuda]

The first half of this file is the benches' side: how a bench picks its device and prints its JSON line.
"""
import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MiB = 2 ** 20


# --- the benches' side -------------------------------------------------------------------------------------------

HOST_ATTENTION = {"auto": (), "pytorch": ("--use-pytorch-cross-attention",)}  # --host-attention: the host's flags


def add_suite_arguments(parser: argparse.ArgumentParser, layouts: bool = True) -> None:
    """--device, --host-attention, --json and (for the benches on a random SD1.5 UNet) --layout."""
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="where the models run (default: cuda where there is one, else cpu)")
    parser.add_argument("--host-attention", choices=tuple(HOST_ATTENTION), default="auto",
                        help="the host's attention kernel: auto = its own choice (sub-quadratic on a CPU, PyTorch's "
                             "scaled_dot_product_attention on an NVIDIA GPU); pytorch = the NVIDIA one on any device")
    parser.add_argument("--json", action="store_true",
                        help="end with one JSON line of the figures (what bench/gpu_suite.py reads)")
    if layouts:
        parser.add_argument("--layout", choices=UNET_LAYOUTS, default="width",
                            help="random UNet: full (SD1.5), width (SD1.5's width, two levels), tiny (two levels, 32 "
                             "channels: smoke runs)")


UNET_LAYOUTS = ("full", "width", "tiny")


def unet_layout(name: str) -> dict:
    """The UNet config a --layout names (tests/tiny_models.py). tiny: SD1.5-width's two levels at 32 channels,
    because on a CPU the cost of a tiny model is the number of its layers, not their width."""
    from tiny_models import FULL_SD15_UNET, SD15_WIDTH_UNET
    return {"full": FULL_SD15_UNET, "width": SD15_WIDTH_UNET, "tiny": dict(SD15_WIDTH_UNET, model_channels=32)}[name]


def resolve_device(args) -> str:
    """Fills in args.device; refuses cuda where there is none (a silent CPU run would be mistaken for a GPU one)."""
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run where a GPU is lent, or pass --device cpu")
    return args.device


def start_host(args, bench: str):
    """The in-process ComfyUI of tests/conftest.py on args.device (the host chooses its GPU when not on the CPU)."""
    from conftest import HostSession
    from host_compat import find_comfyui
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"{bench}: {reason}")
    return HostSession(comfy_path, Path(tempfile.mkdtemp()), cpu=resolve_device(args) == "cpu",
                       host_args=HOST_ATTENTION[args.host_attention])


def device_label(device: str) -> str:
    """The device, and the host's attention kernel where the host is loaded (it sets the diffusion benches' ratios)."""
    import torch
    label = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    attention = sys.modules.get("comfy.ldm.modules.attention")
    if attention is not None:
        label += f", host attention {attention.optimized_attention.__name__}"
    return label


def peak_memory(device: str) -> tuple:
    """(MiB, what it is) of this process so far."""
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / MiB, "GPU peak allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "CPU peak RSS"


def emit(args, measure: str, value: float, ratios: dict, size: str, memory: tuple = None) -> None:
    """With --json, prints the bench's figures as its last line: `value` in `measure`, `ratios` {anchor: value /
    anchor}, peak memory (MiB, label; this process's by default)."""
    if not args.json:
        return
    peak, kind = memory or peak_memory(args.device)
    print(json.dumps({"measure": measure, "value": value, "ratios": ratios, "size": size,
                      "device": device_label(args.device), "peak_mib": peak, "memory": kind}), flush=True)


# --- the suite ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    label: str
    args: tuple
    # GPU sizes: estimated before any GPU run (none was lent when written); smoke: measured on a loaded 2-core
    # machine, rounded up
    estimate_s: float


@dataclass(frozen=True)
class Case:
    name: str
    script: str
    gpu: tuple  # Sizes, largest first
    smoke: Size


FULL_512 = ("--layout", "full", "--size", "512")
CASES = (
    Case("propagator", "propagator_gpu_bench.py",
         (Size("512x512, 11 frames, key every 10", ("--size", "512", "--frames", "11", "--interval", "10",
                                                    "--no-cpu-check"), 40),),
         Size("64x64, 3 frames", ("--size", "64", "--frames", "3", "--interval", "2", "--no-cpu-check"), 5)),
    Case("keyframe_sampler", "keyframe_sampler_bench.py",
         (Size("512x512 SD1.5, 3 frames, 15 of 20 steps", FULL_512 + ("--steps", "15", "--denoise", "0.75",
                                                                       "--keyframes", "3"), 70),
          Size("512x512 SD1.5-width, 3 frames, 8 steps", ("--layout", "width", "--size", "512", "--steps", "8",
                                                          "--denoise", "0.75", "--keyframes", "3"), 40)),
         Size("64x64 tiny UNet, 3 frames, 1 step", ("--layout", "tiny", "--size", "64", "--steps", "1",
                                                    "--denoise", "1", "--keyframes", "3"), 15)),
    Case("fresco", "fresco_keyframes_bench.py",
         (Size("512x512 SD1.5, batch 8, 4 steps, 20 Adam its", FULL_512 + ("--frames", "8", "--steps", "4"), 120),
          Size("512x512 SD1.5-width, batch 4, 4 steps", ("--layout", "width", "--size", "512", "--frames", "4",
                                                         "--steps", "4"), 60)),
         Size("64x64 tiny UNet, batch 3, 1 step, 2 Adam its", ("--layout", "tiny", "--size", "64", "--frames", "3",
                                                               "--steps", "1", "--denoise", "1", "--iterations",
                                                               "2", "--threads", "1"), 15)),
    Case("tokenflow", "tokenflow_bench.py",
         (Size("512x512 SD1.5, 16 frames, 10 steps", FULL_512 + ("--frames", "16", "--steps", "10",
                                                                 "--inversion-steps", "20"), 120),
          Size("512x512 SD1.5-width, 8 frames, 10 steps", ("--layout", "width", "--size", "512", "--frames", "8",
                                                           "--steps", "10", "--inversion-steps", "20"), 50)),
         Size("64x64 tiny UNet, 4 frames, 2 steps", ("--layout", "tiny", "--size", "64", "--frames", "4",
                                                     "--chunk", "2", "--steps", "2", "--inversion-steps", "2"), 15)),
    Case("tune_a_video", "tune_a_video_bench.py",
         (Size("512x512 SD1.5, 8 frames, 3 steps", FULL_512 + ("--frames", "8", "--steps", "3"), 150),
          Size("256x256 SD1.5-width, 8 frames, 3 steps", ("--layout", "width", "--size", "256", "--frames", "8",
                                                          "--steps", "3"), 70)),
         Size("32x32 tiny UNet, 2 frames, 1 step", ("--layout", "tiny", "--size", "32", "--frames", "2",
                                                    "--steps", "1"), 30)),
)
# What each bench is told beyond its size: one sampler, no per-component rows, no side measurements.
FIXED_ARGS = {"keyframe_sampler": ("--samplers", "ddim", "--repeats", "1", "--skip-each", "--cache-size", "0"),
              "fresco": ("--skip-each",)}


@dataclass
class Outcome:
    case: str
    status: str  # ok | FAILED | skipped
    size: str = ""
    note: str = ""
    figures: dict = None
    wall_s: float = 0.0
    stderr_tail: str = ""


def bench_environment(smoke: bool) -> dict:
    """Smoke runs give each bench (and the workers it starts) one CPU thread unless OMP_NUM_THREADS says otherwise:
    their tensors are tiny, and on a shared machine with few cores two threads contending with other processes
    made them several times slower. Runs at GPU sizes keep the environment as it is."""
    env = dict(os.environ)
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_bench(case: Case, size: Size, device: str, timeout_s: float, smoke: bool) -> Outcome:
    """The bench in its own process (its own process group, so a timeout also stops the workers it started)."""
    command = [sys.executable, str(BENCH / case.script), *size.args, *FIXED_ARGS.get(case.name, ()),
               "--device", device, "--json"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=bench_environment(smoke))
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        problem = f"exit status {process.returncode}" if process.returncode else ""
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        problem = f"ran past its {timeout_s:.0f} s share of the budget"
    outcome = Outcome(case.name, "ok", size.label, wall_s=time.perf_counter() - start, stderr_tail=stderr[-1500:])
    lines = stdout.strip().splitlines()
    for line in lines[:-1]:
        print(f"    {line}")
    if not problem:
        try:
            outcome.figures = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            problem = "no JSON line at the end of its output"
    if problem:
        outcome.status, outcome.note = "FAILED", problem
    return outcome


def run_suite(cases, budget_s: float, device: str, smoke: bool) -> list:
    started, outcomes = time.perf_counter(), []
    for number, case in enumerate(cases):
        sizes = (case.smoke,) if smoke else case.gpu
        left = budget_s - (time.perf_counter() - started)
        reserve = sum(min(s.estimate_s for s in ((c.smoke,) if smoke else c.gpu)) for c in cases[number + 1:])
        fitting = [s for s in sizes if s.estimate_s + reserve <= left]
        if not fitting:
            note = f"needs ~{sizes[-1].estimate_s:.0f} s, {left - reserve:.0f} s left for it"
            print(f"{case.name}: skipped to fit the budget ({note})", flush=True)
            outcomes.append(Outcome(case.name, "skipped", sizes[-1].label, note))
            continue
        size = fitting[0]
        note = "" if size is sizes[0] else f"shrunk to fit (full: {sizes[0].label}, ~{sizes[0].estimate_s:.0f} s)"
        print(f"{case.name}: {size.label} (~{size.estimate_s:.0f} s{'; ' + note if note else ''})", flush=True)
        outcome = run_bench(case, size, device, timeout_s=left - reserve, smoke=smoke)
        outcome.note = "; ".join(filter(None, (outcome.note, note)))
        outcomes.append(outcome)
    return outcomes


def table(outcomes) -> str:
    """One row per case: its figure, its ratios against the anchors measured in the same process, peak memory."""
    rows = [("case", "size", "figure", "against (same run)", "peak memory", "wall", "status")]
    for o in outcomes:
        f = o.figures
        if f:
            against = ", ".join(f"{ratio:.2f}x {anchor}" for anchor, ratio in f["ratios"].items()) or "-"
            rows.append((o.case, f["size"], f"{f['value']:.3f} {f['measure']}", against,
                         f"{f['peak_mib']:.0f} MiB {f['memory']}", f"{o.wall_s:.0f} s",
                         o.status + (f" ({o.note})" if o.note else "")))
        else:
            rows.append((o.case, o.size, "-", "-", "-", f"{o.wall_s:.0f} s", f"{o.status}: {o.note}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU unless --device cuda")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cpu with --smoke, else cuda")
    parser.add_argument("--budget", type=float, help="seconds for the whole suite (default 480; --smoke: 300)")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="run only these")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every case's outcome")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.smoke else "cuda")
    budget = args.budget or (300.0 if args.smoke else 480.0)
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    print(f"gpu_suite: {len(cases)} case(s) on {device}, {'smoke sizes' if args.smoke else 'GPU sizes'}, budget "
          f"{budget:.0f} s", flush=True)
    started = time.perf_counter()
    outcomes = run_suite(cases, budget, device, args.smoke)
    print(f"\n{table(outcomes)}\n\nwhole suite: {time.perf_counter() - started:.0f} s of a {budget:.0f} s budget")
    for o in outcomes:
        if o.status == "FAILED":
            print(f"\n{o.case} FAILED ({o.note}); the tail of its stderr:\n{o.stderr_tail}")
    if args.json:
        print(json.dumps([{k: v for k, v in vars(o).items() if k != "stderr_tail"} for o in outcomes]))
    sys.exit(1 if any(o.status == "FAILED" for o in outcomes) else 0)


if __name__ == "__main__":
    main()
