"""bench/gpu_suite.py --smoke: the GPU suite's own code (every bench's device handling, sizes, JSON line, the table)
at tiny sizes on the CPU, so the GPU command cannot rot while no GPU is at hand."""
import json
import math
import os
import subprocess
import sys

from host_compat import REPO_ROOT, find_comfyui, skip_or_fail

CASES = {"propagator", "keyframe_sampler", "fresco", "tokenflow", "tune_a_video"}


def run_suite(*args, comfy_path):
    env = dict(os.environ, COMFYUI_PATH=str(comfy_path))
    return subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_suite.py"), "--smoke", "--json", *args],
                          capture_output=True, text=True, env=env, timeout=900)


def test_every_case_reports_numbers():
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        skip_or_fail(f"host tests skipped: {reason}")
    done = run_suite(comfy_path=comfy_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    outcomes = {o["case"]: o for o in json.loads(done.stdout.strip().splitlines()[-1])}
    assert set(outcomes) == CASES
    for case, outcome in outcomes.items():
        figures = outcome["figures"]
        assert outcome["status"] == "ok" and figures, case
        assert figures["peak_mib"] > 0 and figures["device"].startswith("CPU"), case
        # Tune-A-Video's figure is a difference of two timed runs (its setup cancels out): on a loaded machine it
        # can come out below zero, so only its being a number is the code's doing; every other figure is timed.
        timed = [figures["value"], *figures["ratios"].values()]
        assert all(math.isfinite(x) for x in timed) and (case == "tune_a_video" or min(timed) > 0), (case, figures)
        assert case in done.stdout.split("whole suite")[0].split("case ")[-1]  # a row of the printed table
    assert len(outcomes["tokenflow"]["figures"]["ratios"]) == 2 and outcomes["tune_a_video"]["figures"]["ratios"]


def test_a_failing_case_shows_as_failed_and_fails_the_run(tmp_path):
    done = run_suite("--cases", "keyframe_sampler", comfy_path=tmp_path)  # not a ComfyUI checkout: the bench exits
    assert done.returncode == 1
    (outcome,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "FAILED" and "exit status" in outcome["note"]
    assert "keyframe_sampler FAILED" in done.stdout and "not a ComfyUI checkout" in done.stdout


def test_host_attention_option_runs_the_host_with_that_kernel():
    """--host-attention pytorch starts the host with the kernel an NVIDIA GPU gets, and the bench says so; auto
    keeps the host's own CPU choice."""
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        skip_or_fail(f"host tests skipped: {reason}")
    env = dict(os.environ, COMFYUI_PATH=str(comfy_path), OMP_NUM_THREADS="1")
    kernels = {}
    for choice in ("pytorch", "auto"):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "keyframe_sampler_bench.py"), "--layout",
                               "tiny", "--size", "64", "--steps", "1", "--denoise", "1", "--keyframes", "2",
                               "--repeats", "1", "--skip-each", "--cache-size", "0", "--samplers", "ddim",
                               "--device", "cpu", "--host-attention", choice],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        kernels[choice] = done.stdout.split("host attention ")[1].split()[0]
    assert kernels["pytorch"] == "attention_pytorch"
    assert kernels["auto"] != "attention_pytorch"
