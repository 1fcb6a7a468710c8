"""Queue a Rerender workflow on a running ComfyUI server, headless, and write the output video.

    python workflows/run_headless.py --video input.mp4 --output styled.mp4 --prompt "a van gogh painting"

Uploads the video, checks every model file and node the workflow names against the server before queueing,
queues it (POST /prompt), follows the websocket with a progress bar, and downloads the saved video.
Needs `aiohttp` (installed with ComfyUI). Exit codes: 0 done, 1 the workflow failed, 2 no server, 3 bad input.
"""
import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
DEFAULT_WORKFLOW = HERE / "rerender_full_pipeline_api.json"
CONNECT_TIMEOUT_S = 10
# Combo inputs whose values are model files, with the models/ folder a user must put them in.
MODEL_FOLDERS = {"ckpt_name": "checkpoints", "lora_name": "loras", "control_net_name": "controlnet",
                 "vae_name": "vae or vae_approx", "model_name": "optical_flow", "unet_name": "diffusion_models",
                 "clip_name": "text_encoders"}


class UserError(Exception):
    """A problem the user can fix; printed as one line with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True, type=Path, help="input video file")
    parser.add_argument("--output", required=True, type=Path, help="where to write the output video")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI server URL")
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW, type=Path, help="API-format workflow JSON")
    parser.add_argument("--prompt", help="positive prompt (the text encoder wired to the sampler's positive input)")
    parser.add_argument("--negative", help="negative prompt (the text encoder wired to its negative input)")
    parser.add_argument("--checkpoint", help="checkpoint file name in models/checkpoints")
    parser.add_argument("--controlnet", help="ControlNet file name in models/controlnet")
    parser.add_argument("--seed", type=int, help="sampler seed")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override any input; NODE is a node id or title, VALUE is JSON or text")
    return parser.parse_args(argv)


def find_nodes(prompt: dict, key: str) -> list:
    """Node ids whose id, title or class type is `key`."""
    return [nid for nid, node in prompt.items()
            if key in (nid, node.get("_meta", {}).get("title"), node["class_type"])]


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


def apply_overrides(prompt: dict, args, video_name: str) -> None:
    set_input(prompt, "LoadVideo", "file", video_name)
    for which, text in (("positive", args.prompt), ("negative", args.negative)):
        if text is not None:
            prompt[prompt_text_node(prompt, which)]["inputs"]["text"] = text
    named = {"CheckpointLoaderSimple": ("ckpt_name", args.checkpoint),
             "ControlNetLoader": ("control_net_name", args.controlnet), "Rerender_KeyframeSampler": ("seed", args.seed)}
    for node_key, (name, value) in named.items():
        if value is not None:
            set_input(prompt, node_key, name, value)
    for item in args.set:
        target, _, raw = item.partition("=")
        node_key, _, name = target.rpartition(".")
        if not node_key or not name or not _:
            raise UserError(f"--set '{item}' must look like NODE.INPUT=VALUE", 3)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        set_input(prompt, node_key, name, value)


def combo_options(spec):
    """The allowed values of a combo input spec from /object_info, or None for other inputs."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def check_against_server(prompt: dict, object_info: dict) -> None:
    """Missing node types and model files, named, before anything runs on the server."""
    for nid, node in prompt.items():
        title = node.get("_meta", {}).get("title", node["class_type"])
        info = object_info.get(node["class_type"])
        if info is None:
            raise UserError(f"node type '{node['class_type']}' ({title}) is not installed on the server; install "
                            "the pack that provides it and restart ComfyUI", 3)
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
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
            self.detail = f"  key frame {data['key_frame'] + 1}/{data['total']} (frame {data['frame_index']})"
            self.show()

    def close(self):
        self.stream.write("\n")


async def run(args) -> Path:
    if not args.video.is_file():
        raise UserError(f"input video '{args.video}' does not exist", 3)
    try:
        prompt = json.loads(args.workflow.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read the workflow '{args.workflow}': {error}", 3)
    url = args.server.rstrip("/")
    client_id = uuid.uuid4().hex
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(f"{url}/system_stats") as response:
                response.raise_for_status()
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise UserError(f"no ComfyUI server answers at {url} ({type(error).__name__}); start it with "
                            "'python main.py --listen' or pass --server URL", 2)

        form = aiohttp.FormData()
        form.add_field("image", args.video.read_bytes(), filename=args.video.name)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        async with session.post(f"{url}/upload/image", data=form) as response:
            if response.status != 200:
                raise UserError(f"the server refused the video upload: HTTP {response.status}", 3)
            uploaded = await response.json()
        video_name = f"{uploaded['subfolder']}/{uploaded['name']}" if uploaded.get("subfolder") else uploaded["name"]
        apply_overrides(prompt, args, video_name)
        async with session.get(f"{url}/object_info") as response:
            check_against_server(prompt, await response.json())

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
                    break
        progress.close()

        async with session.get(f"{url}/history/{prompt_id}") as response:
            entry = (await response.json())[prompt_id]
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
        output = asyncio.run(run(args))
    except UserError as error:
        print(f"run_headless: {error}", file=sys.stderr)
        return error.code
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
