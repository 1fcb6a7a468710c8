"""Style-aware cross-frame attention (reference §1.4), independent of the host and of the attention backend.

During key frame rendering, the decoder's self-attention takes its keys and values from the anchor frame and the
previous key frame (the current frame's own tokens are NOT included, as in the reference): K' = W_K[v_anchor;
v_prev], V' = W_V[v_anchor; v_prev]. What is cached is the input of the K/V projections (the normed hidden states),
as the reference does, so the substitution happens before any projection or attention kernel runs: whatever
attention backend or attention replacement is installed computes the attention on the substituted inputs.

Caches are keyed by (step of the full schedule, layer = (block name, block number, transformer index), branch =
cond 0 / uncond 1), never by call order: cond/uncond batching, a dropped uncond (cfg 1) or a split batch cannot
misalign them (the reference's running counter breaks on all three).
"""
import enum
from typing import Collection, Dict, Optional, Sequence, Tuple

import torch

from .keyframe_constraints import period_steps, step_at_sigma

LayerKey = Tuple[str, int, int]
CacheKey = Tuple[int, LayerKey, int]


class Mode(enum.Enum):
    OFF = "off"              # plain self-attention (outside key frame rendering)
    ANCHOR = "anchor"        # plain self-attention; cache the anchor's K/V inputs
    KEY_FRAME = "key frame"  # K/V from anchor + previous key frame; cache this frame's own as the next "previous"


