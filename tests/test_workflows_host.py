"""The shipped workflows and the headless main job, on the real server with tiny random-weight models and a short
real clip (6 frames at 10 fps, see the `server` fixture)."""
import json
import subprocess
import sys

import cv2
import pytest

from conftest import CLIP_FPS, CLIP_FRAMES
from host_compat import REPO_ROOT
from host_server import free_port

WORKFLOWS = REPO_ROOT / "workflows"
HEADLESS = [sys.executable, "-m", "rerender_cli.run_headless"]   # run with cwd=REPO_ROOT
# The shipped defaults name real models and 512x512 frames; these make the same graphs cheap on a CPU.
TINY_OVERRIDES = {
    "LoadVideo": {"file": "clip.mp4"},
    "Rerender_VideoFrames": {"longer_side": 64},
    "CheckpointLoaderSimple": {"ckpt_name": "tiny_sd15.safetensors"},
    "ControlNetLoader": {"control_net_name": "tiny_control.safetensors"},
    "Rerender_KeyframePicker": {"interval": 3},
    "Rerender_KeyframeSampler": {"steps": 3},
    "KSampler": {"steps": 3},
    "Rerender_TuneAVideo": {"steps": 2, "mixed_precision": "fp32", "gradient_checkpointing": False},
    "Rerender_Inversion": {"steps": 3, "inversion_steps": 3},
    "Rerender_TokenFlowSampler": {"steps": 3, "chunk_size": 2},
    "BasicScheduler": {"steps": 3},
    "Rerender_FrescoKeyFrames": {"steps": 3, "iterations": 2},
}
HEADLESS_SETS = {"rerender_full_pipeline": ["Video Frames.longer_side=64",
                                            "Rerender_KeyframePicker.interval=3", "Rerender_KeyframeSampler.steps=3"],
                 "rerender_fresco_pipeline": ["Video Frames.longer_side=64",
                                              "Rerender_KeyframePicker.s_min=2", "Rerender_KeyframePicker.s_max=3",
                                              "Rerender_FrescoKeyFrames.steps=3",
                                              "Rerender_FrescoKeyFrames.iterations=2"]}
HEADLESS_PROGRESS = {"rerender_full_pipeline": "key frame", "rerender_fresco_pipeline": "batch 1/1"}
# A line of the key frame node's own report (what the editor shows on it), as the runner prints it.
HEADLESS_REPORT = {"rerender_full_pipeline": "Key Frame Sampler: 3 key frames;",
                   "rerender_fresco_pipeline": "FRESCO Key Frames: FRESCO-guided attention on"}


def for_tiny_models(prompt: dict) -> dict:
    for node in prompt.values():
        for name, value in TINY_OVERRIDES.get(node["class_type"], {}).items():
            assert name in node["inputs"], f"{node['class_type']} has no input {name}"
            node["inputs"][name] = value
        if node["class_type"] == "LoadImage" and node["inputs"]["image"] == "example.png":
            node["inputs"]["image"] = "rerender_example.png"
    return prompt


def video_frames_and_fps(path):
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return count, fps


def saved_files(server, entry):
    return [server.base / "output" / item["subfolder"] / item["filename"]
            for output in entry["outputs"].values() for item in output.get("images", [])
            if item.get("type", "output") == "output"]  # previews (type "temp") are not saved files


@pytest.mark.parametrize("name", ["rerender_full_pipeline", "rerender_propagation_only", "rerender_tokenflow",
                                  "rerender_fresco_pipeline"])
def test_video_workflow_runs_and_keeps_frame_count_and_rate(server, name):
    prompt = for_tiny_models(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()))
    messages, entry = server.queue(prompt)
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert not errors, errors[0].get("exception_message", errors) if errors else None
    assert entry["status"]["status_str"] == "success"
    (video,) = saved_files(server, entry)
    frames, fps = video_frames_and_fps(video)
    assert frames == CLIP_FRAMES and fps == pytest.approx(CLIP_FPS, abs=0.01)


def test_fidelity_img2img_workflow_runs(server):
    prompt = for_tiny_models(json.loads((WORKFLOWS / "api" / "rerender_fidelity_img2img.json").read_text()))
    messages, entry = server.queue(prompt)
    assert entry["status"]["status_str"] == "success", [m for m in messages if m["type"] == "execution_error"]
    (image,) = saved_files(server, entry)
    assert cv2.imread(str(image)).shape == (128, 128, 3)


