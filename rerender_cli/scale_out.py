"""The headless main job spread over several ComfyUI servers (`run_headless.py --servers URL,URL,...`).

Key frames depend on each other, so one server renders them all (the user's workflow up to the Key Frame Sampler).
The propagation intervals between consecutive key frames are independent: each becomes its own API workflow (the
interval's frames cut from the video, Flow Estimation, a Key Frame Picker listing the interval's two ends, the two
rendered key frames, Patch Propagator with its seed shifted by the interval's first frame, as the whole-clip run
seeds every frame by its index) queued on whichever server is free. A server whose connection fails, whose
websocket closes or stops answering pings is dropped and the intervals it held go back to the queue for the
others; every interval is taken once from the first result that arrives. Finally one server turns the frames, in
order, into the video with the workflow's own output nodes.

Nothing is shared but HTTP: inputs go up through /upload/image, outputs come down through /view. Images travel as
32-bit float EXR (Save Image (Advanced), read back by Load Image), so the video equals the one-server run's bit for
bit: the host reads an EXR back exactly when its width is a multiple of 32, so frames of other widths are padded
to one (Pad Image for Outpainting) before the transfer and cropped back (Image Crop) after it.
"""
import asyncio
import copy
import hashlib
import json
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import run_headless as headless
from .errors import UserError

PROPAGATOR = "Rerender_PatchPropagator"
PICKER = "Rerender_KeyframePicker"
FLOW = "Rerender_FlowEstimation"
PICKER_INDICES_OUTPUT = 2       # Key Frame Picker's "indices" (text) output
BATCH_LIMIT = 50                # Batch Images takes at most 50 inputs: larger clips are batched in a tree
PROMPTS_PER_SERVER = 2          # one running, one waiting, so a server never idles while the client transfers
HEARTBEAT_S = 20                # websocket ping period; no pong within half of it = the server is gone
EXR_WIDTH_ALIGN = 32            # the host's decoder re-samples EXRs of other widths (not bit-exact)
SEED_MAX = 0xFFFFFFFF
UPLOAD_LOADERS = {"LoadImage", "LoadVideo"}   # their file lists change as this job uploads
EXR_FORMAT = {"format": "exr", "format.bit_depth": "32-bit float", "format.input_color_space": "linear"}


class ServerLost(Exception):
    """The server stopped answering (connection refused or reset, websocket closed, ping timeout)."""


# ---- the workflow as a graph ------------------------------------------------------------------------------------
def links(node: dict):
    """(input name, [source id, output index]) for every linked input of an API-format node."""
    for name, value in node["inputs"].items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            yield name, value


def upstream(prompt: dict, roots) -> set:
    """The ids of `roots` and of every node they read from, transitively."""
    seen, stack = set(), list(roots)
    while stack:
        nid = stack.pop()
        if nid not in seen:
            seen.add(nid)
            stack.extend(source for _, (source, _) in links(prompt[nid]))
    return seen


def downstream(prompt: dict, root: str) -> set:
    """The ids of every node that reads `root`'s outputs, transitively (without `root`)."""
    return {nid for nid in prompt if nid != root and root in upstream(prompt, [nid])}


def copy_nodes(prompt: dict, ids) -> dict:
    return {nid: copy.deepcopy(prompt[nid]) for nid in ids}


def node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


@dataclass
class Pipeline:
    """Where the stages sit in the user's workflow (node ids, and the links into Patch Propagator)."""
    prompt: dict
    propagator: str
    picker: str
    flow: str
    frames: list
    key_images: list
    seed: int

    @classmethod
    def find(cls, prompt: dict) -> "Pipeline":
        found = [nid for nid, n in prompt.items() if n["class_type"] == PROPAGATOR]
        if len(found) != 1:
            raise UserError(f"--servers needs a workflow with exactly one Patch Propagator; this one has "
                            f"{len(found)}", 3)
        propagator = found[0]
        inputs = dict(links(prompt[propagator]))
        missing = [name for name in ("frames", "keyframes", "key_frame_images", "flow") if name not in inputs]
        if missing:
            raise UserError(f"--servers: Patch Propagator's {', '.join(missing)} must be connected", 3)
        picker, flow = inputs["keyframes"][0], inputs["flow"][0]
        if prompt[picker]["class_type"] != PICKER:
            raise UserError("--servers: Patch Propagator's keyframes must come straight from a Key Frame Picker "
                            "(its key frame indices split the video into intervals)", 3)
        if prompt[flow]["class_type"] != FLOW or prompt[flow]["inputs"].get("frames") != inputs["frames"]:
            raise UserError("--servers: Patch Propagator's flow must come from a Flow Estimation of the same frames "
                            "(each interval estimates its own part of it)", 3)
        seed = prompt[propagator]["inputs"].get("seed", 0)
        if not isinstance(seed, int):
            raise UserError("--servers: Patch Propagator's seed must be a value, not a connection", 3)
        return cls(prompt, propagator, picker, flow, inputs["frames"], inputs["key_frame_images"], seed)


