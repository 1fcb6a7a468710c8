"""TokenFlow sampler through the real host on tiny random-weight models: with every component off it is plain
sampling from the inverted noise, identical frames stay identical with everything on, per-chunk ControlNet hints,
the three model families, and refusals before any work."""
import pytest
import torch

from tiny_models import (conditioning, sdxl_conditioning, tiny_controlnet, tiny_sd15, tiny_sd2_vpred, tiny_sdxl,
                         with_unit_norm_gains)

SCHEDULE = dict(steps=3, denoise=0.5, sampler_name="ddim", scheduler="ddim_uniform")
ALL_OFF = dict(pnp_attention=0.0, pnp_residual=0.0, extended_attention=False, propagation=False)
ALL_ON = dict(pnp_attention=0.5, pnp_residual=0.8, extended_attention=True, propagation=True)


def clip_latents(count=5, seed=0):
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) / 0.18215


def inverted(host, model, latents, cond, **schedule):
    args = dict(SCHEDULE, **schedule)
    return host.run_node("Rerender_Inversion", model=model, conditioning=cond, latent={"samples": latents},
                         inversion_steps=4, batch_size=8, **args)[0]


def tokenflow(host, model, inversion, positive, negative, chunk_size=2, cfg=4.0, **options):
    args = dict(SCHEDULE, seed=1, cfg=cfg, chunk_size=chunk_size, **dict(ALL_ON, **options))
    return host.run_node("Rerender_TokenFlowSampler", model=model, positive=positive, negative=negative,
                         inversion=inversion, **args)[0]["samples"]


def plain_from_inverted_noise(host, model, inversion, positive, negative, cfg=4.0):
    import comfy.sample
    import comfy.samplers
    nodes_inversion = host.pack_module("engine.inversion")
    sigmas = inversion.sigmas
    noise = nodes_inversion.start_noise(model, inversion.state(0), float(sigmas[0]))
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(SCHEDULE["sampler_name"]),
                                      sigmas, positive, negative, torch.zeros_like(noise), disable_pbar=True, seed=1)


def test_all_components_off_equals_plain_sampling_from_the_inverted_noise(host):
    model = with_unit_norm_gains(tiny_sd15(0))
    inversion = inverted(host, model, clip_latents(), conditioning(5))
    out = tokenflow(host, model, inversion, conditioning(0), conditioning(1), **ALL_OFF)
    expected = plain_from_inverted_noise(host, model, inversion, conditioning(0), conditioning(1))
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    edited = tokenflow(host, model, inversion, conditioning(0), conditioning(1))
    assert not torch.allclose(edited, expected, atol=1e-2)  # the components do act


BUILDERS = {"sd15": (tiny_sd15, conditioning), "sd2_vpred": (tiny_sd2_vpred, lambda s: conditioning(s, dim=1024)),
            "sdxl": (tiny_sdxl, sdxl_conditioning)}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_identical_frames_stay_identical_with_everything_on(host, kind):
    build, make_cond = BUILDERS[kind]
    model = with_unit_norm_gains(build(0))
    options_before = repr(model.model_options)
    latents = clip_latents(1).expand(5, -1, -1, -1).clone()
    inversion = inverted(host, model, latents, make_cond(5))
    out = tokenflow(host, model, inversion, make_cond(0), make_cond(1))
    assert out.shape == latents.shape and torch.isfinite(out).all()
    for frame in out[1:]:
        assert torch.allclose(frame, out[0], atol=1e-4)
    assert repr(model.model_options) == options_before
    varied = inverted(host, model, clip_latents(5), make_cond(5))
    out = tokenflow(host, model, varied, make_cond(0), make_cond(1))
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1], atol=1e-2)


