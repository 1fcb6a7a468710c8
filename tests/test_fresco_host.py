"""FRESCO key frames through the real host on tiny random-weight SD1.5-architecture models: equality with KSampler
img2img when every component is off, the shared anchors as the model sees them, feature optimisation's isolation
from the model, coupling of consecutive key frames on a real clip, and errors before any work."""
import pytest
import torch

from clips import read_frames
from tiny_models import conditioning, tiny_sd15, tiny_sd_vae, with_unit_norm_gains

SIZE = 64
SEED = 5
ALL_OFF = dict(cross_frame_start=0.0, cross_frame_end=0.0, spatial_guided_steps=0, temporal_guided_start=0.0,
               temporal_guided_end=0.0, optimization_start=0.0, optimization_end=0.0, smoothing_start=0.0,
               smoothing_end=0.0)
NODE_DEFAULTS = dict(seed=SEED, steps=4, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=0.75,
                     batch_size=3, spatial_loss=True, temporal_loss=True, iterations=3, learning_rate=0.4)
EVERYTHING_ON = dict(cross_frame_start=0.0, cross_frame_end=1.0, spatial_guided_steps=1, temporal_guided_start=0.0,
                     temporal_guided_end=0.6, optimization_start=0.0, optimization_end=0.7, smoothing_start=0.8,
                     smoothing_end=0.85)


def clip(count=5, seed=0):
    return torch.rand(count, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def still_flow(host, frames):
    video_flow = host.pack_module("rerender.flow").VideoFlow
    return video_flow(frames, lambda targets, sources: torch.zeros(targets.shape[0], 2, *targets.shape[-2:]))


def keyframes(host, indices, count):
    return host.pack_module("rerender.keyframes").KeyFrameSelection(tuple(indices), count)


def run_fresco(host, model, frames, indices=None, vae=None, components=ALL_OFF, **inputs):
    args = dict(NODE_DEFAULTS, **components)
    args.update(inputs)
    selection = keyframes(host, range(len(frames)) if indices is None else indices, len(frames))
    return host.run_node("Rerender_FrescoKeyFrames", model=model, positive=conditioning(0),
                         negative=conditioning(1), vae=vae or tiny_sd_vae(0), frames=frames, keyframes=selection,
                         **args)


@pytest.mark.parametrize("sampler_name, scheduler, denoise", [("ddim", "ddim_uniform", 0.75),
                                                             ("euler", "karras", 1.0),
                                                             ("dpmpp_2m", "normal", 0.6)])
def test_everything_off_equals_ksampler_img2img(host, sampler_name, scheduler, denoise):
    """Two batches (5 keys, batch 3 -> keys 0,1,2 then anchors 0,2 + keys 3,4): each key frame equals KSampler
    img2img of that frame with the same seed, within the float reordering of batched convolutions."""
    model, vae, frames = tiny_sd15(0), tiny_sd_vae(0), clip()
    images, latent = run_fresco(host, model, frames, sampler_name=sampler_name, scheduler=scheduler,
                                denoise=denoise)
    assert latent["samples"].shape[0] == len(frames)
    worst = 0.0
    for i in range(len(frames)):
        (plain,) = host.nodes.VAEEncode().encode(vae, frames[i:i + 1])
        (expected,) = host.nodes.KSampler().sample(model, SEED, 4, 5.0, sampler_name, scheduler, conditioning(0),
                                                   conditioning(1), plain, denoise=denoise)
        difference = (latent["samples"][i:i + 1] - expected["samples"]).abs().max().item()
        worst = max(worst, difference)
        assert difference <= 1e-4 * expected["samples"].abs().max().item(), (i, difference)
    print(f"{sampler_name}: largest latent difference to KSampler img2img {worst:.3g}")


def test_everything_on_runs_and_reports(host):
    frames = clip()
    images, latent = run_fresco(host, tiny_sd15(0), frames, flow=still_flow(host, frames),
                                mask=torch.zeros(1, SIZE, SIZE), components=EVERYTHING_ON)
    assert images.shape == (5, SIZE, SIZE, 3) and torch.isfinite(images).all()


class ModelCalls:
    """A model wrapper that records, per model call, σ and the state of every slot of the first CFG chunk."""

    def __init__(self, model):
        self.calls = []
        self.model = model.clone()
        self.model.set_model_unet_function_wrapper(self)

    def __call__(self, apply_model, args):
        x, chunks = args["input"], len(args["cond_or_uncond"])
        self.calls.append((float(args["timestep"].flatten()[0]), x.reshape(chunks, -1, *x.shape[1:])[0].clone()))
        return apply_model(x, args["timestep"], **args["c"])


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "heun"])
def test_anchor_slots_hold_the_previous_batch_latents_at_every_evaluation(host, sampler_name):
    """8 keys, batch 4: batches (0,1,2,3), (0,3,4), (0,4,5,6,7). Before every model call the anchor slots 0 and 1
    hold what the previous batch had in its first and last slot at that call. An ancestral sampler draws different
    per-step noise for each slot position, so without the overwrite the anchors would drift from the recorded."""
    frames = clip(8)
    recorder = ModelCalls(tiny_sd15(0))
    run_fresco(host, recorder.model, frames, flow=still_flow(host, frames), sampler_name=sampler_name,
               batch_size=4, components=dict(ALL_OFF, cross_frame_end=1.0))
    batches = {}
    for sigma, x in recorder.calls:
        batches.setdefault(x.shape[0], []).append((sigma, x))
    assert sorted(batches) == [3, 4, 5]
    chain = [batches[4], batches[3], batches[5]]
    assert len({len(calls) for calls in chain}) == 1 and len(chain[0]) >= 4
    for previous, current in zip(chain, chain[1:]):
        for (sigma_a, x_a), (sigma_b, x_b) in zip(previous, current):
            assert sigma_a == sigma_b
            assert torch.equal(x_b[0], x_a[0]) and torch.equal(x_b[1], x_a[-1])
    assert not torch.equal(chain[1][-1][1][2], chain[0][-1][1][2])  # new keys are free


