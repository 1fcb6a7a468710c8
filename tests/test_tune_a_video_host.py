"""Tune-A-Video through the real host: tuning lowers the loss on a real clip, what it trains and what it leaves
bit-identical, save/load, sampling the whole clip in the host's KSampler, and bad input refused before any work."""
import os

import pytest
import torch

from clips import read_frames
from tiny_models import conditioning, tiny_sd15, tiny_sd_vae

SIZE, FRAMES = 64, 4
FAST = dict(frame_stride=1, mixed_precision="fp32", gradient_checkpointing=False)


@pytest.fixture(scope="module")
def clip(host, shared_data):
    """4 real frames (car turn) at 64x64, stride 2, encoded by the tiny VAE: a LATENT."""
    import torch.nn.functional as F
    frames = read_frames(shared_data / "videos" / "car_turn_480x480_10fps.mp4", FRAMES, stride=2)
    frames = F.interpolate(frames.movedim(-1, 1), size=(SIZE, SIZE), mode="area").movedim(1, -1)
    with torch.inference_mode():  # as in a node: no graph, inference tensors
        return {"samples": tiny_sd_vae(0).encode(frames)}


def tune(host, model, clip, **settings):
    options = dict(FAST, frame_count=FRAMES, steps=8, learning_rate=1e-3, seed=33)
    options.update(settings)
    return host.run_node("Rerender_TuneAVideo", model=model, positive=conditioning(0), latent=clip, **options)


def snapshot(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def unet_call(model, latent, sigma=1.5, seed=0):
    """The model's denoised output for one batch, through the host's own sampling path (one Euler step)."""
    import comfy.sample
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.tensor([sigma, 0.0])
    sampler = __import__("comfy.samplers", fromlist=["x"]).sampler_object("euler")
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, conditioning(0), conditioning(1), latent,
                                      seed=seed, disable_pbar=True)


@pytest.fixture(scope="module")
def tuned(host, clip):
    model = tiny_sd15(0)
    before = snapshot(model)
    options_before = repr(model.model_options)
    output_before = unet_call(model, clip["samples"])
    tuned_model, params, losses, tuned_clip = tune(host, model, clip)
    assert torch.equal(tuned_clip["samples"], clip["samples"])  # frame_count = all 4 frames, stride 1
    return dict(base=model, before=before, options_before=options_before, output_before=output_before,
                model=tuned_model, params=params, losses=losses)


def test_tuning_lowers_the_training_loss_on_a_real_clip(host, clip):
    """Same seed = the same timesteps and noise at every step: the tuned run's loss is below the untrained one."""
    steps = 16
    frozen = tune(host, tiny_sd15(0), clip, steps=steps, learning_rate=1e-8)[2]["loss"]
    trained = tune(host, tiny_sd15(0), clip, steps=steps, learning_rate=3e-2)[2]["loss"]
    assert frozen[0] == pytest.approx(trained[0], rel=1e-6)
    ratios = [t / f for t, f in zip(trained, frozen)]
    assert all(r < 1 for r in ratios[1:]), ratios                  # lower at every step once it has trained
    assert sum(ratios[-4:]) < sum(ratios[1:5]), ratios              # and increasingly so


def test_trains_exactly_the_query_projections_and_temporal_attention(host, tuned):
    nodes = host.pack_module("engine.tune_a_video")
    params = tuned["params"]
    blocks = nodes.transformer_blocks(tuned["base"])
    assert len(blocks) == 16 and set(params.temporal) == set(blocks)   # SD1.5: 6 encoder, 1 middle, 9 decoder
    assert set(params.query_deltas) == {f"{b}.attn{i}.to_q.weight" for b in blocks for i in (1, 2)}
    assert all(d.abs().max() > 0 for d in params.query_deltas.values())
    assert all(m.to_out.weight.abs().max() > 0 for m in params.temporal.values())
    # the tuned clone's weight patches touch nothing but the query projections
    assert set(tuned["model"].patches) == set(params.query_deltas)
    import comfy.model_management as mm
    mm.load_models_gpu([tuned["model"]])
    loaded = tuned["model"].model.state_dict()
    for key, value in tuned["before"].items():
        if key in params.query_deltas:
            assert torch.allclose(loaded[key], value + params.query_deltas[key], atol=1e-6)
        else:
            assert torch.equal(loaded[key], value), key
    assert sum(".attn_temp." in k for k in loaded) == 16 * 7  # norm weight+bias, q, k, v, out weight+bias
    mm.unload_all_models()


def test_input_model_unchanged_after_tuning_and_sampling(host, tuned, clip):
    base = tuned["base"]
    samples = host.run_node("KSampler", model=tuned["model"], seed=1, steps=2, cfg=12.5, sampler_name="euler",
                            scheduler="normal", positive=conditioning(0), negative=conditioning(1),
                            latent_image=clip, denoise=0.6)[0]["samples"]
    assert samples.shape == clip["samples"].shape and torch.isfinite(samples).all()
    # while the tuned clone is loaded the shared weights carry its patches (the host's design); the base model
    # itself renders exactly as before, and once unloaded its weights are bit-identical
    assert torch.equal(unet_call(base, clip["samples"]), tuned["output_before"])
    import comfy.model_management as mm
    mm.unload_all_models()
    for key, value in snapshot(base).items():
        assert torch.equal(value, tuned["before"][key]), key
    assert repr(base.model_options) == tuned["options_before"] and not base.patches and not base.object_patches
    assert not any(type(m).__name__ == "TemporalTransformerBlock" for m in base.model.modules())


