"""Writes the shipped workflows, each as a UI-format file (for the editor) and its API-format twin, from one
description per graph, so the two never drift.

UI files sit in `workflows/` itself, named by their card title: the host's template browser lists every
`workflows/*.json` of a pack as a card whose title (and description) is the file name, with `<name>.jpg` beside it as
the thumbnail (tests/test_frontend_host.py writes them). The API twins go to `workflows/api/<name>.json`, which the
browser does not list and `run_headless.py` reads.

Every widget not set here gets the node's own default, read from the node definitions of a real ComfyUI with this
pack loaded. Run after changing a node's inputs:
    COMFYUI_PATH=/path/to/ComfyUI python -m rerender_cli.build_workflows
"""
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
AUTOGROW = "COMFY_AUTOGROW_V3"                      # a growing list of sockets, e.g. Batch Images' images.image0..
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
# Layout: each group is a column of its nodes, groups side by side in the order given. Node heights are estimated
# generously from their slots and widgets (the editor draws multiline text boxes and upload previews taller than a
# plain widget row), so that nothing overlaps once the editor has sized the nodes; tests/workflow_geometry.py checks it.
NODE_WIDTH = 320
NODE_TITLE_HEIGHT = 30
SLOT_HEIGHT = 24
WIDGET_HEIGHT = 28
MULTILINE_HEIGHT = 120
UPLOAD_PREVIEW_HEIGHT = 300
STATUS_HEIGHT = 20                                   # the pack's js draws a status line under each pack node
MIN_BODY_HEIGHT = 140                                # output nodes grow a preview area (PreviewAny, SaveVideo)
NODE_GAP = 40
GROUP_PADDING = 30
GROUP_TITLE_BAND = 50
GROUP_GAP = 60
GROUP_FONT_SIZE = 24
TITLE_ADVANCE = 0.58                                 # average Arial advance per px of font size, rounded up


@dataclass
class Node:
    key: str
    class_type: str
    values: dict = field(default_factory=dict)       # widget values that differ from the node's defaults
    links: dict = field(default_factory=dict)        # input name -> (source node key, output slot)
    bypass: bool = False                             # UI only: a bypassed node is left out of the API twin
    ui_widgets: list = None                          # UI widget values where the frontend stores more than inputs
    api_extra: dict = field(default_factory=dict)    # API-only inputs (nested dynamic inputs)
    title: str = None                                # the node's title where its class's name would be ambiguous


@dataclass
class Workflow:
    name: str                                        # the API twin's file name: workflows/api/<name>.json
    nodes: list
    groups: dict                                     # title -> node keys, one column each, left to right
    title: str = None                                # the template card's title = the UI file's name
    color: str = "#3f789e"                           # its groups' colour: each card's thumbnail has its own

    @property
    def ui_name(self) -> str:
        return self.title or self.name


API_DIR = WORKFLOWS / "api"


def ui_path(workflow: Workflow) -> Path:
    return WORKFLOWS / f"{workflow.ui_name}.json"


def api_path(workflow: Workflow) -> Path:
    return API_DIR / f"{workflow.name}.json"


def node_definition(cls) -> dict:
    return {"input": cls.INPUT_TYPES(), "outputs": list(zip(cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", None)
                                                            or cls.RETURN_TYPES))}


def input_specs(definition: dict) -> list:
    """(name, spec) for every input, required first, in the node's own order."""
    specs = []
    for section in ("required", "optional"):
        specs.extend(definition["input"].get(section, {}).items())
    return specs


def ui_input_specs(node: Node, definition: dict) -> list:
    """input_specs with each autogrow input expanded to the sockets the node links (`images.image0`, ...) and the
    one free socket the editor shows after them."""
    specs = []
    for name, spec in input_specs(definition):
        if type(spec[0]) is not str or spec[0] != AUTOGROW:   # IO.ANY compares equal to everything
            specs.append((name, spec))
            continue
        template = spec[1]["template"]
        (socket_type,) = [s[0] for section in template["input"].values() for s in section.values()]
        linked = sorted((n for n in node.links if n.startswith(f"{name}.")),
                        key=lambda n: int(n.rsplit(template["prefix"], 1)[1]))
        specs.extend((n, (socket_type, {})) for n in linked + [f"{name}.{template['prefix']}{len(linked)}"])
    return specs