@pytest.mark.parametrize("spatial_loss, temporal_loss", [(True, False), (True, True)])
def test_feature_optimisation_leaves_the_model_alone_and_lowers_its_objective(host, car_turn, spatial_loss,
                                                                               temporal_loss):
    """Run as the host runs nodes (inference mode): the weights are unchanged and without gradient, the model passed
    in keeps no patch, and the optimised objective (the switched-on losses' weighted sum, after AdaIN) is lower
    after than before (the flow term alone, whose residuals on this tiny model are far below Adam's step, is
    checked on features of unit scale in test_fresco.py)."""
    model, (frames, video_flow) = tiny_sd15(0), car_turn
    unet = model.get_model_object("diffusion_model")
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    options_before = repr(model.model_options)
    run_fresco(host, model, frames, indices=[0, 4, 8], flow=video_flow, iterations=20,
               components=dict(ALL_OFF, optimization_end=0.7), spatial_loss=spatial_loss, temporal_loss=temporal_loss)
    for name, p in unet.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None and not p.requires_grad, name
    assert repr(model.model_options) == options_before
    report = "\n".join(host.last_ui["text"])
    losses = {}
    for line in report.splitlines():
        if line.startswith("feature optimisation, "):
            name = line.split(", ")[1].split(" ")[0]
            losses[name] = [float(v) for v in line.split(": ")[1].split(" (")[0].split(" -> ")]
    expected = {name for name, on in (("spatial", spatial_loss), ("temporal", temporal_loss)) if on}
    assert set(losses) == expected, report
    assert sum(after for _, after in losses.values()) < sum(start for start, _ in losses.values()), report
    assert "background smoothing: off" in report