def exr_save(image_link: list, prefix: str, width: int) -> dict:
    """Nodes saving `image_link` as float EXR, padded on the right to a width the host reads back exactly."""
    nodes, link = {}, image_link
    pad = -width % EXR_WIDTH_ALIGN
    if pad:
        nodes["scaleout_pad"] = node("ImagePadForOutpaint", "Pad for exact transfer", image=link, left=0, top=0,
                                     right=pad, bottom=0, feathering=0)
        link = ["scaleout_pad", 0]
    nodes["scaleout_save"] = node("SaveImageAdvanced", "Save for transfer", images=link, filename_prefix=prefix,
                                  **EXR_FORMAT)
    return nodes


def exr_load(nid: str, name: str, width: int, height: int) -> tuple:
    """(nodes, link) loading one transferred EXR, cropped back to the frame's width."""
    nodes = {nid: node("LoadImage", "Load transferred image", image=name)}
    if -width % EXR_WIDTH_ALIGN == 0:
        return nodes, [nid, 0]
    nodes[f"{nid}_crop"] = node("ImageCrop", "Crop padding", image=[nid, 0], width=width, height=height, x=0, y=0)
    return nodes, [f"{nid}_crop", 0]


def key_stage_prompt(pipeline: Pipeline, prefix: str, width: int) -> dict:
    """The workflow up to the key frames: the rendered key frames saved, the key indices and frame count shown."""
    prompt = pipeline.prompt
    out = copy_nodes(prompt, upstream(prompt, [pipeline.key_images[0], pipeline.picker, pipeline.frames[0]]))
    out.update(exr_save(pipeline.key_images, prefix, width))
    out["scaleout_indices"] = node("PreviewAny", "Key frame indices", source=[pipeline.picker, PICKER_INDICES_OUTPUT])
    out["scaleout_size"] = node("GetImageSize", "Frame count", image=pipeline.frames)
    out["scaleout_count"] = node("PreviewAny", "Frame count", source=["scaleout_size", 2])
    return out


def size_prompt(pipeline: Pipeline) -> dict:
    """The frames' width and height, before anything else runs (the transfers depend on the width)."""
    prompt = pipeline.prompt
    out = copy_nodes(prompt, upstream(prompt, [pipeline.frames[0]]))
    out["scaleout_size"] = node("GetImageSize", "Frame size", image=pipeline.frames)
    out["scaleout_width"] = node("PreviewAny", "Frame width", source=["scaleout_size", 0])
    out["scaleout_height"] = node("PreviewAny", "Frame height", source=["scaleout_size", 1])
    return out


@dataclass(frozen=True)
class Segment:
    """Frames start..stop (inclusive) propagated from the key frames among them (`keys`, absolute indices)."""
    start: int
    stop: int
    keys: tuple

    @property
    def label(self) -> str:
        return f"{self.start}-{self.stop}"

    @property
    def propagated(self) -> list:
        return [i for i in range(self.start, self.stop + 1) if i not in self.keys]


def segments(key_indices: list, num_frames: int) -> list:
    """What Patch Propagator does on the whole clip, cut into independent parts: the frames before the first key
    frame, each interval between consecutive key frames with frames in between, the frames after the last one."""
    parts = []
    if key_indices[0] > 0:
        parts.append(Segment(0, key_indices[0], (key_indices[0],)))
    parts += [Segment(a, b, (a, b)) for a, b in zip(key_indices, key_indices[1:]) if b - a >= 2]
    if key_indices[-1] < num_frames - 1:
        parts.append(Segment(key_indices[-1], num_frames - 1, (key_indices[-1],)))
    return parts


