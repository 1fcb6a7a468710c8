"""Tune-A-Video (reference §6) without the host: the inflated attention, the training loss and the tuned-parameter file.

An image UNet becomes a video model in two ways, both on every transformer block: its self-attention becomes
sparse-causal (frame i's queries attend to the tokens of frame 0 and frame i-1, never its own; frame 0 attends to
itself twice, which is plain self-attention), and a new temporal self-attention runs after the feed-forward, over
the frame axis at each spatial location (pre-LayerNorm, zero-initialised output projection, no positional encoding).
One-shot tuning trains the query projections of the self- and cross-attention and the temporal attention.

Frames of a video are consecutive along the batch, one video per cond/uncond chunk, as the host batches them.
"""
import hashlib
import math
import json
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

TRAINED_PROJECTIONS = ("attn1.to_q", "attn2.to_q")  # the reference's trainable modules besides attn_temp
FILE_FORMAT = "rerender.tune_a_video.v1"


def select_frames(total: int, count: int, stride: int, start: int = 0) -> List[int]:
    """The reference dataset's sampling: every `stride`-th frame from `start`, at most `count` of them."""
    if count < 2:
        raise ValueError(f"frame_count is {count}: Tune-A-Video tunes on a clip of at least 2 frames.")
    if stride < 1:
        raise ValueError(f"frame_stride is {stride}: use 1 (every frame) or more.")
    indices = list(range(start, total, stride))[:count]
    if len(indices) < 2:
        raise ValueError(f"the clip has {total} frame(s); from frame {start} at stride {stride} that gives "
                         f"{len(indices)} frame(s), and tuning needs at least 2. Give a longer clip, a smaller "
                         "stride or an earlier start frame.")
    return indices


def check_frame_sizes(sizes: Sequence[Tuple[int, ...]]) -> None:
    """All frames of the clip must have one size: they are tuned and sampled as one batch."""
    distinct = sorted(set(tuple(s) for s in sizes))
    if len(distinct) > 1:
        raise ValueError(f"the clip's frames have different sizes {distinct}; resize them to one size first "
                         "(e.g. with Upscale Image) before tuning.")


def sparse_causal_inputs(tokens: torch.Tensor, videos: int) -> torch.Tensor:
    """K/V inputs of sparse-causal attention: [videos*F, T, C] -> [videos*F, 2T, C], for frame i the tokens of
    frame 0 then of frame i-1 (frame 0: itself twice), as the reference concatenates them."""
    batch, count, channels = tokens.shape
    if batch % videos:
        raise RuntimeError(f"sparse-causal attention: a batch of {batch} cannot be split into {videos} videos.")
    frames = batch // videos
    clip = tokens.view(videos, frames, count, channels)
    previous = (torch.arange(frames, device=tokens.device) - 1).clamp(min=0)
    first = clip[:, :1].expand(-1, frames, -1, -1)
    return torch.cat([first, clip[:, previous]], dim=2).reshape(batch, 2 * count, channels)


