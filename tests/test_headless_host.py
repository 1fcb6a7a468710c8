"""The headless runner against the real server: every mistake a user makes on the command line is refused in one
line with exit code 3 before anything is queued or uploaded (checked on /queue, /history and input/), every stop
signal stops only this client's prompt, and a server lost mid-run is one line with its own exit code."""
import json
import shutil
import signal
import subprocess
import time

import pytest

from host_compat import REPO_ROOT
from test_workflows_host import HEADLESS, HEADLESS_SETS, for_tiny_models

UI_WORKFLOW = REPO_ROOT / "workflows" / "Rerender - video to video.json"


def headless(server, *args, scheme=True):
    address = server.url if scheme else server.url.removeprefix("http://")
    return subprocess.run([*HEADLESS, "--server", address,
                           "--video", str(server.base / "input" / "clip.mp4"), "--output",
                           str(server.base / "never_written.mp4"), "--checkpoint", "tiny_sd15.safetensors",
                           "--controlnet", "tiny_control.safetensors", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


@pytest.mark.parametrize("args, expected", [
    (["--set", "Rerender_KeyframePicker.intervall=5"], "Rerender_KeyframePicker has no input 'intervall'"),
    (["--set", "Rerender_KeyframePicker.interval"], "must look like NODE.INPUT=VALUE"),
    (["--set", "Rerender_KeyframePickr.interval=5"], "the workflow has no node 'Rerender_KeyframePickr'"),
    (["--set", "Rerender_KeyframePicker.interval=five"], "Rerender_KeyframePicker.interval must be an integer"),
    (["--set", "Rerender_KeyframePicker.interval=0"], "Rerender_KeyframePicker.interval must be between 1 and"),
    (["--set", "Rerender_KeyframeSampler.denoise=1.5"], "Rerender_KeyframeSampler.denoise must be between 0"),
    (["--set", "Rerender_KeyframePicker.include_last=yes"], "include_last is a boolean; use true or false"),
    (["--set", "Rerender_KeyframeSampler.frames=1"], "Rerender_KeyframeSampler.frames is a connection (IMAGE)"),
    (["--set", "Rerender_KeyframePicker.mode=sometimes"], "'sometimes' is not a valid Key Frame Picker.mode"),
    # core nodes: every input kind (combo lists, dynamic combos, numbers) gets the same checks as the pack's
    (["--set", "Load Checkpoint.ckpt_nme=x.safetensors"], "CheckpointLoaderSimple has no input 'ckpt_nme' (its "
                                                          "inputs: ckpt_name)"),
    (["--set", "Load ControlNet Model.control_net=x"], "ControlNetLoader has no input 'control_net' (its inputs: "
                                                       "control_net_name)"),
    (["--set", "Save Video.format=gif"], "'gif' is not a valid Save Video.format; choose one of:"),
    (["--set", "Save Video.format.codec=h265"], "'h265' is not a valid Save Video.format.codec"),
    (["--set", "Detect Edges (Canny).low_threshold=2"], "low_threshold must be between 0.01 and 0.99"),
    (["--set", "Load Checkpoint.ckpt_name=nope.safetensors"], "put it in ComfyUI/models/checkpoints"),
    # a key that names two nodes
    (["--set", "CLIPTextEncode.text=a cat"], "'CLIPTextEncode' names 2 nodes: 8 (Positive prompt), 9 (Negative "
                                             "prompt); use the node id"),
    # refused by the server: one line, the reason once
    (["--set", "Rerender_KeyframeSampler.sampler_name=dpm_fast"],
     "the server rejected the workflow: Key Frame Sampler.sampler_name: sampler 'dpm_fast' cannot run"),
    (["--workflow", str(UI_WORKFLOW)], "is a UI-format workflow"),
])
def test_a_mistake_is_refused_in_one_line_and_nothing_is_queued(server, args, expected):
    history_before = server.history_ids()
    done = headless(server, *args, scheme=False)    # a bare HOST:PORT reaches the server (else exit code 2)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1), done.stderr
    assert expected in lines[0], lines[0]
    assert lines[0].count("cannot run") <= 1 and len(lines[0]) < 1000, lines[0]
    assert server.queued_ids() == ([], []) and server.history_ids() == history_before


def test_a_titled_prompt_node_is_set_alone(server, tmp_path):
    """`--set "Negative prompt.text=..."` reaches that node only: a wrong checkpoint then stops the run before
    anything is uploaded, so the check is on the refusal's wording (the title resolved, one node)."""
    done = headless(server, "--set", "Negative prompt.text=blurry", "--checkpoint", "nope.safetensors")
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1) and "nope.safetensors" in lines[0], done.stderr


def test_nothing_is_uploaded_before_the_model_files_are_checked(server, tmp_path):
    clip = tmp_path / "my_holiday.mp4"
    shutil.copy(server.base / "input" / "clip.mp4", clip)
    done = headless(server, "--video", str(clip), "--checkpoint", "nope.safetensors")
    assert done.returncode == 3, done.stderr
    assert not (server.base / "input" / clip.name).exists()


def test_the_upload_keeps_a_same_named_file_of_the_user(server, tmp_path):
    theirs = server.base / "input" / "holiday.mp4"
    theirs.write_bytes(b"the user's own file, not a clip")
    clip = tmp_path / "holiday.mp4"
    shutil.copy(server.base / "input" / "clip.mp4", clip)
    # refused by the server after the upload (queue-time check): nothing runs, the upload is done
    done = headless(server, "--video", str(clip), "--set", "Rerender_KeyframeSampler.sampler_name=dpm_fast")
    assert done.returncode == 3, done.stderr
    assert theirs.read_bytes() == b"the user's own file, not a clip"
    assert (server.base / "input" / "holiday (1).mp4").read_bytes() == clip.read_bytes()


def test_an_image_as_video_is_named_as_such(server):
    done = headless(server, "--video", str(server.base / "input" / "rerender_example.png"))
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1), done.stderr
    assert "is not a video file (image/png)" in lines[0], lines[0]


