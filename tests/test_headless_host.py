"""The headless runner against the real server: every mistake a user makes on the command line is refused in one
line with exit code 3 before anything is queued (checked on /queue and /history), and Ctrl-C stops only this
client's prompt."""
import json
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
    (["--workflow", str(UI_WORKFLOW)], "is a UI-format workflow"),
])
def test_a_mistake_is_refused_in_one_line_and_nothing_is_queued(server, args, expected):
    history_before = server.history_ids()
    done = headless(server, *args, scheme=False)    # a bare HOST:PORT reaches the server (else exit code 2)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1), done.stderr
    assert expected in lines[0], lines[0]
    assert server.queued_ids() == ([], []) and server.history_ids() == history_before


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


def interrupt(process, log) -> str:
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 130, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    last_line = log.read_text().strip().splitlines()[-1]
    assert last_line.startswith("run_headless: interrupted"), last_line
    return last_line


def test_ctrl_c_stops_its_running_prompt_and_the_next_client_runs(server, tmp_path):
    ours, our_id = start_headless(server, tmp_path / "ours.log", "Rerender_KeyframeSampler.steps=400")
    wait_until(lambda: server.queued_ids()[0] == [our_id], ours, tmp_path / "ours.log")
    their_id = server.submit(other_clients_prompt("rerender_fidelity_img2img"))
    wait_until(lambda: "key frame" in (tmp_path / "ours.log").read_text(), ours, tmp_path / "ours.log")
    interrupt(ours, tmp_path / "ours.log")
    our_entry = server.wait_for_history(our_id, timeout_s=60)
    assert our_entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [message[0] for message in our_entry["status"]["messages"]]
    assert server.wait_for_history(their_id)["status"]["status_str"] == "success"


def test_ctrl_c_while_waiting_leaves_the_running_prompt_of_another_client_alone(server, tmp_path):
    their_id = server.submit(other_clients_prompt("rerender_fidelity_img2img", steps=20))
    ours, our_id = start_headless(server, tmp_path / "ours.log")
    assert server.queued_ids() == ([their_id], [our_id])
    interrupt(ours, tmp_path / "ours.log")
    assert server.queued_ids()[1] == []                  # ours left the queue; theirs was still running
    their_entry = server.wait_for_history(their_id)
    assert their_entry["status"]["status_str"] == "success", their_entry["status"]
    assert our_id not in server.history_ids()           # ours never ran
