"""The worker side of the cluster job (`run_headless --cluster`, see scale_out.py): the tasks a Dask worker runs.

Key frames and the video need the diffusion model: they run in ComfyUI loaded in this worker process, through the
host's own executor, with every custom node pack of that ComfyUI (this one among them). The host is loaded once
per process and kept, and so are the outputs of its loaders (the models), between tasks. A worker that can do this
says so with the Dask resource `diffusion=1` and loads the host at start when this module is its preload:

    COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=/path/to/ComfyUI/custom_nodes/comfyui-rerender \\
        dask worker tcp://SCHEDULER:8786 --resources diffusion=1 --preload rerender_cli.dask_worker

COMFYUI_ARGS holds the host's command-line options (e.g. "--base-directory /data/comfy --highvram").
Propagation intervals need only this pack's `rerender` library (flow and propagation, no host): any worker whose
PYTHONPATH holds the pack runs them. Frames arrive and leave as numpy arrays.
"""
import asyncio
import functools
import hashlib
import json
import os
import shlex
import sys
import threading
import types
import uuid
from pathlib import Path

import numpy as np
import psutil
import torch

from rerender import flow as flowlib
from rerender import propagate

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_SOURCES = ("__init__.py", "rerender", "engine", "nodes", "rerender_cli")
PROPAGATOR = "Rerender_PatchPropagator"
GIVEN_IMAGES = "RerenderCluster_GivenImages"
FAILURE_EVENTS = ("execution_error", "execution_interrupted")

cancelled_jobs = set()      # job tags the driver stopped (Ctrl-C): their running tasks end at their next check
_given = {}                 # token -> IMAGE batch, for GivenImages
_host = None
_host_lock = threading.Lock()


class JobCancelled(Exception):
    """The driver cancelled this task's job."""