def is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        return True
    return kind in WIDGET_TYPES and not options.get("forceInput", False) and not options.get("hidden", False)


def default_value(spec):
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""           # an empty model folder: the user picks a file in the editor
    if kind == "COMBO":
        return options["options"][0] if options.get("options") else ""
    if kind == DYNAMIC_COMBO:
        return options["options"][0]["key"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def resolve(node: Node, definition: dict) -> dict:
    """Widget name -> value for every widget input of the node."""
    values = {}
    for name, spec in input_specs(definition):
        if is_widget(spec) and name not in node.links:
            values[name] = node.values.get(name, default_value(spec))
    unknown = set(node.values) - set(values)
    if unknown:
        raise ValueError(f"{node.class_type} has no widget inputs {sorted(unknown)}")
    return values


def to_api(workflow: Workflow, definitions: dict, titles: dict) -> dict:
    active = {n.key for n in workflow.nodes if not n.bypass}
    ids = {n.key: str(i + 1) for i, n in enumerate(workflow.nodes)}
    by_key = {n.key: n for n in workflow.nodes}

    def source(key, slot):
        """[id, slot] of what feeds a link; None when a bypassed node has no input of the output's type to pass
        through (the editor then leaves the input unconnected)."""
        # a bypassed node passes its first input of the same type through, as the editor does
        while key not in active:
            node = by_key[key]
            out_type = definitions[node.class_type]["outputs"][slot][0]
            for name, spec in input_specs(definitions[node.class_type]):
                if spec[0] == out_type and name in node.links:
                    key, slot = node.links[name]
                    break
            else:
                return None
        return [ids[key], slot]

    prompt = {}
    for node in workflow.nodes:
        if node.bypass:
            continue
        inputs = dict(resolve(node, definitions[node.class_type]))
        optional = definitions[node.class_type]["input"].get("optional", {})
        for name, link in node.links.items():
            fed = source(*link)
            if fed is None and name not in optional:
                raise ValueError(f"{node.class_type}.{name} is fed by a bypassed node that cannot pass it through")
            if fed is not None:
                inputs[name] = fed
        inputs.update(node.api_extra)
        prompt[ids[node.key]] = {"class_type": node.class_type, "inputs": inputs,
                                 "_meta": {"title": node.title or titles[node.class_type]}}
    return prompt


def to_ui(workflow: Workflow, definitions: dict, titles: dict) -> dict:
    ids = {n.key: i + 1 for i, n in enumerate(workflow.nodes)}
    links, ui_nodes = [], []
    out_links = {}
    for node in workflow.nodes:
        definition = definitions[node.class_type]
        for name, (src, slot) in node.links.items():
            link_id = len(links) + 1
            socket_inputs = [n for n, s in ui_input_specs(node, definition) if not is_widget(s) or n in node.links]
            out_type = definitions[by_key(workflow, src).class_type]["outputs"][slot][0]
            links.append([link_id, ids[src], slot, ids[node.key], socket_inputs.index(name), out_type])
            out_links.setdefault((src, slot), []).append(link_id)
    for order, node in enumerate(workflow.nodes):
        definition = definitions[node.class_type]
        inputs = []
        for name, spec in ui_input_specs(node, definition):
            if is_widget(spec) and name not in node.links:
                continue
            link = next((l[0] for l in links if l[3] == ids[node.key] and
                         l[4] == len(inputs)), None)
            entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link}
            if is_widget(spec):
                entry["widget"] = {"name": name}
            inputs.append(entry)
        outputs = [{"name": name, "type": kind, "links": out_links.get((node.key, slot), []), "slot_index": slot}
                   for slot, (kind, name) in enumerate(definition["outputs"])]
        widgets = node.ui_widgets
        if widgets is None:
            widgets = []
            values = resolve(node, definition)
            for name, spec in input_specs(definition):
                if name in values:
                    widgets.append(values[name])
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        widgets.append("fixed")
        ui_nodes.append({"id": ids[node.key], "type": node.class_type, "pos": [0, 0],
                         "size": [NODE_WIDTH, node_height(node, definition, inputs, outputs)], "flags": {},
                         "order": order, "mode": 4 if node.bypass else 0, "inputs": inputs, "outputs": outputs,
                         "title": node.title or titles[node.class_type],
                         "properties": {"Node name for S&R": node.class_type}, "widgets_values": widgets})
    groups = lay_out(workflow, {n["id"]: n for n in ui_nodes}, ids)
    for group in groups:
        group["color"] = workflow.color
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def node_height(node: Node, definition: dict, inputs: list, outputs: list) -> int:
    """The body height (below the title bar) the editor needs for the node's slots and widgets."""
    height = 20 + SLOT_HEIGHT * max(len(inputs), len(outputs))
    for name, spec in input_specs(definition):
        if not is_widget(spec) or name in node.links:
            continue
        options = spec[1] if len(spec) > 1 else {}
        height += MULTILINE_HEIGHT if options.get("multiline") else WIDGET_HEIGHT
        if options.get("control_after_generate"):
            height += WIDGET_HEIGHT
        if options.get("image_upload") or options.get("video_upload"):
            height += WIDGET_HEIGHT + UPLOAD_PREVIEW_HEIGHT
    if node.class_type.startswith("Rerender_"):
        height += STATUS_HEIGHT
    return max(height, MIN_BODY_HEIGHT)