def segment_prompt(pipeline: Pipeline, segment: Segment, key_files: dict, prefix: str, width: int,
                   height: int) -> dict:
    """One interval as its own workflow: its frames cut from the video, its flow, its key frames, Patch Propagator
    with the seed its first frame has in the whole-clip run (which seeds each frame by its index)."""
    prompt = pipeline.prompt
    out = copy_nodes(prompt, upstream(prompt, [pipeline.frames[0]]))
    flow = prompt[pipeline.flow]
    out.update(copy_nodes(prompt, upstream(prompt, [source for name, (source, _) in links(flow) if name != "frames"])))
    frames = ["scaleout_frames", 0]
    out["scaleout_frames"] = node("ImageFromBatch", "Interval frames", image=pipeline.frames,
                                  batch_index=segment.start, length=segment.stop - segment.start + 1)
    out[pipeline.flow] = dict(copy.deepcopy(flow), inputs=dict(flow["inputs"], frames=frames))
    picker = prompt[pipeline.picker]
    local_keys = ",".join(str(k - segment.start) for k in segment.keys)
    out[pipeline.picker] = dict(copy.deepcopy(picker), inputs=dict(picker["inputs"], frames=frames, mode="list",
                                                                    index_list=local_keys))
    key_links = []
    for k in segment.keys:
        nodes, link = exr_load(f"scaleout_key_{k}", key_files[k], width, height)
        out.update(nodes)
        key_links.append(link)
    if len(key_links) > 1:
        out["scaleout_keys"] = node("BatchImagesNode", "Interval key frames",
                                    **{f"images.image{i}": link for i, link in enumerate(key_links)})
        key_links = [["scaleout_keys", 0]]
    propagator = prompt[pipeline.propagator]
    out[pipeline.propagator] = dict(copy.deepcopy(propagator), inputs=dict(
        propagator["inputs"], frames=frames, keyframes=[pipeline.picker, 1], key_frame_images=key_links[0],
        flow=[pipeline.flow, 0], seed=pipeline.seed + segment.start))
    out.update(exr_save([pipeline.propagator, 0], prefix, width))
    return out


def batch_tree(prompt: dict, frame_links: list) -> list:
    """Batch Images nodes (at most 50 inputs each) joining `frame_links` in order; the link to the whole batch."""
    level = 0
    while len(frame_links) > 1:
        joined = []
        for group in range(0, len(frame_links), BATCH_LIMIT):
            nid = f"scaleout_batch_{level}_{group // BATCH_LIMIT}"
            prompt[nid] = node("BatchImagesNode", "Video frames", **{
                f"images.image{i}": link for i, link in enumerate(frame_links[group:group + BATCH_LIMIT])})
            joined.append([nid, 0])
        frame_links, level = joined, level + 1
    return frame_links[0]


def stitch_prompt(pipeline: Pipeline, frame_files: list, width: int, height: int) -> dict:
    """The workflow's own output nodes after Patch Propagator (Create Video, Save Video, ...), fed the frames."""
    prompt = pipeline.prompt
    after = downstream(prompt, pipeline.propagator)
    if not any(prompt[nid]["class_type"] in ("SaveVideo", "SaveImage", "SaveAnimatedWEBP", "SaveAnimatedPNG",
                                             "SaveImageAdvanced") for nid in after):
        raise UserError("--servers: nothing saves Patch Propagator's output (end the workflow in Save Video)", 3)
    out = {}
    frame_links = []
    for index, name in enumerate(frame_files):
        nodes, link = exr_load(f"scaleout_frame_{index}", name, width, height)
        out.update(nodes)
        frame_links.append(link)
    video = batch_tree(out, frame_links)
    others = set()
    for nid in after:
        inputs = dict(prompt[nid]["inputs"])
        for name, (source, _) in links(prompt[nid]):
            if source == pipeline.propagator:
                inputs[name] = video
            elif source not in after:
                others.add(source)
        out[nid] = dict(copy.deepcopy(prompt[nid]), inputs=inputs)
    out.update(copy_nodes(prompt, upstream(prompt, others)))
    return out


