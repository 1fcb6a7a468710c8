"""The main job on a Dask cluster (`python -m rerender_cli.run_headless --cluster`): a LocalCluster of three worker
processes on loopback, each with the diffusion resource and ComfyUI loaded in process (rerender_cli/dask_worker.py
as its preload) on the `server` fixture's folders (tiny models). The video equals the one-machine run
(`--server`) bit for bit, also when a worker is killed while it holds an interval or while it renders the key
frames; Ctrl-C leaves no task running; bad input is refused in one line before anything is submitted.

The tests share the cluster and run in file order: the refusals first, then the runs; a killed worker is restarted
by its nanny."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from host_compat import REPO_ROOT, default_sigint, skip_or_fail
from test_headless_host import interrupt
from test_workflows_host import HEADLESS

# 11 frames, a key frame every 4th without the last: keys 0, 4, 8 -> intervals 0-4, 4-8 and the frames after 8.
FRAMES, FPS, SIZE, INTERVAL = 11, 10, 48, 4
SETS = [f"Video Frames.longer_side={SIZE}", f"Rerender_KeyframePicker.interval={INTERVAL}",
        "Rerender_KeyframePicker.include_last=false", "Rerender_KeyframeSampler.steps=2",
        "Rerender_PatchPropagator.search_vote_iters=3", "Rerender_PatchPropagator.patchmatch_iters=2",
        "Rerender_PatchPropagator.seed=7"]
EXPECTED = ["0-4", "4-8", "8-10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def dask_installed():
    try:
        import distributed  # noqa: F401
    except ImportError:
        skip_or_fail("cluster tests skipped: Dask distributed is not installed (pip install distributed)")


@pytest.fixture(scope="module")
def clip(tmp_path_factory, shared_data):
    capture = cv2.VideoCapture(str(shared_data / "videos" / "car_turn_480x480_10fps.mp4"))
    path = tmp_path_factory.mktemp("cluster_clip") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (64, 64))
    for _ in range(FRAMES):
        writer.write(cv2.resize(capture.read()[1], (64, 64), interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def worker_environment(server) -> dict:
    """What a worker needs here: the host, its options (CPU, the fixture server's folders), the CPU torchvision
    workaround as a preload, the tests' folder importable (Dask copies a preload file away from it)."""
    return {"COMFYUI_PATH": str(server.comfy_path),
            "COMFYUI_ARGS": f"--cpu --disable-api-nodes --base-directory {server.base}",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
            "DASK_DISTRIBUTED__WORKER__PRELOAD": '["dask_preload"]'}


@pytest.fixture(scope="module")
def cluster(server):
    """A LocalCluster of 3 worker processes on 127.0.0.1, each a diffusion worker; (scheduler address, Client,
    {worker address: pid} as they started)."""
    from distributed import Client, LocalCluster
    saved = {name: os.environ.get(name) for name in worker_environment(server)}
    os.environ.update(worker_environment(server))
    local = LocalCluster(n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None, resources={"diffusion": 1},
                         preload=["dask_preload", "rerender_cli.dask_worker"])
    client = Client(local)
    try:
        yield local.scheduler_address, client
    finally:
        client.close()
        local.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def command(clip, output, *where, sets=()):
    return [*HEADLESS, *where, "--video", str(clip), "--output", str(output), "--checkpoint",
            "tiny_sd15.safetensors", "--controlnet", "tiny_control.safetensors",
            *[arg for item in [*SETS, *sets] for arg in ("--set", item)]]


def decoded_frames(path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    return np.stack(frames)


@pytest.fixture(scope="module")
def one_machine_video(server, clip, tmp_path_factory):
    """The plain one-server run (run_headless --server): what every cluster run must equal."""
    output = tmp_path_factory.mktemp("one_machine") / "one.mp4"
    done = subprocess.run(command(clip, output, "--server", server.url), capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    frames = decoded_frames(output)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    return frames


def refused(clip, tmp_path, *where, sets=()) -> tuple:
    """The command's one line (asserted one) and exit code, for input refused before anything runs."""
    done = subprocess.run(command(clip, tmp_path / "video.mp4", *where, sets=sets), capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert not (tmp_path / "video.mp4").exists()
    return done.returncode, lines[0]


def test_no_scheduler_at_the_address_is_one_line_and_exit_2(clip, tmp_path):
    code, line = refused(clip, tmp_path, "--cluster", f"tcp://127.0.0.1:{free_port()}")
    assert code == 2 and "no Dask scheduler answers at tcp://127.0.0.1:" in line, line


def test_a_cluster_without_a_diffusion_worker_says_so(clip, tmp_path):
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as plain:
        code, line = refused(clip, tmp_path, "--cluster", plain.scheduler_address)
    assert code == 2 and "no worker of the cluster has the 'diffusion' resource" in line, line


@pytest.mark.parametrize("sets, expected", [
    (["Rerender_PatchPropagator.patch_size=99"], "--set Rerender_PatchPropagator.patch_size=99: "),
    (["CheckpointLoaderSimple.ckpt_name=missing.safetensors"], "model file 'missing.safetensors'"),
])
def test_a_mistake_is_refused_in_one_line_before_anything_runs(cluster, clip, tmp_path, sets, expected):
    address, client = cluster
    code, line = refused(clip, tmp_path, "--cluster", address, sets=sets)
    assert code == 3 and expected in line, line
    if "model file" in line:                       # the worker that lacks it is named
        assert re.match(r"run_headless: worker tcp://127\.0\.0\.1:\d+: ", line), line
    assert not any(client.processing().values())


def test_a_worker_with_another_pack_version_is_named(cluster, server, clip, tmp_path):
    """A worker started from a copy of the pack with one file changed."""
    address, client = cluster
    copy = tmp_path / "pack"
    for top in ("rerender", "engine", "nodes", "rerender_cli"):
        shutil.copytree(REPO_ROOT / top, copy / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "__init__.py", copy / "__init__.py")
    with open(copy / "rerender" / "propagate.py", "a") as changed:
        changed.write("\n# changed\n")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), str(REPO_ROOT / "tests")]))
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
                               "--nthreads", "1", "--no-nanny", "--no-dashboard"], cwd=copy, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(client.scheduler_info(n_workers=-1)["workers"]) < 4:
            assert worker.poll() is None and time.time() < deadline
            time.sleep(0.2)
        code, line = refused(clip, tmp_path, "--cluster", address)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert code == 2 and re.search(r"worker tcp://127\.0\.0\.1:\d+ runs another version of this pack", line), line


