"""Style-aware cross-frame attention (reference §1.4), independent of the host and of the attention backend.

During key frame rendering, the decoder's self-attention takes its keys and values from the anchor frame and the
previous key frame (the current frame's own tokens are NOT included, as in the reference): K' = W_K[v_anchor;
v_prev], V' = W_V[v_anchor; v_prev]. What is cached is the input of the K/V projections (the normed hidden states),
as the reference does, so the substitution happens before any projection or attention kernel runs: whatever
attention backend or attention replacement is installed computes the attention on the substituted inputs.

Caches are keyed per model evaluation: (evaluation index in the pass, layer = (block name, block number,
transformer index), branch = cond 0 / uncond 1), and each entry keeps the σ it was made at; a key frame's evaluation
meets the anchor's evaluation with the same index only when their σ agree, else it attends plainly and the miss is
counted (reported by the sampler). cond/uncond batching, a dropped uncond (cfg 1) or a split batch cannot misalign
them (the reference's running counter breaks on all three). Two frames' worth are held: the anchor and the
previous key frame, whose entries a key frame overwrites as it reads them.
"""
import enum
from typing import Collection, Dict, Optional, Sequence, Tuple

import torch

from ..evaluation_plan import Evaluation
from .keyframe_constraints import period_steps

LayerKey = Tuple[str, int, int]
CacheKey = Tuple[int, LayerKey, int]
Entry = Tuple[torch.Tensor, Optional[torch.Tensor], float]


class Mode(enum.Enum):
    OFF = "off"              # plain self-attention (outside key frame rendering)
    ANCHOR = "anchor"        # plain self-attention; cache the anchor's K/V inputs
    KEY_FRAME = "key frame"  # K/V from anchor + previous key frame; cache this frame's own as the next "previous"


class AttentionInputCache:
    """K/V inputs of self-attention per (evaluation, layer, branch) with the evaluation's σ, at a fixed dtype."""

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype
        self._entries: Dict[CacheKey, Entry] = {}

    def put(self, key: CacheKey, context: torch.Tensor, value: Optional[torch.Tensor], sigma: float) -> None:
        """`value` None means the values are projected from `context` too (plain self-attention)."""
        dtype = self.dtype or context.dtype
        self._entries[key] = (context.detach().to(dtype=dtype, copy=True),
                              None if value is None else value.detach().to(dtype=dtype, copy=True), sigma)

    def get(self, key: CacheKey, sigma: float) -> Optional[Entry]:
        """The entry for `key` if it was made at `sigma` (never a neighbouring noise level)."""
        entry = self._entries.get(key)
        if entry is None or abs(entry[2] - sigma) > 1e-4 * max(abs(sigma), 1e-8):
            return None
        return entry

    def tensors(self):
        for context, value, _ in self._entries.values():
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


