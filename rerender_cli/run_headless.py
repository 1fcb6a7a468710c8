"""Queue a Rerender workflow on a running ComfyUI server, headless, and write the output video.

    python -m rerender_cli.run_headless --video input.mp4 --output styled.mp4 --prompt "a van gogh painting"

Checks every model file and node the workflow names against the server, uploads the video (never over a file of
the same name in the server's input/), queues it (POST /prompt), follows the websocket with a progress line and the
nodes' reports, and downloads the saved video.
With `--cluster tcp://HOST:8786` (a Dask scheduler) or `--cluster local:N` the job runs on a Dask cluster instead
(see scale_out.py): key frames on a worker with the diffusion model, propagation intervals on any worker.
Needs `aiohttp` (installed with ComfyUI). Exit codes: 0 done, 1 the workflow failed, 2 no server, 3 bad input
(nothing queued; a command-line usage error too), 4 the server was lost during the run, 130 / 143 / 129 stopped by
SIGINT (Ctrl-C) / SIGTERM / SIGHUP (this client's prompt is taken off the queue or stopped in every case).
"""
import argparse
import asyncio
import json
import mimetypes
import signal
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from .errors import UserError

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
DEFAULT_WORKFLOW = WORKFLOWS / "api" / "rerender_full_pipeline.json"
CONNECT_TIMEOUT_S = 10
# Combo inputs whose values are model files, with the models/ folder a user must put them in.
MODEL_FOLDERS = {"ckpt_name": "checkpoints", "lora_name": "loras", "control_net_name": "controlnet",
                 "vae_name": "vae or vae_approx", "model_name": "optical_flow", "unet_name": "diffusion_models",
                 "clip_name": "text_encoders"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
BAD_INPUT_EXIT = 3
LOST_SERVER_EXIT = 4
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage error on the bad-input exit code (argparse's own 2 means "no server" here)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(BAD_INPUT_EXIT, f"run_headless: {message}\n")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True, type=Path, help="input video file")
    parser.add_argument("--output", required=True, type=Path, help="where to write the output video")
    parser.add_argument("--server", default="127.0.0.1:8188", help="ComfyUI server: HOST:PORT or a URL")
    parser.add_argument("--cluster", metavar="tcp://HOST:8786 | local:N",
                        help="run on a Dask cluster (its scheduler's address), or on N local worker processes, "
                             "instead of a ComfyUI server; needs pip install 'comfyui-rerender[cluster]'")
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW, type=Path,
                        help="API-format workflow JSON (default: workflows/api/rerender_full_pipeline.json)")
    parser.add_argument("--prompt", help="positive prompt (the text encoder wired to the sampler's positive input)")
    parser.add_argument("--negative", help="negative prompt (the text encoder wired to its negative input)")
    parser.add_argument("--checkpoint", help="checkpoint file name in models/checkpoints")
    parser.add_argument("--controlnet", help="ControlNet file name in models/controlnet")
    parser.add_argument("--seed", type=int, help="sampler seed")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override any widget input; NODE is a node id, title or class that names one node; "
                             "checked against the server's node definitions (name, type, range, options) before "
                             "anything is queued")
    return parser.parse_args(argv)


def find_nodes(prompt: dict, key: str) -> list:
    """Node ids whose id, title or class type is `key`."""
    return [nid for nid, node in prompt.items()
            if key in (nid, node.get("_meta", {}).get("title"), node["class_type"])]


def one_node(prompt: dict, key: str, item: str) -> str:
    """The id of the one node `key` names for --set `item`; a key matching no node or several is refused in one line
    (the shipped workflows' prompt nodes share a class, so a class or a shared title would set both)."""
    ids = [key] if key in prompt else find_nodes(prompt, key)
    if not ids:
        known = sorted({node["class_type"] for node in prompt.values()})
        raise UserError(f"--set {item}: the workflow has no node '{key}' (a node id, title or class; "
                        f"its classes: {', '.join(known)})", BAD_INPUT_EXIT)
    if len(ids) > 1:
        matches = ", ".join(f"{nid} ({node_title(prompt, nid)})" for nid in ids)
        raise UserError(f"--set {item}: '{key}' names {len(ids)} nodes: {matches}; use the node id", BAD_INPUT_EXIT)
    return ids[0]


