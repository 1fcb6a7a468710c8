"""Writes the shipped workflows, each as a UI-format file (for the editor) and its API-format twin (`*_api.json`,
for headless queueing), from one description per graph, so the two never drift.

Every widget not set here gets the node's own default, read from the node definitions of a real ComfyUI with this
pack loaded. Run after changing a node's inputs:
    COMFYUI_PATH=/path/to/ComfyUI python workflows/build_workflows.py
"""
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
NODE_WIDTH = 320
GROUP_PADDING = 30


@dataclass
class Node:
    key: str
    class_type: str
    pos: tuple
    values: dict = field(default_factory=dict)       # widget values that differ from the node's defaults
    links: dict = field(default_factory=dict)        # input name -> (source node key, output slot)
    bypass: bool = False                             # UI only: a bypassed node is left out of the API twin
    ui_widgets: list = None                          # UI widget values where the frontend stores more than inputs
    api_extra: dict = field(default_factory=dict)    # API-only inputs (nested dynamic inputs)


@dataclass
class Workflow:
    name: str
    nodes: list
    groups: dict                                     # title -> node keys


def node_definition(cls) -> dict:
    return {"input": cls.INPUT_TYPES(), "outputs": list(zip(cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", None)
                                                            or cls.RETURN_TYPES))}


def input_specs(definition: dict) -> list:
    """(name, spec) for every input, required first, in the node's own order."""
    specs = []
    for section in ("required", "optional"):
        specs.extend(definition["input"].get(section, {}).items())
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
        # a bypassed node passes its first input of the same type through, as the editor does
        while key not in active:
            node = by_key[key]
            out_type = definitions[node.class_type]["outputs"][slot][0]
            for name, spec in input_specs(definitions[node.class_type]):
                if spec[0] == out_type and name in node.links:
                    key, slot = node.links[name]
                    break
            else:
                raise ValueError(f"bypassed {node.class_type} cannot pass {out_type} through")
        return [ids[key], slot]

    prompt = {}
    for node in workflow.nodes:
        if node.bypass:
            continue
        inputs = dict(resolve(node, definitions[node.class_type]))
        inputs.update({name: source(*link) for name, link in node.links.items()})
        inputs.update(node.api_extra)
        prompt[ids[node.key]] = {"class_type": node.class_type, "inputs": inputs,
                                 "_meta": {"title": titles[node.class_type]}}
    return prompt


def to_ui(workflow: Workflow, definitions: dict, titles: dict) -> dict:
    ids = {n.key: i + 1 for i, n in enumerate(workflow.nodes)}
    links, ui_nodes = [], []
    out_links = {}
    for node in workflow.nodes:
        definition = definitions[node.class_type]
        for name, (src, slot) in node.links.items():
            link_id = len(links) + 1
            socket_inputs = [n for n, s in input_specs(definition) if not is_widget(s) or n in node.links]
            out_type = definitions[by_key(workflow, src).class_type]["outputs"][slot][0]
            links.append([link_id, ids[src], slot, ids[node.key], socket_inputs.index(name), out_type])
            out_links.setdefault((src, slot), []).append(link_id)
    for order, node in enumerate(workflow.nodes):
        definition = definitions[node.class_type]
        inputs = []
        for name, spec in input_specs(definition):
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
        rows = len(widgets) + max(len(inputs), len(outputs))
        ui_nodes.append({"id": ids[node.key], "type": node.class_type, "pos": list(node.pos),
                         "size": [NODE_WIDTH, 46 + 24 * rows], "flags": {}, "order": order,
                         "mode": 4 if node.bypass else 0, "inputs": inputs, "outputs": outputs,
                         "title": titles[node.class_type],
                         "properties": {"Node name for S&R": node.class_type}, "widgets_values": widgets})
    groups = []
    for title, keys in workflow.groups.items():
        members = [n for n in ui_nodes if n["id"] in {ids[k] for k in keys}]
        x0 = min(n["pos"][0] for n in members) - GROUP_PADDING
        y0 = min(n["pos"][1] for n in members) - GROUP_PADDING - 20
        x1 = max(n["pos"][0] + n["size"][0] for n in members) + GROUP_PADDING
        y1 = max(n["pos"][1] + n["size"][1] for n in members) + GROUP_PADDING
        groups.append({"title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": "#3f789e",
                       "font_size": 24, "flags": {}})
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def by_key(workflow: Workflow, key: str) -> Node:
    return next(n for n in workflow.nodes if n.key == key)