class AttentionInputCache:
    """K/V inputs of self-attention per (step, layer, branch), stored at a fixed dtype on their own device."""

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype
        self._entries: Dict[CacheKey, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def put(self, key: CacheKey, context: torch.Tensor, value: Optional[torch.Tensor]) -> None:
        """`value` None means the values are projected from `context` too (plain self-attention)."""
        dtype = self.dtype or context.dtype
        self._entries[key] = (context.detach().to(dtype=dtype, copy=True),
                              None if value is None else value.detach().to(dtype=dtype, copy=True))

    def get(self, key: CacheKey) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        return self._entries.get(key)

    def tensors(self):
        for context, value in self._entries.values():
            yield context
            if value is not None:
                yield value

    def shallow_copy(self) -> "AttentionInputCache":
        copy = AttentionInputCache(self.dtype)
        copy._entries = dict(self._entries)
        return copy

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


def cross_frame_inputs(current: torch.Tensor, anchor: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """K/V inputs [B, Na+Np, C] for a chunk of B frames: anchor tokens then previous-key-frame tokens (the
    reference's order), each cached with batch 1 (broadcast) or B."""
    batch = current.shape[0]
    parts = []
    for name, cached in (("anchor", anchor), ("previous key frame", previous)):
        if cached.shape[0] not in (1, batch) or cached.shape[-1] != current.shape[-1]:
            raise RuntimeError(f"cross-frame attention: the cached {name} tokens {tuple(cached.shape)} do not fit "
                               f"the current frame's {tuple(current.shape)}; another patch changes the token "
                               f"layout between frames, or frames differ in size.")
        parts.append(cached.to(current.dtype).expand(batch, -1, -1))
    return torch.cat(parts, dim=1)


class CrossFrameAttention:
    """What the decoder self-attention does during a key frame rendering run, and the caches it needs.

    The key frame sampler drives it: `start_run(schedule)` once per run, then `mode` per pass (the anchor pass
    records; key frame passes substitute and record the frame's own inputs, a later pass overwriting an earlier
    one), `commit_anchor` after the anchor, `commit_previous` after each key frame, and `end_run()` in a `finally`
    (it frees every cache). Outside a run it is inert."""

    def __init__(self, layers: Collection[LayerKey], start: float, end: float, dtype: Optional[torch.dtype] = None):
        if not layers:
            raise ValueError("cross-frame attention needs at least one decoder self-attention layer.")
        self.layers = frozenset(layers)
        self.start, self.end = start, end
        self.dtype = dtype
        self.mode = Mode.OFF
        self.schedule: Optional[torch.Tensor] = None
        self.active_steps = frozenset()
        self._last_sigma, self._last_step = None, 0
        self.misses = 0
        self.anchor = AttentionInputCache(dtype)
        self.previous = AttentionInputCache(dtype)
        self.pending = AttentionInputCache(dtype)

    # ----------------------------------------------------------------------------------------------- run control
    def start_run(self, schedule: torch.Tensor) -> None:
        """Start a run over the full sigma schedule (T+1 descending values); the active steps follow from it."""
        self.end_run()
        self.schedule = schedule.detach().float().cpu()
        self.active_steps = period_steps(self.start, self.end, len(self.schedule) - 1)

    def commit_anchor(self) -> None:
        """After the anchor pass: the anchor is also the first "previous key frame" (tensors shared, not copied)."""
        self.previous = self.anchor.shallow_copy()

    def commit_previous(self) -> None:
        """The key frame just rendered becomes the "previous key frame" of the next one."""
        self.previous, self.pending = self.pending, AttentionInputCache(self.dtype)

    def end_run(self) -> None:
        """Back to plain attention; free every cache."""
        self.mode = Mode.OFF
        self.schedule = None
        self.active_steps = frozenset()
        self._last_sigma = None
        self.misses = 0
        for cache in (self.anchor, self.previous, self.pending):
            cache.clear()

    @property
    def running(self) -> bool:
        return self.schedule is not None

    def nbytes(self) -> int:
        """Bytes held by the caches (tensors shared between the anchor and "previous" caches counted once)."""
        seen = {}
        for cache in (self.anchor, self.previous, self.pending):
            for tensor in cache.tensors():
                seen[(tensor.data_ptr(), tensor.device)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def cached_entries(self) -> int:
        return len(self.anchor) + len(self.previous) + len(self.pending)

    # --------------------------------------------------------------------------------------------- the attention
    def step_of(self, sigma) -> int:
        """Step of the full schedule for the sigma of the current model call (memoised per sigma tensor: every
        layer of one call gets the same tensor, so the host-to-device sync happens once per call)."""
        if sigma is not self._last_sigma:
            self._last_sigma, self._last_step = sigma, step_at_sigma(self.schedule, sigma)
        return self._last_step

    def kv_inputs(self, sigma, layer: LayerKey, branches: Sequence[int], context: torch.Tensor,
                  value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The K and V inputs of one self-attention call. `context`/`value` hold len(branches) chunks of frames
        along the batch (cond 0 / uncond 1 per chunk, in the host's order); returned unchanged when inactive."""
        if self.mode is Mode.OFF or not self.running or layer not in self.layers:
            return context, value
        step = self.step_of(sigma)
        if step not in self.active_steps:
            return context, value
        own_values = value is not context
        contexts = context.chunk(len(branches))
        values = value.chunk(len(branches)) if own_values else (None,) * len(branches)

        if self.mode is Mode.ANCHOR:
            for branch, chunk_context, chunk_value in zip(branches, contexts, values):
                self.anchor.put((step, layer, branch), chunk_context, chunk_value)
            return context, value

        new_contexts, new_values = [], []
        for branch, chunk_context, chunk_value in zip(branches, contexts, values):
            key = (step, layer, branch)
            anchor, previous = self.anchor.get(key), self.previous.get(key)
            if anchor is None or previous is None:
                # Only an adaptive sampler can visit a noise level the anchor never did: attend plainly there.
                self.misses += 1
                return context, value
            self.pending.put(key, chunk_context, chunk_value)
            new_contexts.append(cross_frame_inputs(chunk_context, anchor[0], previous[0]))
            new_values.append(cross_frame_inputs(chunk_context if chunk_value is None else chunk_value,
                                                 _values(anchor), _values(previous)))
        new_context = torch.cat(new_contexts)
        separate_values = own_values or any(entry[1] is not None for entry in (anchor, previous))
        return new_context, (torch.cat(new_values) if separate_values else new_context)


def _values(entry: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
    return entry[0] if entry[1] is None else entry[1]
