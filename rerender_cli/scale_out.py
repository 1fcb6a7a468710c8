"""The headless main job on a Dask cluster (`run_headless.py --cluster tcp://HOST:8786` or `--cluster local:N`).

Key frames depend on each other, so one task renders them all: the workflow up to the Key Frame Sampler, in
ComfyUI on a worker with the `diffusion` resource (dask_worker.py). The propagation intervals between consecutive
key frames are independent: each is one task on any worker, Patch Propagator on the interval's frames alone with
its own flow and the seed shifted by its first frame (the whole-clip run seeds every frame by its index), so the
video equals the one-machine run bit for bit. A last diffusion task runs the workflow's own output nodes on the
assembled frames. Frames travel as numpy arrays between the workers; the video bytes go in with the tasks.
Placement, transfers, retries and recovery are Dask's: a task whose worker is lost is run again elsewhere, the key
frames too (Dask recomputes a lost result from the graph). Needs `distributed` (pip install comfyui-rerender[cluster]).
"""
import hashlib
import sys
import uuid
from dataclasses import dataclass

from . import run_headless as headless
from .errors import INTERRUPTED_EXIT, UserError

PROPAGATOR, PICKER, FLOW = "Rerender_PatchPropagator", "Rerender_KeyframePicker", "Rerender_FlowEstimation"
PROPAGATOR_LINKS = ("frames", "keyframes", "key_frame_images", "flow")
FLOW_WIDGETS = ("dis_preset", "cache_pairs", "consistency_alpha", "consistency_beta", "photometric_check")
DIFFUSION = "diffusion"                   # the Dask resource of workers that run ComfyUI with the models
CONNECT_TIMEOUT_S = 3
REDRAW_S = 0.5
SEED_MAX = 0xFFFFFFFF
WORKER_START = ("COMFYUI_PATH=/path/to/ComfyUI dask worker {address} --resources diffusion=1 "
                "--preload rerender_cli.dask_worker")


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


def widget_values(prompt: dict, nid: str, names, what: str) -> dict:
    """The values of `names` among the node's inputs; a UserError if one is a connection (known only at run time)."""
    linked = sorted(name for name, _ in links(prompt[nid]) if name in names)
    if linked:
        raise UserError(f"--cluster: {what}'s {', '.join(linked)} must be values, not connections", 3)
    return {name: prompt[nid]["inputs"][name] for name in names}


@dataclass
class Pipeline:
    """Where the stages sit in the user's workflow: the links into Patch Propagator and its and the flow's widgets."""
    prompt: dict
    propagator: str
    inputs: dict
    settings: dict
    flow: dict

    @classmethod
    def find(cls, prompt: dict) -> "Pipeline":
        found = [nid for nid, n in prompt.items() if n["class_type"] == PROPAGATOR]
        if len(found) != 1:
            raise UserError(f"--cluster needs a workflow with exactly one Patch Propagator; this one has "
                            f"{len(found)}", 3)
        propagator = found[0]
        inputs = dict(links(prompt[propagator]))
        missing = [name for name in PROPAGATOR_LINKS if name not in inputs]
        if missing:
            raise UserError(f"--cluster: Patch Propagator's {', '.join(missing)} must be connected", 3)
        picker, flow = inputs["keyframes"][0], inputs["flow"][0]
        if prompt[picker]["class_type"] != PICKER:
            raise UserError("--cluster: Patch Propagator's keyframes must come straight from a Key Frame Picker "
                            "(its key frame indices split the video into intervals)", 3)
        if prompt[flow]["class_type"] != FLOW or prompt[flow]["inputs"].get("frames") != inputs["frames"]:
            raise UserError("--cluster: Patch Propagator's flow must come from a Flow Estimation of the same frames "
                            "(each interval estimates its own part of it)", 3)
        if "optical_flow" in prompt[flow]["inputs"]:
            raise UserError("--cluster: the intervals estimate their flow with OpenCV DIS on any worker; disconnect "
                            "Flow Estimation's optical_flow (RAFT) model", 3)
        settings = widget_values(prompt, propagator, [name for name in prompt[propagator]["inputs"]
                                                      if name not in PROPAGATOR_LINKS], "Patch Propagator")
        flow_settings = widget_values(prompt, flow, FLOW_WIDGETS, "Flow Estimation")
        return cls(prompt, propagator, inputs, settings, flow_settings)

    def key_stage(self) -> dict:
        """The workflow up to the key frames (frames, picker, sampler and what they read)."""
        roots = [self.inputs[name][0] for name in ("frames", "keyframes", "key_frame_images")]
        return {nid: self.prompt[nid] for nid in upstream(self.prompt, roots)}

    def video_stage(self) -> dict:
        """The workflow's nodes after Patch Propagator and what else they read; the worker stands in for Patch
        Propagator with the assembled frames."""
        after = downstream(self.prompt, self.propagator)
        if not any(self.prompt[nid]["class_type"] in ("SaveVideo", "SaveImage", "SaveAnimatedWEBP",
                                                       "SaveAnimatedPNG", "SaveImageAdvanced") for nid in after):
            raise UserError("--cluster: nothing saves Patch Propagator's output (end the workflow in Save Video)", 3)
        others = {source for nid in after for _, (source, _) in links(self.prompt[nid])
                  if source != self.propagator and source not in after}
        return {nid: self.prompt[nid] for nid in after | upstream(self.prompt, others)}


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