def node_title(prompt: dict, nid: str) -> str:
    return prompt[nid].get("_meta", {}).get("title", prompt[nid]["class_type"])


def set_input(prompt: dict, node_key: str, name: str, value) -> None:
    ids = find_nodes(prompt, node_key)
    if not ids:
        raise UserError(f"the workflow has no node '{node_key}' to set '{name}' on", 3)
    for nid in ids:
        prompt[nid]["inputs"][name] = value


def prompt_text_node(prompt: dict, which: str) -> str:
    """Id of the text encoder feeding the samplers' `which` ("positive" / "negative") input."""
    for node in prompt.values():
        link = node["inputs"].get(which)
        if isinstance(link, list) and "text" in prompt[link[0]]["inputs"]:
            return link[0]
    raise UserError(f"the workflow has no text prompt wired to a sampler's '{which}' input", 3)


def input_specs(info: dict, values: dict = None) -> dict:
    """Input name -> spec from one /object_info entry, with a dynamic combo's nested inputs as `combo.name`: those
    of the option chosen in `values` (a node's inputs) when given, else the first option's that has the name."""
    specs = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            specs[name] = spec
            if spec[0] == DYNAMIC_COMBO:
                options = spec[1].get("options", [])
                chosen = [o for o in options if values is not None and o.get("key") == values.get(name)]
                for option in chosen or options:
                    for nested_section in option.get("inputs", {}).values():
                        for nested, nested_spec in nested_section.items():
                            specs.setdefault(f"{name}.{nested}", nested_spec)
    return specs


def is_widget(spec) -> bool:
    """Whether an /object_info input spec is a value (a combo list or a widget type), not a connection."""
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def combo_options(spec):
    """The allowed values of a combo input spec from /object_info, or None for other inputs."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    if spec[0] == DYNAMIC_COMBO:
        return [option["key"] for option in spec[1].get("options", [])]
    return None


def typed_value(where: str, spec, raw: str):
    """`raw` (the text after '=') as the input's type, within its range; a UserError naming `where` otherwise.
    A combo's value is checked, with every other combo of the workflow, by check_against_server."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if combo_options(spec) is not None:
        return raw
    if kind == "STRING":
        return raw
    if kind == "BOOLEAN":
        if raw.lower() not in ("true", "false"):
            raise UserError(f"--set {where}={raw}: {where} is a boolean; use true or false", 3)
        return raw.lower() == "true"
    if kind not in ("INT", "FLOAT"):
        raise UserError(f"--set {where}={raw}: {where} is a connection ({kind}), not a value; it cannot be set", 3)
    try:
        value = int(raw) if kind == "INT" else float(raw)
    except ValueError:
        article = "an integer" if kind == "INT" else "a number"
        raise UserError(f"--set {where}={raw}: {where} must be {article}, got '{raw}'", 3) from None
    low, high = options.get("min"), options.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UserError(f"--set {where}={raw}: {where} must be between {low} and {high}", 3)
    return value


def parse_set(item: str) -> tuple:
    """NODE.INPUT=VALUE -> (NODE, INPUT, raw VALUE). INPUT may itself hold a dot (a dynamic combo's `mode.x`)."""
    target, equals, raw = item.partition("=")
    node_key, dot, name = target.partition(".")
    if not equals or not dot or not node_key or not name:
        raise UserError(f"--set '{item}' must look like NODE.INPUT=VALUE (NODE: a node id, title or class)", 3)
    return node_key, name, raw


