"""The key frame sampler through the real host on tiny random-weight SD1.5-architecture models: equality with
KSampler when every constraint is off, what each constraint does to x̂0 / x, per-frame ControlNet hints wired
upstream (one or two chained ControlNets), isolation of the model passed in, and errors before sampling."""
import pytest
import torch

from rerender.adain import channel_stats
from tiny_models import conditioning, taef2_vae, tiny_controlnet, tiny_sd15, tiny_sd_vae

SIZE = 64
SEED = 11
ALL_OFF = dict(shape_fusion_start=0.0, shape_fusion_end=0.0, pixel_fusion_start=0.0, pixel_fusion_end=0.0,
               adain_start=0.0, adain_end=0.0)
NODE_DEFAULTS = dict(seed=SEED, steps=4, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=0.75,
                     mask_strength=0.5, inner_strength=0.9, smooth_boundary=True, fidelity_strength=1.0,
                     fidelity_threshold=0.25, color_preserve=True)


def clip(count=3, seed=0):
    return torch.rand(count, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def zero_flow(host, frames):
    """The pack's own flow payload with an estimator that sees no motion (hence no occlusion either)."""
    video_flow = host.pack_module("rerender.flow").VideoFlow
    return video_flow(frames, lambda targets, sources: torch.zeros(targets.shape[0], 2, *targets.shape[-2:]))


def keyframes(host, indices, count):
    return host.pack_module("rerender.keyframes").KeyFrameSelection(tuple(indices), count)


def run_sampler(host, model, frames, indices=None, vae=None, **inputs):
    args = dict(NODE_DEFAULTS, **ALL_OFF)
    args.update(inputs)
    selection = keyframes(host, range(len(frames)) if indices is None else indices, len(frames))
    return host.run_node("Rerender_KeyframeSampler", model=model, positive=conditioning(0),
                         negative=conditioning(1), vae=vae or tiny_sd_vae(0), frames=frames, keyframes=selection,
                         **args)


def render(host, model, frames, flow=None, on_step=None, **settings):
    """The renderer itself, for tests that watch each step's x̂0."""
    rendering = host.pack_module("engine.rerender_a_video")
    options = dict(seed=SEED, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                   shape_period=(0.0, 0.0), pixel_period=(0.0, 0.0), adain_period=(0.0, 0.0))
    options.update(settings)
    renderer = rendering.KeyframeRenderer(model, conditioning(0), conditioning(1), tiny_sd_vae(0), frames,
                                          keyframes(host, range(len(frames)), len(frames)), flow,
                                          rendering.KeyframeSettings(**options), on_step=on_step)
    return renderer.run()


def x0_per_step(steps_seen, key_frame, pass_name=None):
    return {info.step: info.x0 for info in steps_seen
            if info.key_frame == key_frame and (pass_name is None or info.pass_name == pass_name)}


@pytest.mark.parametrize("sampler_name, scheduler, denoise", [("ddim", "ddim_uniform", 0.75),
                                                             ("euler_ancestral", "karras", 1.0),
                                                             ("dpmpp_2m", "normal", 0.6)])
def test_all_constraints_off_equals_ksampler_img2img(host, sampler_name, scheduler, denoise):
    model, vae, frames = tiny_sd15(0), tiny_sd_vae(0), clip()
    images, latent = run_sampler(host, model, frames, sampler_name=sampler_name, scheduler=scheduler,
                                 denoise=denoise)
    for i in range(len(frames)):
        (plain,) = host.nodes.VAEEncode().encode(vae, frames[i:i + 1])
        (expected,) = host.nodes.KSampler().sample(model, SEED, 4, 5.0, sampler_name, scheduler, conditioning(0),
                                                   conditioning(1), plain, denoise=denoise)
        assert torch.equal(latent["samples"][i:i + 1], expected["samples"])
        assert torch.equal(images[i:i + 1], vae.decode(expected["samples"]))


def test_zero_flow_fusion_copies_the_anchor_x0(host):
    frames, seen = clip(), []
    render(host, tiny_sd15(0), frames, zero_flow(host, frames), seen.append, shape_period=(0.0, 0.5))
    anchor = x0_per_step(seen, 0)
    for key_frame in (1, 2):
        fused = x0_per_step(seen, key_frame)
        assert sorted(fused) == [0, 1, 2, 3]
        for step in (0, 1, 2):                       # 4·0.5 = 2 is included, as in the reference
            assert torch.equal(fused[step], anchor[step])
        assert not torch.equal(fused[3], anchor[3])


def test_adain_matches_the_anchor_channel_statistics(host):
    frames, seen = clip(), []
    render(host, tiny_sd15(0), frames, on_step=seen.append, adain_period=(0.5, 1.0))
    anchor = x0_per_step(seen, 0)
    adjusted = x0_per_step(seen, 2)
    for step in (2, 3):
        for ours, theirs in zip(channel_stats(adjusted[step]), channel_stats(anchor[step])):
            assert torch.allclose(ours, theirs, rtol=2e-2, atol=1e-4)
    mean, _ = channel_stats(adjusted[1])
    assert not torch.allclose(mean, channel_stats(anchor[1])[0], atol=1e-3)


def test_full_blend_weight_pulls_the_result_to_the_reference(host):
    """mask_strength 1 with no occlusion: w = 1 and r = 0, so x becomes the noised reference E*(warped anchor)."""
    frames, seen = clip(2), []
    flow = zero_flow(host, frames)
    fidelity = host.pack_module("rerender.fidelity").fidelity_encode
    vae = tiny_sd_vae(0)
    images, latents, stats = render(host, tiny_sd15(0), frames, flow, seen.append, pixel_period=(0.0, 1.0),
                                    mask_strength=1.0)
    target, _ = fidelity(vae.encode, vae.decode, images[:1])       # the pixel reference is the anchor itself
    blended = (latents[1] - target[0]).abs().mean()
    _, unblended, _ = render(host, tiny_sd15(0), frames, flow)
    assert blended < 0.01 * (unblended[1] - target[0]).abs().mean()
    passes = [info.pass_name for info in seen if info.key_frame == 1]
    assert passes == ["rough"] * 4 + ["final"] * 3     # the final pass resumes at the first blend step (1)
    assert (stats.vae_encodes, stats.vae_decodes) == (1 + 3, 1 + 4)   # anchor; key frame as the reference


def test_model_is_unchanged_and_a_second_run_is_identical(host):
    import comfy.utils
    model = tiny_sd15(0)
    (patched,) = host.run_node("Rerender_CrossFrameAttention", model=model, layers="loose", start=0.0, end=1.0)
    options_before = comfy.utils.deepcopy_list_dict(patched.model_options)
    weights_before = {k: v.clone() for k, v in patched.model.state_dict().items()}
    frames = clip()
    flow = zero_flow(host, frames)
    everything = dict(shape_fusion_start=0.0, shape_fusion_end=0.5, pixel_fusion_start=0.2, pixel_fusion_end=0.9,
                      adain_start=0.75, adain_end=1.0, denoise=1.0)
    first = run_sampler(host, patched, frames, flow=flow, **everything)
    second = run_sampler(host, patched, frames, flow=flow, **everything)
    assert torch.equal(first[1]["samples"], second[1]["samples"]) and torch.equal(first[0], second[0])
    assert patched.model_options == options_before
    assert all(torch.equal(v, weights_before[k]) for k, v in patched.model.state_dict().items())
    assert patched.patches == {} and "sampler_post_cfg_function" not in patched.model_options


def frame_hints(count, base):
    """One hint image per frame with a recognisable value: base + 0.1·(frame + 1)."""
    return torch.stack([torch.full((SIZE, SIZE, 3), base + 0.1 * (i + 1)) for i in range(count)])


def watch_hints(control_net, seen, current):
    """Record (key frame being rendered, mean of the hint the ControlNet receives) at every ControlNet call."""
    control_net.control_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((current[0], round(kwargs["hint"].mean().item(), 4))),
        with_kwargs=True)