@functools.lru_cache(maxsize=None)
def pack_version() -> str:
    """A digest of this pack's Python sources as this process found them first: workers and driver must run the
    same code for the video to equal the one-machine run."""
    digest = hashlib.sha1()
    for top in PACK_SOURCES:
        path = PACK_DIR / top
        for file in sorted([path] if path.is_file() else path.rglob("*.py")):
            digest.update(str(file.relative_to(PACK_DIR)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


class GivenImages:
    """Stands in for a node of the workflow whose IMAGE output this worker received through Dask."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "give"
    CATEGORY = "hidden"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"token": ("STRING", {"default": ""})}}

    def give(self, token: str):
        return (_given.pop(token),)


class Host:
    """ComfyUI in this process: its nodes, one executor for the key frame stage (its cache keeps the loaded models
    from one job to the next) and one for writing videos."""

    def __init__(self):
        comfy_path = os.environ.get("COMFYUI_PATH", "")
        if not (Path(comfy_path) / "main.py").is_file():
            raise RuntimeError(f"COMFYUI_PATH={comfy_path!r} is not a ComfyUI checkout; set it before starting the "
                               "worker")
        # Dask's nanny starts workers with OMP_NUM_THREADS=1; a ComfyUI server has torch's default, one thread per
        # physical core, and matrix products round differently with another thread count
        torch.set_num_threads(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
        sys.path.insert(0, comfy_path)
        sys.argv = ["main.py", *shlex.split(os.environ.get("COMFYUI_ARGS", ""))]
        import comfy.options
        comfy.options.enable_args_parsing()
        import execution
        import folder_paths
        import nodes
        import server

        self.execution, self.folder_paths, self.nodes = execution, folder_paths, nodes
        self.loop = asyncio.new_event_loop()
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if PROPAGATOR not in nodes.NODE_CLASS_MAPPINGS:        # the pack is not among the host's custom nodes
            self.loop.run_until_complete(nodes.load_custom_node(str(PACK_DIR), set(nodes.NODE_CLASS_MAPPINGS),
                                                                module_parent="custom_nodes"))
        nodes.NODE_CLASS_MAPPINGS[GIVEN_IMAGES] = GivenImages
        self.object_info_handler = next(route.handler for route in self.server.routes
                                        if route.method == "GET" and route.path == "/object_info/{node_class}")
        cache = dict(lru=0, ram=0, ram_inactive=0)
        self.key_executor = execution.PromptExecutor(self.server, execution.CacheType.CLASSIC, cache)
        self.video_executor = execution.PromptExecutor(self.server, execution.CacheType.CLASSIC, cache)
        self.lock = threading.Lock()
        self.running_job = None

    def put_input(self, name: str, data: bytes) -> None:
        path = Path(self.folder_paths.get_input_directory()) / name
        if not path.is_file() or path.stat().st_size != len(data):
            path.write_bytes(data)

    def object_info(self, class_types) -> dict:
        """The host's /object_info entries of `class_types`, from its own route handler."""
        info = {}
        for class_type in class_types:
            request = types.SimpleNamespace(match_info={"node_class": class_type})
            response = self.loop.run_until_complete(self.object_info_handler(request))
            info.update(json.loads(response.body))
        return info

    def validate(self, prompt: dict) -> str:
        """The host's own check of a workflow (types, links, values), as POST /prompt runs it; '' when valid."""
        valid, error, _, node_errors = self.loop.run_until_complete(
            self.execution.validate_prompt(uuid.uuid4().hex, prompt, None))
        if valid:
            return ""
        details = [f"{entry.get('class_type')}: {problem.get('message')} {problem.get('details', '')}".strip()
                   for entry in node_errors.values() for problem in entry.get("errors", [])]
        return "; ".join(details) or error.get("message", str(error))

    def run(self, executor, prompt: dict, wanted: list, job: str):
        """Execute `prompt` up to the nodes in `wanted`; each one's outputs (and the UI outputs) afterwards."""
        with self.lock:
            if job in cancelled_jobs:
                raise JobCancelled(job)
            self.running_job = job
            try:
                executor.execute(prompt, f"{job}-{uuid.uuid4().hex[:8]}", {}, wanted)
            finally:
                self.running_job = None
            failures = [data for event, data in executor.status_messages if event in FAILURE_EVENTS]
            if failures:
                failure = failures[0]
                if job in cancelled_jobs:
                    raise JobCancelled(job)
                raise RuntimeError(f"{failure.get('node_type')} failed: "
                                   f"{failure.get('exception_message', 'interrupted').strip()}")
            entries = {nid: asyncio.run(executor.caches.outputs.get(nid)) for nid in wanted}
            return {nid: entry.outputs for nid, entry in entries.items()}, executor.history_result["outputs"]

    def interrupt(self, job: str) -> None:
        if self.running_job == job:
            self.nodes.interrupt_processing(True)


def host() -> Host:
    global _host
    with _host_lock:
        if _host is None:
            _host = Host()
        return _host


async def dask_setup(worker) -> None:
    """As a worker's --preload: ComfyUI and its nodes load when the worker starts, not with its first task (in a
    thread: the host runs its own event loop)."""
    await asyncio.get_running_loop().run_in_executor(None, host)


# ---- tasks and calls from the driver ----------------------------------------------------------------------------
def object_info(class_types) -> dict:
    return host().object_info(class_types)


def check_workflow(prompt: dict, video_name: str, video: bytes) -> str:
    """What this worker lacks to run `prompt` (a node type, a model file, a value the host refuses); '' if
    nothing."""
    from .errors import UserError
    from .run_headless import check_against_server
    comfy = host()
    comfy.put_input(video_name, video)
    try:
        check_against_server(prompt, comfy.object_info({node["class_type"] for node in prompt.values()}),
                             host="this worker")
    except UserError as error:
        return str(error)
    return comfy.validate(prompt)


def output(outputs: dict, link: list):
    """The value a link [node id, output index] carries, from `Host.run`'s outputs."""
    return outputs[link[0]][link[1]][0]


def render_key_frames(prompt: dict, frames: list, keyframes: list, key_images: list, video_name: str,
                      video: bytes, job: str) -> dict:
    """The workflow up to the key frames, in the host: the video's frames, the key frame indices and the rendered
    key frames, as arrays."""
    comfy = host()
    comfy.put_input(video_name, video)
    outputs, _ = comfy.run(comfy.key_executor, prompt, list({frames[0], keyframes[0], key_images[0]}), job)
    return {"frames": output(outputs, frames).cpu().numpy(),
            "indices": [int(i) for i in output(outputs, keyframes).indices],
            "key_images": output(outputs, key_images).cpu().numpy()}


def key_layout(render: dict) -> tuple:
    """(key frame indices, frame count) of a key frame render: all the driver needs to cut the intervals."""
    return render["indices"], len(render["frames"])


def interval_inputs(render: dict, start: int, stop: int, keys: tuple) -> tuple:
    """The frames start..stop and the rendered key frames among them."""
    slots = [render["indices"].index(key) for key in keys]
    return render["frames"][start:stop + 1], render["key_images"][slots]


def propagate_interval(inputs: tuple, start: int, keys: tuple, propagator: dict, flow: dict, job: str) -> np.ndarray:
    """Patch Propagator on one interval alone, from its own frames and flow, with the seed its first frame has in
    the whole-clip run (which seeds each frame by its index); the propagated frames (key frames left out)."""
    frames, key_images = (torch.from_numpy(array) for array in inputs)
    video_flow = flowlib.VideoFlow(
        frames, flowlib.DISEstimator(flow["dis_preset"]), max_cached_pairs=flow["cache_pairs"],
        **flowlib.consistency_settings(flow["consistency_alpha"], flow["consistency_beta"], flow["photometric_check"]))
    settings = propagate.settings_from_widgets(**dict(propagator, seed=propagator["seed"] + start))

    def check_cancelled(_done: int) -> None:
        if job in cancelled_jobs:
            raise JobCancelled(job)

    local_keys = [key - start for key in keys]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.inference_mode():
        video = propagate.propagate_video(frames, local_keys, key_images, video_flow, settings, device=device,
                                          on_frame=check_cancelled)
    return video[[i for i in range(len(frames)) if i not in local_keys]].numpy()


def write_video(prompt: dict, propagator: str, render: dict, parts: list, propagated: list, video_name: str,
                video: bytes, job: str) -> bytes:
    """The workflow's own nodes after Patch Propagator (Create Video, Save Video, ...), in the host, fed the video
    assembled from the key frames and the intervals; the saved video file's bytes."""
    frames = render["frames"].copy()
    frames[render["indices"]] = render["key_images"]
    for (start, stop, keys), images in zip(parts, propagated):
        frames[[i for i in range(start, stop + 1) if i not in keys]] = images
    token = f"{job}-{uuid.uuid4().hex}"
    _given[token] = torch.from_numpy(frames)
    prompt = dict(prompt, **{propagator: {"class_type": GIVEN_IMAGES, "inputs": {"token": token}}})
    comfy = host()
    comfy.put_input(video_name, video)
    info = comfy.object_info({node["class_type"] for node in prompt.values()})
    wanted = [nid for nid, node in prompt.items() if info[node["class_type"]]["output_node"]]
    try:
        _, shown = comfy.run(comfy.video_executor, prompt, wanted, job)
    finally:
        _given.pop(token, None)
    videos = [item for ui in shown.values() if ui.get("animated") for item in ui.get("images", [])]
    if not videos:
        raise RuntimeError("the workflow finished but saved no video (does it end in a Save Video node?)")
    item = videos[-1]
    return (Path(comfy.folder_paths.get_directory_by_type(item["type"])) / item["subfolder"]
            / item["filename"]).read_bytes()


def stop_job(job: str) -> None:
    """Called by the driver on Ctrl-C, beside the running task: its job's tasks stop at their next check, and the
    host's run of it is interrupted."""
    cancelled_jobs.add(job)
    if _host is not None:
        _host.interrupt(job)


def running_tasks(dask_worker) -> list:
    """The keys this worker is executing now (for tests and progress)."""
    return [str(task.key) for task in dask_worker.state.executing]