def apply_sets(prompt: dict, sets: list, object_info: dict) -> None:
    """Every --set checked against the workflow (the key names one node) and /object_info (the input exists, the
    value has its type and lies in its range or options) before anything is changed or queued."""
    for item in sets:
        node_key, name, raw = parse_set(item)
        nid = one_node(prompt, node_key, item)
        class_type = prompt[nid]["class_type"]
        info = object_info.get(class_type)
        if info is None:
            raise UserError(f"node type '{class_type}' ({node_title(prompt, nid)}) is not installed on the "
                            "server; install the pack that provides it and restart ComfyUI", BAD_INPUT_EXIT)
        specs = input_specs(info, prompt[nid]["inputs"])
        if name not in specs:
            widgets = [n for n, spec in specs.items() if is_widget(spec)]
            raise UserError(f"--set {item}: {class_type} has no input '{name}' (its inputs: "
                            f"{', '.join(widgets)})", BAD_INPUT_EXIT)
        prompt[nid]["inputs"][name] = typed_value(f"{node_key}.{name}", specs[name], raw)


def apply_overrides(prompt: dict, args, object_info: dict) -> None:
    for which, text in (("positive", args.prompt), ("negative", args.negative)):
        if text is not None:
            prompt[prompt_text_node(prompt, which)]["inputs"]["text"] = text
    named = {"CheckpointLoaderSimple": ("ckpt_name", args.checkpoint),
             "ControlNetLoader": ("control_net_name", args.controlnet), "Rerender_KeyframeSampler": ("seed", args.seed)}
    for node_key, (name, value) in named.items():
        if value is not None:
            set_input(prompt, node_key, name, value)
    apply_sets(prompt, args.set, object_info)


def check_against_server(prompt: dict, object_info: dict, uploading=frozenset(), host: str = "the server") -> None:
    """Missing node types, model files and combo values, named, before anything is uploaded or runs on the server.
    `uploading`: the (node id, input) pairs whose file is not uploaded yet; `host`: where the workflow runs, as the
    messages name it (the server, the embedded host, a worker)."""
    for nid, node in prompt.items():
        title = node_title(prompt, nid)
        info = object_info.get(node["class_type"])
        if info is None:
            raise UserError(f"node type '{node['class_type']}' ({title}) is not installed on {host}; install "
                            "the pack that provides it and restart ComfyUI", 3)
        specs = input_specs(info, node["inputs"])
        for name, value in node["inputs"].items():
            options = combo_options(specs[name]) if name in specs else None
            if options is None or isinstance(value, list) or value in options or (nid, name) in uploading:
                continue
            if name in MODEL_FOLDERS:
                raise UserError(f"model file '{value}' ({title}.{name}) is not on {host}; put it in "
                                f"ComfyUI/models/{MODEL_FOLDERS[name]} or choose one of: "
                                f"{', '.join(map(str, options[:8])) or 'none available'}", 3)
            raise UserError(f"'{value}' is not a valid {title}.{name}; choose one of: "
                            f"{', '.join(map(str, options[:8]))}", 3)


def read_workflow(path: Path) -> dict:
    """An API-format workflow; a UI-format one (saved from the editor) is refused in one line."""
    try:
        prompt = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read the workflow '{path}': {error}", 3)
    if isinstance(prompt, dict) and isinstance(prompt.get("nodes"), list):
        raise UserError(f"'{path}' is a UI-format workflow (as the editor saves it); give its API-format twin "
                        f"(workflows/api/) or one exported with the editor's 'Export (API)'", 3)
    if not isinstance(prompt, dict) or not all(isinstance(n, dict) and "class_type" in n for n in prompt.values()):
        raise UserError(f"'{path}' is not an API-format workflow ({{node id: {{class_type, inputs}}}})", 3)
    return prompt


def server_url(text: str) -> str:
    """The server's base URL; a bare host:port gets http://."""
    text = text.strip().rstrip("/")
    return text if "://" in text else f"http://{text}"


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


# What a node's progress bar counts, where it is not plain sampling steps.
PROGRESS_UNITS = {"Rerender_KeyframeSampler": "sampling steps of every key frame, plus pixel-aware fusion's second "
                                              "pass from its start",
                  "Rerender_FrescoKeyFrames": "sampling steps of every key frame batch",
                  "Rerender_PatchPropagator": "frames propagated"}
UI_REPORT_KEYS = ("text", "rerender_notes")
VIDEO_SAVERS = ("SaveVideo", "SaveWEBM", "SaveAnimatedWEBP", "SaveAnimatedPNG")


