"""TokenFlow's per-step pieces on tensors (no host)."""
import math

import torch

from rerender.tokenflow import (blend_weights, chunks, draw_key_frames, extended_attention, injection_steps,
                                nearest_tokens, propagate)


def softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_extended_attention_over_identical_key_frames_equals_plain_self_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 8, generator=gen).expand(3, -1, -1) for _ in range(3))
    assert torch.allclose(extended_attention(q, k, v, softmax_attention), softmax_attention(q, k, v), atol=1e-6)


def test_extended_attention_lets_each_key_frame_see_the_others():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 8, generator=gen) for _ in range(3))
    out = extended_attention(q, k, v, softmax_attention)
    joint = softmax_attention(q[:1], k.reshape(1, 8, 8), v.reshape(1, 8, 8))
    assert torch.allclose(out[:1], joint, atol=1e-6)
    assert not torch.allclose(out, softmax_attention(q, k, v), atol=1e-3)


def test_propagation_over_identical_frames_gives_each_frame_the_key_frames_output():
    gen = torch.Generator().manual_seed(2)
    key_tokens, key_output = torch.randn(10, 6, generator=gen), torch.randn(10, 5, generator=gen)
    frames = key_tokens.expand(4, -1, -1)
    (field,) = nearest_tokens(frames, [key_tokens])
    assert torch.equal(field, torch.arange(10).expand(4, -1))
    assert torch.equal(propagate([key_output], [field], None), key_output.expand(4, -1, -1))
    both = propagate([key_output, key_output], [field, field], torch.tensor([0.6, 0.7, 0.5, 0.9]))
    assert torch.allclose(both, key_output.expand(4, -1, -1), atol=1e-6)


def test_nearest_tokens_follows_a_permutation_and_ignores_scale():
    gen = torch.Generator().manual_seed(3)
    key_tokens = torch.randn(12, 8, generator=gen)
    permutation = torch.randperm(12, generator=gen)
    frame = key_tokens[permutation] * 3.0  # cosine similarity: scale does not matter
    assert torch.equal(nearest_tokens(frame[None], [key_tokens])[0][0], permutation)


def test_nearest_tokens_gives_each_key_frame_its_own_field():
    """Two key frames compared in one product: each field indexes its own key frame (a field taken over the
    joined keys, or from the other key frame, would differ)."""
    gen = torch.Generator().manual_seed(5)
    own, previous = torch.randn(12, 8, generator=gen), torch.randn(7, 8, generator=gen)
    frames = torch.randn(3, 20, 8, generator=gen)
    fields = nearest_tokens(frames, [own, previous])
    for field, keys in zip(fields, (own, previous)):
        similarity = torch.nn.functional.cosine_similarity(frames[:, :, None], keys[None, None], dim=-1)
        assert torch.equal(field, similarity.argmax(dim=-1))


def test_two_key_frames_blend_with_the_given_weights():
    own, previous = torch.ones(3, 2), torch.zeros(3, 2)
    field = torch.zeros(2, 3, dtype=torch.long)
    out = propagate([own, previous], [field, field], torch.tensor([0.25, 0.75]))
    assert torch.allclose(out[0], torch.full((3, 2), 0.25)) and torch.allclose(out[1], torch.full((3, 2), 0.75))


def test_blend_weight_is_the_reference_formula():
    # chunk 1 of size 8 (frames 8..15): centres 12 (own) and 4 (previous); w = sigmoid(d2 / (d1 + d2))
    expected = [1 / (1 + math.exp(-(abs(s - 4) / (abs(s - 12) + abs(s - 4))))) for s in range(8, 16)]
    assert torch.allclose(blend_weights(range(8, 16), 1, 8), torch.tensor(expected))
    assert abs(float(blend_weights([12], 1, 8)[0]) - 1 / (1 + math.exp(-1))) < 1e-6  # at the own centre: 0.731
    assert abs(float(blend_weights([8], 1, 8)[0]) - 1 / (1 + math.exp(-0.5))) < 1e-6  # chunk start: 0.622


def test_key_frames_one_per_chunk_redrawn_and_seeded():
    draws = [draw_key_frames(21, 8, torch.Generator().manual_seed(s)) for s in range(6)]
    for keys in draws:
        assert len(keys) == 3 and [k // 8 for k in keys] == [0, 1, 2] and keys[2] < 21
    assert len({tuple(k) for k in draws}) > 1
    assert draw_key_frames(21, 8, torch.Generator().manual_seed(4)) == draws[4]
    assert chunks(5, 2) == [[0, 1], [2, 3], [4]]


def test_injection_periods_are_the_first_steps():
    assert injection_steps(0.8, 50) == frozenset(range(40))
    assert injection_steps(0.5, 50) == frozenset(range(25))
    assert injection_steps(0.0, 50) == frozenset()
