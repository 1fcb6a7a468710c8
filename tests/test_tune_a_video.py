"""Tune-A-Video's host-free pieces: sparse-causal K/V, temporal attention, the ε/v loss, frame selection, the file."""
import pytest
import torch
import torch.nn.functional as F

from rerender.tune_a_video import (TemporalAttention, TunedParameters, check_frame_sizes, prediction_from_denoised,
                                   prediction_target, select_frames, sparse_causal_inputs, tuning_loss)


def tokens(videos=2, frames=5, count=6, channels=8, seed=0):
    return torch.randn(videos * frames, count, channels, generator=torch.Generator().manual_seed(seed))


def test_sparse_causal_keys_are_first_and_previous_frame():
    x = tokens()
    kv = sparse_causal_inputs(x, videos=2).view(2, 5, 12, 8)
    clip = x.view(2, 5, 6, 8)
    for v in range(2):
        for i in range(5):
            assert torch.equal(kv[v, i, :6], clip[v, 0])
            assert torch.equal(kv[v, i, 6:], clip[v, max(i - 1, 0)])


def test_sparse_causal_attention_of_frame_0_is_self_attention():
    x = tokens(videos=1, frames=3)
    q = x.view(1, 3, 6, 8)
    kv = sparse_causal_inputs(x, videos=1)
    sparse = F.scaled_dot_product_attention(x[:1], kv[:1], kv[:1])
    plain = F.scaled_dot_product_attention(q[0, :1], q[0, :1], q[0, :1])
    assert torch.allclose(sparse, plain, atol=1e-6)
    later = F.scaled_dot_product_attention(x[2:3], kv[2:3], kv[2:3])
    assert not torch.allclose(later, F.scaled_dot_product_attention(x[2:3], x[2:3], x[2:3]), atol=1e-3)


def test_untuned_temporal_attention_is_the_identity_and_tuned_mixes_frames():
    module = TemporalAttention(8, heads=2, dim_head=4)
    x = tokens()
    assert torch.equal(module(x, videos=2), x)
    torch.nn.init.normal_(module.to_out.weight)
    y = module(x, videos=2)
    changed = x.clone()
    changed[4] = torch.randn(6, 8, generator=torch.Generator().manual_seed(9))  # last frame of video 0
    y2 = module(changed, videos=2)
    assert not torch.allclose(y2[0], y[0])             # frame 0 of the same video sees it
    assert torch.equal(y2[5:], y[5:])                  # the other video does not


def test_only_the_projections_of_temporal_attention_are_trainable():
    module = TemporalAttention(8, heads=2, dim_head=4)
    trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert trainable == ["to_k.weight", "to_out.bias", "to_out.weight", "to_q.weight", "to_v.weight"]


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_loss_is_zero_exactly_when_the_model_predicts_the_target(kind):
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    # the true x0 as the model's denoised estimate: the recovered raw output is the training target
    assert tuning_loss(kind, x, x0, x0, noise, sigma).item() < 1e-9
    target = prediction_target(kind, x0, noise, sigma)
    assert torch.allclose(prediction_from_denoised(kind, x, x0, sigma), target, atol=1e-4)
    assert tuning_loss(kind, x, x0 + 0.1, x0, noise, sigma).item() > 1e-4


def test_velocity_matches_the_vp_definition():
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    sigma = torch.tensor([0.5, 3.0]).view(-1, 1, 1, 1)
    alpha, sigma_vp = 1 / (1 + sigma ** 2) ** 0.5, sigma / (1 + sigma ** 2) ** 0.5
    assert torch.allclose(prediction_target("v", x0, noise, sigma.flatten()), alpha * noise - sigma_vp * x0, atol=1e-6)


def test_frame_selection_and_its_errors():
    assert select_frames(50, 24, 2) == list(range(0, 48, 2))
    assert select_frames(10, 24, 2, start=3) == [3, 5, 7, 9]
    with pytest.raises(ValueError, match="at least 2"):
        select_frames(1, 24, 1)
    with pytest.raises(ValueError, match="at least 2"):
        select_frames(10, 24, 20)
    with pytest.raises(ValueError, match="different sizes"):
        check_frame_sizes([(64, 64, 3), (64, 48, 3)])
    check_frame_sizes([(64, 64, 3)] * 3)


def test_tuned_parameters_round_trip():
    temporal = TemporalAttention(8, 2, 4)
    torch.nn.init.normal_(temporal.to_out.weight)
    tuned = TunedParameters({"diffusion_model.a.attn1.to_q.weight": torch.randn(8, 8)}, {"diffusion_model.a": temporal},
                            "abc", {"steps": "3"})
    again = TunedParameters.from_state_dict(*tuned.state_dict())
    assert again.fingerprint == "abc" and again.info == {"steps": "3"}
    assert torch.equal(again.query_deltas["diffusion_model.a.attn1.to_q.weight"],
                       tuned.query_deltas["diffusion_model.a.attn1.to_q.weight"])
    x = tokens(videos=1, frames=4)
    assert torch.equal(again.temporal["diffusion_model.a"](x, 1), temporal(x, 1))
    with pytest.raises(ValueError, match="not a Tune-A-Video"):
        TunedParameters.from_state_dict({}, {"format": "other"})