class ProgressLine:
    """The run as it goes: the running node, a bar with elapsed time and ETA, the key frame being rendered, the
    queue position while the prompt waits, and the nodes' reports. On a terminal one line redrawn in place; in a
    log (not a terminal) plain lines, the bar at every tenth of it, with no carriage return or escape code."""

    def __init__(self, prompt: dict, stream=sys.stderr):
        self.titles = {nid: node.get("_meta", {}).get("title", node["class_type"]) for nid, node in prompt.items()}
        self.classes = {nid: node["class_type"] for nid, node in prompt.items()}
        self.stream, self.tty = stream, stream.isatty()
        self.node, self.detail, self.started = None, "", time.monotonic()
        self.node_started, self.last_tenth, self.explained = self.started, None, set()

    def write(self, text: str, redraw: bool = False) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[2K{text}" if redraw else f"\r\x1b[2K{text}\n")
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def bar(self, value, maximum) -> str:
        elapsed = time.monotonic() - self.node_started
        eta = f", ETA {format_duration(elapsed * (maximum - value) / value)}" if 0 < value < maximum else ""
        filled = int(30 * value / maximum)
        return (f" [{'#' * filled}{'.' * (30 - filled)}] {value}/{maximum} ({format_duration(elapsed)} elapsed"
                f"{eta}; total {format_duration(time.monotonic() - self.started)})")

    def show(self, value=None, maximum=None):
        title = self.titles.get(self.node, self.node or "")
        bar = self.bar(value, maximum) if value is not None and maximum else ""
        if self.tty:
            self.write(f"{title}{bar}{self.detail}", redraw=True)
            return
        tenth = None if not bar else int(10 * value / maximum)
        if bar and tenth == self.last_tenth:
            return
        self.last_tenth = tenth
        self.write(f"{title}{bar}{self.detail}")

    def explain_units(self, maximum) -> None:
        """Once per node: what its bar counts, where that is not plain steps."""
        units = PROGRESS_UNITS.get(self.classes.get(self.node))
        if units and self.node not in self.explained:
            self.explained.add(self.node)
            self.write(f"{self.titles[self.node]}: the bar counts {units} ({maximum} in all)")

    def waiting(self, ahead: int) -> None:
        self.write(f"waiting in the server's queue: {ahead} prompt{'s' * (ahead != 1)} ahead "
                   f"({format_duration(time.monotonic() - self.started)} so far)", redraw=True)

    def report(self, node_id: str, output: dict) -> None:
        """The lines a node shows on itself in the editor (its ui text and notes), printed under its title."""
        for key in UI_REPORT_KEYS:
            for text in output.get(key) or []:
                for line in str(text).splitlines():
                    self.write(f"{self.titles.get(node_id, node_id)}: {line}")

    def handle(self, message: dict) -> None:
        kind, data = message["type"], message.get("data", {})
        if kind == "executing" and data.get("node"):
            self.node, self.detail = data["node"], ""
            self.node_started, self.last_tenth = time.monotonic(), None
            self.show()
        elif kind == "progress":
            self.node = data.get("node", self.node)
            self.explain_units(data["max"])
            self.show(data["value"], data["max"])
        elif kind == "rerender.keyframe_progress":
            self.detail = (f"  {data['text']}" if "text" in data else
                           f"  key frame {data['key_frame'] + 1}/{data['total']} (frame {data['frame_index']})")
            self.show()
        elif kind == "executed" and data.get("output"):
            self.report(data.get("node"), data["output"])

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def get_json(session, url: str):
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def cancel_own_prompt(session, url: str, prompt_id: str) -> None:
    """Take this client's prompt off the queue if it waits, and interrupt it if it runs; the host's targeted
    /interrupt leaves any other client's running prompt alone."""
    async with session.post(f"{url}/queue", json={"delete": [prompt_id]}):
        pass
    async with session.post(f"{url}/interrupt", json={"prompt_id": prompt_id}):
        pass


async def prompts_ahead(session, url: str, prompt_id: str):
    """How many prompts run or wait before this one on the server; None once it runs or has left the queue."""
    queue = await get_json(session, f"{url}/queue")
    running = [entry[1] for entry in queue.get("queue_running", [])]
    pending = sorted(queue.get("queue_pending", []), key=lambda entry: entry[0])
    order = running + [entry[1] for entry in pending]
    if prompt_id in running or prompt_id not in order:
        return None
    return order.index(prompt_id)


async def follow(ws, prompt_id: str, progress: "ProgressLine", queue_position) -> None:
    """Websocket messages of this prompt until it ends; a failure or an interrupt on the server is a UserError,
    a closed connection a lost server. `queue_position()` is awaited while the prompt has not started."""
    started = False
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        message = json.loads(msg.data)
        data = message.get("data", {})
        if message["type"] == "status" and not started:
            ahead = await queue_position()
            if ahead:
                progress.waiting(ahead)
            continue
        if data.get("prompt_id", prompt_id) != prompt_id:
            continue
        started = started or message["type"] in ("execution_start", "execution_cached", "executing")
        progress.handle(message)
        if message["type"] == "execution_error":
            progress.close()
            raise UserError(f"{data.get('node_type')} failed: {data.get('exception_message', '').strip()}", 1)
        if message["type"] == "execution_interrupted":
            progress.close()
            raise UserError("the run was interrupted on the server", 1)
        if message["type"] == "executing" and data.get("node") is None:
            return
    raise aiohttp.ServerDisconnectedError("the websocket closed before the prompt finished")


def check_video_file(path: Path) -> None:
    """The input exists and is a video by its name, as the host's Load Video lists input files (by MIME type), so
    that an image or a typo is named here and not as a missing Load Video option."""
    if not path.is_file():
        raise UserError(f"input video '{path}' does not exist", BAD_INPUT_EXIT)
    kind = mimetypes.guess_type(path.name)[0] or "unknown type"
    if not kind.startswith("video/"):
        raise UserError(f"--video '{path}' is not a video file ({kind}); give a video (.mp4, .webm, .mov, .mkv, "
                        f"...); Load Video lists only those", BAD_INPUT_EXIT)


def rejection_lines(body: dict, prompt: dict) -> list:
    """One line per distinct problem in a POST /prompt refusal. The host repeats a node's validate_inputs message
    once for every input the check takes (`input - message`); each message is kept once, named by its input when
    only one input carries it."""
    lines = []
    for nid, entry in body.get("node_errors", {}).items():
        title = node_title(prompt, nid) if nid in prompt else entry.get("class_type", nid)
        by_message = {}
        for error in entry.get("errors", []):
            name = error.get("extra_info", {}).get("input_name", "")
            reason = str(error.get("details", ""))
            for prefix in (f"{name} - ", f"{name}: "):           # the host's details start with the input's name
                reason = reason.removeprefix(prefix) if name else reason
            reason = "" if reason == name else reason
            if error.get("type") != "custom_validation_failed":
                reason = f"{error.get('message', '')}: {reason}" if reason else error.get("message", "")
            by_message.setdefault(reason, []).append(name)
        for text, names in by_message.items():
            where = f"{title}.{names[0]}" if len(names) == 1 and names[0] else title
            lines.append(f"{where}: {text.removeprefix(f'{title}: ')}")
    return lines or [body.get("error", {}).get("message", str(body))]


def job_targets(prompt: dict) -> dict:
    """The POST /prompt fields that make the server run only what saves the video (and what it needs). The host
    runs every output whose own inputs are valid, so without this a workflow with previews would run its flow
    preview past a refused sampler instead of being refused; the previews are for the editor."""
    savers = [nid for nid, node in prompt.items() if node["class_type"] in VIDEO_SAVERS]
    return {"partial_execution_targets": savers} if savers else {}


async def upload_video(session, url: str, path: Path) -> str:
    """Upload the clip to the server's input/ without overwriting: the host keeps a same-named file and stores a
    different clip as `name (1).ext` (an identical one is reused). Returns the name Load Video takes."""
    form = aiohttp.FormData()
    form.add_field("image", path.read_bytes(), filename=path.name)
    form.add_field("type", "input")
    async with session.post(f"{url}/upload/image", data=form) as response:
        if response.status != 200:
            raise UserError(f"the server refused the video upload: HTTP {response.status}", BAD_INPUT_EXIT)
        uploaded = await response.json()
    return f"{uploaded['subfolder']}/{uploaded['name']}" if uploaded.get("subfolder") else uploaded["name"]


def read_job(args) -> dict:
    check_video_file(args.video)
    return read_workflow(args.workflow)


async def run(args) -> Path:
    prompt = read_job(args)
    url = server_url(args.server)
    client_id = uuid.uuid4().hex
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            object_info = await get_json(session, f"{url}/object_info")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            raise UserError(f"no ComfyUI server answers at {url} ({type(error).__name__}); start it with "
                            "'python main.py --listen 127.0.0.1' or pass --server HOST:PORT", 2)
        apply_overrides(prompt, args, object_info)
        video_inputs = {(nid, "file") for nid in find_nodes(prompt, "LoadVideo")}
        check_against_server(prompt, object_info, uploading=video_inputs)
        video_name = await upload_video(session, url, args.video)
        set_input(prompt, "LoadVideo", "file", video_name)
        check_against_server(prompt, await get_json(session, f"{url}/object_info"))

        progress = ProgressLine(prompt)
        async with session.ws_connect(f"{url}/ws?clientId={client_id}", heartbeat=30) as ws:
            request = {"prompt": prompt, "client_id": client_id, **job_targets(prompt)}
            async with session.post(f"{url}/prompt", json=request) as response:
                body = await response.json()
                if response.status != 200:
                    raise UserError("\n".join(f"the server rejected the workflow: {line}"
                                              for line in rejection_lines(body, prompt)), BAD_INPUT_EXIT)
                prompt_id = body["prompt_id"]
            print(f"run_headless: queued prompt {prompt_id}", file=sys.stderr, flush=True)
            try:
                ahead = await prompts_ahead(session, url, prompt_id)
                if ahead:
                    progress.waiting(ahead)
                await follow(ws, prompt_id, progress, lambda: prompts_ahead(session, url, prompt_id))
            except asyncio.CancelledError:           # a stop signal: run_until_stopped cancels this task
                progress.close()
                await cancel_own_prompt(session, url, prompt_id)
                raise
        progress.close()

        entry = (await get_json(session, f"{url}/history/{prompt_id}"))[prompt_id]
        videos = [item for output in entry["outputs"].values() if output.get("animated")
                  for item in output.get("images", [])]
        if not videos:
            raise UserError("the workflow finished but saved no video (does it end in a Save Video node?)", 1)
        video = videos[-1]
        params = {"filename": video["filename"], "subfolder": video["subfolder"], "type": video["type"]}
        async with session.get(f"{url}/view", params=params) as response:
            response.raise_for_status()
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_bytes(await response.read())
    return args.output


class Stopped(Exception):
    """The job was stopped by a signal, after its own prompts were cancelled on the server."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def run_until_stopped(args) -> Path:
    """`run`, cancelled by SIGINT, SIGTERM or SIGHUP (Ctrl-C, a closed terminal, `timeout`, a job scheduler), so
    that every way of stopping takes this client's prompt off the server; a connection lost mid-run is one line."""
    loop, task, received = asyncio.get_running_loop(), asyncio.current_task(), []

    def stop(signum):
        received.append(signum)
        task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await run(args)
    except asyncio.CancelledError:
        if received:
            raise Stopped(received[0]) from None
        raise
    except (aiohttp.ClientConnectionError, ConnectionError) as error:
        raise UserError(f"lost the ComfyUI server during the run ({type(error).__name__}: {error}); restart it "
                        "and run again", LOST_SERVER_EXIT) from None
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.cluster:
            from . import scale_out
            output = scale_out.run(args, read_job(args))
        else:
            output = asyncio.run(run_until_stopped(args))
    except UserError as error:
        for line in str(error).splitlines():
            print(f"run_headless: {line}", file=sys.stderr)
        return error.code
    except (Stopped, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        name = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"run_headless: {name}; this client's prompt was taken off the server's queue or stopped",
              file=sys.stderr)
        return 128 + signum
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