# ---- the cluster ------------------------------------------------------------------------------------------------
def open_client(address: str):
    """(Client, LocalCluster or None): `local:N` starts N worker processes on 127.0.0.1, each with the diffusion
    resource; any other address is a running scheduler, which must answer within CONNECT_TIMEOUT_S."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("--cluster needs Dask distributed: pip install 'comfyui-rerender[cluster]' "
                        "(or pip install distributed)", 3) from None
    dask.config.set({"distributed.comm.timeouts.connect": f"{CONNECT_TIMEOUT_S}s"})
    if address.startswith("local:"):
        count = address.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--cluster {address}: local:N needs a number of workers N >= 1", 3)
        preload = [*dask.config.get("distributed.worker.preload", []), "rerender_cli.dask_worker"]
        cluster = LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", resources={DIFFUSION: 1}, preload=preload)
        return Client(cluster), cluster
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S), None
    except (OSError, TimeoutError, ValueError) as error:
        raise UserError(f"no Dask scheduler answers at {address} ({type(error).__name__}); start one with "
                        "'dask scheduler' or fix --cluster", 2) from None


class Progress:
    """One line: a bar for the intervals done, then what each worker runs; events on lines of their own."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.done, self.total = stream, 0, 0

    def draw(self, running: dict) -> None:
        parts = []
        if self.total:
            filled = int(20 * self.done / self.total)
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} intervals")
        parts += [f"{worker.split('://')[-1]}: {', '.join(labels)}" for worker, labels in running.items() if labels]
        self.stream.write("\r\x1b[2K" + " | ".join(parts))
        self.stream.flush()

    def event(self, text: str) -> None:
        self.stream.write(f"\r\x1b[2Krun_headless: {text}\n")
        self.stream.flush()