class TemporalAttention(torch.nn.Module):
    """Self-attention over the frame axis at each token position, added to its input (reference `norm_temp` +
    `attn_temp`). The output projection starts at zero, weight and bias, so an untuned module is the identity.
    Parameters stay in float32; they are cast to the activations' dtype and device at each call."""

    def __init__(self, dim: int, heads: int, dim_head: int, generator: Optional[torch.Generator] = None):
        """Q/K/V start as torch's Linear default, U(-1/sqrt(dim), 1/sqrt(dim)), drawn from `generator` (the
        tuning seed's, so one seed gives one tuned model) and never from the global RNG."""
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (torch.nn.utils.skip_init(torch.nn.Linear, dim, inner, bias=False)
                                           for _ in range(3))
        bound = 1.0 / math.sqrt(dim)
        with torch.no_grad():
            for layer in (self.to_q, self.to_k, self.to_v):
                layer.weight.uniform_(-bound, bound, generator=generator)
        self.to_out = torch.nn.utils.skip_init(torch.nn.Linear, inner, dim)
        torch.nn.init.zeros_(self.to_out.weight)
        torch.nn.init.zeros_(self.to_out.bias)
        self.norm.requires_grad_(False)  # the reference trains attn_temp only, not norm_temp

    def forward(self, hidden: torch.Tensor, videos: int) -> torch.Tensor:
        batch, count, channels = hidden.shape
        if batch % videos:
            raise RuntimeError(f"temporal attention: a batch of {batch} cannot be split into {videos} videos.")
        frames = batch // videos

        def cast(t):
            return None if t is None else t.to(dtype=hidden.dtype, device=hidden.device)

        # (videos*frames, tokens, C) -> (videos*tokens, frames, C)
        seq = hidden.view(videos, frames, count, channels).transpose(1, 2).reshape(videos * count, frames, channels)
        normed = F.layer_norm(seq, (channels,), cast(self.norm.weight), cast(self.norm.bias), self.norm.eps)

        def heads(t):
            return t.view(t.shape[0], frames, self.heads, -1).transpose(1, 2)

        q, k, v = (heads(F.linear(normed, cast(layer.weight))) for layer in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(videos * count, frames, -1)
        seq = seq + F.linear(attended, cast(self.to_out.weight), cast(self.to_out.bias))
        return seq.view(videos, count, frames, channels).transpose(1, 2).reshape(batch, count, channels)


# --------------------------------------------------------------------------------------------------- the loss
def prediction_target(kind: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                      sigma_data: float = 1.0) -> torch.Tensor:
    """What the network is trained to output at x = x0 + sigma*noise (the host's sigma form of DDPM noising):
    ε for "eps", the velocity (α·ε − σ_vp·x0 in the VP form) for "v"."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    if kind == "eps":
        return noise
    if kind == "v":
        return (noise * sigma_data - s * x0 / sigma_data) * sigma_data / (s ** 2 + sigma_data ** 2) ** 0.5
    raise ValueError(f"unsupported prediction type {kind!r}")


def prediction_from_denoised(kind: str, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor,
                             sigma_data: float = 1.0) -> torch.Tensor:
    """The network's raw output recovered from the host's denoised x̂0 (inverting its EPS / V_PREDICTION
    parameterisation exactly), so the loss is the reference's MSE on ε or v whatever the host returns."""
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    if kind == "eps":
        return (x - denoised) / s
    if kind == "v":
        total = s ** 2 + sigma_data ** 2
        return (x * sigma_data ** 2 / total - denoised) * total ** 0.5 / (s * sigma_data)
    raise ValueError(f"unsupported prediction type {kind!r}")


def tuning_loss(kind: str, x: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """The reference's loss: mean squared error of the prediction against its target, in float32."""
    prediction = prediction_from_denoised(kind, x.float(), denoised.float(), sigma.float(), sigma_data)
    return F.mse_loss(prediction, prediction_target(kind, x0.float(), noise.float(), sigma.float(), sigma_data))


# ------------------------------------------------------------------------------------- the tuned parameters
def base_fingerprint(named_shapes: Iterable[Tuple[str, Sequence[int]]],
                     sample_tensors: Iterable[torch.Tensor]) -> str:
    """Identity of a base model: its frozen weights' names and shapes, plus the bytes of a few of them (so two
    fine-tunes of one architecture differ)."""
    digest = hashlib.sha256()
    for name, shape in sorted(named_shapes):
        digest.update(f"{name}:{tuple(shape)};".encode())
    for tensor in sample_tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TunedParameters:
    """What tuning produced: the change of each trained query projection (`query_deltas`, keyed by the host's
    weight key), one temporal attention per transformer block (`temporal`, keyed by the block's path, with its
    head layout), and the fingerprint of the base model it was tuned on."""
    query_deltas: Dict[str, torch.Tensor]
    temporal: Dict[str, TemporalAttention]
    fingerprint: str
    info: Dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        tensors = {f"query_delta/{key}": value.detach().float().cpu().contiguous()
                   for key, value in self.query_deltas.items()}
        layout = {}
        for path, module in self.temporal.items():
            layout[path] = [module.to_q.in_features, module.heads, module.to_q.out_features // module.heads]
            for name, value in module.state_dict().items():
                tensors[f"temporal/{path}/{name}"] = value.detach().float().cpu().contiguous()
        metadata = {"format": FILE_FORMAT, "fingerprint": self.fingerprint, "temporal_layout": json.dumps(layout),
                    **{f"info.{k}": str(v) for k, v in self.info.items()}}
        return tensors, metadata

    @classmethod
    def from_state_dict(cls, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> "TunedParameters":
        if (metadata or {}).get("format") != FILE_FORMAT:
            raise ValueError(f"not a Tune-A-Video parameter file of this pack (format "
                             f"{(metadata or {}).get('format')!r}, expected {FILE_FORMAT!r}).")
        layout = json.loads(metadata["temporal_layout"])
        temporal = {}
        for path, (dim, heads, dim_head) in layout.items():
            module = TemporalAttention(dim, heads, dim_head)
            prefix = f"temporal/{path}/"
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            temporal[path] = module.requires_grad_(False)
        deltas = {k[len("query_delta/"):]: v for k, v in tensors.items() if k.startswith("query_delta/")}
        info = {k[len("info."):]: v for k, v in metadata.items() if k.startswith("info.")}
        return cls(deltas, temporal, metadata["fingerprint"], info)

    def parameter_count(self) -> int:
        """Trained parameters (query changes and temporal attention, without its frozen LayerNorm)."""
        return (sum(t.numel() for t in self.query_deltas.values())
                + sum(p.numel() for m in self.temporal.values() for n, p in m.named_parameters()
                      if not n.startswith("norm.")))
