"""Cross-frame attention through the real host: the patcher node, its layer layout, composition with other
attention patches and backends, and the cache lifetime around the key frame sampler."""
import pytest
import torch

from tiny_models import TINY_SD15_UNET, conditioning, tiny_sd15, tiny_sd_vae

SIZE = 64
ALL_OFF = dict(shape_period=(0.0, 0.0), pixel_period=(0.0, 0.0), adain_period=(0.0, 0.0))


def patch(host, model, layers="all", start=0.0, end=1.0):
    return host.run_node("Rerender_CrossFrameAttention", model=model, layers=layers, start=start, end=end)[0]


def controller_of(host, model):
    return host.pack_module("engine.cross_frame_attention").find_cross_frame_attention(model)


def render(host, model, frames, indices=None, **settings):
    """Key frames through the renderer; only cross-frame attention unless other periods are given."""
    rendering = host.pack_module("engine.rerender_a_video")
    selection = host.pack_module("rerender.keyframes").KeyFrameSelection
    options = dict(seed=5, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0, **ALL_OFF)
    options.update(settings)
    on_step = options.pop("on_step", None)
    keyframes = selection(tuple(range(len(frames))) if indices is None else indices, len(frames))
    renderer = rendering.KeyframeRenderer(model, conditioning(0), conditioning(1), tiny_sd_vae(0), frames, keyframes,
                                          None, rendering.KeyframeSettings(**options), on_step=on_step)
    return renderer.run()


def frames_of(*seeds):
    return torch.cat([torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_patcher_clones_and_derives_the_decoder_layout(host):
    model = tiny_sd15(0)
    patched = patch(host, model)
    assert controller_of(host, model) is None
    assert "patches" not in model.model_options.get("transformer_options", {})
    controller = controller_of(host, patched)
    assert sorted(controller.layers) == [("output", n, 0) for n in range(3, 12)]   # SD1.5's 9 decoder layers
    loose = controller_of(host, patch(host, model, layers="loose"))
    assert sorted(loose.layers) == [("output", n, 0) for n in range(6, 12)]       # without the widest three
    assert controller.dtype == torch.float32


def test_sdxl_layout_is_read_from_the_model(host):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    config = {"model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 3, 3],
              "context_dim": 64, "adm_in_channels": 2816, "use_temporal_attention": False, "in_channels": 4,
              "out_channels": 4, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 3, 3, 3], "transformer_depth_middle": 3,
              "num_head_channels": 16, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
              "use_temporal_resblock": False, "use_checkpoint": False}
    model_config = comfy.supported_models.SDXL(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(model_config.get_model({}), load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    layout = host.pack_module("engine.cross_frame_attention").decoder_self_attention_layers(model)
    expected = {("output", n, i): 128 for n in range(3) for i in range(3)}
    expected.update({("output", n, i): 64 for n in range(3, 6) for i in range(2)})
    assert layout == expected
    assert controller_of(host, patch(host, model, layers="loose")).layers == frozenset(
        key for key, width in expected.items() if width == 64)


def test_patcher_rejects_bad_input(host):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    model = tiny_sd15(0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        patch(host, model, start=-0.2, end=0.5)
    reversed_period = controller_of(host, patch(host, model, start=1.0, end=0.0))   # the webUI's "off"
    reversed_period.start_run(torch.linspace(10, 0, 5))
    assert reversed_period.active_steps == frozenset()
    with pytest.raises(ValueError, match="already"):
        patch(host, patch(host, model))
    no_attention = dict(TINY_SD15_UNET, transformer_depth=[0] * 8, transformer_depth_output=[0] * 12,
                        transformer_depth_middle=0)
    model_config = comfy.supported_models.SD15(no_attention)
    model_config.set_inference_dtype(torch.float32, None)
    bare = comfy.model_patcher.ModelPatcher(model_config.get_model({}), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
    with pytest.raises(ValueError, match="no decoder self-attention"):
        patch(host, bare)


def test_identical_key_frame_renders_like_the_anchor(host):
    """K/V = [anchor; anchor] for a frame equal to the anchor leaves softmax attention unchanged."""
    patched = patch(host, tiny_sd15(0))
    images, latents, stats = render(host, patched, frames_of(1, 1, 1))
    assert torch.allclose(latents[1], latents[0], atol=1e-4) and torch.allclose(latents[2], latents[0], atol=1e-4)
    assert stats.attention_cache_peak_bytes > 0
    plain = render(host, tiny_sd15(0), frames_of(1, 2))[1]
    crossed = render(host, patched, frames_of(1, 2))[1]
    assert torch.equal(plain[0], crossed[0])                     # the anchor itself is rendered plainly
    assert (plain[1] - crossed[1]).abs().max() > 1e-3            # the key frame follows the anchor


def test_composes_with_another_packs_attention_replace_and_backend(host):
    """A replace installed by another pack keeps its slot and receives the substituted K/V (anchor + previous:
    twice the tokens); an attention-backend override gives the same result as the default backend."""
    from comfy.ldm.modules.attention import attention_pytorch, optimized_attention
    model = tiny_sd15(0)
    seen = []

    def other_pack_replace(q, k, v, extra_options):
        seen.append((q.shape[1], k.shape[1]))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    other = model.clone()
    other.set_model_attn1_replace(other_pack_replace, "output", 9)
    patched = patch(host, other)
    assert patched.model_options["transformer_options"]["patches_replace"]["attn1"][("output", 9)] is \
        other_pack_replace
    frames = frames_of(3, 4)
    reference = render(host, patch(host, model), frames)[1]
    composed = render(host, patched, frames)[1]
    assert torch.allclose(composed, reference, atol=1e-5)
    assert {k // q for q, k in seen} == {1, 2}   # the anchor attends to itself, the key frame to 2 frames

    backend = model.clone()
    backend.set_model_optimized_attention(attention_pytorch)
    assert torch.allclose(render(host, patch(host, backend), frames)[1], reference, atol=1e-4)


def test_caches_are_freed_after_return_exception_and_interrupt(host):
    import comfy.model_management as mm
    patched = patch(host, tiny_sd15(0))
    controller = controller_of(host, patched)
    frames = frames_of(5, 6, 7)
    render(host, patched, frames)
    assert controller.cached_entries() == 0 and not controller.running

    def fail(info):
        if info.key_frame == 2:
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        render(host, patched, frames, on_step=fail)
    assert controller.cached_entries() == 0 and not controller.running

    def interrupt(info):
        if info.key_frame == 1:
            mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        render(host, patched, frames, on_step=interrupt)
    assert controller.cached_entries() == 0 and not controller.running and controller.mode.value == "off"
    assert torch.equal(render(host, patched, frames)[1], render(host, patched, frames)[1])


def test_cache_size_is_reported_and_scales_with_the_layer_set(host):
    frames = frames_of(8, 9)
    full = render(host, patch(host, tiny_sd15(0)), frames)[2].attention_cache_peak_bytes
    loose = render(host, patch(host, tiny_sd15(0), layers="loose"), frames)[2].attention_cache_peak_bytes
    late = render(host, patch(host, tiny_sd15(0), start=0.5), frames)[2].attention_cache_peak_bytes
    assert 0 < loose < full and 0 < late < full