def render_with_hints(host, positive, negative, frames, indices, flow=None, **settings):
    rendering = host.pack_module("engine.rerender_a_video")
    current = [None]
    options = dict(seed=SEED, steps=4, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0,
                   shape_period=(0.0, 0.0), pixel_period=(0.3, 0.9), adain_period=(0.0, 0.0))
    options.update(settings)
    renderer = rendering.KeyframeRenderer(
        tiny_sd15(0), positive, negative, tiny_sd_vae(0), frames, keyframes(host, indices, len(frames)), flow,
        rendering.KeyframeSettings(**options), on_key_frame=lambda number, index, total: current.__setitem__(0, index))
    return renderer, current


def test_upstream_controlnet_gives_each_key_frame_its_own_hint_on_every_pass(host):
    """Apply ControlNet (Advanced) on the whole clip's hints, as shared workflows wire it: every ControlNet call
    of every pass (anchor, rough, final) sees the hint of the key frame being rendered."""
    import nodes
    frames = clip(4)
    control_net = tiny_controlnet(3)
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning(0), conditioning(1), control_net, frame_hints(4, 0.0), 1.0, 0.0, 1.0)
    renderer, current = render_with_hints(host, positive, negative, frames, (0, 2, 3), zero_flow(host, frames))
    seen = []
    watch_hints(control_net, seen, current)
    _, latents, _ = renderer.run()
    expected = {0: 0.1, 2: 0.3, 3: 0.4}
    assert {frame for frame, _ in seen} == set(expected)
    assert all(hint == expected[frame] for frame, hint in seen), seen
    calls = {frame: sum(1 for f, _ in seen if f == frame) for frame in expected}
    assert calls[0] == 4 and calls[2] > 4 and calls[3] > 4      # key frames: rough pass + final pass from its blend
    without, _ = render_with_hints(host, conditioning(0), conditioning(1), frames, (0, 2, 3), zero_flow(host, frames))
    assert not torch.equal(without.run()[1], latents)