def title_width(title: str) -> float:
    return len(title) * TITLE_ADVANCE * GROUP_FONT_SIZE


def lay_out(workflow: Workflow, ui_nodes: dict, ids: dict) -> list:
    """Places every node in its group's column and returns the groups, each wide enough for its title."""
    grouped = [key for keys in workflow.groups.values() for key in keys]
    if sorted(grouped) != sorted(n.key for n in workflow.nodes):
        raise ValueError(f"{workflow.name}: every node must be in exactly one group")
    groups, x = [], 0
    for title, keys in workflow.groups.items():
        members = [ui_nodes[ids[key]] for key in keys]
        inner_width = max(max(n["size"][0] for n in members), round(title_width(title)) + 8)
        y = GROUP_TITLE_BAND
        for member in members:
            member["pos"] = [x + GROUP_PADDING, y + NODE_TITLE_HEIGHT]
            y += NODE_TITLE_HEIGHT + member["size"][1] + NODE_GAP
        width = inner_width + 2 * GROUP_PADDING
        groups.append({"title": title, "bounding": [x, 0, width, y - NODE_GAP + GROUP_PADDING], "color": "#3f789e",
                       "font_size": GROUP_FONT_SIZE, "flags": {}})
        x += width + GROUP_GAP
    return groups


def by_key(workflow: Workflow, key: str) -> Node:
    return next(n for n in workflow.nodes if n.key == key)


def input_video_at(size: int) -> list:
    """Load Video and Video Frames: a frame range decoded alone, the longer side at `size`, the aspect ratio kept."""
    return [
        Node("load", "LoadVideo", values={"file": "input.mp4"}, ui_widgets=["input.mp4", "image"]),
        Node("frames", "Rerender_VideoFrames", values={"longer_side": size}, links={"video": ("load", 0)}),
    ]


def prompt_node(key: str, text: str, clip: tuple, title: str) -> Node:
    """A text encoder with its own title, so that a title names one node (run_headless --set, the editor)."""
    return Node(key, "CLIPTextEncode", values={"text": text}, links={"clip": clip}, title=title)


def key_frames_preview(key_frames: tuple) -> Node:
    """The rendered key frames, shown as soon as they are done, so that the style can be judged before the
    propagation finishes."""
    return Node("key_frames_preview", "PreviewImage", links={"images": key_frames}, title="Key frames preview")


def flow_preview() -> Node:
    """The colour-coded flow of the Flow Estimation node (key `flow`): a glance tells whether it follows the motion."""
    return Node("flow_preview", "PreviewImage", links={"images": ("flow", 1)}, title="Flow preview")


