"""The pack inside a real ComfyUI: registration, schema, and the three foundation nodes on real data."""
import pytest
import torch

from clips import psnr, read_frames
from tiny_models import taef2_vae, tiny_sd_vae

FOUNDATION_NODES = ["Rerender_KeyframePicker", "Rerender_FidelityEncode", "Rerender_AdaINLatent"]


def test_pack_loads_through_the_host_loader(host):
    assert host.pack_loaded, "the host's custom-node loader reported an import failure for the pack"
    for node_id in FOUNDATION_NODES:
        assert node_id in host.pack_node_ids
    assert all(node_id.startswith("Rerender_") for node_id in host.pack_node_ids)


# One sub-category per method, and one for the stages they share (a flat "Rerender" held all of them before).
NODE_CATEGORIES = {
    **dict.fromkeys(["Rerender_KeyframeSampler", "Rerender_CrossFrameAttention", "Rerender_FidelityEncode",
                     "Rerender_AdaINLatent"], "Rerender/Rerender-A-Video"),
    "Rerender_FrescoKeyFrames": "Rerender/FRESCO",
    "Rerender_TokenFlowSampler": "Rerender/TokenFlow",
    **dict.fromkeys(["Rerender_TuneAVideo", "Rerender_TuneAVideoSave", "Rerender_TuneAVideoLoad"],
                    "Rerender/Tune-A-Video"),
    **dict.fromkeys(["Rerender_VideoFrames", "Rerender_KeyframePicker", "Rerender_FlowEstimation",
                     "Rerender_RAFTLoader", "Rerender_PatchPropagator", "Rerender_Inversion",
                     "Rerender_InvertedNoise"], "Rerender/Shared"),
}
# Output names that say what they carry (ids unchanged: links are by slot, saved workflows load).
OUTPUT_NAMES = {"Rerender_PatchPropagator": ["frames"], "Rerender_KeyframeSampler": ["key_frames", "key_frame_latents"],
                "Rerender_FrescoKeyFrames": ["key_frames", "key_frame_latents"],
                "Rerender_TuneAVideo": ["model", "tuned", "loss_map", "clip_latents"],
                "Rerender_TokenFlowSampler": ["latents"], "Rerender_AdaINLatent": ["adjusted_latent"]}


def test_nodes_sit_in_their_methods_category_with_outputs_named_by_content(host):
    assert sorted(NODE_CATEGORIES) == host.pack_node_ids
    for node_id, names in OUTPUT_NAMES.items():
        assert list(host.nodes.NODE_CLASS_MAPPINGS[node_id].RETURN_NAMES) == names, node_id


def test_every_input_and_output_has_a_tooltip(host):
    for node_id in host.pack_node_ids:
        info = host.nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert info["category"] == NODE_CATEGORIES[node_id], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]) and len(info["output_tooltips"]) == len(info["output"]), node_id


def test_keyframe_picker_node(host):
    frames = torch.rand(25, 16, 16, 3)
    images, selection, text = host.run_node("Rerender_KeyframePicker", frames=frames, mode="uniform", interval=10,
                                            include_last=True, s_min=5, s_max=20, index_list="")
    assert text == "0,10,20,24" and selection.indices == (0, 10, 20, 24) and selection.num_frames == 25
    assert torch.equal(images, frames[[0, 10, 20, 24]])
    _, selection, _ = host.run_node("Rerender_KeyframePicker", frames=frames, mode="list", interval=10,
                                    include_last=True, s_min=5, s_max=20, index_list="0:-1:10,-1")
    assert selection.indices == (0, 10, 20, 24)


@pytest.mark.parametrize("inputs, message", [
    (dict(mode="list", index_list="0,30"), "out of range"),
    (dict(mode="list", index_list="5,2"), "increasing"),
    (dict(mode="adaptive", s_min=9, s_max=3), "s_min"),
])
def test_keyframe_picker_rejects_bad_input(host, inputs, message):
    args = dict(frames=torch.rand(25, 16, 16, 3), mode="uniform", interval=10, include_last=True, s_min=5,
                s_max=20, index_list="")
    args.update(inputs)
    with pytest.raises(ValueError, match=message):
        host.run_node("Rerender_KeyframePicker", **args)
    with pytest.raises(ValueError, match="empty"):
        host.run_node("Rerender_KeyframePicker", **dict(args, frames=torch.zeros(0, 16, 16, 3)))


def test_fidelity_encode_beats_plain_encode_with_real_taef2(host, shared_data):
    """decode(E*(I)) is closer to I than decode(E(I)), and E* drifts less over 10 round trips."""
    vae = taef2_vae()
    # a 128x128 crop around the face keeps ten round trips cheap on the CPU; bench/ runs the full frames
    frames = read_frames(shared_data / "videos" / "man_talking_512x640_25fps.mp4", 1)[:, 96:224, 192:320]
    assert vae.latent_channels == 128

    plain_latent = vae.encode(frames)
    (latent, rejected) = host.run_node("Rerender_FidelityEncode", pixels=frames, vae=vae, strength=1.0,
                                       error_threshold=0.25)
    assert latent["samples"].shape == plain_latent.shape == (1, 128, 8, 8)
    assert rejected.shape == (1, 8, 8)
    assert psnr(vae.decode(latent["samples"]), frames) > psnr(vae.decode(plain_latent), frames)

    from rerender.fidelity import fidelity_encode
    plain, fidel = frames, frames
    with torch.inference_mode():
        for _ in range(10):
            plain = vae.decode(vae.encode(plain))
            fidel = vae.decode(fidelity_encode(vae.encode, vae.decode, fidel)[0])
    assert psnr(fidel, frames) > psnr(plain, frames)


def test_vae_factor_is_measured_not_assumed(host):
    vae_factor = host.pack_module("engine.vae").vae_spatial_factor
    assert vae_factor(taef2_vae()) == 16 and vae_factor(tiny_sd_vae()) == 8


def test_fidelity_encode_rejects_sizes_the_vae_would_crop(host):
    with pytest.raises(ValueError, match="multiples of 16"):
        host.run_node("Rerender_FidelityEncode", pixels=torch.rand(1, 40, 40, 3), vae=taef2_vae(), strength=1.0,
                      error_threshold=0.25)
    with pytest.raises(ValueError, match="multiples of 8"):
        host.run_node("Rerender_FidelityEncode", pixels=torch.rand(1, 36, 40, 3), vae=tiny_sd_vae(), strength=1.0,
                      error_threshold=0.25)


def test_adain_node_matches_the_reference_and_rejects_mixed_channels(host):
    latent = {"samples": torch.randn(3, 4, 8, 8) * 2 + 1, "batch_index": [0, 1, 2]}
    reference = {"samples": torch.randn(1, 4, 8, 8) * 0.3 - 1}
    (out,) = host.run_node("Rerender_AdaINLatent", latent=latent, reference=reference, strength=1.0)
    assert out["batch_index"] == [0, 1, 2] and latent["samples"].abs().mean() > 1  # input left untouched
    ref_mean = reference["samples"].mean(dim=(2, 3))
    assert torch.allclose(out["samples"].mean(dim=(2, 3)), ref_mean.expand(3, 4), atol=1e-4)
    with pytest.raises(ValueError, match="channels"):
        host.run_node("Rerender_AdaINLatent", latent=latent, reference={"samples": torch.randn(1, 128, 8, 8)},
                      strength=1.0)