def test_a_usage_error_is_bad_input_not_no_server(server):
    done = headless(server, "--seed", "abc")
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("run_headless: argument --seed: invalid int value")


def start_headless(server, log, *sets):
    """run_headless in the background with the tiny models; returns (process, the prompt id it queued)."""
    args = [arg for item in HEADLESS_SETS["rerender_full_pipeline"] + list(sets) for arg in ("--set", item)]
    with open(log, "w") as stderr:
        process = subprocess.Popen([*HEADLESS, "--server", server.url.removeprefix("http://"),
                                    "--video", str(server.base / "input" / "clip.mp4"), "--output",
                                    str(log.with_suffix(".mp4")), "--checkpoint", "tiny_sd15.safetensors",
                                    "--controlnet", "tiny_control.safetensors", *args], stderr=stderr, text=True,
                                   cwd=REPO_ROOT)
    wait_until(lambda: "queued prompt" in log.read_text(), process, log)
    return process, log.read_text().split("queued prompt ")[1].split()[0]


def wait_until(condition, process, log, timeout_s=120):
    deadline = time.time() + timeout_s
    while not condition():
        assert process.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)


def other_clients_prompt(name: str, **sampler_inputs) -> dict:
    prompt = for_tiny_models(json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text()))
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "Rerender_KeyframeSampler"):
            # a fresh seed keeps the host's cache from answering it without running
            node["inputs"].update(seed=time.time_ns() % 2**31, **sampler_inputs)
    return prompt


def interrupt(process, log, signum=signal.SIGINT) -> str:
    process.send_signal(signum)
    try:
        assert process.wait(timeout=60) == 128 + signum, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    last_line = log.read_text().strip().splitlines()[-1]
    said = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    assert last_line.startswith(f"run_headless: {said}"), last_line
    return last_line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_stops_its_running_prompt_and_the_next_client_runs(server, tmp_path, signum):
    """Ctrl-C and `timeout` / a job scheduler (SIGTERM) cancel the job's running prompt (SIGHUP, a closed terminal:
    below, while it waits; one handler serves all three)."""
    ours, our_id = start_headless(server, tmp_path / "ours.log", "Rerender_KeyframeSampler.steps=400")
    wait_until(lambda: server.queued_ids()[0] == [our_id], ours, tmp_path / "ours.log")
    their_id = server.submit(other_clients_prompt("rerender_fidelity_img2img"))
    explained = "Key Frame Sampler: the bar counts sampling steps of every key frame"
    wait_until(lambda: explained in (tmp_path / "ours.log").read_text(), ours, tmp_path / "ours.log")
    log = (tmp_path / "ours.log").read_text()       # not a terminal: plain lines with times
    assert "\r" not in log and "\x1b" not in log and "elapsed" in log, log
    interrupt(ours, tmp_path / "ours.log", signum)
    our_entry = server.wait_for_history(our_id, timeout_s=60)
    assert our_entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [message[0] for message in our_entry["status"]["messages"]]
    assert server.wait_for_history(their_id)["status"]["status_str"] == "success"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_stop_while_waiting_leaves_the_running_prompt_of_another_client_alone(server, tmp_path, signum):
    their_id = server.submit(other_clients_prompt("rerender_fidelity_img2img", steps=20))
    ours, our_id = start_headless(server, tmp_path / "ours.log")
    assert server.queued_ids() == ([their_id], [our_id])
    wait_until(lambda: "waiting in the server's queue: 1 prompt ahead" in (tmp_path / "ours.log").read_text(),
               ours, tmp_path / "ours.log")
    interrupt(ours, tmp_path / "ours.log", signum)
    assert server.queued_ids()[1] == []                  # ours left the queue; theirs was still running
    their_entry = server.wait_for_history(their_id)
    assert their_entry["status"]["status_str"] == "success", their_entry["status"]
    assert our_id not in server.history_ids()           # ours never ran


def test_a_server_lost_mid_run_is_one_line_and_its_own_exit_code(host, server, tmp_path):
    """A second server on the same base directory, killed while it renders the job's key frames."""
    from host_server import HostServer
    doomed = HostServer(host.comfy_path, server.base)
    doomed.log_path = tmp_path / "doomed_server.log"
    doomed.start()
    try:
        args = [arg for item in HEADLESS_SETS["rerender_full_pipeline"] + ["Rerender_KeyframeSampler.steps=400"]
                for arg in ("--set", item)]
        log = tmp_path / "ours.log"
        with open(log, "w") as stderr:
            ours = subprocess.Popen([*HEADLESS, "--server", doomed.url, "--video",
                                     str(server.base / "input" / "clip.mp4"), "--output", str(tmp_path / "o.mp4"),
                                     "--checkpoint", "tiny_sd15.safetensors", "--controlnet",
                                     "tiny_control.safetensors", *args], stderr=stderr, text=True, cwd=REPO_ROOT)
        wait_until(lambda: "key frame" in log.read_text(), ours, log)
        doomed.proc.kill()
        assert ours.wait(timeout=60) == 4, log.read_text()
    finally:
        doomed.stop()
    last_line = log.read_text().strip().splitlines()[-1]
    assert last_line.startswith("run_headless: lost the ComfyUI server during the run"), last_line
    assert "Traceback" not in log.read_text()
