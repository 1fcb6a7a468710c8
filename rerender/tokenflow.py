"""TokenFlow's per-step pieces on tensors (reference §5), independent of the host and of the attention backend.

Each denoising step edits one random key frame per chunk of frames jointly (extended attention: every key frame's
queries attend to the keys and values of all key frames), then every frame of a chunk takes the key frames' stored
self-attention outputs along nearest-neighbour correspondences of the source video's own features at that step and
layer, its chunk's key frame blended with the previous chunk's by a sigmoid of the distances to the chunk centres.
"""
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) [B,T,C] -> [B,Tq,C]
HostAttention = Callable[..., torch.Tensor]  # (q, k, v, heads, attn_precision=) as the host's optimized_attention
LayerKey = Tuple[str, int, int]               # (block name, block number, transformer index)


@dataclasses.dataclass(frozen=True)
class TokenFlowSettings:
    seed: int = 1
    steps: int = 50
    cfg: float = 7.5
    sampler_name: str = "ddim"
    scheduler: str = "ddim_uniform"
    denoise: float = 1.0
    pnp_attention: float = 0.5     # first fraction of the schedule with self-attention Q/K injection
    pnp_residual: float = 0.8      # first fraction with the res block injection
    extended_attention: bool = True
    propagation: bool = True
    chunk_size: int = 8


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
    (concatenated along the tokens, in key frame order). One attention call of K·T queries over K·T keys: the same
    rows as K calls over a K-fold copy of the keys and values, without the copy."""
    frames, tokens, _ = q.shape
    joint = attention(q.reshape(1, frames * tokens, -1), k.reshape(1, frames * tokens, -1),
                      v.reshape(1, frames * tokens, -1))
    return joint.reshape(frames, tokens, -1)


def nearest_tokens(frame_tokens: torch.Tensor, key_tokens: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """For every token of every frame [F,T,C], the index of the most cosine-similar token of each key frame [Tk,C]
    (one [F,T] long field per key frame). Each frame is normalised once and compared with all the key frames in
    one product, so memory stays T·ΣTk."""
    keys = torch.cat([torch.nn.functional.normalize(tokens.float(), dim=-1) for tokens in key_tokens]).T
    sizes = [tokens.shape[0] for tokens in key_tokens]
    fields = [[] for _ in key_tokens]
    for frame in frame_tokens:
        similarity = torch.nn.functional.normalize(frame.float(), dim=-1) @ keys
        for field, part in zip(fields, similarity.split(sizes, dim=-1)):
            field.append(part.argmax(dim=-1))
    return [torch.stack(field) for field in fields]


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


def first_step(settings: TokenFlowSettings) -> int:
    """Steps of the full schedule (steps/denoise) before the executed part, as KSampler computes it."""
    if settings.denoise >= 0.9999:
        return 0
    return int(settings.steps / settings.denoise) - settings.steps


PROPAGATION_PHASES = ("source_prop", "edit_prop")


class TokenFlowAttention:
    """What the patches do in each phase of a step, and the per-step stores (freed by `reset`).

    phase: None (plain model), "source_key"/"edit_key" (key frame pass), "source_prop"/"edit_prop" (propagation).
    Stores: key frame tokens/outputs per (layer, branch) with branch "normed"/"source"/0 (cond)/1 (uncond), the
    outputs taken after the attention's output projection; the source's Q/K and res block residual branch of the
    current pass; the NN fields of the current chunk.

    In the propagation phases a layer's own attention is never used, so the input patch hands the host's Q/K/V
    projections zero tokens and the output patch puts the gathered key frame outputs in place of the (empty)
    projected result: the output projection is affine and the blend weights sum to one, so gathering after it is
    the same as projecting the gathered tokens, and the layer's four projections run on the key frames only."""

    def __init__(self, residual_block: Optional[int], pnp_attention_layers: frozenset, layers: Sequence[LayerKey],
                 previous_replace: Dict, default_attention: HostAttention):
        self.residual_block = residual_block
        self.default_attention = default_attention
        self.pnp_attention_layers = pnp_attention_layers
        self.layers = frozenset(layers)
        self.previous_replace = previous_replace
        self.reset()

    def reset(self) -> None:
        self.phase: Optional[str] = None
        self.extended = False
        self.inject_attention = False
        self.inject_residual = False
        self.store_key_outputs = False
        self.key_store: Dict[Tuple[LayerKey, object], torch.Tensor] = {}
        self.source_qk: Dict[LayerKey, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.source_residual: Optional[torch.Tensor] = None
        self.normed: Dict[LayerKey, torch.Tensor] = {}
        self.fields: Dict[LayerKey, List[torch.Tensor]] = {}
        self.chunk_keys: List[int] = []       # positions in the key frame list: own chunk's, previous chunk's
        self.chunk_weights: Optional[torch.Tensor] = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_store.values())

    # attn1_patch: the normed tokens of the source branch (the NN features); no tokens to project when propagating
    def attention_inputs(self, n, context_attn1, value_attn1, extra_options):
        if extra_options.get("block") is None or _layer(extra_options) not in self.layers:
            return n, context_attn1, value_attn1
        if self.phase in ("source_key", "source_prop"):
            self.normed[_layer(extra_options)] = n
        if self.phase in PROPAGATION_PHASES:
            return n[:, :0], context_attn1[:, :0], value_attn1[:, :0]
        return n, context_attn1, value_attn1

    # attn1_replace
    def attention(self, q, k, v, extra_options):
        layer = _layer(extra_options)
        previous = self.previous_replace.get(layer) or self.previous_replace.get(layer[:2])

        def attend(q_, k_, v_):
            if previous is not None:
                return previous(q_, k_, v_, extra_options)
            return self.default_attention(q_, k_, v_, extra_options["n_heads"],
                                          attn_precision=extra_options.get("attn_precision"))

        phase = self.phase
        if phase in PROPAGATION_PHASES:
            return q  # zero tokens; the output patch puts the propagated output in place
        if phase == "source_key":
            if self.inject_attention and layer in self.pnp_attention_layers:
                self.source_qk[layer] = (q, k)
            return attend(q, k, v)
        if phase == "edit_key":
            branches = len(extra_options["cond_or_uncond"])
            injected = self.inject_attention and layer in self.source_qk
            outs = []
            for q_c, k_c, v_c in zip(q.chunk(branches), k.chunk(branches), v.chunk(branches)):
                if injected:
                    q_c, k_c = self.source_qk[layer]
                outs.append(extended_attention(q_c, k_c, v_c, attend) if self.extended else attend(q_c, k_c, v_c))
            return torch.cat(outs)
        return attend(q, k, v)

    # attn1_output_patch (installed first): stores the key frames' projected outputs, or puts the propagated ones
    def attention_output(self, n, extra_options):
        if extra_options.get("block") is None or _layer(extra_options) not in self.layers:
            return n
        layer, phase = _layer(extra_options), self.phase
        if phase == "source_key" and self.store_key_outputs:
            self.key_store[(layer, "normed")] = self.normed.pop(layer)
            self.key_store[(layer, "source")] = n
        elif phase == "edit_key" and self.store_key_outputs:
            branches = extra_options["cond_or_uncond"]
            for branch, out in zip(branches, n.chunk(len(branches))):
                self.key_store[(layer, branch)] = out
        elif phase == "source_prop":
            key_normed = self.key_store[(layer, "normed")]
            self.fields[layer] = nearest_tokens(self.normed.pop(layer),
                                                [key_normed[position] for position in self.chunk_keys])
            return self._propagated(layer, "source")
        elif phase == "edit_prop":
            return torch.cat([self._propagated(layer, branch) for branch in extra_options["cond_or_uncond"]])
        return n

    def _propagated(self, layer, branch):
        stored = self.key_store[(layer, branch)]
        return propagate([stored[position] for position in self.chunk_keys], self.fields[layer],
                         self.chunk_weights)

    # forward_timestep_embed_patch on the injected ResBlock (the engine passes the host's block as two thunks)
    def res_block(self, block, forward: Callable[[], torch.Tensor], skip: Callable[[], torch.Tensor]) -> torch.Tensor:
        """PnP conv injection as the reference's register_conv_injection: the source pass keeps its residual
        branch (block output minus its skip path); the edit branches add the source's branch to their OWN skip
        path, so only the branch after the second convolution is replaced. `forward()` is the block's output,
        `skip()` its skip path on the same input."""
        if not self.inject_residual or block != ("output", self.residual_block):
            return forward()
        if self.phase in ("source_key", "source_prop"):
            out = forward()
            self.source_residual = out - skip()
            return out
        if self.phase in ("edit_key", "edit_prop") and self.source_residual is not None:
            shortcut = skip()
            branch = self.source_residual.repeat(shortcut.shape[0] // self.source_residual.shape[0], 1, 1, 1)
            return shortcut + branch.to(shortcut)
        return forward()


def _layer(extra_options) -> LayerKey:
    block = extra_options["block"]
    return block[0], block[1], extra_options.get("block_index", 0)