def test_each_chunk_gets_its_frames_control_hints(host):
    model = with_unit_norm_gains(tiny_sd15(0))
    hints = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = host.nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning(0), conditioning(1), tiny_controlnet(0), hints, 1.0, 0.0, 1.0)
    inversion = inverted(host, model, clip_latents(), conditioning(5))
    out = tokenflow(host, model, inversion, positive, negative, **ALL_OFF)
    expected = plain_from_inverted_noise(host, model, inversion, positive, negative)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_bad_input_is_refused_before_work(host):
    model = tiny_sd15(0)
    inversion = inverted(host, model, clip_latents(), conditioning(5))
    with pytest.raises(Exception, match="another schedule"):
        tokenflow(host, model, inversion, conditioning(0), conditioning(1), steps=4)
    with pytest.raises(Exception, match="another schedule"):
        tokenflow(host, model, inversion, conditioning(0), conditioning(1), scheduler="karras")
    with pytest.raises(Exception, match="fewer than one chunk"):
        tokenflow(host, model, inversion, conditioning(0), conditioning(1), chunk_size=8)
    node = host.nodes.NODE_CLASS_MAPPINGS["Rerender_TokenFlowSampler"]
    spec = node.INPUT_TYPES()["required"]["sampler_name"]   # the host refuses a value outside it at queue time
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert "ddim" in options and "euler_ancestral" not in options and "heun" not in options
    hints = torch.rand(3, 64, 64, 3)
    positive, negative = host.nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning(0), conditioning(1), tiny_controlnet(0), hints, 1.0, 0.0, 1.0)
    with pytest.raises(Exception, match="3 hint images for a 5-frame clip"):
        tokenflow(host, model, inversion, positive, negative)


def test_injection_layers_are_derived_from_the_decoder_layout(host):
    pnp_layers = host.pack_module("engine.tokenflow").pnp_layers
    # SD1.x layout (the tiny model keeps SD1.5's blocks, decoder attention in output blocks 3..11): the res block
    # of output 4 = up_blocks[1].resnets[1]; Q/K in up_blocks[1].attentions[1:], [2], [3] = output 4..11.
    residual, attention = pnp_layers(tiny_sd15(0))
    assert residual == 4 and attention == {("output", n, 0) for n in range(4, 12)}
    # SDXL layout: its first decoder level is already at 1/4 resolution
    residual, attention = pnp_layers(tiny_sdxl(0))
    assert residual == 1
    assert attention == {("output", n, i) for n in (1, 2) for i in (0, 1)} | {("output", n, 0) for n in (3, 4, 5)}


def test_residual_injection_replaces_only_the_residual_branch(host):
    """The reference's register_conv_injection: the edit branches take the source's residual branch (after the
    block's second convolution) and keep their own skip path (here a real 1x1 projection, not the identity)."""
    from comfy.ldm.modules.attention import optimized_attention
    engine = host.pack_module("engine.tokenflow")
    model = tiny_sd15(0)
    residual, attention = engine.pnp_layers(model)
    controller = host.pack_module("rerender.tokenflow").TokenFlowAttention(residual, attention, [], {},
                                                                            optimized_attention)
    patched = engine.patched_model(model, controller)
    ((_, patch),) = patched.model_options["transformer_options"]["patches"]["forward_timestep_embed_patch"]
    block = model.get_model_object("diffusion_model").output_blocks[residual][0]
    assert not isinstance(block.skip_connection, torch.nn.Identity)
    g = torch.Generator().manual_seed(0)
    x_source, x_edit = torch.randn(1, block.channels, 4, 4, generator=g), torch.randn(2, block.channels, 4, 4,
                                                                                      generator=g)
    emb_source, emb_edit = torch.randn(1, block.emb_channels, generator=g), torch.randn(2, block.emb_channels,
                                                                                       generator=g)
    options = {"block": ("output", residual)}
    controller.inject_residual = True
    with torch.inference_mode():
        controller.phase = "source_key"
        source_out = patch(block, x_source, emb_source, None, options, None, None, None, None)
        controller.phase = "edit_key"
        edit_out = patch(block, x_edit, emb_edit, None, options, None, None, None, None)
        branch = block(x_source, emb_source) - block.skip_connection(x_source)
        expected = block.skip_connection(x_edit) + branch.expand(2, -1, -1, -1)
    assert torch.allclose(source_out, block(x_source, emb_source), atol=1e-6)
    assert torch.allclose(edit_out, expected, atol=1e-5)
    assert not torch.allclose(edit_out, source_out.expand(2, -1, -1, -1), atol=1e-2)