def start(clip, output, log, address, *sets):
    with open(log, "w") as stderr:
        return subprocess.Popen(command(clip, output, "--cluster", address, sets=sets), stderr=stderr, text=True,
                                cwd=REPO_ROOT, preexec_fn=default_sigint)


def finished(job, log) -> str:
    try:
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    return log.read_text()


def intervals_done(text: str) -> list:
    return sorted(re.findall(r"interval (\d+-\d+) done on", text))


def test_three_workers_write_the_one_machine_video(cluster, clip, one_machine_video, tmp_path):
    address, _ = cluster
    log = tmp_path / "job.log"
    text = finished(start(clip, tmp_path / "video.mp4", log, address), log)
    assert intervals_done(text) == EXPECTED, text
    assert len(set(re.findall(r"interval \d+-\d+ done on (\S+)", text))) >= 2, text   # spread over the workers
    assert np.array_equal(one_machine_video, decoded_frames(tmp_path / "video.mp4"))


def kill_when_running(client, job, log, label: str) -> str:
    """SIGKILL, by its pid, the worker process that runs a task of `label` as soon as one does; its address."""
    pids = client.run(os.getpid)
    deadline = time.time() + 300
    while True:
        holders = [worker for worker, keys in client.processing().items()
                   if any(key.startswith(f"rerender-{label}") for key in keys)]
        if holders:
            os.kill(pids[holders[0]], signal.SIGKILL)
            return holders[0]
        assert job.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)


def test_the_key_frame_worker_killed_while_it_renders(cluster, clip, one_machine_video, tmp_path):
    address, client = cluster
    log = tmp_path / "job.log"
    def forget_key_frames() -> None:          # on each worker (a local function: Dask sends it by value)
        from rerender_cli import dask_worker
        if dask_worker._host is not None:     # the host's cache of key frame stages emptied, the models with it:
            dask_worker._host.key_executor.reset()   # else the worker that rendered them answers at once
    client.run(forget_key_frames)
    job = start(clip, tmp_path / "video.mp4", log, address)
    killed = kill_when_running(client, job, log, "key-frames")
    text = finished(job, log)
    rendered_on = re.search(r"key frames rendered on (\S+)", text).group(1)
    assert rendered_on != killed.removeprefix("tcp://"), text
    assert intervals_done(text) == EXPECTED, text
    assert np.array_equal(one_machine_video, decoded_frames(tmp_path / "video.mp4"))


def test_a_worker_killed_while_it_holds_an_interval(cluster, clip, one_machine_video, tmp_path):
    address, client = cluster
    log = tmp_path / "job.log"
    job = start(clip, tmp_path / "video.mp4", log, address)
    killed = kill_when_running(client, job, log, "interval")
    text = finished(job, log)
    assert intervals_done(text) == EXPECTED, text            # each interval once
    assert np.array_equal(one_machine_video, decoded_frames(tmp_path / "video.mp4"))
    assert killed not in client.scheduler_info(n_workers=-1)["workers"]


def test_ctrl_c_exits_130_and_leaves_no_task_of_the_job_running(cluster, clip, tmp_path):
    from rerender_cli import dask_worker
    address, client = cluster
    log = tmp_path / "job.log"
    job = start(clip, tmp_path / "video.mp4", log, address, "Rerender_KeyframeSampler.steps=1000")
    deadline = time.time() + 300
    while not any(key.startswith("rerender-key-frames") for keys in client.processing().values() for key in keys):
        assert job.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)
    time.sleep(1)                                   # into the sampling steps
    interrupt(job, log)

    def nothing_left() -> bool:
        running = client.run(dask_worker.running_tasks)
        return not any(running.values()) and not any(client.processing().values())
    deadline = time.time() + 60                      # 1000 steps would take far longer than this
    while not nothing_left():
        assert time.time() < deadline, client.run(dask_worker.running_tasks)
        time.sleep(0.2)