def test_two_chained_controlnets_keep_their_own_periods_and_hints(host):
    import nodes
    frames = clip(3)
    first, second = tiny_controlnet(3), tiny_controlnet(4)
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning(0), conditioning(1), first, frame_hints(3, 0.0), 1.0, 0.0, 0.5)
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, second, frame_hints(3, 0.5), 0.7, 0.5, 1.0)
    renderer, current = render_with_hints(host, positive, negative, frames, (0, 1, 2), pixel_period=(0.0, 0.0))
    seen_first, seen_second = [], []
    watch_hints(first, seen_first, current)
    watch_hints(second, seen_second, current)
    renderer.run()
    for seen, base in ((seen_first, 0.0), (seen_second, 0.5)):
        assert {frame for frame, _ in seen} == {0, 1, 2}
        assert all(abs(hint - (base + 0.1 * (frame + 1))) < 1e-4 for frame, hint in seen), seen
    # start/end split the 4 steps between them: neither runs at every step, together they cover all of them.
    assert 0 < len(seen_first) < 4 * 3 and 0 < len(seen_second) < 4 * 3
    assert len(seen_first) + len(seen_second) >= 4 * 3


def test_progress_events_name_each_key_frame(host):
    while not host.server.messages.empty():
        host.server.messages.get_nowait()
    run_sampler(host, tiny_sd15(0), clip(3), indices=(0, 2), unique_id="42")
    events = []
    while not host.server.messages.empty():
        events.append(host.server.messages.get_nowait())
    ours = [data for event, data, _ in events if event == "rerender.keyframe_progress"]
    assert ours == [{"node": "42", "key_frame": 0, "frame_index": 0, "total": 2},
                    {"node": "42", "key_frame": 1, "frame_index": 2, "total": 2}]
    assert "2 key frames" in host.last_ui["text"][0]


def counting(model):
    """A clone that counts UNet calls, to prove errors come before any sampling."""
    calls = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"],
                                                                                         args["timestep"],
                                                                                         **args["c"]))
    return counted, calls