def shipped_workflows() -> list:
    save_video = dict(ui_widgets=["rerender/video", "auto", "auto"],
                      values={"filename_prefix": "rerender/video", "format": "auto"},
                      api_extra={"format.codec": "auto"})
    input_video = [
        Node("load", "LoadVideo", (0, 0), values={"file": "input.mp4"}, ui_widgets=["input.mp4", "image"]),
        Node("components", "GetVideoComponents", (0, 420), links={"video": ("load", 0)}),
        Node("scale", "ImageScale", (0, 620), values={"width": 512, "height": 512, "crop": "center"},
             links={"image": ("components", 0)}),
    ]
    full = Workflow("rerender_full_pipeline", input_video + [
        Node("picker", "Rerender_KeyframePicker", (400, 0), links={"frames": ("scale", 0)}),
        Node("flow", "Rerender_FlowEstimation", (400, 420), links={"frames": ("scale", 0)}),
        Node("canny", "Canny", (400, 800), links={"image": ("scale", 0)}),
        Node("checkpoint", "CheckpointLoaderSimple", (800, 0), values={"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        Node("lora", "LoraLoader", (800, 180), bypass=True,
             links={"model": ("checkpoint", 0), "clip": ("checkpoint", 1)}),
        Node("positive", "CLIPTextEncode", (800, 420), values={"text": "a beautiful oil painting, best quality, "
                                                                          "extremely detailed"},
             links={"clip": ("lora", 1)}),
        Node("negative", "CLIPTextEncode", (800, 680), values={"text": "longbody, lowres, bad anatomy, bad hands, "
                                                                          "missing fingers, cropped, worst quality"},
             links={"clip": ("lora", 1)}),
        Node("controlnet", "ControlNetLoader", (800, 940), values={"control_net_name": "control_v11p_sd15_canny.pth"}),
        Node("apply_controlnet", "ControlNetApplyAdvanced", (1200, 940),
             values={"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
             links={"positive": ("positive", 0), "negative": ("negative", 0), "control_net": ("controlnet", 0),
                    "image": ("canny", 0), "vae": ("checkpoint", 2)}),
        Node("attention", "Rerender_CrossFrameAttention", (1200, 0), links={"model": ("lora", 0)}),
        Node("sampler", "Rerender_KeyframeSampler", (1200, 260),
             links={"model": ("attention", 0), "positive": ("apply_controlnet", 0),
                    "negative": ("apply_controlnet", 1), "vae": ("checkpoint", 2), "frames": ("scale", 0),
                    "keyframes": ("picker", 1), "flow": ("flow", 0)}),
        Node("propagator", "Rerender_PatchPropagator", (1600, 0),
             links={"frames": ("scale", 0), "keyframes": ("picker", 1), "key_frame_images": ("sampler", 0),
                    "flow": ("flow", 0)}),
        Node("create", "CreateVideo", (2000, 0), links={"images": ("propagator", 0), "fps": ("components", 2)}),
        Node("save", "SaveVideo", (2000, 260), links={"video": ("create", 0)}, **save_video),
    ], groups={"Input video": ["load", "components", "scale"],
               "Key frames, flow and control hints": ["picker", "flow", "canny"],
               "Model and prompts": ["checkpoint", "lora", "positive", "negative", "controlnet"],
               "Key frame rendering": ["attention", "apply_controlnet", "sampler"],
               "Propagation and output": ["propagator", "create", "save"]})

    propagation = Workflow("rerender_propagation_only", input_video + [
        Node("picker", "Rerender_KeyframePicker", (400, 0), values={"mode": "list", "index_list": "0,-1"},
             links={"frames": ("scale", 0)}),
        Node("flow", "Rerender_FlowEstimation", (400, 420), links={"frames": ("scale", 0)}),
        Node("first_key", "LoadImage", (800, 0), values={"image": "key_first.png"},
             ui_widgets=["key_first.png", "image"]),
        Node("last_key", "LoadImage", (800, 380), values={"image": "key_last.png"},
             ui_widgets=["key_last.png", "image"]),
        Node("keys", "ImageBatch", (800, 760), links={"image1": ("first_key", 0), "image2": ("last_key", 0)}),
        Node("propagator", "Rerender_PatchPropagator", (1200, 0),
             links={"frames": ("scale", 0), "keyframes": ("picker", 1), "key_frame_images": ("keys", 0),
                    "flow": ("flow", 0)}),
        Node("create", "CreateVideo", (1600, 0), links={"images": ("propagator", 0), "fps": ("components", 2)}),
        Node("save", "SaveVideo", (1600, 260), links={"video": ("create", 0)}, **save_video),
    ], groups={"Input video": ["load", "components", "scale"], "Key frames and flow": ["picker", "flow"],
               "Your painted key frames (first and last frame)": ["first_key", "last_key", "keys"],
               "Propagation and output": ["propagator", "create", "save"]})

    img2img = Workflow("rerender_fidelity_img2img", [
        Node("image", "LoadImage", (0, 0), values={"image": "example.png"}, ui_widgets=["example.png", "image"]),
        Node("checkpoint", "CheckpointLoaderSimple", (0, 380), values={"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        Node("positive", "CLIPTextEncode", (400, 0), values={"text": "a watercolor painting, best quality"},
             links={"clip": ("checkpoint", 1)}),
        Node("negative", "CLIPTextEncode", (400, 260), values={"text": "lowres, worst quality"},
             links={"clip": ("checkpoint", 1)}),
        Node("encode", "Rerender_FidelityEncode", (400, 520), links={"pixels": ("image", 0), "vae": ("checkpoint", 2)}),
        Node("ksampler", "KSampler", (800, 0), values={"denoise": 0.6},
             links={"model": ("checkpoint", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                    "latent_image": ("encode", 0)}),
        Node("decode", "VAEDecode", (1200, 0), links={"samples": ("ksampler", 0), "vae": ("checkpoint", 2)}),
        Node("save", "SaveImage", (1200, 200), values={"filename_prefix": "rerender/img2img"},
             links={"images": ("decode", 0)}),
    ], groups={"Image and model": ["image", "checkpoint"],
               "Fidelity-oriented encode and prompts": ["positive", "negative", "encode"],
               "Sample and save": ["ksampler", "decode", "save"]})
    roundtrip = Workflow("rerender_fidelity_roundtrip", [
        Node("image", "LoadImage", (0, 0), values={"image": "example.png"}, ui_widgets=["example.png", "image"]),
        Node("vae", "VAELoader", (0, 380), values={"vae_name": "taef2"}),
        Node("fidelity", "Rerender_FidelityEncode", (400, 0), links={"pixels": ("image", 0), "vae": ("vae", 0)}),
        Node("fidelity_decode", "VAEDecode", (800, 0), links={"samples": ("fidelity", 0), "vae": ("vae", 0)}),
        Node("fidelity_save", "SaveImage", (1200, 0), values={"filename_prefix": "rerender/fidelity_encode"},
             links={"images": ("fidelity_decode", 0)}),
        Node("plain", "VAEEncode", (400, 300), links={"pixels": ("image", 0), "vae": ("vae", 0)}),
        Node("plain_decode", "VAEDecode", (800, 300), links={"samples": ("plain", 0), "vae": ("vae", 0)}),
        Node("plain_save", "SaveImage", (1200, 380), values={"filename_prefix": "rerender/plain_encode"},
             links={"images": ("plain_decode", 0)}),
        Node("picker", "Rerender_KeyframePicker", (400, 560), links={"frames": ("image", 0)}),
        Node("indices", "PreviewAny", (800, 560), links={"source": ("picker", 2)}),
    ], groups={"Input": ["image", "vae"], "Fidelity-oriented encode": ["fidelity", "fidelity_decode", "fidelity_save"],
               "Plain encode, for comparison": ["plain", "plain_decode", "plain_save"],
               "Key frame picker": ["picker", "indices"]})
    return [full, propagation, img2img, roundtrip]


def build(nodes_module) -> list:
    written = []
    for workflow in shipped_workflows():
        classes = {n.class_type: nodes_module.NODE_CLASS_MAPPINGS[n.class_type] for n in workflow.nodes}
        definitions = {name: node_definition(cls) for name, cls in classes.items()}
        titles = {name: nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(name, name) for name in classes}
        for suffix, data in (("", to_ui(workflow, definitions, titles)), ("_api", to_api(workflow, definitions, titles))):
            path = HERE / f"{workflow.name}{suffix}.json"
            path.write_text(json.dumps(data, indent=2) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import HostSession
    from host_compat import find_comfyui
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"build_workflows: {reason}")
    host = HostSession(comfy_path, Path(tempfile.mkdtemp()))
    for path in build(host.nodes):
        print(f"wrote {path.relative_to(HERE.parent)}")
