"""Test harness. Pure tests need nothing; tests that take the `host` fixture run against a real ComfyUI
(see host_compat.find_comfyui) and are skipped, with the reason in the summary, when none is found."""
import asyncio
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_compat import (PACK_DIR_NAME, SHARED_DATA, define_missing_torchvision_ops, find_comfyui,  # noqa: E402
                         make_base_directory, skip_or_fail)


class HostSession:
    """ComfyUI loaded in-process (no socket) with this pack loaded through the host's own custom-node loader.
    `cpu=False` lets the host pick its own device (CUDA where there is one): the benches' GPU runs."""

    def __init__(self, comfy_path: Path, base: Path, cpu: bool = True, host_args: tuple = ()):
        define_missing_torchvision_ops()
        sys.path.insert(0, str(comfy_path))
        sys.argv = ["main.py", *(["--cpu"] if cpu else []), "--base-directory", str(make_base_directory(base)),
                    "--disable-api-nodes", *host_args]
        import comfy.options
        comfy.options.enable_args_parsing()
        import execution
        import nodes
        import server

        self.comfy_path, self.base, self.nodes, self.execution = comfy_path, base, nodes, execution
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        builtin = set(nodes.NODE_CLASS_MAPPINGS)
        pack_path = str(base / "custom_nodes" / PACK_DIR_NAME)
        self.pack_loaded = self.loop.run_until_complete(
            nodes.load_custom_node(pack_path, builtin, module_parent="custom_nodes"))
        self.pack_node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - builtin)
        self.pack = sys.modules.get(pack_path.replace(".", "_x_"))  # the loader's module naming

    def pack_module(self, dotted: str):
        """A submodule of the pack as the host loaded it, e.g. pack_module("rerender.flow")."""
        import importlib
        return importlib.import_module(f"{self.pack.__name__}.{dotted}")

    def run_node(self, node_id: str, unique_id: str = "1", **inputs) -> tuple:
        """Run one node the way the host's executor does (inference mode, input gathering, V3 class clone,
        hidden inputs)."""
        import torch
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        is_v3 = hasattr(cls, "define_schema")
        input_data_all, missing, v3_data = self.execution.get_input_data(inputs, cls, unique_id)
        if missing:
            raise ValueError(f"inputs not accepted by {node_id}: {sorted(missing)}")
        with torch.inference_mode():
            output, ui, _, _ = self.loop.run_until_complete(
                self.execution.get_output_data("test-prompt", unique_id, cls if is_v3 else cls(), input_data_all,
                                               v3_data=v3_data))
        self.last_ui = ui
        return tuple(values[0] for values in output)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The suite runs many small tensor ops (tiny models, small images): on a 2-core machine one thread is several
    times faster than two contending with the test's other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> HostSession:
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        skip_or_fail(f"host tests skipped: {reason}")
    return HostSession(comfy_path, tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"test material not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def server(host, tmp_path_factory, shared_data):
    """The real ComfyUI server on loopback with this pack, a tiny SD1.5 checkpoint and ControlNet on disk
    (models/checkpoints/tiny_sd15.safetensors, models/controlnet/tiny_control.safetensors) and test inputs:
    rerender_example.png, clip.mp4 (6 real frames, 64x64, 10 fps), key_first.png / key_last.png."""
    import cv2
    from host_server import HostServer
    from tiny_models import save_tiny_checkpoint, save_tiny_controlnet

    base = make_base_directory(tmp_path_factory.mktemp("server_base"))
    for folder in ("checkpoints", "controlnet"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    save_tiny_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    save_tiny_controlnet(base / "models" / "controlnet" / "tiny_control.safetensors")

    capture = cv2.VideoCapture(str(shared_data / "videos" / "car_turn_480x480_10fps.mp4"))
    frames = [cv2.resize(capture.read()[1], (64, 64), interpolation=cv2.INTER_AREA) for _ in range(CLIP_FRAMES)]
    writer = cv2.VideoWriter(str(base / "input" / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (64, 64))
    for frame in frames:
        writer.write(frame)
    writer.release()
    cv2.imwrite(str(base / "input" / "rerender_example.png"), cv2.resize(frames[0], (128, 128)))
    cv2.imwrite(str(base / "input" / "key_first.png"), 255 - frames[0])   # "hand-painted": inverted colours
    cv2.imwrite(str(base / "input" / "key_last.png"), 255 - frames[-1])

    running = HostServer(host.comfy_path, base).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def sdxl_models(server) -> dict:
    """A tiny SDXL checkpoint (detected by the host as SDXL; the host's full-size CLIP-L + OpenCLIP-G, random
    weights) and an SDXL-layout ControlNet in the running server's model folders, written on first use:
    {"checkpoint": "tiny_sdxl.safetensors", "controlnet": "tiny_sdxl_control.safetensors"}. Removed after the session
    (2.3 GB on disk)."""
    from tiny_models import write_sdxl_models
    names = write_sdxl_models(server.base)
    yield names
    for folder, name in (("checkpoints", names["checkpoint"]), ("controlnet", names["controlnet"])):
        (server.base / "models" / folder / name).unlink(missing_ok=True)


CLIP_FRAMES, CLIP_FPS = 6, 10
