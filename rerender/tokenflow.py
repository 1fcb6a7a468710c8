"""TokenFlow's per-step pieces on tensors (reference §5), independent of the host and of the attention backend.

Each denoising step edits one random key frame per chunk of frames jointly (extended attention: every key frame's
queries attend to the keys and values of all key frames), then every frame of a chunk takes the key frames' stored
self-attention outputs along nearest-neighbour correspondences of the source video's own features at that step and
layer, its chunk's key frame blended with the previous chunk's by a sigmoid of the distances to the chunk centres.
"""
from typing import Callable, List, Optional, Sequence

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) [B,T,C] -> [B,Tq,C]


def chunks(frame_count: int, chunk_size: int) -> List[List[int]]:
    """Consecutive chunks of frame indices (the last one may be shorter)."""
    return [list(range(start, min(start + chunk_size, frame_count))) for start in range(0, frame_count, chunk_size)]


def draw_key_frames(frame_count: int, chunk_size: int, generator: torch.Generator) -> List[int]:
    """One uniformly random frame per chunk (the reference's randint(chunk) + arange(0, n, chunk); a shorter last
    chunk draws among its own frames)."""
    return [chunk[int(torch.randint(len(chunk), (1,), generator=generator))]
            for chunk in chunks(frame_count, chunk_size)]


def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Attention) -> torch.Tensor:
    """Joint attention of K key frames [K,T,C]: each frame's queries over the keys/values of all K frames
    (concatenated along the tokens, in key frame order)."""
    frames, tokens, channels = k.shape
    k_all = k.reshape(1, frames * tokens, channels).expand(frames, -1, -1)
    v_all = v.reshape(1, frames * tokens, v.shape[-1]).expand(frames, -1, -1)
    return attention(q, k_all, v_all)


def nearest_tokens(frame_tokens: torch.Tensor, key_tokens: torch.Tensor) -> torch.Tensor:
    """For every token of every frame [F,T,C], the index of the most cosine-similar token of one key frame [Tk,C]
    ([F,T] long). One similarity matrix per frame at a time, so memory stays T·Tk."""
    keys = torch.nn.functional.normalize(key_tokens.float(), dim=-1)
    return torch.stack([(torch.nn.functional.normalize(frame.float(), dim=-1) @ keys.T).argmax(dim=-1)
                        for frame in frame_tokens])


def gather_tokens(key_output: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Key frame attention output [Tk,C] taken at `indices` [F,T] -> [F,T,C]."""
    return key_output[indices]


def blend_weights(frames: Sequence[int], chunk_index: int, chunk_size: int) -> torch.Tensor:
    """Weight of the chunk's own key frame against the previous chunk's, per frame (the reference's formula):
    w = sigmoid(d2 / (d1 + d2)), d1 / d2 = distances of the frame to the centres of chunks b and b-1."""
    position = torch.as_tensor(list(frames), dtype=torch.float32)
    d1 = (position - (chunk_index * chunk_size + chunk_size // 2)).abs()
    d2 = (position - ((chunk_index - 1) * chunk_size + chunk_size // 2)).abs()
    return torch.sigmoid(d2 / (d1 + d2))


def propagate(key_outputs: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
              weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Propagated attention output of a chunk's frames: the own key frame's output gathered along its NN field, or
    with two key frames (own, previous) w·own + (1-w)·previous, `weights` per frame [F]."""
    own = gather_tokens(key_outputs[0], indices[0])
    if len(key_outputs) == 1:
        return own
    w = weights.to(own).view(-1, 1, 1)
    return w * own + (1 - w) * gather_tokens(key_outputs[1], indices[1])


def injection_steps(fraction: float, total_steps: int) -> frozenset:
    """The first int(T·fraction) steps of a T-step schedule (the reference's PnP periods)."""
    return frozenset(range(int(total_steps * fraction + 1e-9)))