@pytest.fixture(scope="module")
def car_turn(shared_data):
    """9 frames of car-turn (every 2nd), 64x64, with the flow stage's DIS flow."""
    import torch.nn.functional as F
    from rerender.flow import DISEstimator, VideoFlow
    frames = read_frames(shared_data / "videos" / "car_turn_480x480_10fps.mp4", 9, stride=2)
    frames = F.interpolate(frames.movedim(-1, 1), size=(SIZE, SIZE), mode="area").movedim(1, -1).contiguous()
    return frames, VideoFlow(frames, DISEstimator("medium"))


def test_fresco_couples_consecutive_key_frames_of_a_real_clip(host, car_turn):
    """Flow-warp error between consecutive rendered key frames (car-turn, 9 frames, keys every 2, two batches):
    lower with FRESCO's inter-frame mechanisms on (shared anchors, efficient cross-frame and temporal-guided
    attention, the temporal loss) than with everything off, even with random weights (gains at 1 so that the
    model's output depends on its input). The Gram loss is an intra-frame constraint toward each frame's own
    structure: with random weights it moves frames apart, so the full set is printed, not asserted. The rate
    0.05 suits this model's feature scale (Adam steps by about the rate; the paper's 0.4 is for SD's)."""
    from rerender.warp import flow_warp
    frames, video_flow = car_turn
    keys = list(range(0, 9, 2))
    inter_frame = dict(EVERYTHING_ON, smoothing_end=0.0, spatial_guided_steps=0, spatial_loss=False)
    errors = {}
    for name, components in (("off", ALL_OFF), ("inter-frame on", inter_frame),
                             ("everything on", dict(EVERYTHING_ON, smoothing_end=0.0))):
        images, _ = run_fresco(host, with_unit_norm_gains(tiny_sd15(0)), frames, indices=keys, flow=video_flow,
                               components=components, batch_size=4, steps=6, learning_rate=0.05)
        out = images.movedim(-1, 1)
        total = 0.0
        for k, (a, b) in enumerate(zip(keys, keys[1:])):
            flow, occlusion = video_flow.pair(a, b)
            visible = 1.0 - occlusion
            total += float(((out[k + 1:k + 2] - flow_warp(out[k:k + 1], flow)).abs() * visible).sum()
                           / (3 * visible.sum()))
        errors[name] = total / (len(keys) - 1)
    print("flow-warp error between consecutive key frames: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["inter-frame on"] < errors["off"]


def test_efficient_attention_renders_a_batch_of_identical_frames_identically(host):
    frames = clip(1).repeat(3, 1, 1, 1)
    images, _ = run_fresco(host, tiny_sd15(0), frames, flow=still_flow(host, frames),
                           components=dict(ALL_OFF, cross_frame_end=1.0, temporal_guided_end=0.6))
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


@pytest.mark.parametrize("case, inputs, message", [
    ("batch", dict(batch_size=2), "batch_size"),
    ("mask", dict(mask=torch.zeros(2, SIZE, SIZE)), "2 masks for 5 frames"),
    ("keys", dict(indices=[2]), "at least 2"),
    ("flow", dict(flow="other clip"), "another clip"),
])
def test_bad_input_is_refused_before_any_model_call(host, case, inputs, message):
    frames = clip()
    recorder = ModelCalls(tiny_sd15(0))
    if inputs.get("flow") == "other clip":
        inputs = dict(flow=still_flow(host, clip(seed=9)))
    with pytest.raises(Exception, match=message):
        run_fresco(host, recorder.model, frames, **inputs)
    assert recorder.calls == []


def test_every_host_sampler_runs_fresco_or_is_refused_by_name(host):
    """The sweep over comfy.samplers.KSampler.SAMPLERS (one test, the list read from the host): refused samplers
    are refused before any model call; every other one renders two batches with every component on (smoothing and
    spatial-guided attention over two steps included, so multi-evaluation steps meet every component) and finite
    results, its anchor slots holding the previous batch's latents at every evaluation."""
    import comfy.samplers
    steered = host.pack_module("engine.sampling")
    size = 32
    frames = torch.rand(5, size, size, 3, generator=torch.Generator().manual_seed(3))
    flow = still_flow(host, frames)
    everything = dict(EVERYTHING_ON, smoothing_start=0.5, smoothing_end=1.0, spatial_guided_steps=2)
    swept = 0
    for sampler_name in comfy.samplers.KSampler.SAMPLERS:
        recorder = ModelCalls(tiny_sd15(0))
        args = dict(vae=tiny_sd_vae(0), flow=flow, mask=torch.zeros(1, size, size), components=everything,
                    sampler_name=sampler_name, scheduler="karras", steps=3, denoise=1.0, iterations=1)
        if sampler_name in steered.REFUSED_SAMPLERS:
            with pytest.raises(ValueError, match=sampler_name):
                run_fresco(host, recorder.model, frames, **args)
            assert recorder.calls == [], sampler_name
            continue
        images, _ = run_fresco(host, recorder.model, frames, **args)
        assert images.shape == (5, size, size, 3) and torch.isfinite(images).all(), sampler_name
        # batch (0, 1, 2) and batch (0, 2, 3, 4), each its reference pass (the same noised frames) and sampling
        first = [x for _, x in recorder.calls if x.shape[0] == 3]
        second = [x for _, x in recorder.calls if x.shape[0] == 4]
        assert len(first) == len(second) >= 4, sampler_name
        for a, b in zip(first, second):
            assert torch.equal(b[0], a[0]) and torch.equal(b[1], a[2]), sampler_name
        swept += 1
    assert swept >= 20


def test_smoothing_with_an_all_foreground_mask_changes_nothing(host):
    frames = (clip(1) + 0.05 * clip(3, seed=1)).clamp(0, 1)  # alike frames: the still flow passes the photometric test
    smoothing_only = dict(ALL_OFF, smoothing_start=0.5, smoothing_end=1.0)
    off, _ = run_fresco(host, tiny_sd15(0), frames, flow=still_flow(host, frames), components=ALL_OFF)
    kept, _ = run_fresco(host, tiny_sd15(0), frames, flow=still_flow(host, frames), components=smoothing_only,
                         mask=torch.ones(1, SIZE, SIZE))
    smoothed, _ = run_fresco(host, tiny_sd15(0), frames, flow=still_flow(host, frames), components=smoothing_only,
                             mask=torch.zeros(1, SIZE, SIZE))
    assert torch.equal(kept, off)
    assert not torch.equal(smoothed, off)  # the same steps with a background do smooth


def test_another_packs_attention_replacement_runs_where_fresco_is_off(host):
    """A replacement already installed on a FRESCO layer is called for that layer whenever FRESCO's attention is
    off, and the result is then exactly the replacement's (here: the host's attention, so KSampler's result)."""
    from comfy.ldm.modules.attention import optimized_attention
    calls = []

    def replacement(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    model = tiny_sd15(0)
    patched = model.clone()
    patched.set_model_attn1_replace(replacement, "output", 6, 0)
    frames = clip(3)
    _, latent = run_fresco(host, patched, frames)
    assert calls and set(calls) == {("output", 6)}
    (plain,) = host.nodes.VAEEncode().encode(tiny_sd_vae(0), frames[:1])
    (expected,) = host.nodes.KSampler().sample(patched, SEED, 4, 5.0, "ddim", "ddim_uniform", conditioning(0),
                                               conditioning(1), plain, denoise=0.75)
    assert (latent["samples"][:1] - expected["samples"]).abs().max() <= 1e-4 * expected["samples"].abs().max()


def test_sdxl_layout_runs_with_everything_on_and_equals_ksampler_with_everything_off(host):
    """FRESCO on the tiny SDXL-architecture UNet (adm conditioning, 3 decoder levels: its 640-channel layers are
    guided): all off is KSampler img2img, everything on renders finite frames."""
    from tiny_models import sdxl_conditioning, tiny_sdxl
    model, vae, frames = tiny_sdxl(0), tiny_sd_vae(0), (clip(1) + 0.05 * clip(3, seed=1)).clamp(0, 1)
    selection = keyframes(host, range(3), 3)
    common = dict(NODE_DEFAULTS, model=model, positive=sdxl_conditioning(0), negative=sdxl_conditioning(1),
                  vae=vae, frames=frames, keyframes=selection, flow=still_flow(host, frames))
    _, latent = host.run_node("Rerender_FrescoKeyFrames", **common, **ALL_OFF)
    (plain,) = host.nodes.VAEEncode().encode(vae, frames[1:2])
    (expected,) = host.nodes.KSampler().sample(model, SEED, 4, 5.0, "ddim", "ddim_uniform", sdxl_conditioning(0),
                                               sdxl_conditioning(1), plain, denoise=0.75)
    assert (latent["samples"][1:2] - expected["samples"]).abs().max() <= 1e-4 * expected["samples"].abs().max()
    images, _ = host.run_node("Rerender_FrescoKeyFrames", **common, **EVERYTHING_ON,
                              mask=torch.zeros(1, SIZE, SIZE))
    assert torch.isfinite(images).all()
    assert "feature optimisation, spatial loss" in "\n".join(host.last_ui["text"])


def test_batches_never_reach_across_a_shot_cut(host):
    """Two shots joined (cut before frame 3, keys on both sides): with every component on, shot 2's key frames equal
    a run on shot 2 alone (its own anchor, its own batches and flows), and shot 1's a run on shot 1 alone."""
    shot_1 = (clip(1, seed=4) + 0.05 * clip(3, seed=5)).clamp(0, 1)
    shot_2 = (clip(1, seed=6) + 0.05 * clip(3, seed=7)).clamp(0, 1)
    joined = torch.cat([shot_1, shot_2])
    selection = host.pack_module("rerender.keyframes").KeyFrameSelection(tuple(range(6)), 6, cuts=(3,))
    on = dict(EVERYTHING_ON, smoothing_start=0.5, smoothing_end=1.0)

    def render(frames, keys):
        return host.run_node("Rerender_FrescoKeyFrames", model=tiny_sd15(0), positive=conditioning(0),
                             negative=conditioning(1), vae=tiny_sd_vae(0), frames=frames, keyframes=keys,
                             flow=still_flow(host, frames), mask=torch.zeros(1, SIZE, SIZE),
                             **dict(NODE_DEFAULTS, **on))[1]["samples"]

    both = render(joined, selection)
    assert "in 2 shots" in host.last_ui["text"][0]
    for shot, frames in ((slice(0, 3), shot_1), (slice(3, 6), shot_2)):
        alone = render(frames, keyframes(host, range(3), 3))
        assert torch.equal(both[shot], alone)


class SmoothingLikeEdit:
    """FRESCO's hooks as far as the x̂0 edit goes: δ added to the x̂0 of one step's own evaluation, taken by the
    sampler as its prediction (FrescoPass's rule); the state of every evaluation recorded."""
    x0_edit_rule = None  # set from FrescoPass

    def __init__(self, step, delta):
        self.step, self.delta, self.states, self.plan = step, delta, [], None

    def start(self, plan):
        self.plan = plan

    def before(self, evaluation, state):
        self.states.append((evaluation, state.clone()))
        return None

    def replay(self, evaluation):
        return None

    def after(self, evaluation, state, denoised):
        if self.delta is not None and evaluation.starts_step and evaluation.step == self.step:
            return denoised + self.delta
        return denoised

    def finish(self, sample):
        pass


def steered_states(host, model, latent, sampler_name, sigmas, step, delta):
    import comfy.sample
    steered = host.pack_module("engine.sampling")
    hooks = SmoothingLikeEdit(step, delta)
    hooks.x0_edit_rule = host.pack_module("engine.fresco").FrescoPass.x0_edit_rule
    sampler = steered.steered_sampler(sampler_name, hooks, sigmas, 0)
    with torch.inference_mode():
        comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, SEED), 4.0, sampler, sigmas.clone(),
                                   conditioning(0), conditioning(1), latent, disable_pbar=True, seed=SEED)
    return hooks.states


