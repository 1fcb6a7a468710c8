"""Original RAFT checkpoints (princeton-vl layout) as torchvision RAFT modules.

The host's optical-flow model is torchvision's `raft_large`; the widely shared checkpoints (`raft-sintel.pth`,
`raft-small.pth`, ...) use princeton-vl's module names under a DataParallel `module.` prefix. The two networks are
the same, so converting is a renaming of state-dict keys (torchvision ported its own RAFT weights the same way).
Files are read with `torch.load(weights_only=True)` or safetensors; anything that is not a RAFT state dict is refused
with a ValueError naming the file.
"""
import os
import re

import torch

# princeton-vl name -> torchvision name, applied in order to every key (after the `module.` prefix is stripped).
_RENAMES = (
    (r"^fnet\.", "feature_encoder."),
    (r"^cnet\.", "context_encoder."),
    # encoder stem and head
    (r"^(feature_encoder|context_encoder)\.conv1\.", r"\1.convnormrelu.0."),
    (r"^(feature_encoder|context_encoder)\.norm1\.", r"\1.convnormrelu.1."),
    (r"^(feature_encoder|context_encoder)\.conv2\.", r"\1.conv."),
    # residual / bottleneck blocks: convK + normK -> convnormreluK.{0,1}
    (r"^(\w+_encoder\.layer\d\.\d)\.conv(\d)\.", r"\1.convnormrelu\2.0."),
    (r"^(\w+_encoder\.layer\d\.\d)\.norm(\d)\.", r"\1.convnormrelu\2.1."),
    # update block
    (r"^update_block\.encoder\.convc(\d)\.", r"update_block.motion_encoder.convcorr\1.0."),
    (r"^update_block\.encoder\.convf(\d)\.", r"update_block.motion_encoder.convflow\1.0."),
    (r"^update_block\.encoder\.conv\.", "update_block.motion_encoder.conv.0."),
    (r"^update_block\.gru\.conv([zrq])(\d)\.", r"update_block.recurrent_block.convgru\2.conv\1."),
    (r"^update_block\.gru\.conv([zrq])\.", r"update_block.recurrent_block.convgru1.conv\1."),
    (r"^update_block\.mask\.0\.", "mask_predictor.convrelu.0."),
    (r"^update_block\.mask\.2\.", "mask_predictor.conv."),
)
_BLOCK_NORM = re.compile(r"^(\w+_encoder\.layer\d\.\d)\.convnormrelu(\d)\.1\.")


def _is_alias_of_downsample_norm(key: str, converted_keys: set) -> bool:
    """princeton-vl registers a block's last norm twice (as normK and inside `downsample`); keep only the latter.

    A block with C convolutions has norms 1..C for its convolutions; norm C+1 is the downsample's norm."""
    match = _BLOCK_NORM.match(key)
    if match is None:
        return False
    block, index = match.group(1), int(match.group(2))
    return f"{block}.convnormrelu{index}.0.weight" not in converted_keys


def convert_original_state_dict(state_dict: dict) -> tuple:
    """princeton-vl RAFT state dict -> (variant 'large' | 'small', torchvision RAFT state dict). Tensors are shared."""
    stripped = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state_dict.items()}
    renamed = {}
    for key, value in stripped.items():
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    names = set(renamed)
    converted = {key: value for key, value in renamed.items() if not _is_alias_of_downsample_norm(key, names)}
    return _variant_of(converted), converted


def _variant_of(torchvision_state_dict: dict) -> str:
    return "large" if "mask_predictor.conv.weight" in torchvision_state_dict else "small"


def _read_state_dict(path: str) -> dict:
    try:
        if path.lower().endswith(".safetensors"):
            import safetensors.torch
            state_dict = safetensors.torch.load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a pickle with code in it, random bytes: all "not readable"
        # PyTorch's own message advises weights_only=False, which must never be done with an untrusted file
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}): it is corrupt, truncated "
                         "or not a weights file; re-download it (RAFT: raft-sintel.pth from princeton-vl's RAFT, or "
                         "torchvision's raft_large)") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"RAFT checkpoint {os.path.basename(path)!r} is not a state dict of tensors")
    return state_dict


def raft_from_state_dict(state_dict: dict, name: str = "checkpoint") -> torch.nn.Module:
    """A torchvision RAFT (large or small, as the weights say) in eval mode, from either key layout."""
    from torchvision.models.optical_flow import raft_large, raft_small

    keys = list(state_dict)
    if any(k.startswith("feature_encoder.") for k in keys):
        variant, converted = _variant_of(state_dict), state_dict
    elif any(re.match(r"^(module\.)?fnet\.", k) for k in keys):
        variant, converted = convert_original_state_dict(state_dict)
    else:
        raise ValueError(f"{name} is not a RAFT checkpoint: expected princeton-vl keys ('module.fnet.', "
                         f"'module.cnet.', 'module.update_block.') or torchvision keys ('feature_encoder.', ...); "
                         f"found e.g. {keys[:3]}")
    module = (raft_large if variant == "large" else raft_small)(weights=None, progress=False)
    try:
        module.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{name} does not match torchvision's raft_{variant}: {error}") from error
    return module.eval().to(torch.float32)


def load_raft(path: str) -> torch.nn.Module:
    """Read a RAFT checkpoint file (.pth/.pt with weights_only, or .safetensors) into a torchvision RAFT module."""
    return raft_from_state_dict(_read_state_dict(path), name=f"RAFT checkpoint {os.path.basename(path)!r}")