@pytest.mark.parametrize("change, message", [
    (dict(indices=(0, 1), frames_count=3, selection_count=2), "picked for 2 frames"),
    (dict(control_hints=2), "ControlNet .*2 hint images for a 3-frame clip"),
    (dict(sampler_name="dpm_adaptive"), "dpm_adaptive.*adaptive.*use one of: euler"),
    (dict(pixel_fusion_start=-0.2), r"\[0, 1\]"),
    (dict(shape_fusion_end=0.5, denoise=1.0), "no `flow`"),
    (dict(flow_frames=2), "flow"),
    (dict(flow_of_other_clip=True), "another clip"),   # same shape, other pictures
    (dict(size=60), "multiples of 8"),
    (dict(taef2=True), "channel"),
])
def test_bad_input_fails_before_sampling(host, change, message):
    change = dict(change)
    counted, calls = counting(tiny_sd15(0))
    size = change.pop("size", SIZE)
    frames = torch.rand(change.pop("frames_count", 3), size, size, 3)
    selection_count = change.pop("selection_count", len(frames))
    indices = change.pop("indices", tuple(range(selection_count)))
    inputs = dict(NODE_DEFAULTS, **ALL_OFF)
    vae = taef2_vae() if change.pop("taef2", False) else tiny_sd_vae(0)
    positive, negative = conditioning(0), conditioning(1)
    if "control_hints" in change:
        import nodes
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, tiny_controlnet(0), torch.rand(change.pop("control_hints"), 8, 8, 3), 1.0, 0.0, 1.0)
    flow_frames = change.pop("flow_frames", None)
    if flow_frames is not None:
        inputs["flow"] = zero_flow(host, frames[:flow_frames])
    if change.pop("flow_of_other_clip", False):
        inputs["flow"] = zero_flow(host, torch.rand_like(frames))
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        host.run_node("Rerender_KeyframeSampler", model=counted, positive=positive, negative=negative, vae=vae, frames=frames, keyframes=keyframes(host, indices, selection_count), **inputs)
    assert calls == []


@pytest.mark.parametrize("sampler_name", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lms",
                                          "dpmpp_2s_ancestral", "res_multistep"])
def test_every_constraint_runs_with_other_samplers(host, sampler_name):
    model = tiny_sd15(0)
    (patched,) = host.run_node("Rerender_CrossFrameAttention", model=model, layers="all", start=0.0, end=1.0)
    frames = clip(2)
    everything = dict(shape_fusion_start=0.0, shape_fusion_end=0.5, pixel_fusion_start=0.2, pixel_fusion_end=0.9,
                      adain_start=0.75, adain_end=1.0, denoise=1.0, sampler_name=sampler_name, scheduler="karras")
    images, latent = run_sampler(host, patched, frames, flow=zero_flow(host, frames), **everything)
    assert torch.isfinite(latent["samples"]).all() and images.shape == frames.shape
    assert "fell back" not in host.last_ui["text"][0] and "skipped" not in host.last_ui["text"][0]


def test_widget_only_problems_are_refused_at_queue_time(host):
    """The node's own queue-time check takes `sampler_name` alone: the host reports a failed `validate_inputs` on
    every input the function takes, and checks the other widgets' ranges itself (tests/test_queue_time_host.py)."""
    import inspect
    node = host.nodes.NODE_CLASS_MAPPINGS["Rerender_KeyframeSampler"]
    assert list(inspect.signature(node.validate_inputs).parameters) == ["sampler_name"]
    assert node.validate_inputs(sampler_name="ddim") is True
    assert "dpm_fast" in node.validate_inputs(sampler_name="dpm_fast")
    assert node.validate_inputs() is True  # linked: checked when it runs


def test_start_after_end_switches_a_constraint_off(host):
    frames = clip(2)
    _, off, _ = render(host, tiny_sd15(0), frames)
    _, reversed_period, _ = render(host, tiny_sd15(0), frames, adain_period=(1.0, 0.0))
    assert torch.equal(off, reversed_period)


def test_colour_not_preserved_matches_inputs_to_a_pure_noise_anchor(host):
    frames, seen = clip(2), []
    images, latents, _ = render(host, tiny_sd15(0), frames, on_step=seen.append, color_preserve=False)
    assert [info.pass_name for info in seen].count("colour") == 4    # the whole schedule, from pure noise
    assert seen[-1].done == seen[-1].total == 4 + 4 + 4
    preserved = render(host, tiny_sd15(0), frames)[1]
    assert torch.isfinite(latents).all() and not torch.equal(latents, preserved)