def run_headless(*args):
    return subprocess.run([*HEADLESS, *args], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)


@pytest.mark.parametrize("name", list(HEADLESS_SETS))
def test_headless_command_writes_the_video(server, tmp_path, name):
    output = tmp_path / "styled.mp4"
    sets = [arg for item in HEADLESS_SETS[name] for arg in ("--set", item)]
    workflow = [] if name == "rerender_full_pipeline" else ["--workflow", str(WORKFLOWS / "api" / f"{name}.json")]
    done = run_headless("--server", server.url, "--video", str(server.base / "input" / "clip.mp4"),
                        "--output", str(output), "--checkpoint", "tiny_sd15.safetensors",
                        "--controlnet", "tiny_control.safetensors", "--prompt", "a pencil sketch", *workflow, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    frames, fps = video_frames_and_fps(output)
    assert frames == CLIP_FRAMES and fps == pytest.approx(CLIP_FPS, abs=0.01)
    assert HEADLESS_PROGRESS[name] in done.stderr  # the progress line showed the key frames / batches
    # not a terminal: plain lines, with times, and the nodes' own reports (what the editor shows on them)
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert "elapsed" in done.stderr and "ETA" in done.stderr
    assert any(line.startswith(HEADLESS_REPORT[name]) for line in done.stderr.splitlines()), done.stderr[-3000:]


def test_headless_command_explains_a_missing_server(tmp_path, shared_data):
    done = run_headless("--server", f"http://127.0.0.1:{free_port()}", "--video",
                        str(shared_data / "videos" / "car_turn_480x480_10fps.mp4"), "--output", str(tmp_path / "o.mp4"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no ComfyUI server answers" in lines[0]


def test_headless_command_names_a_missing_model(server, tmp_path):
    done = run_headless("--server", server.url, "--video", str(server.base / "input" / "clip.mp4"),
                        "--output", str(tmp_path / "o.mp4"), "--checkpoint", "not_there.safetensors")
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not_there.safetensors" in lines[0] and "models/checkpoints" in lines[0]


def test_tune_a_video_workflow_tunes_saves_and_samples_the_clip(server):
    prompt = for_tiny_models(json.loads((WORKFLOWS / "api" / "rerender_tune_a_video.json").read_text()))
    messages, entry = server.queue(prompt)
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert not errors, errors[0].get("exception_message", errors) if errors else None
    (video,) = saved_files(server, entry)
    frames, _ = video_frames_and_fps(video)
    assert frames == len(range(0, CLIP_FRAMES, 2))   # the tuned frames: every 2nd (reference stride)
    assert list((server.base / "models" / "tune_a_video").rglob("*.safetensors"))


def api_workflows() -> dict:
    return {path.stem: json.loads(path.read_text()) for path in sorted((WORKFLOWS / "api").glob("*.json"))}


def fed_by(prompt: dict, class_type: str, source: str, slot: int) -> list:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type
            and any(link == [source, slot] for link in node["inputs"].values())]


def test_prompt_nodes_have_titles_of_their_own():
    """A title names one node (run_headless --set "Negative prompt.text=..."; two nodes titled "CLIP Text Encode
    (Prompt)" before)."""
    for name, prompt in api_workflows().items():
        titles = [node["_meta"]["title"] for node in prompt.values() if node["class_type"] == "CLIPTextEncode"]
        assert len(titles) == len(set(titles)), (name, titles)
        assert not titles or {"Positive prompt", "Negative prompt"} <= set(titles), (name, titles)


def test_video_workflows_limit_the_frames_keep_the_aspect_and_preview_key_frames_and_flow():
    for name, prompt in api_workflows().items():
        loads = [nid for nid, node in prompt.items() if node["class_type"] == "LoadVideo"]
        if not loads:
            continue
        assert not [node for node in prompt.values() if node["class_type"] in ("ImageScale", "GetVideoComponents")]
        assert fed_by(prompt, "Rerender_VideoFrames", loads[0], 0), name
        for nid, node in prompt.items():
            if node["class_type"] in ("Rerender_KeyframeSampler", "Rerender_FrescoKeyFrames"):
                assert fed_by(prompt, "PreviewImage", nid, 0), (name, "key frames preview")
            if node["class_type"] == "Rerender_FlowEstimation":
                assert fed_by(prompt, "PreviewImage", nid, 1), (name, "flow preview")
