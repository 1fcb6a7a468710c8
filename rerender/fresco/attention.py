"""FRESCO-guided self-attention (reference §4.5) on projected q/k/v, independent of the host and of the backend.

Every function takes tensors in the layout the host's `attn1_replace` callback receives: `[chunks*N, tokens,
heads*dim_head]`, `chunks` CFG chunks (cond/uncond, in whatever order the host batched them) of the N frames of a
batch, frames in batch order within each chunk. Each chunk is handled on its own, as in the reference. The actual
softmax attention is delegated to an `attention(q, k, v, heads, mask=None)` callable with the signature of the
host's `optimized_attention` (`mask`: additive float, broadcastable to [B, heads, tq, tk]), so whatever backend the
host selected runs it; `sdpa_attention` is the host-free default.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .geometry import Trajectories

SPATIAL_LOGIT_SCALE = 0.2   # the reference multiplies the logits by 0.2 (paper: lambda_s = 5)
TEMPORAL_LOGIT_SCALE = 0.2  # paper: lambda_t = 5

Attention = Callable[..., torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head softmax attention, [B, tq, heads*d] x [B, tk, heads*d] -> [B, tq, heads*d] (torch SDPA)."""
    b, tq, c = q.shape
    d = c // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, tq, c)


def _chunks(x: torch.Tensor, frames: int) -> int:
    if x.shape[0] % frames:
        raise ValueError(f"FRESCO attention: a batch of {x.shape[0]} is not whole chunks of {frames} frames; "
                         f"another patch changed the batch layout.")
    return x.shape[0] // frames


def unique_token_index(unique: torch.Tensor) -> torch.Tensor:
    """Flat indices into the N*T tokens of a chunk of the tokens an [N, T] unique-region mask selects (compute once
    per batch and layer resolution: it costs a device sync)."""
    return unique.flatten().nonzero().squeeze(1)


def efficient_cross_frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unique_index: torch.Tensor,
                                    frames: int, heads: int, attention: Attention = sdpa_attention) -> torch.Tensor:
    """Every query of every frame attends to the same gathered set of K/V: the unique-region tokens of all frames
    of its chunk (`unique_index` from `unique_token_index`; all of frame 0 plus what each later frame newly shows)."""
    chunks = _chunks(q, frames)
    tokens, channels = q.shape[1], q.shape[2]
    keys = k.reshape(chunks, frames * tokens, k.shape[2]).index_select(1, unique_index)
    values = v.reshape(chunks, frames * tokens, v.shape[2]).index_select(1, unique_index)
    out = attention(q.reshape(chunks, frames * tokens, channels), keys, values, heads)
    return out.reshape(chunks * frames, tokens, out.shape[-1])


def spatial_guided_query(q: torch.Tensor, reference_q: torch.Tensor, reference_k: torch.Tensor, heads: int,
                         scale: float = SPATIAL_LOGIT_SCALE, attention: Attention = sdpa_attention) -> torch.Tensor:
    """§4.5 step 3, per head: Q <- softmax(scale * (W_Q r)(W_K r)^T / sqrt(d)) Q, with `reference_q`/`reference_k`
    the projections of the layer's intra-frame reference input r (the attn1 q/k recorded in the reference pass),
    same layout as `q` (or broadcastable over chunks: [N, T, C])."""
    if reference_q.shape[0] != q.shape[0]:
        repeat = _chunks(q, reference_q.shape[0])
        reference_q, reference_k = reference_q.repeat(repeat, 1, 1), reference_k.repeat(repeat, 1, 1)
    return attention(reference_q.to(q.dtype), reference_k.to(q.dtype) * scale, q, heads)


def trajectory_bias(trajectories: Trajectories, chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [chunks*T, 1, N, N]: 0 within a track segment, -inf across a break."""
    bias = torch.zeros(trajectories.allowed.shape, dtype=dtype, device=trajectories.allowed.device)
    bias = bias.masked_fill(~trajectories.allowed, float("-inf"))[:, None]
    return bias.repeat(chunks, 1, 1, 1)


def temporal_guided_attention(q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, trajectories: Trajectories,
                              heads: int, scale: float = TEMPORAL_LOGIT_SCALE, use_breaks: bool = True,
                              attention: Attention = sdpa_attention) -> torch.Tensor:
    """§4.5 step 5: along each trajectory, the N frames attend to each other (logits x `scale`), raw `q`/`k` as
    queries/keys and `hidden` (the output of the spatial attention) as values, attention forbidden across a break
    unless `use_breaks` is False; the result is scattered back to the tokens. Same layout in and out."""
    frames = trajectories.frames
    chunks = _chunks(q, frames)
    tokens = q.shape[1]
    if tokens != trajectories.forward.shape[1]:
        raise ValueError(f"temporal-guided attention: {tokens} tokens but the trajectories are for "
                         f"{trajectories.size[0]}x{trajectories.size[1]}.")
    gather_index = trajectories.forward.to(q.device)

    def along_tracks(x):  # [chunks*N, T, C] -> [chunks*T, N, C]
        x = x.reshape(chunks, frames, tokens, x.shape[-1])
        x = torch.gather(x, 2, gather_index[None, :, :, None].expand(chunks, -1, -1, x.shape[-1]))
        return x.transpose(1, 2).reshape(chunks * tokens, frames, x.shape[-1])

    bias = trajectory_bias(trajectories, chunks, q.dtype).to(q.device) if use_breaks else None
    out = attention(along_tracks(q), along_tracks(k) * scale, along_tracks(hidden), heads, mask=bias)
    out = out.reshape(chunks, tokens, frames, out.shape[-1]).transpose(1, 2)  # [chunks, N, track, C]
    scatter_index = trajectories.backward.to(q.device)[None, :, :, None].expand(chunks, -1, -1, out.shape[-1])
    return torch.gather(out, 2, scatter_index).reshape(chunks * frames, tokens, out.shape[-1])


def fresco_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int,
                     unique_index: Optional[torch.Tensor] = None, reference_q: Optional[torch.Tensor] = None,
                     reference_k: Optional[torch.Tensor] = None, trajectories: Optional[Trajectories] = None,
                     attention: Attention = sdpa_attention) -> torch.Tensor:
    """One FRESCO self-attention call in the reference's order (§4.5): spatial-guided Q (when a reference is
    given), attention over the unique-region tokens of the chunk (when `unique_index` is given; else each frame
    attends to itself), then temporal-guided attention along the trajectories (when given) with the raw Q/K.
    With everything None it is plain self-attention."""
    raw_q = q
    if reference_q is not None:
        q = spatial_guided_query(q, reference_q, reference_k, heads, attention=attention)
    if unique_index is not None:
        hidden = efficient_cross_frame_attention(q, k, v, unique_index, frames, heads, attention)
    else:
        hidden = attention(q, k, v, heads)
    if trajectories is not None:
        hidden = temporal_guided_attention(raw_q, k, hidden, trajectories, heads, attention=attention)
    return hidden