class Job:
    def __init__(self, client, args, prompt: dict):
        from . import dask_worker
        self.client, self.args, self.prompt, self.worker = client, args, prompt, dask_worker
        self.tag = uuid.uuid4().hex[:10]
        self.labels = {}                   # task key -> what the progress line calls it
        self.futures = []
        self.progress = Progress()

    def submit(self, label: str, function, *args, diffusion: bool = False, **kwargs):
        key = f"rerender-{label.replace(' ', '-')}-{self.tag}"
        self.labels[key] = label
        future = self.client.submit(function, *args, key=key, pure=False,
                                    resources={DIFFUSION: 1} if diffusion else None, **kwargs)
        self.futures.append(future)
        return future

    def running(self) -> dict:
        return {worker: [self.labels[key] for key in keys if key in self.labels]
                for worker, keys in self.client.processing().items()}

    def wait(self, futures: list, on_done=lambda future: None) -> None:
        """Until `futures` are done, the progress line redrawn; an erred task is a UserError naming it."""
        from distributed import wait
        pending = set(futures)
        while pending:
            self.progress.draw(self.running())
            try:
                done, pending = wait(pending, timeout=REDRAW_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            for future in done:
                if future.status == "error":
                    error = future.exception()
                    raise UserError(f"{self.labels[future.key]} failed: {type(error).__name__}: {error}", 1)
                if future.status == "cancelled":
                    raise UserError("the cluster cancelled the job (was the scheduler stopped?)", 2)
                on_done(future)

    def check_workers(self) -> list:
        """The diffusion workers, after every worker was found to run this very pack version; one line naming the
        first worker that does not."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        self.all_workers = sorted(workers)
        diffusion = sorted(address for address, info in workers.items() if info.get("resources", {}).get(DIFFUSION))
        if not diffusion:
            raise UserError(f"no worker of the cluster has the '{DIFFUSION}' resource to render key frames; start "
                            f"one with: {WORKER_START.format(address=self.client.scheduler.address)}", 2)
        mine = self.worker.pack_version()
        for address, version in sorted(self.client.run(self.worker.pack_version, on_error="return").items()):
            if isinstance(version, Exception):
                raise UserError(f"worker {address} cannot import this pack ({type(version).__name__}: {version}); "
                                "start it with the pack on its PYTHONPATH", 2)
            if version != mine:
                raise UserError(f"worker {address} runs another version of this pack ({version}, here {mine}); "
                                "install the same version on every worker", 2)
        return diffusion

    def run(self) -> bytes:
        diffusion = self.check_workers()
        video = self.args.video.read_bytes()
        video_name = f"rerender_{hashlib.sha1(video).hexdigest()[:12]}{self.args.video.suffix}"
        classes = {node["class_type"] for node in self.prompt.values()}
        info = self.submit("node definitions", self.worker.object_info, classes, workers=diffusion[:1],
                           diffusion=True).result()
        headless.apply_overrides(self.prompt, self.args, info)           # the --set checks, before any job task
        headless.set_input(self.prompt, "LoadVideo", "file", video_name)
        pipeline = Pipeline.find(self.prompt)
        checks = {address: self.submit(f"check {address}", self.worker.check_workflow, self.prompt, video_name,
                                       video, workers=[address], diffusion=True) for address in diffusion}
        for address, check in checks.items():
            if check.result():
                raise UserError(f"worker {address}: {check.result()}", 3)
        if "dashboard" in self.client.scheduler_info().get("services", {}):
            self.progress.event(f"Dask's dashboard (task stream, progress): {self.client.dashboard_link}")

        inputs = pipeline.inputs
        render = self.submit("key frames", self.worker.render_key_frames, pipeline.key_stage(), inputs["frames"],
                             inputs["keyframes"], inputs["key_frame_images"], video_name, video, self.tag,
                             diffusion=True)
        layout = self.submit("key frame layout", self.worker.key_layout, render)
        self.wait([layout])
        key_indices, num_frames = layout.result()
        self.progress.event(f"{len(key_indices)} key frames rendered on {self.where(render)}")
        parts = segments(key_indices, num_frames)
        if parts and pipeline.settings["seed"] + parts[-1].start > SEED_MAX:
            raise UserError(f"Patch Propagator's seed {pipeline.settings['seed']} is too large to shift per "
                            f"interval; use a seed below {SEED_MAX - parts[-1].start}", 3)
        propagated = [
            self.submit(f"interval {part.label}", self.worker.propagate_interval,
                        self.submit(f"cut {part.label}", self.worker.interval_inputs, render, part.start, part.stop,
                                    part.keys),
                        part.start, part.keys, pipeline.settings, pipeline.flow, self.tag,
                        workers=self.all_workers[index % len(self.all_workers)], allow_other_workers=True)
            for index, part in enumerate(parts)]   # spread at the start; Dask moves them if a worker goes
        self.progress.total = len(parts)

        def interval_done(future) -> None:
            self.progress.done += 1
            self.progress.event(f"{self.labels[future.key]} done on {self.where(future)}")
        self.wait(propagated, interval_done)
        written = self.submit("video", self.worker.write_video, pipeline.video_stage(), pipeline.propagator, render,
                              [(part.start, part.stop, part.keys) for part in parts], propagated, video_name,
                              video, self.tag, diffusion=True)
        self.wait([written])
        self.progress.event(f"video written on {self.where(written)}")
        return written.result()

    def where(self, future) -> str:
        holders = self.client.who_has([future]).get(future.key, ())
        return ", ".join(address.split("://")[-1] for address in holders) or "?"

    def cancel(self) -> None:
        """Ctrl-C: the job's futures cancelled and its running tasks stopped on their workers."""
        self.client.cancel(self.futures, force=True)
        self.client.run(self.worker.stop_job, self.tag, on_error="return")


def run(args, prompt: dict):
    """The cluster job; `prompt` is the workflow read from --workflow, overrides not yet applied. Synchronous, so
    that Ctrl-C reaches it as KeyboardInterrupt."""
    client, cluster = open_client(args.cluster)
    job = Job(client, args, prompt)
    try:
        data = job.run()
    except KeyboardInterrupt:
        job.cancel()
        raise UserError("interrupted; the job's tasks were cancelled on the cluster", INTERRUPTED_EXIT)
    except UserError:
        job.cancel()
        raise
    finally:
        job.progress.stream.write("\n")
        client.close()
        if cluster is not None:
            cluster.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    return args.output
