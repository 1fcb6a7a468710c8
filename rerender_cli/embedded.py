"""`render`: the full video-to-video job in this process, on an embedded ComfyUI host; no server to start.

The host is $COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack. It is set up as its main.py sets
it up (extra_model_paths.yaml, --base-directory and the other path options of `--comfy-args`, prestartup scripts,
every custom node pack), so model names resolve through the host's folder_paths exactly as in the editor. The
workflow is checked as run_headless checks it against a server (`--set` against the same node definitions, which
here come from the host's own node classes, then model files and combo values) and run by the host's own
PromptExecutor. With `--server HOST:PORT` the same job is queued on a running server by run_headless instead.
"""
import argparse
import asyncio
import os
import shlex
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

from . import run_headless
from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = {"rerender": "rerender_full_pipeline", "fresco": "rerender_fresco_pipeline",
           "tokenflow": "rerender_tokenflow", "tune-a-video": "rerender_tune_a_video"}
PACK_NODE = "Rerender_PatchPropagator"  # present once this pack is loaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", required=True, type=Path, help="input video file")
    parser.add_argument("--output", required=True, type=Path, help="where to write the output video")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--method", choices=list(METHODS), default="rerender",
                       help="the shipped workflow to run (workflows/api/): rerender = rerender_full_pipeline")
    which.add_argument("--workflow", type=Path, help="any API-format workflow JSON instead of --method")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help="queue on this running ComfyUI server (as run_headless) instead of an embedded host")
    parser.add_argument("--comfy-args", default="", metavar="'ARGS'",
                        help="the embedded host's command-line options, as for its main.py, e.g. "
                             "--comfy-args='--base-directory /data/comfy --lowvram'")
    for name, text in (("--prompt", "positive prompt"), ("--negative", "negative prompt"),
                       ("--checkpoint", "checkpoint file name in models/checkpoints"),
                       ("--controlnet", "ControlNet file name in models/controlnet")):
        parser.add_argument(name, help=text)
    parser.add_argument("--seed", type=int, help="sampler seed")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override any widget input; checked against the node definitions before any work")
    parser.set_defaults(run=run)


def workflow_path(args, host_path: Path = None) -> Path:
    """--workflow, else the method's shipped workflow: in this clone, or (installed with pip) in the pack's folder
    in the host's custom_nodes/."""
    if args.workflow:
        return args.workflow
    name = f"{METHODS[args.method]}.json"
    candidates = [run_headless.WORKFLOWS / "api" / name]
    if host_path is not None:
        candidates += sorted(host_path.glob(f"custom_nodes/*/workflows/api/{name}"))
    return next((path for path in candidates if path.is_file()), candidates[0])


def run(args) -> Path:
    if args.server:
        return asyncio.run(run_headless.run(run_headless.parse_args(headless_argv(args))))
    if not args.video.is_file():
        raise UserError(f"input video '{args.video}' does not exist", 3)
    host_path = find_host()
    prompt = run_headless.read_workflow(workflow_path(args, host_path))
    host = EmbeddedHost(host_path, shlex.split(args.comfy_args))
    run_headless.apply_overrides(prompt, args, host.object_info())
    run_headless.set_input(prompt, "LoadVideo", "file", host.add_input(args.video))
    object_info = host.object_info()                 # the video is now one of LoadVideo's options
    host.check_model_files(prompt, object_info)
    run_headless.check_against_server(prompt, object_info, host=f"the host at {host_path}")
    return host.render(prompt, args.output)


