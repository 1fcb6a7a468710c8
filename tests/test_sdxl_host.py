"""SDXL end to end: the shipped SDXL video-to-video workflow on the real server with a tiny SDXL checkpoint (the
`sdxl_models` fixture) and the short real clip of the `server` fixture (6 frames at 10 fps)."""
import json

import pytest
import torch

from conftest import CLIP_FPS, CLIP_FRAMES
from test_cross_frame_attention_host import controller_of, patch
from test_workflows_host import WORKFLOWS, for_tiny_models, saved_files, video_frames_and_fps
from tiny_models import TINY_SDXL_UNET, tiny_sdxl

# SDXL's decoder self-attention: output blocks 0-2 with 10 transformers each, 3-5 with 2 (blocks 6-8 have none).
SDXL_DECODER_LAYERS = 3 * 10 + 3 * 2


def for_tiny_sdxl(prompt: dict, sdxl_models: dict) -> dict:
    """for_tiny_models with the tiny SDXL checkpoint and ControlNet in place of the SD1.5 ones."""
    prompt = for_tiny_models(prompt)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = sdxl_models["checkpoint"]
        elif node["class_type"] == "ControlNetLoader":
            node["inputs"]["control_net_name"] = sdxl_models["controlnet"]
    return prompt


def test_cross_frame_attention_takes_sdxls_decoder_layers(host):
    """SDXL's depths and widths (at 1/10 of the width): 30 decoder self-attention layers at the widest level and
    6 at the next; "loose" keeps those 6, as it keeps SD1.5's two finer levels."""
    depths = dict(transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                  transformer_depth_middle=10)
    model = tiny_sdxl(0, dict(TINY_SDXL_UNET, **depths))
    layers = host.pack_module("engine.cross_frame_attention").decoder_self_attention_layers(model)
    widest = {("output", n, i) for n in range(3) for i in range(10)}
    finer = {("output", n, i) for n in range(3, 6) for i in range(2)}
    assert set(layers) == widest | finer and len(layers) == SDXL_DECODER_LAYERS
    assert {layers[key] for key in widest} == {4 * TINY_SDXL_UNET["model_channels"]}
    assert {layers[key] for key in finer} == {2 * TINY_SDXL_UNET["model_channels"]}
    assert controller_of(host, patch(host, model)).layers == frozenset(layers)
    assert controller_of(host, patch(host, model, layers="loose")).layers == frozenset(finer)


def test_tiny_checkpoint_is_detected_as_sdxl(host, server, sdxl_models):
    """The host's checkpoint detector (run on the file's tensor shapes, not its values) takes it for SDXL itself,
    not one of the distilled SDXL variants, with both text encoders present in the layouts SDXL files use."""
    import comfy.model_detection
    import comfy.supported_models
    from safetensors import safe_open
    path = server.base / "models" / "checkpoints" / sdxl_models["checkpoint"]
    with safe_open(str(path), framework="pt") as checkpoint:
        shapes = {key: torch.empty(checkpoint.get_slice(key).get_shape(), device="meta") for key in checkpoint.keys()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(shapes)
    config = comfy.model_detection.model_config_from_unet(shapes, prefix)
    assert type(config) is comfy.supported_models.SDXL
    assert config.unet_config["transformer_depth"] == [0, 0, 2, 2, 10, 10]
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight" in shapes   # CLIP-L
    assert "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight" in shapes            # OpenCLIP-G


def test_sdxl_video_workflow_runs_and_keeps_frame_count_and_rate(server, sdxl_models):
    prompt = for_tiny_sdxl(json.loads((WORKFLOWS / "api" / "rerender_full_pipeline_sdxl.json").read_text()),
                           sdxl_models)
    messages, entry = server.queue(prompt, timeout_s=900)
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert not errors, errors[0].get("exception_message", errors) if errors else None
    assert entry["status"]["status_str"] == "success"
    (video,) = saved_files(server, entry)
    frames, fps = video_frames_and_fps(video)
    assert frames == CLIP_FRAMES and fps == pytest.approx(CLIP_FPS, abs=0.01)

    # every decoder self-attention of the SDXL UNet was patched, and the key frames used the anchor's caches
    assert f"Cross-Frame Attention: {SDXL_DECODER_LAYERS} of {SDXL_DECODER_LAYERS} decoder" in server.log()
    sampler = next(key for key, node in prompt.items() if node["class_type"] == "Rerender_KeyframeSampler")
    report = "\n".join(entry["outputs"][sampler]["text"])
    assert "attention cache peak 0.0 MiB" not in report and "fell back" not in report, report
    assert "skipped" not in report and "no Cross-Frame Attention" not in report, report


def test_fresco_workflow_serves_sdxl_too(server, sdxl_models):
    """The one FRESCO workflow with the SDXL checkpoint and ControlNet in place of SD1.5's: it runs, keeps the frame
    count and rate, and guides SDXL's finest decoder attention (the 6 layers of output blocks 3-5 here)."""
    prompt = for_tiny_sdxl(json.loads((WORKFLOWS / "api" / "rerender_fresco_pipeline.json").read_text()),
                           sdxl_models)
    messages, entry = server.queue(prompt, timeout_s=900)
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert not errors, errors[0].get("exception_message", errors) if errors else None
    (video,) = saved_files(server, entry)
    frames, fps = video_frames_and_fps(video)
    assert frames == CLIP_FRAMES and fps == pytest.approx(CLIP_FPS, abs=0.01)
    node = next(key for key, node in prompt.items() if node["class_type"] == "Rerender_FrescoKeyFrames")
    report = "\n".join(entry["outputs"][node]["text"])
    assert "on 6 decoder self-attention layers (output blocks [3, 4, 5])" in report, report
    assert "feature optimisation, spatial loss" in report, report
