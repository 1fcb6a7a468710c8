"""Queue a Rerender workflow on a running ComfyUI server, headless, and write the output video.

    python -m rerender_cli.run_headless --video input.mp4 --output styled.mp4 --prompt "a van gogh painting"

Uploads the video, checks every model file and node the workflow names against the server before queueing,
queues it (POST /prompt), follows the websocket with a progress bar, and downloads the saved video.
With `--cluster tcp://HOST:8786` (a Dask scheduler) or `--cluster local:N` the job runs on a Dask cluster instead
(see scale_out.py): key frames on a worker with the diffusion model, propagation intervals on any worker.
Needs `aiohttp` (installed with ComfyUI). Exit codes: 0 done, 1 the workflow failed, 2 no server, 3 bad input
(nothing queued), 130 interrupted with Ctrl-C (this client's prompt is taken off the queue or stopped).
"""
import argparse
import asyncio
import json
import sys
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
INTERRUPTED_EXIT = 130


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
                        help="override any widget input; NODE is a node id, title or class; checked against the "
                             "server's node definitions (name, type, range) before anything is queued")
    return parser.parse_args(argv)


def find_nodes(prompt: dict, key: str) -> list:
    """Node ids whose id, title or class type is `key`."""
    return [nid for nid, node in prompt.items()
            if key in (nid, node.get("_meta", {}).get("title"), node["class_type"])]


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
    """`raw` (the text after '=') as the input's type, within its range; a UserError naming `where` otherwise."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if combo_options(spec) is not None:
        return raw                                   # its options are checked with the model files
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
    """Every --set checked against the workflow (the node exists) and /object_info (the input exists, the value
    has its type and lies in its range) before anything is changed or queued."""
    for item in sets:
        node_key, name, raw = parse_set(item)
        ids = find_nodes(prompt, node_key)
        if not ids:
            known = sorted({node["class_type"] for node in prompt.values()})
            raise UserError(f"--set {item}: the workflow has no node '{node_key}' (a node id, title or class; "
                            f"its classes: {', '.join(known)})", 3)
        for nid in ids:
            class_type = prompt[nid]["class_type"]
            info = object_info.get(class_type)
            if info is None:
                raise UserError(f"node type '{class_type}' ({node_title(prompt, nid)}) is not installed on the "
                                "server; install the pack that provides it and restart ComfyUI", 3)
            specs = input_specs(info)
            where = f"{node_key}.{name}"
            if name not in specs:
                widgets = [n for n, s in specs.items() if s[0] in WIDGET_TYPES or isinstance(s[0], list)]
                raise UserError(f"--set {item}: {class_type} has no input '{name}' (its inputs: "
                                f"{', '.join(widgets)})", 3)
            prompt[nid]["inputs"][name] = typed_value(where, specs[name], raw)


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


def check_against_server(prompt: dict, object_info: dict) -> None:
    """Missing node types and model files, named, before anything runs on the server."""
    for nid, node in prompt.items():
        title = node_title(prompt, nid)
        info = object_info.get(node["class_type"])
        if info is None:
            raise UserError(f"node type '{node['class_type']}' ({title}) is not installed on the server; install "
                            "the pack that provides it and restart ComfyUI", 3)
        specs = input_specs(info, node["inputs"])
        for name, value in node["inputs"].items():
            options = combo_options(specs[name]) if name in specs else None
            if options is None or isinstance(value, list) or value in options:
                continue
            if name in MODEL_FOLDERS:
                raise UserError(f"model file '{value}' ({title}.{name}) is not on the server; put it in "
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


class ProgressLine:
    """One terminal line: the running node, a bar for its progress, and the key frame being rendered."""

    def __init__(self, prompt: dict, stream=sys.stderr):
        self.titles = {nid: node.get("_meta", {}).get("title", node["class_type"]) for nid, node in prompt.items()}
        self.stream, self.node, self.detail = stream, None, ""

    def show(self, value=None, maximum=None):
        title = self.titles.get(self.node, self.node or "")
        bar = ""
        if value is not None and maximum:
            filled = int(30 * value / maximum)
            bar = f" [{'#' * filled}{'.' * (30 - filled)}] {value}/{maximum}"
        self.stream.write(f"\r\x1b[2K{title}{bar}{self.detail}")
        self.stream.flush()

    def handle(self, message: dict) -> None:
        kind, data = message["type"], message.get("data", {})
        if kind == "executing" and data.get("node"):
            self.node, self.detail = data["node"], ""
            self.show()
        elif kind == "progress":
            self.node = data.get("node", self.node)
            self.show(data["value"], data["max"])
        elif kind == "rerender.keyframe_progress":
            self.detail = (f"  {data['text']}" if "text" in data else
                           f"  key frame {data['key_frame'] + 1}/{data['total']} (frame {data['frame_index']})")
            self.show()

    def close(self):
        self.stream.write("\n")


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


async def follow(ws, prompt_id: str, progress: "ProgressLine") -> None:
    """Websocket messages of this prompt until it ends; a failure or an interrupt on the server is a UserError."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        message = json.loads(msg.data)
        data = message.get("data", {})
        if data.get("prompt_id", prompt_id) != prompt_id:
            continue
        progress.handle(message)
        if message["type"] == "execution_error":
            progress.close()
            raise UserError(f"{data.get('node_type')} failed: {data.get('exception_message', '').strip()}", 1)
        if message["type"] == "execution_interrupted":
            progress.close()
            raise UserError("the run was interrupted on the server", 1)
        if message["type"] == "executing" and data.get("node") is None:
            return


def read_job(args) -> dict:
    if not args.video.is_file():
        raise UserError(f"input video '{args.video}' does not exist", 3)
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
                            "'python main.py --listen' or pass --server HOST:PORT", 2)
        apply_overrides(prompt, args, object_info)

        form = aiohttp.FormData()
        form.add_field("image", args.video.read_bytes(), filename=args.video.name)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        async with session.post(f"{url}/upload/image", data=form) as response:
            if response.status != 200:
                raise UserError(f"the server refused the video upload: HTTP {response.status}", 3)
            uploaded = await response.json()
        video_name = f"{uploaded['subfolder']}/{uploaded['name']}" if uploaded.get("subfolder") else uploaded["name"]
        set_input(prompt, "LoadVideo", "file", video_name)
        check_against_server(prompt, await get_json(session, f"{url}/object_info"))

        progress = ProgressLine(prompt)
        async with session.ws_connect(f"{url}/ws?clientId={client_id}", heartbeat=30) as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                body = await response.json()
                if response.status != 200:
                    errors = [f"{e.get('class_type')}: {err.get('message')} {err.get('details', '')}".strip()
                              for e in body.get("node_errors", {}).values() for err in e.get("errors", [])]
                    raise UserError("the server rejected the workflow: "
                                    + ("; ".join(errors) or body.get("error", {}).get("message", str(body))), 3)
                prompt_id = body["prompt_id"]
            print(f"run_headless: queued prompt {prompt_id}", file=sys.stderr, flush=True)
            try:
                await follow(ws, prompt_id, progress)
            except asyncio.CancelledError:           # Ctrl-C: asyncio.run cancels this task
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.cluster:
            from . import scale_out
            output = scale_out.run(args, read_job(args))
        else:
            output = asyncio.run(run(args))
    except UserError as error:
        print(f"run_headless: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("run_headless: interrupted; this client's prompt was taken off the server's queue or stopped",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