# One sampler of each kind the steering must carry an x̂0 edit through: single-step (deterministic, ancestral,
# DDPM, LCM), multi-evaluation (Heun, DPM-2, 2S, SDE), multistep history (2M, iPNDM, DEIS, UniPC, res), SDE noise,
# and the CFG++ ones that read the uncond half.
FAMILIES = ("euler", "euler_ancestral", "ddpm", "lcm", "heun", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde",
            "dpmpp_2m", "ipndm", "deis", "uni_pc", "res_multistep", "dpmpp_2m_sde", "euler_cfg_pp",
            "res_multistep_cfg_pp", "gradient_estimation_cfg_pp")


def test_an_x0_edit_moves_the_state_as_the_samplers_own_prediction(host):
    """Background smoothing as the reference's pipe_FRESCO.step takes it: the edited x̂0 is the sampler's
    prediction. Per step, ddpm moves the next state by its posterior mean's x̂0 coefficient β_t/(1-ᾱ_t) =
    1 - σ_{i+1}²/σ_i² (not by δ, the DDIM rule: 1.8-2.3x more at steps 16-17 of 20), the host's ddim by
    1 - σ_{i+1}/σ_i; and for every sampler the states the model sees are those of a plain run whose model itself
    returns the edited x̂0 (multistep history included), one sampler of each kind."""
    import comfy.sample
    import comfy.samplers
    steered = host.pack_module("engine.sampling")
    model = tiny_sd15(0)
    latent = tiny_sd_vae(0).encode(clip(1)[:, :32, :32])
    delta = 0.3 * torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    coefficients = {"ddpm": lambda now, following: 1 - following ** 2 / now ** 2,
                    "ddim": lambda now, following: 1 - following / now}
    for sampler_name, coefficient in coefficients.items():
        sigmas = comfy.samplers.KSampler(model, steps=20, device="cpu", sampler=sampler_name,
                                         scheduler="ddim_uniform", denoise=1.0).sigmas
        plain = steered_states(host, model, latent, sampler_name, sigmas, None, None)
        for step in (16, 17):  # the reference's smoothing steps
            edited = steered_states(host, model, latent, sampler_name, sigmas, step, delta)
            following = next(i for i, (e, _) in enumerate(plain) if e.starts_step and e.step == step + 1)
            moved = edited[following][1] - plain[following][1]
            expected = coefficient(float(sigmas[step]), float(sigmas[step + 1]))
            assert 0.2 < expected < 0.6  # ddpm 0.43 and 0.57, ddim 0.25 and 0.34; the DDIM rule: 1
            torch.testing.assert_close(moved, expected * delta, rtol=1e-4, atol=1e-5)

    failures = []
    for sampler_name in [name for name in FAMILIES if name in steered.supported_samplers()]:
        sigmas = comfy.samplers.KSampler(model, steps=3, device="cpu", sampler=sampler_name, scheduler="karras",
                                         denoise=1.0).sigmas
        ours = steered_states(host, model, latent, sampler_name, sigmas, 0, delta)
        edit_at = next(e.key.index for e, _ in ours if e.starts_step and e.step == 0)
        seen = []

        def predicts_the_edit(args):
            seen.append(args["input"].clone())
            return args["denoised"] + delta.to(args["denoised"]) if len(seen) - 1 == edit_at else args["denoised"]

        reference_model = model.clone()
        reference_model.set_model_sampler_post_cfg_function(predicts_the_edit)
        with torch.inference_mode():
            comfy.sample.sample_custom(reference_model, comfy.sample.prepare_noise(latent, SEED), 4.0,
                                       comfy.samplers.sampler_object(sampler_name), sigmas.clone(), conditioning(0),
                                       conditioning(1), latent, disable_pbar=True, seed=SEED)
        worst = max(float((a - b).norm() / b.norm()) for (_, a), b in zip(ours, seen))
        if len(seen) != len(ours) or worst > 1e-4:
            failures.append(f"{sampler_name}: {len(ours)}/{len(seen)} evaluations, relative error {worst:.3g}")
    assert failures == []
