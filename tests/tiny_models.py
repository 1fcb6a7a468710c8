"""Tiny random-weight models built with the host's own classes (call only after the `host` fixture is up).

The host's ops leave parameters uninitialised, so every builder initialises them itself, from a seed.
"""
import copy

import torch

# SD1.5's UNet layout (3 attention levels, 2 res blocks each, the same decoder blocks 3..11) at a fraction of the width.
TINY_SD15_UNET = {
    "context_dim": 768, "model_channels": 32, "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "num_heads": 8, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
    "use_temporal_resblock": False, "use_checkpoint": False,
}

# SD1.5's real width (320 channels, so the host's checkpoint detector recognises it as SD1.5) with two levels of one
# res block each: the size the benchmarks and the on-disk test checkpoint use.
SD15_WIDTH_UNET = dict(TINY_SD15_UNET, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 2],
                       transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1])

# SD1.5's UNet itself (random weights): the same compute as the real model, for cost measurements.
FULL_SD15_UNET = dict(TINY_SD15_UNET, model_channels=320)

TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def init_parameters(module: torch.nn.Module, seed: int) -> None:
    """Deterministic small-variance init: weights ~ N(0, 1/fan_in), norms at identity, biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def tiny_sd15(seed: int = 0, unet_config: dict = TINY_SD15_UNET):
    """ModelPatcher around a random-weight SD1.5-architecture UNet (EPS, SD1.5 latent format)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    model_config = comfy.supported_models.SD15(copy.deepcopy(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    init_parameters(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_sd_vae(seed: int = 0):
    """Host VAE with SD's latent interface (4 channels at 1/8) and random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    config = {"params": {"embed_dim": 4, "ddconfig": TINY_VAE_DDCONFIG}}
    module = AutoencoderKL(**config["params"])
    init_parameters(module, seed)
    vae = comfy.sd.VAE(sd=module.state_dict(), config=config)
    vae.throw_exception_if_invalid()
    return vae


def taef2_vae():
    """The real trained taef2 autoencoder (128 channels at 1/16) through the host's own VAE loader."""
    import nodes
    return nodes.VAELoader().load_vae("taef2")[0]


def conditioning(seed: int = 0, tokens: int = 77, dim: int = 768):
    """A CONDITIONING for the tiny SD1.5 UNet (random text embedding; no text encoder needed)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, dim, generator=gen), {}]]


def tiny_controlnet_module(seed: int = 0, unet_config: dict = TINY_SD15_UNET):
    """A random-weight ControlNet module matching a UNet config of this file."""
    import comfy.cldm.cldm
    config = {k: copy.deepcopy(v) for k, v in unet_config.items()
              if k not in ("out_channels", "transformer_depth_output", "use_temporal_attention", "use_temporal_resblock")}
    module = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", **config)
    init_parameters(module, seed)
    return module


def tiny_controlnet(seed: int = 0):
    """CONTROL_NET for the tiny SD1.5 UNet, as the host's ControlNet loader would return it."""
    import comfy.controlnet
    import comfy.model_management as mm
    return comfy.controlnet.ControlNet(tiny_controlnet_module(seed), load_device=mm.get_torch_device())


def save_tiny_checkpoint(path, seed: int = 0, unet_config: dict = SD15_WIDTH_UNET) -> None:
    """A loadable SD1.5-architecture checkpoint (tiny UNet, random CLIP-L text encoder, random SD VAE) for tests
    that go through the host's CheckpointLoaderSimple, e.g. on a server."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models
    model = tiny_sd15(seed, unet_config)
    clip = comfy.sd.CLIP(comfy.supported_models.SD15(copy.deepcopy(TINY_SD15_UNET)).clip_target(), embedding_directory=None)
    init_parameters(clip.cond_stage_model, seed + 1)
    comfy.sd.save_checkpoint(str(path), model, clip, checkpoint_sd_vae(seed + 2))
    mm.unload_all_models()


def checkpoint_sd_vae(seed: int, decoder_channels: int = 128):
    """A random-weight VAE in the layout the host's checkpoint loader assumes for SD1.x, SD2.x and SDXL alike (SD's
    AutoencoderKL: 4 latent channels at 1/8; the model's latent format sets the scale). The loader reads the
    decoder's width from its weights, so a thinner decoder (SD: 128 base channels) keeps decoding cheap."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    thinner = {} if decoder_channels == 128 else {"decoder_ddconfig": dict(ddconfig, ch=decoder_channels)}
    vae_module = AutoencoderKL(embed_dim=4, ddconfig=ddconfig, **thinner)
    init_parameters(vae_module, seed)
    return comfy.sd.VAE(sd=vae_module.state_dict())


def save_tiny_controlnet(path, seed: int = 0, unet_config: dict = SD15_WIDTH_UNET) -> None:
    """A ControlNet for save_tiny_checkpoint's UNet, as an LDM-format safetensors file for the host's loader."""
    import safetensors.torch
    module = tiny_controlnet_module(seed, unet_config)
    state = {f"control_model.{k}": v.contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path))


# SD2.x's layout (1024-d text context, linear projections in the transformers) at the tiny SD1.5 width.
TINY_SD2_UNET = dict(TINY_SD15_UNET, context_dim=1024, use_linear_in_transformer=True)

# SDXL's layout at a fraction of the width: three levels, no attention at the first, deeper transformers at the last
# (SDXL has 2 and 10; the host pops transformer_depth_output from the end, so output blocks 0-2 get depth 2),
# 2048-d context and the 2816-d "adm" vector (pooled text embedding + size conditioning).
TINY_SDXL_UNET = {
    "model_channels": 32, "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816,
    "use_temporal_attention": False, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "transformer_depth_middle": 2, "num_classes": "sequential",
    "num_heads": 4, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
    "use_temporal_resblock": False, "use_checkpoint": False,
}


def _patcher(base, seed):
    import comfy.model_management as mm
    import comfy.model_patcher
    init_parameters(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_sd2_vpred(seed: int = 0, unet_config: dict = TINY_SD2_UNET):
    """ModelPatcher around a random-weight SD2.x-architecture UNet with v-prediction (as SD2.1-768)."""
    import comfy.model_base
    import comfy.supported_models
    model_config = comfy.supported_models.SD20(copy.deepcopy(unet_config))
    model_config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=-1)  # tiny width
    model_config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    return _patcher(base, seed)


def tiny_sdxl(seed: int = 0, unet_config: dict = TINY_SDXL_UNET):
    """ModelPatcher around a random-weight SDXL-layout UNet (EPS, SDXL latent format, adm conditioning)."""
    import comfy.supported_models
    model_config = comfy.supported_models.SDXL(copy.deepcopy(unet_config))
    model_config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=-1)
    model_config.set_inference_dtype(torch.float32, None)
    return _patcher(model_config.get_model({}), seed)


def sdxl_conditioning(seed: int = 0, tokens: int = 77):
    """A CONDITIONING for the tiny SDXL UNet: 2048-d text embedding and a 1280-d pooled embedding."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]


def with_unit_norm_gains(model):
    """The same random model with every normalisation gain at 1: `init_parameters` leaves gains of norms whose name
    lacks "norm" (the UNet's `out.0`, the res blocks' `in_layers.0` / `out_layers.0`) at ~0.02, which makes the
    predicted noise ~0.02 and nearly input-independent; DDIM inversion tests need an ε of order 1 that depends on x.
    Modifies and returns the ModelPatcher built by one of the builders above."""
    with torch.no_grad():
        for module in model.model.diffusion_model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
    return model


# SDXL's own layout as the host's checkpoint detector recognises it (320 base channels, transformer depths
# [0, 0, 2, 2, 10, 10] in the encoder and decoder, 2048-d context, 2816-d adm, linear projections, 64-channel heads),
# at one width on every level (SDXL widens to 640 and 1280) and with one transformer in the middle block (SDXL: 10;
# the detector does not look at it): the UNet of the on-disk SDXL test checkpoint.
SDXL_DETECTED_UNET = dict(TINY_SDXL_UNET, model_channels=320, channel_mult=[1, 1, 1],
                          transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                          transformer_depth_middle=1)
# Its ControlNet: the encoder half of that UNet, with one transformer per attention block (as the "small"/"mid"
# SDXL ControlNets thin theirs out). The host loads an LDM-format ControlNet of any such layout with the layout it
# reads from the weights (logging "no match": no model class has these depths).
SDXL_CONTROLNET_UNET = dict(SDXL_DETECTED_UNET, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                            num_heads=-1, num_head_channels=64)


def save_tiny_sdxl_checkpoint(path, seed: int = 0, unet_config: dict = SDXL_DETECTED_UNET) -> None:
    """A loadable SDXL checkpoint for tests that go through the host's CheckpointLoaderSimple: the UNet above,
    the host's CLIP-L + OpenCLIP-G text encoders (its fixed configs: full size, random weights) and SD's VAE layout.
    The host detects it as SDXL (latent format, adm size conditioning, the two-encoder CLIP). The UNet is stored in
    float16 (the host loads it at the dtype it computes in), the VAE with a thin decoder (see checkpoint_sd_vae)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    model_config = comfy.supported_models.SDXL(copy.deepcopy(unet_config))
    model_config.set_inference_dtype(torch.float16, torch.float32)
    model = _patcher(model_config.get_model({}), seed)
    clip = comfy.sd.CLIP(model_config.clip_target(), embedding_directory=None)
    init_parameters(clip.cond_stage_model, seed + 1)
    comfy.sd.save_checkpoint(str(path), model, clip, checkpoint_sd_vae(seed + 2, decoder_channels=32))
    mm.unload_all_models()


def save_tiny_sdxl_controlnet(path, seed: int = 0, unet_config: dict = SDXL_CONTROLNET_UNET) -> None:
    """An SDXL-layout ControlNet for save_tiny_sdxl_checkpoint's UNet (the same blocks and widths, so its residuals
    fit), as an LDM-format safetensors file."""
    save_tiny_controlnet(path, seed, unet_config)


SDXL_CHECKPOINT_NAME, SDXL_CONTROLNET_NAME = "tiny_sdxl.safetensors", "tiny_sdxl_control.safetensors"


def write_sdxl_models(base, seed: int = 0) -> dict:
    """Writes the tiny SDXL checkpoint and its ControlNet where a ComfyUI with base directory `base` finds them
    (models/checkpoints, models/controlnet) and returns their file names: {"checkpoint": ..., "controlnet": ...}."""
    from pathlib import Path
    models = Path(base) / "models"
    for folder in ("checkpoints", "controlnet"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    save_tiny_sdxl_checkpoint(models / "checkpoints" / SDXL_CHECKPOINT_NAME, seed)
    save_tiny_sdxl_controlnet(models / "controlnet" / SDXL_CONTROLNET_NAME, seed)
    return {"checkpoint": SDXL_CHECKPOINT_NAME, "controlnet": SDXL_CONTROLNET_NAME}