def headless_argv(args) -> list:
    """The run_headless command line of the same job."""
    argv = ["--server", args.server, "--video", str(args.video), "--output", str(args.output),
            "--workflow", str(workflow_path(args))]
    for name in ("prompt", "negative", "checkpoint", "controlnet", "seed"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + [arg for item in args.set for arg in ("--set", item)]


def pack_paths() -> list:
    """Where this pack sits, symlinks kept: a clone linked into custom_nodes/ resolves elsewhere, so the path the
    user is in ($PWD, which the kernel's cwd loses) and this file's unresolved path come before the real one."""
    paths = []
    pwd = os.environ.get("PWD")
    if pwd and Path(pwd).resolve() == REPO_ROOT:
        paths.append(Path(pwd))
    paths += [Path(__file__).absolute().parents[1], REPO_ROOT]
    return list(dict.fromkeys(paths))


def find_host() -> Path:
    """$COMFYUI_PATH, else the ComfyUI checkout this pack sits in (ComfyUI/custom_nodes/<pack>)."""
    def is_comfyui(path: Path) -> bool:
        return (path / "main.py").is_file() and (path / "nodes.py").is_file()

    env = os.environ.get("COMFYUI_PATH")
    if env:
        if is_comfyui(Path(env).expanduser()):
            return Path(env).expanduser().resolve()
        raise UserError(f"no ComfyUI host found: COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py and "
                        f"nodes.py); point it at one, or use --server HOST:PORT", 3)
    for pack in pack_paths():
        if pack.parent.name == "custom_nodes" and is_comfyui(pack.parent.parent):
            return pack.parent.parent
    raise UserError(f"no ComfyUI host found: COMFYUI_PATH is not set and {REPO_ROOT} is not inside "
                    f"ComfyUI/custom_nodes/ (it is in {REPO_ROOT.parent}); set COMFYUI_PATH "
                    f"to a ComfyUI checkout, or use --server HOST:PORT", 3)


def accelerator_args() -> list:
    """--cpu where torch has no accelerator the host could use (it would otherwise try CUDA and fail)."""
    import torch
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return [] if torch.cuda.is_available() or has_mps or has_xpu else ["--cpu"]


def node_definitions(nodes, folder_paths) -> dict:
    """The inputs and outputs of every loaded node class, as the server's GET /object_info gives them (its
    `node_info`: a V3 node's GET_NODE_INFO_V1, a classic node's INPUT_TYPES); `nodes` and `folder_paths` are the
    host's modules."""
    from comfy_api.internal import _ComfyNodeInternal
    info = {}
    with folder_paths.cache_helper:
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            if issubclass(cls, _ComfyNodeInternal):
                info[name] = cls.GET_NODE_INFO_V1()
            else:
                info[name] = {"input": cls.INPUT_TYPES(), "output": cls.RETURN_TYPES}
    return info


class EmbeddedHost:
    """ComfyUI started in this process the way its main.py starts it, minus the web server and the queue."""

    def __init__(self, comfy_path: Path, comfy_args: list):
        started = time.perf_counter()
        extra = [] if "--cpu" in comfy_args else accelerator_args()
        quiet = [] if "--verbose" in comfy_args else ["--verbose", "ERROR"]    # the host's start-up log
        sys.argv = [str(comfy_path / "main.py"), "--disable-api-nodes", *quiet, *extra, *comfy_args]
        sys.path.insert(0, str(comfy_path))
        import importlib
        host_main = importlib.import_module("main")      # paths, prestartup scripts, as at the host's start
        import execution
        import folder_paths
        import nodes
        import server

        self.execution, self.folder_paths, self.nodes = execution, folder_paths, nodes
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop)
        self.server.send_sync = self._deliver         # no sockets: messages go to the progress line
        self.listeners = []
        host_main.hook_breaker_ac10a0.save_functions()
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        host_main.hook_breaker_ac10a0.restore_functions()
        if PACK_NODE not in nodes.NODE_CLASS_MAPPINGS:   # the pack is not in the host's custom_nodes/
            if not (REPO_ROOT / "__init__.py").is_file():  # installed with pip: only the host-free layers
                raise UserError(f"this pack is not in {comfy_path / 'custom_nodes'}; clone it there", 3)
            loaded = self.loop.run_until_complete(
                nodes.load_custom_node(str(REPO_ROOT), set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"))
            if not loaded:
                raise UserError(f"ComfyUI at {comfy_path} could not load this pack from {REPO_ROOT} (see the log "
                                f"above)", 3)
        host_main.hijack_progress(self.server)
        self.start_seconds = time.perf_counter() - started

    def _deliver(self, event, data, sid=None) -> None:
        if isinstance(event, str):
            for listener in self.listeners:
                listener({"type": event, "data": data})

    def object_info(self) -> dict:
        return node_definitions(self.nodes, self.folder_paths)

    def add_input(self, video: Path) -> str:
        """The video in the host's input folder, as the server's upload puts it there; its name for LoadVideo."""
        folder = Path(self.folder_paths.get_input_directory())
        target = folder / video.name
        if not (target.exists() and os.path.samefile(target, video)):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(video, target)
        return video.name

    def check_model_files(self, prompt: dict, object_info: dict) -> None:
        """A model file the workflow names but folder_paths does not find, with the folders that were searched."""
        for nid, node in prompt.items():
            specs = run_headless.input_specs(object_info.get(node["class_type"], {"input": {}}), node["inputs"])
            for name, value in node["inputs"].items():
                options = run_headless.combo_options(specs[name]) if name in specs else None
                if name not in run_headless.MODEL_FOLDERS or options is None or isinstance(value, list) \
                        or value in options:
                    continue
                folders = [path for folder in run_headless.MODEL_FOLDERS[name].split(" or ")
                           for path in self.folder_paths.get_folder_paths(folder)]
                raise UserError(f"model file '{value}' ({run_headless.node_title(prompt, nid)}.{name}) was not "
                                f"found in {', '.join(folders)}; put it there or choose one of: "
                                f"{', '.join(map(str, options[:8])) or 'none available'}", 3)

    def render(self, prompt: dict, output: Path) -> Path:
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = self.loop.run_until_complete(
            self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            errors = [f"{e.get('class_type')}: {err.get('message')} {err.get('details', '')}".strip()
                      for e in node_errors.values() for err in e.get("errors", [])]
            raise UserError("the host rejected the workflow: " + ("; ".join(errors) or error.get("message", "")), 3)
        progress = run_headless.ProgressLine(prompt)
        self.listeners.append(progress.handle)
        executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self.server.last_prompt_id = prompt_id           # as the host's prompt worker sets it
        started = time.perf_counter()
        interrupted = []

        def interrupt(_signal, _frame):   # stop the running node at its next progress step, as the editor's Cancel
            interrupted.append(True)
            self.nodes.interrupt_processing(True)

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            executor.execute(prompt, prompt_id, {"client_id": "embedded"}, outputs)
        finally:
            signal.signal(signal.SIGINT, previous)
            progress.close()
            self.listeners.remove(progress.handle)
        if interrupted:
            raise KeyboardInterrupt
        ran = time.perf_counter() - started
        if not executor.success:
            failures = [data for event, data in executor.status_messages if event == "execution_error"]
            detail = failures[0] if failures else {}
            raise UserError(f"{detail.get('node_type', 'the workflow')} failed: "
                            f"{detail.get('exception_message', 'interrupted').strip()}", 1)
        print(f"comfyui-rerender render: host started in {self.start_seconds:.1f} s, the workflow ran in {ran:.1f} s",
              file=sys.stderr)
        videos = [item for node_output in executor.history_result["outputs"].values()
                  if node_output.get("animated") for item in node_output.get("images", [])]
        if not videos:
            raise UserError("the workflow finished but saved no video (does it end in a Save Video node?)", 1)
        video = videos[-1]
        saved = Path(self.folder_paths.get_directory_by_type(video["type"])) / video["subfolder"] / video["filename"]
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(f".{output.name}.partial")
        shutil.copyfile(saved, partial)
        os.replace(partial, output)
        return output
