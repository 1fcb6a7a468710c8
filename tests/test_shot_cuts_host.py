"""Shot cuts through the real host, on two shared clips joined end to end: the Key Frame Picker finds the join,
keys both sides of it and shows it on the node; the Patch Propagator keeps each shot's key frames in their shot;
the Key Frame Sampler starts a new anchor at the cut."""
import torch
import torch.nn.functional as F

from clips import read_frames
from tiny_models import conditioning, tiny_sd15, tiny_sd_vae

PICKER_DEFAULTS = dict(mode="uniform", interval=4, include_last=False, s_min=5, s_max=20, index_list="0")
SAMPLER = dict(seed=3, steps=4, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=0.75,
               shape_fusion_start=0.0, shape_fusion_end=0.6, pixel_fusion_start=0.3, pixel_fusion_end=0.9,
               adain_start=0.6, adain_end=1.0, mask_strength=0.5, inner_strength=0.9, smooth_boundary=True,
               fidelity_strength=1.0, fidelity_threshold=0.25, color_preserve=True)


def joined(shared_data, first: int, second: int, size: int) -> tuple:
    """`first` frames of the man clip then `second` of the car clip, size x size; and the first car frame's index."""
    clips = [read_frames(shared_data / "videos" / name, count) for name, count in
             (("man_talking_512x640_25fps.mp4", first), ("car_turn_480x480_10fps.mp4", second))]
    frames = torch.cat([F.interpolate(c.movedim(-1, 1), size=(size, size), mode="area").movedim(1, -1)
                        for c in clips])
    return frames.contiguous(), first


def pick(host, frames, **inputs):
    return host.run_node("Rerender_KeyframePicker", frames=frames, **dict(PICKER_DEFAULTS, **inputs))


def test_picker_keys_both_sides_of_the_join_and_shows_the_cut(host, shared_data):
    frames, join = joined(shared_data, 7, 7, 32)
    images, selection, text = pick(host, frames, split_at_cuts=True)
    assert selection.cuts == (join,)
    assert selection.indices == (0, 4, join - 1, join, join + 4)       # uniform spacing restarts at the cut
    assert text == ",".join(map(str, selection.indices))
    assert torch.equal(images, frames[list(selection.indices)])
    (line,) = host.last_ui["rerender_report"]
    assert line.startswith(f"2 shots; cuts before frames {join} (0.")

    _, plain, _ = pick(host, frames)                                    # off by default: as before cuts existed
    assert plain.cuts == () and plain.indices == (0, 4, 8, 12) and "rerender_report" not in host.last_ui
    _, no_cut, _ = pick(host, frames[:join], split_at_cuts=True)
    assert no_cut.cuts == () and host.last_ui["rerender_report"][0].startswith("no shot cut (largest colour change")


def test_no_propagated_frame_of_one_shot_takes_pixels_from_the_other(host, shared_data):
    """Picker then propagator: shot 1's key frames painted red, shot 2's grey; linear blending, so that any leak
    would show as colour (the histogram blend re-colours to one pass's statistics)."""
    from rerender import flow as flowlib
    from rerender.propagate import PropagationSettings
    frames, join = joined(shared_data, 7, 7, 32)
    key_frames, selection, _ = pick(host, frames, split_at_cuts=True)
    styles = key_frames.mean(dim=-1, keepdim=True).expand(-1, -1, -1, 3).clone()
    in_shot_1 = torch.tensor([index < join for index in selection.indices])
    styles[in_shot_1, ..., 1:] = 0.0
    d = PropagationSettings()
    (video,) = host.run_node(
        "Rerender_PatchPropagator", frames=frames, keyframes=selection, key_frame_images=styles,
        flow=flowlib.VideoFlow.estimate(frames, flowlib.DISEstimator("ultrafast")), colour_weight=d.colour_weight,
        edge_weight=d.edge_weight, temporal_weight=d.temporal_weight, positional_weight=d.positional_weight,
        patch_size=d.patch_size, search_vote_iters=2, patchmatch_iters=2, hole_fill=d.hole_fill,
        histogram_blend=False, poisson_fusion=False, uniformity=d.uniformity, stop_threshold=d.stop_threshold,
        pyramid_levels=0, descriptor_size=d.descriptor_size, seed=d.seed)
    redness = video[..., 0] - video[..., 1:].amax(dim=-1)
    assert redness[join:].max() < 0.02                                  # grey only in shot 2
    assert video[:join, ..., 1:].max() < 0.02 and redness[:join].mean() > 0.1   # red only in shot 1


def test_sampler_starts_a_new_anchor_at_the_cut(host, shared_data):
    """With every constraint on (cross-frame attention, shape- and pixel-aware fusion, AdaIN), shot 2's key frames
    come out exactly as a run on shot 2 alone renders them: no attention, x̂0, flow or previous output of shot 1
    reaches them. The first shot is unchanged by what follows it."""
    from rerender import flow as flowlib
    from rerender.keyframes import KeyFrameSelection
    frames, join = joined(shared_data, 2, 3, 64)
    (model,) = host.run_node("Rerender_CrossFrameAttention", model=tiny_sd15(0), layers="all", start=0.0, end=1.0)
    vae = tiny_sd_vae(0)

    def render(clip, selection):
        images, latent = host.run_node("Rerender_KeyframeSampler", model=model, positive=conditioning(0),
                                       negative=conditioning(1), vae=vae, frames=clip, keyframes=selection,
                                       flow=flowlib.VideoFlow.estimate(clip, flowlib.DISEstimator("ultrafast")),
                                       **SAMPLER)
        return images, latent["samples"], host.last_ui["text"][0]

    images, latents, report = render(frames, KeyFrameSelection(tuple(range(len(frames))), len(frames), (join,)))
    assert report.startswith(f"5 key frames in 2 shots (anchors 0, {join});")
    _, alone, _ = render(frames[join:], KeyFrameSelection((0, 1, 2), 3))
    assert torch.equal(latents[join:], alone)
    _, first_alone, _ = render(frames[:join], KeyFrameSelection((0, 1), 2))
    assert torch.equal(latents[:join], first_alone)
    _, one_shot, _ = render(frames, KeyFrameSelection(tuple(range(len(frames))), len(frames)))
    assert not torch.equal(one_shot[join:], alone)                      # the constraints do reach across otherwise


def test_a_workflow_saved_before_cuts_existed_still_runs_on_the_server(server):
    """The two inputs are optional: an API prompt without them is accepted and runs as before; with split_at_cuts
    on, the node's result carries the cut line the editor shows."""
    import json
    from test_workflows_host import WORKFLOWS, for_tiny_models
    full = for_tiny_models(json.loads((WORKFLOWS / "api" / "rerender_fidelity_roundtrip.json").read_text()))
    picker = next(key for key, node in full.items() if node["class_type"] == "Rerender_KeyframePicker")
    preview = next(key for key, node in full.items() if node["class_type"] == "PreviewAny")
    image = full[picker]["inputs"]["frames"][0]
    prompt = {key: full[key] for key in (image, picker, preview)}
    for name in ("split_at_cuts", "cut_threshold"):
        del prompt[picker]["inputs"][name]
    _, entry = server.queue(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"][picker]["rerender_indices"] == ["0"] and "rerender_report" not in entry["outputs"][picker]

    prompt[picker]["inputs"]["split_at_cuts"] = True
    _, entry = server.queue(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"][picker]["rerender_report"][0].startswith("no shot cut")