# ---- one server -------------------------------------------------------------------------------------------------
class Server:
    """One ComfyUI server: HTTP calls and one websocket whose messages are routed to the prompt they concern."""

    def __init__(self, url: str, session: aiohttp.ClientSession):
        self.url, self.session = url, session
        self.label = url.split("://", 1)[-1]
        self.client_id = uuid.uuid4().hex
        self.alive = False
        self.object_info = {}
        self.uploaded = set()
        self.upload_lock = asyncio.Lock()
        self.in_flight = set()
        self._outcomes = {}
        self._listeners = {}
        self._ws = self._reader = None

    async def connect(self) -> None:
        try:
            self.object_info = await headless.get_json(self.session, f"{self.url}/object_info")
            self._ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}",
                                                     heartbeat=HEARTBEAT_S)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as error:
            raise ServerLost(f"{type(error).__name__}") from None
        self.alive = True
        self._reader = asyncio.create_task(self._read())

    def _outcome(self, prompt_id: str) -> asyncio.Future:
        if prompt_id not in self._outcomes:
            self._outcomes[prompt_id] = asyncio.get_running_loop().create_future()
        return self._outcomes[prompt_id]

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                message = json.loads(msg.data)
                data = message.get("data", {})
                prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
                if prompt_id is None:
                    continue
                if prompt_id in self._listeners:
                    self._listeners[prompt_id](message)
                outcome = self._outcome(prompt_id)
                if outcome.done():
                    continue
                if message["type"] == "execution_error":
                    outcome.set_exception(UserError(
                        f"{data.get('node_type')} failed on {self.label}: "
                        f"{data.get('exception_message', '').strip()}", 1))
                elif message["type"] == "execution_interrupted":
                    outcome.set_exception(UserError(f"the run was interrupted on {self.label}", 1))
                elif message["type"] == "executing" and data.get("node") is None:
                    outcome.set_result(None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        finally:
            self.alive = False
            for outcome in self._outcomes.values():
                if not outcome.done():
                    outcome.set_exception(ServerLost("its websocket closed"))

    async def _request(self, method: str, route: str, **kwargs):
        """One HTTP call; ServerLost if it fails or if the websocket shows the server gone before it answers (a
        frozen server accepts connections but never replies, so the call alone would wait forever)."""
        if not self.alive:
            raise ServerLost("already lost")
        request = asyncio.ensure_future(self._fetch(method, route, **kwargs))
        try:
            await asyncio.wait({request, self._reader}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done():
                raise ServerLost("it stopped answering")
            return request.result()
        finally:
            request.cancel()

    async def _fetch(self, method: str, route: str, **kwargs):
        try:
            async with self.session.request(method, f"{self.url}{route}", **kwargs) as response:
                body = await response.read()
                return response.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            self.alive = False
            raise ServerLost(type(error).__name__) from None

    async def upload(self, name: str, data: bytes) -> None:
        """Put `data` into the server's input folder as `name` (once per server)."""
        async with self.upload_lock:
            if name in self.uploaded:
                return
            form = aiohttp.FormData()
            form.add_field("image", data, filename=name)
            form.add_field("type", "input")
            form.add_field("overwrite", "true")
            status, body = await self._request("POST", "/upload/image", data=form)
            if status != 200:
                raise UserError(f"{self.label} refused the upload of {name}: HTTP {status}", 3)
            self.uploaded.add(name)

    async def check(self, prompt: dict) -> None:
        """Nodes and model files of `prompt` against the server's definitions, the loaders' file lists fresh."""
        for class_type in {n["class_type"] for n in prompt.values()} & UPLOAD_LOADERS:
            status, body = await self._request("GET", f"/object_info/{class_type}")
            if status == 200:
                self.object_info.update(json.loads(body))
        headless.check_against_server(prompt, self.object_info)

    async def run_prompt(self, prompt: dict, on_message=None) -> dict:
        """Queue `prompt`, wait for it to end (ServerLost if the server goes), return its /history entry."""
        await self.check(prompt)
        status, body = await self._request("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id})
        answer = json.loads(body)
        if status != 200:
            errors = [f"{e.get('class_type')}: {err.get('message')} {err.get('details', '')}".strip()
                      for e in answer.get("node_errors", {}).values() for err in e.get("errors", [])]
            raise UserError(f"{self.label} rejected a workflow: "
                            + ("; ".join(errors) or answer.get("error", {}).get("message", str(answer))), 3)
        prompt_id = answer["prompt_id"]
        if on_message is not None:
            self._listeners[prompt_id] = on_message
        self.in_flight.add(prompt_id)    # until it ends here: Ctrl-C (a cancel) leaves it for cancel_own_prompts
        try:
            outcome = self._outcome(prompt_id)
            if not self.alive and not outcome.done():
                raise ServerLost("its websocket closed")
            await outcome
        finally:
            self._listeners.pop(prompt_id, None)
        self.in_flight.discard(prompt_id)
        status, body = await self._request("GET", f"/history/{prompt_id}")
        return json.loads(body)[prompt_id]

    async def download(self, item: dict) -> bytes:
        params = {"filename": item["filename"], "subfolder": item["subfolder"], "type": item["type"]}
        status, body = await self._request("GET", "/view", params=params)
        if status != 200:
            raise ServerLost(f"/view answered HTTP {status}")
        return body

    async def cancel_own_prompts(self) -> None:
        for prompt_id in list(self.in_flight):
            try:
                await headless.cancel_own_prompt(self.session, self.url, prompt_id)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader


def saved_items(entry: dict, nid: str) -> list:
    return entry["outputs"].get(nid, {}).get("images", [])


def shown_text(entry: dict, nid: str) -> str:
    return entry["outputs"][nid]["text"][0]


# ---- the terminal -----------------------------------------------------------------------------------------------
class Progress:
    """One line: intervals done, and per server what it runs (interval, node, bar); events on lines of their own."""

    def __init__(self, servers: list, stream=sys.stderr):
        self.stream = stream
        self.status = {server.label: "idle" for server in servers}
        self.done = self.total = 0

    def set(self, server: "Server", text: str) -> None:
        self.status[server.label] = text
        self.draw()

    def draw(self) -> None:
        parts = [f"{self.done}/{self.total} intervals"] if self.total else []
        parts += [f"{label}: {text}" for label, text in self.status.items()]
        self.stream.write("\r\x1b[2K" + " | ".join(parts))
        self.stream.flush()

    def event(self, text: str) -> None:
        self.stream.write(f"\r\x1b[2Krun_headless: {text}\n")
        self.draw()

    def follower(self, server: "Server", what: str, prompt: dict):
        """A websocket listener showing `what` and the running node's progress on `server`'s part of the line."""
        titles = {nid: n.get("_meta", {}).get("title", n["class_type"]) for nid, n in prompt.items()}

        def on_message(message: dict) -> None:
            data = message.get("data", {})
            if message["type"] == "executing" and data.get("node"):
                self.set(server, f"{what} {titles.get(data['node'], '')}")
            elif message["type"] == "progress" and data.get("max"):
                filled = int(10 * data["value"] / data["max"])
                self.set(server, f"{what} {titles.get(data.get('node'), '')} "
                                 f"[{'#' * filled}{'.' * (10 - filled)}] {data['value']}/{data['max']}")
            elif message["type"] == "rerender.keyframe_progress":
                self.set(server, f"{what} key frame {data['key_frame'] + 1}/{data['total']}")
        return on_message

    def close(self) -> None:
        self.stream.write("\n")


# ---- the job ----------------------------------------------------------------------------------------------------
@dataclass
class Queue:
    """Intervals waiting, and who finished each; an interval is taken from the first server that returns it."""
    waiting: list
    total: int
    results: dict = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def take(self, server: "Server"):
        """The next interval for `server`, or None once all are done or the server is lost."""
        async with self.changed:
            while server.alive and not self.waiting and len(self.results) < self.total:
                await self.changed.wait()
            return self.waiting.pop(0) if self.waiting and server.alive else None

    async def give_back(self, segment: Segment) -> None:
        async with self.changed:
            if segment not in self.results:
                self.waiting.insert(0, segment)
            self.changed.notify_all()

    async def finish(self, segment: Segment, server: Server, files: dict) -> bool:
        async with self.changed:
            first = segment not in self.results
            if first:
                self.results[segment] = (server.label, files)
            self.changed.notify_all()
            return first

    async def stop_waiting(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class Job:
    def __init__(self, args, prompt: dict, servers: list, workdir: Path):
        self.args, self.prompt, self.servers, self.workdir = args, prompt, servers, workdir
        self.tag = uuid.uuid4().hex[:10]
        self.progress = Progress(servers)
        self.lost = []

    def alive(self) -> list:
        return [server for server in self.servers if server.alive]

    def lose(self, server: Server, why: str) -> None:
        server.alive = False
        if server not in self.lost:
            self.lost.append(server)
            self.progress.event(f"lost {server.label} ({why})")
        self.progress.set(server, "lost")

    async def on_any(self, what: str, work):
        """`await work(server)` on the first live server, moving to the next if that one is lost."""
        for server in self.alive():
            try:
                return server, await work(server)
            except ServerLost as error:
                self.lose(server, str(error))
        raise UserError(f"every server was lost while {what}; start them again and re-run", 2)

    def keep(self, name: str, data: bytes) -> Path:
        """Downloaded images wait on disk, not in memory, until they go up to the next server."""
        path = self.workdir / name
        path.write_bytes(data)
        return path

    async def upload_video(self, server: Server) -> None:
        await server.upload(self.video_name, self.video_bytes)

    async def run(self) -> Path:
        self.video_bytes = self.args.video.read_bytes()
        digest = hashlib.sha1(self.video_bytes).hexdigest()[:12]
        self.video_name = f"rerender_{digest}{self.args.video.suffix}"
        headless.set_input(self.prompt, "LoadVideo", "file", self.video_name)
        pipeline = Pipeline.find(self.prompt)

        async def measure(server):
            await self.upload_video(server)
            await server.check(self.prompt)       # the whole workflow, before anything runs
            self.progress.set(server, "frame size")
            return await server.run_prompt(size_prompt(pipeline))
        _, entry = await self.on_any("measuring the frames", measure)
        width, height = int(shown_text(entry, "scaleout_width")), int(shown_text(entry, "scaleout_height"))

        async def render_keys(server):
            await self.upload_video(server)
            prompt = key_stage_prompt(pipeline, f"rerender_scaleout/{self.tag}/keys", width)
            entry = await server.run_prompt(prompt, self.progress.follower(server, "key frames", prompt))
            indices = [int(i) for i in shown_text(entry, "scaleout_indices").split(",")]
            items = saved_items(entry, "scaleout_save")
            if len(items) != len(indices):
                raise UserError(f"{server.label} saved {len(items)} key frames for {len(indices)} indices", 1)
            files = {index: self.keep(f"key_{index:05d}.exr", await server.download(item))
                     for index, item in zip(indices, items)}
            return indices, int(shown_text(entry, "scaleout_count")), files
        key_server, (key_indices, num_frames, key_data) = await self.on_any("rendering the key frames", render_keys)
        self.progress.set(key_server, "idle")
        self.progress.event(f"{len(key_indices)} key frames rendered on {key_server.label}")
        key_files = {index: f"rerender_{self.tag}_key_{index:05d}.exr" for index in key_indices}

        parts = segments(key_indices, num_frames)
        if parts and pipeline.seed + parts[-1].start > SEED_MAX:
            raise UserError(f"Patch Propagator's seed {pipeline.seed} is too large to shift per interval; use a "
                            f"seed below {SEED_MAX - parts[-1].start}", 3)
        queue = Queue(list(parts), len(parts))
        self.progress.total = len(parts)

        async def worker(server: Server) -> None:
            while server.alive:
                segment = await queue.take(server)
                if segment is None:
                    break
                try:
                    files = await self.run_segment(server, pipeline, segment, key_files, key_data, width, height)
                except ServerLost as error:
                    await queue.give_back(segment)
                    self.lose(server, str(error))
                    self.progress.event(f"interval {segment.label} re-queued: {server.label} was lost")
                    break
                if await queue.finish(segment, server, files):
                    self.progress.done = len(queue.results)
                    self.progress.event(f"interval {segment.label} done on {server.label}")
            await queue.stop_waiting()

        workers = [worker(server) for _ in range(PROMPTS_PER_SERVER) for server in self.alive()]
        results = await asyncio.gather(*workers, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        if len(queue.results) < len(parts):
            raise UserError("every server was lost before the propagation finished; start them again and re-run", 2)

        frame_data = dict(key_data)
        for _, files in queue.results.values():
            frame_data.update(files)
        frame_files = [f"rerender_{self.tag}_frame_{index:05d}.exr" for index in range(num_frames)]

        async def stitch(server):
            for index, name in enumerate(frame_files):
                await server.upload(name, frame_data[index].read_bytes())
            await self.upload_video(server)
            prompt = stitch_prompt(pipeline, frame_files, width, height)
            entry = await server.run_prompt(prompt, self.progress.follower(server, "video", prompt))
            videos = [item for output in entry["outputs"].values() if output.get("animated")
                      for item in output.get("images", [])]
            if not videos:
                raise UserError("the workflow finished but saved no video (does it end in a Save Video node?)", 1)
            return await server.download(videos[-1])
        video_server, data = await self.on_any("writing the video", stitch)
        self.progress.set(video_server, "idle")
        self.progress.close()
        by_server = {}
        for label, _ in queue.results.values():
            by_server[label] = by_server.get(label, 0) + 1
        print(f"run_headless: {len(parts)} intervals on {len(self.servers)} servers ("
              + ", ".join(f"{label}: {count}" for label, count in sorted(by_server.items())) + ")"
              + (f"; lost {', '.join(s.label for s in self.lost)}" if self.lost else ""), file=sys.stderr)
        self.args.output.parent.mkdir(parents=True, exist_ok=True)
        self.args.output.write_bytes(data)
        return self.args.output

    async def run_segment(self, server: Server, pipeline: Pipeline, segment: Segment, key_files: dict,
                          key_data: dict, width: int, height: int) -> dict:
        """Propagate one interval on `server`; its propagated frames (EXR files here) by frame index."""
        self.progress.set(server, f"interval {segment.label} uploading")
        await self.upload_video(server)
        for index in segment.keys:
            await server.upload(key_files[index], key_data[index].read_bytes())
        prompt = segment_prompt(pipeline, segment, key_files, f"rerender_scaleout/{self.tag}/{segment.label}",
                                width, height)
        entry = await server.run_prompt(prompt, self.progress.follower(server, f"interval {segment.label}", prompt))
        items = saved_items(entry, "scaleout_save")
        if len(items) != segment.stop - segment.start + 1:
            raise UserError(f"{server.label} saved {len(items)} frames for interval {segment.label}", 1)
        files = {}
        for index, item in zip(range(segment.start, segment.stop + 1), items):
            if index not in segment.keys:
                files[index] = self.keep(f"frame_{index:05d}_{server.label.replace(':', '_')}.exr",
                                         await server.download(item))
        self.progress.set(server, "idle")
        return files


async def run(args, prompt: dict) -> Path:
    """The scale-out job; `prompt` is the workflow read from --workflow, overrides not yet applied."""
    urls = [headless.server_url(text) for text in args.servers.split(",") if text.strip()]
    if len(set(urls)) != len(urls):
        raise UserError(f"--servers names a server twice: {args.servers}", 3)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=headless.CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        servers = [Server(url, session) for url in urls]
        answers = await asyncio.gather(*(server.connect() for server in servers), return_exceptions=True)
        for server, answer in zip(servers, answers):
            if isinstance(answer, ServerLost):
                print(f"run_headless: no ComfyUI server answers at {server.url} ({answer}); going on without it",
                      file=sys.stderr)
        live = [server for server in servers if server.alive]
        if not live:
            raise UserError(f"no ComfyUI server answers at {args.servers}; start them with "
                            "'python main.py --listen' or fix --servers", 2)
        headless.apply_overrides(prompt, args, live[0].object_info)
        with tempfile.TemporaryDirectory(prefix="rerender_scaleout_") as workdir:
            job = Job(args, prompt, live, Path(workdir))
            try:
                return await job.run()
            except (asyncio.CancelledError, UserError):   # Ctrl-C (asyncio.run cancels this task) or a failure
                job.progress.close()
                await asyncio.gather(*(server.cancel_own_prompts() for server in job.alive()))
                raise
            finally:
                await asyncio.gather(*(server.close() for server in servers), return_exceptions=True)