def cross_frame_inputs(current: torch.Tensor, anchor: torch.Tensor, previous: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """K/V inputs [B, Na+Np, C] for a chunk of B frames: anchor tokens then previous-key-frame tokens (the
    reference's order), each cached with batch 1 (broadcast) or B; written into `out` when given (a slice of the
    whole call's tensor, so the tokens are copied once)."""
    batch = current.shape[0]
    for name, cached in (("anchor", anchor), ("previous key frame", previous)):
        if cached.shape[0] not in (1, batch) or cached.shape[-1] != current.shape[-1]:
            raise RuntimeError(f"cross-frame attention: the cached {name} tokens {tuple(cached.shape)} do not fit "
                               f"the current frame's {tuple(current.shape)}; another patch changes the token "
                               f"layout between frames, or frames differ in size.")
    tokens = anchor.shape[1] + previous.shape[1]
    if out is None:
        out = current.new_empty((batch, tokens, current.shape[-1]))
    elif out.shape[1] != tokens:
        raise RuntimeError(f"cross-frame attention: the cached tokens of the cond and uncond branches differ in "
                           f"number ({out.shape[1]} and {tokens}); another patch changes the token layout.")
    out[:, :anchor.shape[1]].copy_(anchor.expand(batch, -1, -1))
    out[:, anchor.shape[1]:].copy_(previous.expand(batch, -1, -1))
    return out


def _cross_frame_call_inputs(chunks: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                             previous: Sequence[torch.Tensor]) -> torch.Tensor:
    """`cross_frame_inputs` of every branch's chunk, in the call's batch order, in one tensor."""
    tokens = anchors[0].shape[1] + previous[0].shape[1]
    out = chunks[0].new_empty((sum(len(chunk) for chunk in chunks), tokens, chunks[0].shape[-1]))
    row = 0
    for chunk, anchor, previous_tokens in zip(chunks, anchors, previous):
        cross_frame_inputs(chunk, anchor, previous_tokens, out=out[row:row + len(chunk)])
        row += len(chunk)
    return out


class CrossFrameAttention:
    """What the decoder self-attention does during a key frame rendering run, and the caches it needs.

    The key frame sampler drives it: `start_run(schedule)` once per run, `new_anchor()` before each shot's anchor,
    `mode` per pass, `evaluation` before each model evaluation (None: inert), `commit_anchor` after the anchor, and
    `end_run()` in a `finally` (it frees every cache). The anchor pass records; a key frame pass substitutes
    [anchor; previous] and, where `records_previous(evaluation)`, replaces the previous key frame's entry by its own
    (the entry was just read and is not needed again). Outside a run it is inert."""

    def __init__(self, layers: Collection[LayerKey], start: float, end: float, dtype: Optional[torch.dtype] = None):
        if not layers:
            raise ValueError("cross-frame attention needs at least one decoder self-attention layer.")
        self.layers = frozenset(layers)
        self.start, self.end = start, end
        self.dtype = dtype
        self.mode = Mode.OFF
        self.schedule: Optional[torch.Tensor] = None
        self.active_steps = frozenset()
        self.evaluation: Optional[Evaluation] = None
        self.records_previous = lambda evaluation: True
        self.misses = 0
        self.anchor = AttentionInputCache(dtype)
        self.previous = AttentionInputCache(dtype)

    # ----------------------------------------------------------------------------------------------- run control
    def start_run(self, schedule: torch.Tensor) -> None:
        """Start a run over the full sigma schedule (T+1 descending values); the active steps follow from it."""
        self.end_run()
        self.schedule = schedule.detach().float().cpu()
        self.active_steps = period_steps(self.start, self.end, len(self.schedule) - 1)

    def commit_anchor(self) -> None:
        """After the anchor pass: the anchor is also the first "previous key frame" (tensors shared, not copied)."""
        self.previous = self.anchor.shallow_copy()

    def new_anchor(self) -> None:
        """A new shot: forget the anchor and the previous key frame, so that the next anchor pass starts the
        shot's caches from nothing (no entry of another shot can be read)."""
        for cache in (self.anchor, self.previous):
            cache.clear()

    def end_run(self) -> None:
        """Back to plain attention; free every cache."""
        self.mode = Mode.OFF
        self.schedule = None
        self.active_steps = frozenset()
        self.evaluation = None
        self.misses = 0
        for cache in (self.anchor, self.previous):
            cache.clear()

    @property
    def running(self) -> bool:
        return self.schedule is not None

    def nbytes(self) -> int:
        """Bytes held by the caches (tensors shared between the anchor and "previous" caches counted once)."""
        seen = {}
        for cache in (self.anchor, self.previous):
            for tensor in cache.tensors():
                seen[(tensor.data_ptr(), tensor.device)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def cached_entries(self) -> int:
        return len(self.anchor) + len(self.previous)

    # --------------------------------------------------------------------------------------------- the attention
    def kv_inputs(self, layer: LayerKey, branches: Sequence[int], context: torch.Tensor,
                  value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The K and V inputs of one self-attention call of the current `evaluation`. `context`/`value` hold
        len(branches) chunks of frames along the batch (cond 0 / uncond 1 per chunk, in the host's order);
        returned unchanged when inactive."""
        evaluation = self.evaluation
        if self.mode is Mode.OFF or not self.running or evaluation is None or layer not in self.layers:
            return context, value
        if evaluation.step not in self.active_steps:
            return context, value
        index, sigma = evaluation.key.index, evaluation.key.sigma
        own_values = value is not context
        contexts = context.chunk(len(branches))
        values = value.chunk(len(branches)) if own_values else (None,) * len(branches)

        if self.mode is Mode.ANCHOR:
            for branch, chunk_context, chunk_value in zip(branches, contexts, values):
                self.anchor.put((index, layer, branch), chunk_context, chunk_value, sigma)
            return context, value

        lookups = [(self.anchor.get((index, layer, b), sigma), self.previous.get((index, layer, b), sigma))
                   for b in branches]
        if any(anchor is None or previous is None for anchor, previous in lookups):
            self.misses += 1  # no anchor evaluation at this σ: attend plainly here, and the sampler reports it
            return context, value
        if self.records_previous(evaluation):  # the entries just looked up are not read again
            for branch, chunk_context, chunk_value in zip(branches, contexts, values):
                self.previous.put((index, layer, branch), chunk_context, chunk_value, sigma)
        new_context = _cross_frame_call_inputs(contexts, [anchor[0] for anchor, _ in lookups],
                                               [previous[0] for _, previous in lookups])
        if not own_values and all(entry[1] is None for pair in lookups for entry in pair):
            return new_context, new_context  # values projected from the same inputs: built once
        value_chunks = values if own_values else contexts
        return new_context, _cross_frame_call_inputs(value_chunks, [_values(anchor) for anchor, _ in lookups],
                                                     [_values(previous) for _, previous in lookups])


def _values(entry: Entry) -> torch.Tensor:
    return entry[0] if entry[1] is None else entry[1]