def test_untuned_inflation_is_the_image_model_for_frame_0(host, clip):
    """Zero query changes and fresh temporal attention: frame 0 (sparse-causal = self-attention, temporal output 0)
    comes out exactly as the image model renders it alone; later frames differ (they attend to frames 0 and i-1)."""
    nodes = host.pack_module("engine.tune_a_video")
    lib = host.pack_module("rerender.tune_a_video")
    base = tiny_sd15(0)
    blocks = nodes.transformer_blocks(base)
    untuned = lib.TunedParameters({}, {p: nodes.new_temporal_attention(b, torch.Generator().manual_seed(0))
                                      for p, b in blocks.items()},
                                  nodes.fingerprint(base))
    inflated = nodes.apply_tuned(base, untuned)
    video = unet_call(inflated, clip["samples"])
    alone = unet_call(base, clip["samples"][:1])
    assert torch.allclose(video[:1], alone, atol=1e-5)
    separately = unet_call(base, clip["samples"])
    assert not torch.allclose(video[1:], separately[1:], atol=1e-3)


def test_saved_parameters_reload_to_identical_outputs(host, tuned, clip):
    import folder_paths
    name = host.run_node("Rerender_TuneAVideoSave", tuned=tuned["params"], filename_prefix="test/clip")[0]
    assert os.path.isfile(folder_paths.get_full_path_or_raise("tune_a_video", name))
    reloaded = host.run_node("Rerender_TuneAVideoLoad", model=tuned["base"], tuned_name=name)[0]
    assert torch.equal(unet_call(reloaded, clip["samples"]), unet_call(tuned["model"], clip["samples"]))
    other = tiny_sd15(1)
    with pytest.raises(ValueError, match="another base model"):
        host.run_node("Rerender_TuneAVideoLoad", model=other, tuned_name=name)


def test_one_seed_gives_one_tuned_model(host, clip):
    """Two tuning runs with one seed save files of identical content whatever the global RNG holds (the temporal
    attention's initial weights come from the seed, as the reference's set_seed makes them). Content, not bytes:
    safetensors writes its metadata map in a per-process random order."""
    import folder_paths
    from safetensors import safe_open
    files = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        params = tune(host, tiny_sd15(0), clip, steps=2)[1]
        name = host.run_node("Rerender_TuneAVideoSave", tuned=params, filename_prefix=f"test/seeded_{global_seed}")[0]
        with safe_open(folder_paths.get_full_path_or_raise("tune_a_video", name), "pt") as file:
            files.append((file.metadata(), {key: file.get_tensor(key) for key in file.keys()}))
    (metadata, tensors), (metadata_again, tensors_again) = files
    assert metadata == metadata_again and tensors.keys() == tensors_again.keys()
    assert all(torch.equal(tensors[key], tensors_again[key]) for key in tensors)


def test_sampling_8_frames_in_the_host_ksampler(host, tuned):
    latent = {"samples": torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    common = dict(seed=1, steps=2, cfg=12.5, sampler_name="ddim", scheduler="ddim_uniform",
                  positive=conditioning(0), negative=conditioning(1), latent_image=latent, denoise=1.0)
    video = host.run_node("KSampler", model=tuned["model"], **common)[0]["samples"]
    images = host.run_node("KSampler", model=tuned["base"], **common)[0]["samples"]
    assert video.shape == (8, 4, 8, 8) and torch.isfinite(video).all()
    assert not torch.allclose(video, images, atol=1e-3)


def test_bad_input_is_refused_before_any_work(host, tuned, clip):
    base = tuned["base"]
    with pytest.raises(ValueError, match="at least 2"):
        tune(host, base, {"samples": clip["samples"][:1]})
    nodes = host.pack_module("engine.tune_a_video")
    node = host.pack_module("nodes.tune_a_video").TuneAVideo
    assert node.INPUT_TYPES()["required"]["steps"][1]["min"] == 1   # the host refuses 0 at queue time
    with pytest.raises(ValueError, match="at least 1 step"):
        node.execute(base, conditioning(0), latent=clip, steps=0)
    ragged = [torch.rand(SIZE, SIZE, 3), torch.rand(SIZE, 48, 3)]
    with pytest.raises(ValueError, match="different sizes"):
        nodes.clip_latents(ragged, tiny_sd_vae(0), None, 24, 1, 0)
    with pytest.raises(ValueError, match="either `frames`"):
        tune(host, base, None)
    with pytest.raises(ValueError, match="already"):
        tune(host, tuned["model"], clip)
    assert not base.patches and not base.object_patches


def test_an_interrupt_keeps_the_state_of_the_finished_steps(host, clip):
    import comfy.model_management as mm
    nodes = host.pack_module("engine.tune_a_video")
    settings = dict(steps=10, learning_rate=1e-3, weight_decay=1e-2, max_grad_norm=1.0, seed=0,
                    gradient_checkpointing=False, mixed_precision="fp32")

    def interrupt_after_third(step, loss):
        if step == 2:
            mm.interrupt_current_processing(True)

    tuned, losses, done, interrupted, _ = nodes.tune(tiny_sd15(0), conditioning(0), clip["samples"], settings,
                                                     on_step=interrupt_after_third)
    assert interrupted and done == 3 and len(losses) == 3
    assert not mm.processing_interrupted()
    assert all(d.abs().max() > 0 for d in tuned.query_deltas.values())