def video_to_video(name: str, title: str, input_video: list, save_video: dict, checkpoint: str,
                   controlnet: str, color: str) -> Workflow:
    """The full Rerender pipeline: key frames, flow and canny hints, cross-frame attention, the key frame
    sampler, propagation, the video at the source frame rate."""
    return Workflow(name, input_video + [
        Node("picker", "Rerender_KeyframePicker", links={"frames": ("frames", 0)}),
        Node("flow", "Rerender_FlowEstimation", links={"frames": ("frames", 0)}),
        Node("canny", "Canny", links={"image": ("frames", 0)}),
        Node("checkpoint", "CheckpointLoaderSimple", values={"ckpt_name": checkpoint}),
        Node("lora", "LoraLoader", bypass=True,
             links={"model": ("checkpoint", 0), "clip": ("checkpoint", 1)}),
        prompt_node("positive", "a beautiful oil painting, best quality, extremely detailed", ("lora", 1),
                    "Positive prompt"),
        prompt_node("negative", "longbody, lowres, bad anatomy, bad hands, missing fingers, cropped, worst quality",
                    ("lora", 1), "Negative prompt"),
        Node("controlnet", "ControlNetLoader", values={"control_net_name": controlnet}),
        Node("apply_controlnet", "ControlNetApplyAdvanced",
             values={"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
             links={"positive": ("positive", 0), "negative": ("negative", 0), "control_net": ("controlnet", 0),
                    "image": ("canny", 0), "vae": ("checkpoint", 2)}),
        Node("attention", "Rerender_CrossFrameAttention", links={"model": ("lora", 0)}),
        Node("sampler", "Rerender_KeyframeSampler",
             links={"model": ("attention", 0), "positive": ("apply_controlnet", 0),
                    "negative": ("apply_controlnet", 1), "vae": ("checkpoint", 2), "frames": ("frames", 0),
                    "keyframes": ("picker", 1), "flow": ("flow", 0)}),
        Node("propagator", "Rerender_PatchPropagator",
             links={"frames": ("frames", 0), "keyframes": ("picker", 1), "key_frame_images": ("sampler", 0),
                    "flow": ("flow", 0)}),
        Node("create", "CreateVideo", links={"images": ("propagator", 0), "fps": ("frames", 1)}),
        Node("save", "SaveVideo", links={"video": ("create", 0)}, **save_video),
        key_frames_preview(("sampler", 0)),
        flow_preview(),
    ], groups={"Input video": ["load", "frames"],
               "Key frames, flow and control hints": ["picker", "flow", "canny", "flow_preview"],
               "Model and prompts": ["checkpoint", "lora", "positive", "negative", "controlnet"],
               "Key frame rendering": ["attention", "apply_controlnet", "sampler", "key_frames_preview"],
               "Propagation and output": ["propagator", "create", "save"]},
        title=title, color=color)


def shipped_workflows() -> list:
    save_video = dict(ui_widgets=["rerender/video", "auto", "auto"],
                      values={"filename_prefix": "rerender/video", "format": "auto"},
                      api_extra={"format.codec": "auto"})
    input_video = input_video_at(512)
    full = video_to_video("rerender_full_pipeline", "Rerender - video to video", input_video, save_video,
                          "v1-5-pruned-emaonly.safetensors", "control_v11p_sd15_canny.pth", color="#3f789e")
    # The same graph for SDXL: its checkpoint, an SDXL canny ControlNet and SDXL's native 1024x1024 frames.
    full_sdxl = video_to_video("rerender_full_pipeline_sdxl", "Rerender - SDXL video to video",
                               input_video_at(1024), save_video, "sd_xl_base_1.0.safetensors",
                               "diffusers_xl_canny_full.safetensors", color="#a1309b")

    propagation = Workflow("rerender_propagation_only", input_video + [
        Node("picker", "Rerender_KeyframePicker", values={"mode": "list", "index_list": "0,-1"},
             links={"frames": ("frames", 0)}),
        Node("flow", "Rerender_FlowEstimation", links={"frames": ("frames", 0)}),
        Node("first_key", "LoadImage", values={"image": "key_first.png"},
             ui_widgets=["key_first.png", "image"]),
        Node("last_key", "LoadImage", values={"image": "key_last.png"},
             ui_widgets=["key_last.png", "image"]),
        Node("keys", "BatchImagesNode",
             links={"images.image0": ("first_key", 0), "images.image1": ("last_key", 0)}),
        Node("propagator", "Rerender_PatchPropagator",
             links={"frames": ("frames", 0), "keyframes": ("picker", 1), "key_frame_images": ("keys", 0),
                    "flow": ("flow", 0)}),
        Node("create", "CreateVideo", links={"images": ("propagator", 0), "fps": ("frames", 1)}),
        Node("save", "SaveVideo", links={"video": ("create", 0)}, **save_video),
        flow_preview(),
    ], groups={"Input video": ["load", "frames"], "Key frames and flow": ["picker", "flow", "flow_preview"],
               "Your painted key frames (first and last frame)": ["first_key", "last_key", "keys"],
               "Propagation and output": ["propagator", "create", "save"]},
        title="Rerender - painted key frames", color="#b58b2a")

    img2img = Workflow("rerender_fidelity_img2img", [
        Node("image", "LoadImage", values={"image": "example.png"}, ui_widgets=["example.png", "image"]),
        Node("checkpoint", "CheckpointLoaderSimple", values={"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        prompt_node("positive", "a watercolor painting, best quality", ("checkpoint", 1), "Positive prompt"),
        prompt_node("negative", "lowres, worst quality", ("checkpoint", 1), "Negative prompt"),
        Node("encode", "Rerender_FidelityEncode", links={"pixels": ("image", 0), "vae": ("checkpoint", 2)}),
        Node("ksampler", "KSampler", values={"denoise": 0.6},
             links={"model": ("checkpoint", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                    "latent_image": ("encode", 0)}),
        Node("decode", "VAEDecode", links={"samples": ("ksampler", 0), "vae": ("checkpoint", 2)}),
        Node("save", "SaveImage", values={"filename_prefix": "rerender/img2img"},
             links={"images": ("decode", 0)}),
    ], groups={"Image and model": ["image", "checkpoint"],
               "Fidelity-oriented encode and prompts": ["positive", "negative", "encode"],
               "Sample and save": ["ksampler", "decode", "save"]},
        title="Rerender - fidelity img2img", color="#8A8")
    roundtrip = Workflow("rerender_fidelity_roundtrip", [
        Node("image", "LoadImage", values={"image": "example.png"}, ui_widgets=["example.png", "image"]),
        Node("vae", "VAELoader", values={"vae_name": "taef2"}),
        Node("fidelity", "Rerender_FidelityEncode", links={"pixels": ("image", 0), "vae": ("vae", 0)}),
        Node("fidelity_decode", "VAEDecode", links={"samples": ("fidelity", 0), "vae": ("vae", 0)}),
        Node("fidelity_save", "SaveImage", values={"filename_prefix": "rerender/fidelity_encode"},
             links={"images": ("fidelity_decode", 0)}),
        Node("plain", "VAEEncode", links={"pixels": ("image", 0), "vae": ("vae", 0)}),
        Node("plain_decode", "VAEDecode", links={"samples": ("plain", 0), "vae": ("vae", 0)}),
        Node("plain_save", "SaveImage", values={"filename_prefix": "rerender/plain_encode"},
             links={"images": ("plain_decode", 0)}),
        Node("picker", "Rerender_KeyframePicker", links={"frames": ("image", 0)}),
        Node("indices", "PreviewAny", links={"source": ("picker", 2)}),
    ], groups={"Input": ["image", "vae"], "Fidelity-oriented encode": ["fidelity", "fidelity_decode", "fidelity_save"],
               "Plain encode, for comparison": ["plain", "plain_decode", "plain_save"],
               "Key frame picker": ["picker", "indices"]},
        title="Rerender - fidelity round trip", color="#8AA")
    tokenflow = Workflow("rerender_tokenflow", input_video + [
        Node("checkpoint", "CheckpointLoaderSimple", values={"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        prompt_node("source_prompt", "", ("checkpoint", 1), "Inversion prompt"),
        prompt_node("positive", "a marble sculpture, best quality", ("checkpoint", 1), "Positive prompt"),
        prompt_node("negative", "ugly, blurry, low res, unrealistic, unaesthetic", ("checkpoint", 1),
                    "Negative prompt"),
        Node("inversion", "Rerender_Inversion",
             links={"model": ("checkpoint", 0), "conditioning": ("source_prompt", 0), "frames": ("frames", 0),
                    "vae": ("checkpoint", 2)}),
        Node("reconstruction", "VAEDecode", links={"samples": ("inversion", 1), "vae": ("checkpoint", 2)}),
        Node("reconstruction_preview", "PreviewImage", links={"images": ("reconstruction", 0)}),
        Node("tokenflow", "Rerender_TokenFlowSampler",
             links={"model": ("checkpoint", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                    "inversion": ("inversion", 0)}),
        Node("decode", "VAEDecode", links={"samples": ("tokenflow", 0), "vae": ("checkpoint", 2)}),
        Node("create", "CreateVideo", links={"images": ("decode", 0), "fps": ("frames", 1)}),
        Node("save", "SaveVideo", links={"video": ("create", 0)}, **save_video),
    ], groups={"Input video": ["load", "frames"],
               "Model and prompts (inversion prompt empty)": ["checkpoint", "source_prompt", "positive", "negative"],
               "DDIM inversion (check the reconstruction)": ["inversion", "reconstruction", "reconstruction_preview"],
               "TokenFlow editing and output": ["tokenflow", "decode", "create", "save"]},
        title="Rerender - TokenFlow", color="#b06634")
    tune_a_video = Workflow("rerender_tune_a_video", input_video + [
        Node("checkpoint", "CheckpointLoaderSimple", values={"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        prompt_node("source_prompt", "a jeep car is moving on the road", ("checkpoint", 1),
                    "Source prompt (what the clip shows)"),
        Node("encode", "VAEEncode", links={"pixels": ("frames", 0), "vae": ("checkpoint", 2)}),
        Node("tune", "Rerender_TuneAVideo",
             links={"model": ("checkpoint", 0), "positive": ("source_prompt", 0), "latent": ("encode", 0)}),
        Node("save_tuned", "Rerender_TuneAVideoSave", links={"tuned": ("tune", 1)}),
        prompt_node("edit_prompt", "a jeep car is moving on the beach", ("checkpoint", 1), "Positive prompt"),
        prompt_node("negative", "", ("checkpoint", 1), "Negative prompt"),
        prompt_node("empty_prompt", "", ("checkpoint", 1), "Inversion prompt"),
        Node("invert", "Rerender_Inversion",
             values={"steps": 50, "sampler_name": "ddim", "scheduler": "ddim_uniform", "inversion_steps": 50,
                     "batch_size": 24},
             links={"model": ("tune", 0), "conditioning": ("empty_prompt", 0), "latent": ("tune", 3)}),
        Node("start", "Rerender_InvertedNoise", links={"model": ("tune", 0), "inversion": ("invert", 0)}),
        Node("guider", "CFGGuider", values={"cfg": 12.5},
             links={"model": ("tune", 0), "positive": ("edit_prompt", 0), "negative": ("negative", 0)}),
        Node("sampler_select", "KSamplerSelect", values={"sampler_name": "ddim"}),
        Node("schedule", "BasicScheduler", values={"scheduler": "ddim_uniform", "steps": 50},
             links={"model": ("tune", 0)}),
        Node("ksampler", "SamplerCustomAdvanced",
             links={"noise": ("start", 0), "guider": ("guider", 0), "sampler": ("sampler_select", 0),
                    "sigmas": ("schedule", 0), "latent_image": ("start", 1)}),
        Node("decode", "VAEDecode", links={"samples": ("ksampler", 0), "vae": ("checkpoint", 2)}),
        Node("create", "CreateVideo", values={"fps": 8.0}, links={"images": ("decode", 0)}),
        Node("save", "SaveVideo", links={"video": ("create", 0)}, **save_video),
    ], groups={"Input video": ["load", "frames"],
               "One-shot tuning on the clip": ["checkpoint", "source_prompt", "encode", "tune",
                                                               "save_tuned"],
               "Invert with the tuned model (no CFG)": ["empty_prompt", "invert",
                                                                                        "start"],
               "Edit the whole clip (CFG 12.5)": [
                   "edit_prompt", "negative", "guider", "sampler_select", "schedule", "ksampler"],
               "Output": ["decode", "create", "save"]},
        title="Rerender - Tune-A-Video", color="#88A")
    fresco = Workflow("rerender_fresco_pipeline", input_video + [
        Node("picker", "Rerender_KeyframePicker", values={"mode": "adaptive", "s_min": 5, "s_max": 20},
             links={"frames": ("frames", 0)}),
        Node("flow", "Rerender_FlowEstimation", links={"frames": ("frames", 0)}),
        Node("canny", "Canny", links={"image": ("frames", 0)}),
        Node("background_model", "LoadBackgroundRemovalModel", bypass=True),
        Node("foreground", "RemoveBackground", bypass=True,
             links={"bg_removal_model": ("background_model", 0), "image": ("frames", 0)}),
        Node("checkpoint", "CheckpointLoaderSimple", values={"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        prompt_node("positive", "a beautiful oil painting, best quality, extremely detailed", ("checkpoint", 1),
                    "Positive prompt"),
        prompt_node("negative", "longbody, lowres, bad anatomy, bad hands, missing fingers, cropped, worst quality",
                    ("checkpoint", 1), "Negative prompt"),
        Node("controlnet", "ControlNetLoader", values={"control_net_name": "control_v11p_sd15_canny.pth"}),
        Node("apply_controlnet", "ControlNetApplyAdvanced",
             values={"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
             links={"positive": ("positive", 0), "negative": ("negative", 0), "control_net": ("controlnet", 0),
                    "image": ("canny", 0), "vae": ("checkpoint", 2)}),
        Node("fresco", "Rerender_FrescoKeyFrames",
             links={"model": ("checkpoint", 0), "positive": ("apply_controlnet", 0),
                    "negative": ("apply_controlnet", 1), "vae": ("checkpoint", 2), "frames": ("frames", 0),
                    "keyframes": ("picker", 1), "flow": ("flow", 0), "mask": ("foreground", 0)}),
        Node("propagator", "Rerender_PatchPropagator",
             links={"frames": ("frames", 0), "keyframes": ("picker", 1), "key_frame_images": ("fresco", 0),
                    "flow": ("flow", 0)}),
        Node("create", "CreateVideo", links={"images": ("propagator", 0), "fps": ("frames", 1)}),
        Node("save", "SaveVideo", links={"video": ("create", 0)}, **save_video),
        key_frames_preview(("fresco", 0)),
        flow_preview(),
    ], groups={"Input video": ["load", "frames"],
               "Key frames (adaptive), flow, hints": ["picker", "flow", "canny", "flow_preview"],
               "Foreground mask (bypassed: needs a model)": ["background_model", "foreground"],
               "Model and prompts": ["checkpoint", "positive", "negative", "controlnet"],
               "FRESCO key frames": ["apply_controlnet", "fresco", "key_frames_preview"],
               "Propagation and output": ["propagator", "create", "save"]},
        title="Rerender - FRESCO", color="#A88")
    return [full, full_sdxl, propagation, img2img, roundtrip, tokenflow, tune_a_video, fresco]


def build(nodes_module) -> list:
    written = []
    for workflow in shipped_workflows():
        classes = {n.class_type: nodes_module.NODE_CLASS_MAPPINGS[n.class_type] for n in workflow.nodes}
        definitions = {name: node_definition(cls) for name, cls in classes.items()}
        titles = {name: nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(name, name) for name in classes}
        API_DIR.mkdir(exist_ok=True)
        for path, data in ((ui_path(workflow), to_ui(workflow, definitions, titles)),
                           (api_path(workflow), to_api(workflow, definitions, titles))):
            path.write_text(json.dumps(data, indent=2) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import HostSession
    from host_compat import find_comfyui
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"build_workflows: {reason}")
    host = HostSession(comfy_path, Path(tempfile.mkdtemp()))
    for path in build(host.nodes):
        print(f"wrote {path.relative_to(REPO)}")
