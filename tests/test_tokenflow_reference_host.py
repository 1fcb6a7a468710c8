"""TokenFlow's fast path against the method computed the straightforward way (reference §5), through the real host
on a tiny random-weight SD1.5 model.

The fast path (rerender.tokenflow.TokenFlowAttention) leaves propagated frames no tokens to project, gathers the key
frames' outputs after the output projection, runs the extended attention of all key frames in one call and finds
both key frames' NN fields in one product per frame. The reference below is written from the description alone:
every frame's Q/K/V projected by the host, attention written out per head, each key frame's extended attention as
its own call over all key frames' K/V, each key frame's NN field from its own cosine similarities, and the
propagated output gathered before the output projection (which the host then applies, as in a plain layer). Both
run inside the same engine (key frame draws, chunks, blend weights, CFG, the sampler), so only the attention
patches differ; the stores and the res block injection, which the fast path left as they were, are inherited."""
import torch

from test_tokenflow_host import clip_latents, inverted, tokenflow
from tiny_models import conditioning, tiny_sd15, with_unit_norm_gains

# 4 steps at denoise 1: Q/K injection in steps 0-1, res block injection in 0-2, step 3 without injection; 5 frames
# in chunks of 2: the first chunk propagates from one key frame, the second and the last (one frame) blend two.
SCHEDULE = dict(steps=4, denoise=1.0)


def softmax_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, [B,T,C] tensors."""
    batch, tokens, channels = q.shape

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, channels // heads).transpose(1, 2)
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (channels // heads) ** 0.5, dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, tokens, channels)


def nearest_neighbour_field(frames, key_frame):
    """For each token of frames [F,T,C], the index of the most cosine-similar token of key_frame [Tk,C]."""
    similarity = torch.nn.functional.cosine_similarity(frames[:, :, None].float(), key_frame[None, None].float(),
                                                       dim=-1)
    return similarity.argmax(dim=-1)


def straightforward_tokenflow(controller_class):
    class StraightforwardTokenFlow(controller_class):
        """key_store holds the attention outputs before the output projection; fields[layer] one field per key."""

        def attention_inputs(self, n, context_attn1, value_attn1, extra_options):
            layer = self._layer(extra_options)
            if layer is not None and self.phase in ("source_key", "source_prop"):
                self.normed[layer] = n
            return n, context_attn1, value_attn1

        def attention_output(self, n, extra_options):
            return n

        def attention(self, q, k, v, extra_options):
            layer, heads = self._layer(extra_options), extra_options["n_heads"]
            branches = extra_options["cond_or_uncond"]
            if self.phase == "source_key":
                if self.inject_attention and layer in self.pnp_attention_layers:
                    self.source_qk[layer] = (q, k)
                out = softmax_attention(q, k, v, heads)
                if self.store_key_outputs:
                    self.key_store[(layer, "normed")] = self.normed.pop(layer)
                    self.key_store[(layer, "source")] = out
                return out
            if self.phase == "edit_key":
                outs = []
                for branch, q_b, k_b, v_b in zip(branches, q.chunk(len(branches)), k.chunk(len(branches)),
                                                 v.chunk(len(branches))):
                    if self.inject_attention and layer in self.source_qk:
                        q_b, k_b = self.source_qk[layer]
                    if self.extended:
                        all_keys, all_values = k_b.reshape(1, -1, k_b.shape[-1]), v_b.reshape(1, -1, v_b.shape[-1])
                        out = torch.cat([softmax_attention(q_b[frame:frame + 1], all_keys, all_values, heads)
                                         for frame in range(q_b.shape[0])])
                    else:
                        out = softmax_attention(q_b, k_b, v_b, heads)
                    if self.store_key_outputs:
                        self.key_store[(layer, branch)] = out
                    outs.append(out)
                return torch.cat(outs)
            if self.phase == "source_prop":
                frames, key_normed = self.normed.pop(layer), self.key_store[(layer, "normed")]
                self.fields[layer] = [nearest_neighbour_field(frames, key_normed[position])
                                      for position in self.chunk_keys]
                return self.propagated(layer, "source")
            if self.phase == "edit_prop":
                return torch.cat([self.propagated(layer, branch) for branch in branches])
            return softmax_attention(q, k, v, heads)

        def propagated(self, layer, branch):
            """Own key frame's output along its field, blended w / 1-w with the previous chunk's along its own."""
            stored = self.key_store[(layer, branch)]
            gathered = [stored[position][field] for position, field in zip(self.chunk_keys, self.fields[layer])]
            if len(gathered) == 1:
                return gathered[0]
            w = self.chunk_weights.view(-1, 1, 1)
            return w * gathered[0] + (1 - w) * gathered[1]

        def _layer(self, extra_options):
            block = extra_options.get("block")
            layer = None if block is None else (block[0], block[1], extra_options.get("block_index", 0))
            return layer if layer in self.layers else None

    return StraightforwardTokenFlow


def test_fast_path_equals_the_straightforward_computation(host, monkeypatch):
    engine = host.pack_module("engine.tokenflow")
    model = with_unit_norm_gains(tiny_sd15(0))
    inversion = inverted(host, model, clip_latents(), conditioning(5), **SCHEDULE)

    def sample(**options):
        return tokenflow(host, model, inversion, conditioning(0), conditioning(1), **SCHEDULE, **options)

    fast, per_frame = sample(), sample(propagation=False)
    monkeypatch.setattr(engine, "TokenFlowAttention", straightforward_tokenflow(engine.TokenFlowAttention))
    reference = sample()
    # float32 throughout; the two differ only in summation order (hand-written softmax against the host's attention,
    # one joint call against per-frame calls, gathering after the affine output projection against before it, whose
    # blend weights sum to 1). Measured: 2.0e-4 of a 55 latent maximum (3.6e-6, ~30 float32 ulps: 4 steps at cfg 4
    # on a random model amplify rounding). The bound is 30 times that, for other CPUs' kernels; the latent of a
    # fast path taking a wrong key frame, key output or NN field was measured 38 to 55 away.
    scale = reference.abs().max()
    difference = (fast - reference).abs().max()
    assert difference <= 1e-4 * scale, f"max |fast - reference| {difference:.3g} of max |latent| {scale:.4g}"
    # propagation moves every frame's latent far beyond that bound, so a wrong frame or key frame in the propagated
    # outputs could not hide under it
    effect = (reference - per_frame).abs().amax(dim=(1, 2, 3))
    assert effect.min() > 1e-2 * scale, effect
