"""Pure tests of the FRESCO library (batching, flow geometry, guided attention, feature optimisation, background
smoothing); no host needed. Expected values come from the rules of ALGORITHMS.md §4 or from independent naive
implementations written here."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from rerender.fresco import attention as fa
from rerender.fresco import optimize as fo
from rerender.flow import VideoFlow
from rerender.fresco.geometry import (AnchorLatents, AnchorSlot, CyclicFlows, background_from_foreground, cyclic_flows,
                             plan_batches, smooth_background, trajectories, unique_region_masks)


def _keys(n):
    return [3 * i for i in range(n)]  # clip indices distinct from the key ordinals


def _zero_flows(n, h, w, occlusion=None):
    occlusion = torch.zeros(n, 1, h, w) if occlusion is None else occlusion
    return CyclicFlows(torch.zeros(n, 2, h, w), occlusion, torch.zeros(n, 2, h, w), torch.zeros(n, 1, h, w))


# ----------------------------------------------------------------------------------------------------- batching

def test_batches_share_the_first_key_and_the_previous_batch_last_key():
    k = _keys(20)
    batches = plan_batches(k, 8)
    assert [b.frames for b in batches] == [tuple(k[:8]), (k[0], k[7], *k[8:14]), (k[0], k[13], *k[14:20])]
    assert batches[0].anchors == ()
    assert batches[1].anchors == (AnchorSlot(0, 0, 0), AnchorSlot(1, 0, 7))
    assert batches[2].anchors == (AnchorSlot(0, 1, 0), AnchorSlot(1, 1, 7))
    assert [b.record for b in batches] == [(0, 7), (0, 7), ()]
    assert [b.new_slots for b in batches] == [tuple(range(8)), tuple(range(2, 8)), tuple(range(2, 8))]


def test_short_last_batch_takes_keys_from_the_previous_one():
    k = _keys(10)  # 8 + 2 new keys: the last batch would have 2 < 3 new keys
    batches = plan_batches(k, 8)
    assert [b.frames for b in batches] == [tuple(k[:7]), (k[0], k[6], k[7], k[8], k[9])]
    assert batches[1].anchors == (AnchorSlot(0, 0, 0), AnchorSlot(1, 0, 6))
    assert batches[0].record == (0, 6)


def test_degenerate_small_batches_follow_the_reference_rule():
    k = _keys(5)  # batch 3: [k0 k1 k2] [k3] [k4] -> last takes k3, the emptied batch is dropped
    assert [b.frames for b in plan_batches(k, 3)] == [tuple(k[:3]), (k[0], k[2], k[3], k[4])]
    k = _keys(4)  # batch 3: [k0 k1 k2] [k3] -> last takes k1, k2; batch 1 keeps only k0, both anchors are k0
    batches = plan_batches(k, 3)
    assert [b.frames for b in batches] == [(k[0],), (k[0], k[0], k[1], k[2], k[3])]
    assert batches[1].anchors == (AnchorSlot(0, 0, 0), AnchorSlot(1, 0, 0)) and batches[0].record == (0,)


def test_everything_fits_in_one_batch():
    batches = plan_batches(_keys(5), 8)
    assert len(batches) == 1 and batches[0].frames == tuple(_keys(5)) and batches[0].record == ()


@pytest.mark.parametrize("n, batch_size", list(itertools.product(range(2, 30), range(3, 10))))
def test_every_key_is_rendered_once_and_anchors_point_at_recorded_slots(n, batch_size):
    k = _keys(n)
    batches = plan_batches(k, batch_size)
    rendered = [b.frames[s] for b in batches for s in b.new_slots]
    assert rendered == k
    for index, batch in enumerate(batches[1:], start=1):
        for anchor in batch.anchors:
            source = batches[anchor.source_batch]
            assert anchor.source_batch == index - 1 and anchor.source_slot in source.record
            assert batch.frames[anchor.slot] == source.frames[anchor.source_slot]
        assert batch.frames[0] == k[0] and batch.frames[1] == batches[index - 1].frames[-1]
    if batch_size >= 5:  # with B - 2 >= 3 new keys per batch the short-batch rule never overfills a batch
        assert all(len(b.frames) <= batch_size for b in batches)
        assert len(batches) == 1 or len(batches[-1].new_slots) >= 3


def test_anchor_slots_hold_the_previous_batch_recorded_latents_at_every_step():
    batches = plan_batches(_keys(14), 6)  # (k0..k5), (k0 k5 k6..k9), (k0 k9 k10..k13)
    store = AnchorLatents()
    seen = {}  # (batch, step) -> the latents handed to the model
    for b, batch in enumerate(batches):
        for step in range(4):
            x = torch.randn(len(batch.frames), 4, 2, 2)  # what the sampler holds before the model call
            seen[b, step] = store.apply(batch, step, x)
            assert torch.equal(seen[b, step][list(batch.new_slots)], x[list(batch.new_slots)])
        store.finish_batch()
    for b in (1, 2):
        for step in range(4):
            assert torch.equal(seen[b, step][0], seen[0, step][0])  # the global first key, from batch 1
            assert torch.equal(seen[b, step][1], seen[b - 1, step][-1])  # the previous batch's last key
    assert store.misses == 0 and store.nbytes() == 0  # the last batch records nothing


def test_anchor_store_leaves_unvisited_noise_levels_free_and_counts_them():
    batches = plan_batches(_keys(8), 4)
    store = AnchorLatents()
    store.apply(batches[0], 0, torch.zeros(4, 1))
    store.finish_batch()
    x = torch.ones(len(batches[1].frames), 1)
    assert torch.equal(store.apply(batches[1], 3, x), x) and store.misses == 1


@pytest.mark.parametrize("keys, batch_size, name", [(_keys(10), 2, "batch_size"), ([0], 8, "keyframes"),
                                                     ([0, 5, 5], 8, "keyframes"), ([4, 2], 8, "keyframes")])
def test_bad_batching_input_names_the_input(keys, batch_size, name):
    with pytest.raises(ValueError, match=name):
        plan_batches(keys, batch_size)


# ------------------------------------------------------------------------------------------ flow geometry

def test_cyclic_flows_from_video_flow_include_the_wrap_pair_and_the_photometric_test():
    frames = torch.full((6, 16, 16, 3), 0.5)
    frames[4, 4:8, 4:8] = 1.0  # clip frame 4 differs in a square; zero flow everywhere
    def still(a, b):
        return torch.zeros(a.shape[0], 2, *a.shape[-2:])

    video_flow = VideoFlow(frames, still)
    batch = [0, 2, 4]
    images = frames[batch].movedim(-1, 1)
    flows = cyclic_flows(video_flow.pair, batch, images)
    assert flows.backward.shape == (3, 2, 16, 16) and flows.frames == 3
    assert {(0, 2), (2, 4), (4, 0)} <= video_flow.computed_pairs  # the wrap pair 4 -> 0 was estimated
    square = torch.zeros(16, 16)
    square[4:8, 4:8] = 1
    # the square differs between frames 2 and 4 (pair 1) and between 4 and 0 (the wrap pair 2), in both directions
    expected = torch.stack([torch.zeros(16, 16), square, square])
    assert torch.equal(flows.backward_occlusion[:, 0], expected)
    assert torch.equal(flows.forward_occlusion[:, 0], expected)
    plain = cyclic_flows(video_flow.pair, batch)
    assert plain.backward_occlusion.sum() == 0


def test_unique_regions_are_frame_zero_and_what_each_frame_newly_shows():
    occlusion = torch.zeros(3, 1, 16, 16)
    occlusion[0, :, :8, :8] = 1  # frame 1's top-left quarter is not visible in frame 0
    occlusion[2] = 1  # the wrap pair must not count
    masks = unique_region_masks(_zero_flows(3, 16, 16, occlusion), [(4, 4), (2, 2)])
    assert masks[(4, 4)].shape == (3, 16) and masks[(4, 4)].dtype == torch.bool
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert masks[(4, 4)][0].all() and torch.equal(masks[(4, 4)][1], expected.flatten())
    assert not masks[(4, 4)][2].any()
    assert masks[(2, 2)][1].tolist() == [True, False, False, False]


def _random_flows(n, h, w, seed, magnitude=3.0, occluded=0.2):
    g = torch.Generator().manual_seed(seed)
    flow = F.interpolate(torch.randn(n, 2, 4, 4, generator=g) * magnitude, size=(h, w), mode="bilinear")
    occlusion = (torch.rand(n, 1, h, w, generator=g) < occluded).float()
    return CyclicFlows(flow, occlusion, -flow, occlusion.clone())


@pytest.mark.parametrize("seed", range(4))
def test_trajectory_maps_are_permutations(seed):
    flows = _random_flows(5, 32, 24, seed)
    images = torch.rand(5, 3, 32, 24, generator=torch.Generator().manual_seed(seed))
    for size in ((8, 6), (16, 12)):
        traj = trajectories(flows, images, size)
        tokens = size[0] * size[1]
        assert traj.forward.shape == (5, tokens) and traj.allowed.shape == (tokens, 5, 5)
        identity = torch.arange(tokens)
        for k in range(5):
            assert torch.equal(traj.forward[k].sort().values, identity)
            assert torch.equal(traj.backward[k][traj.forward[k]], identity)
        assert torch.equal(traj.forward[0], identity)
        diagonal = traj.allowed[:, torch.arange(5), torch.arange(5)]
        assert diagonal.all() and torch.equal(traj.allowed, traj.allowed.transpose(1, 2))


def test_trajectories_follow_the_flow():
    flow = torch.zeros(3, 2, 8, 8)
    flow[:, 0] = -2.0  # content moves right by 2 px each frame: frame k+1's pixel x comes from x-2 in frame k
    traj = trajectories(CyclicFlows(flow, torch.zeros(3, 1, 8, 8), -flow, torch.zeros(3, 1, 8, 8)),
                        torch.rand(3, 3, 8, 8), (8, 8))
    grid = torch.arange(64).view(8, 8)
    for track in grid[:, :4].flatten():  # tracks that stay inside for two frames
        assert traj.forward[1, track] == track + 2 and traj.forward[2, track] == track + 4
        assert traj.allowed[track].all()
    for track in grid[:, 6:].flatten():  # leave the frame at once: filler tokens, broken from frame 1 on
        assert not traj.allowed[track, 0, 1] and not traj.allowed[track, 0, 2]


def test_trajectory_collisions_go_to_the_closest_colour():
    # 1x4 grid: frame-1 tokens 0 and 1 both come from frame-0 token 0; token 1 has token 0's colour
    flow = torch.zeros(2, 2, 1, 4)
    flow[0, 0, 0, 1] = -1.0
    images = torch.zeros(2, 3, 1, 4)
    images[0, 0, 0, 0] = 1.0  # frame 0 token 0 red
    images[1, 2, 0, 0] = 1.0  # frame 1 token 0 blue
    images[1, 0, 0, 1] = 1.0  # frame 1 token 1 red
    traj = trajectories(CyclicFlows(flow, torch.zeros(2, 1, 1, 4), -flow, torch.zeros(2, 1, 1, 4)), images, (1, 4))
    assert traj.forward[1].tolist() == [1, 0, 2, 3]  # track 0 -> red token 1; frame-0 slot 1 unclaimed -> token 0
    assert traj.allowed[0].all() and not traj.allowed[1, 0, 1]


# --------------------------------------------------------------------------------------------- attention

def _naive_attention(q, k, v, heads, scale=1.0, allowed=None):
    """softmax(scale q k^T / sqrt(d)) v per head, written out; `allowed` [tq, tk] bool."""
    d = q.shape[-1] // heads
    qh, kh, vh = (x.reshape(x.shape[0], heads, d) for x in (q, k, v))
    logits = torch.einsum("qhd,khd->hqk", qh, kh) * scale / d ** 0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), vh).reshape(q.shape[0], -1)


def _qkv(chunks, frames, tokens, channels, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(chunks * frames, tokens, channels, generator=g) for _ in range(3)]


def test_efficient_attention_with_all_tokens_unique_attends_to_every_frame():
    q, k, v = _qkv(2, 3, 10, 8, 0)
    index = fa.unique_token_index(torch.ones(3, 10, dtype=torch.bool))
    out = fa.efficient_cross_frame_attention(q, k, v, index, frames=3, heads=2)
    for chunk, frame in itertools.product(range(2), range(3)):
        rows = slice(chunk * 3, chunk * 3 + 3)
        expected = _naive_attention(q[chunk * 3 + frame], k[rows].reshape(-1, 8), v[rows].reshape(-1, 8), 2)
        torch.testing.assert_close(out[chunk * 3 + frame], expected, rtol=1e-5, atol=1e-5)


def test_efficient_attention_with_only_frame_zero_marked_attends_to_frame_zero():
    q, k, v = _qkv(2, 4, 12, 8, 1)
    unique = torch.zeros(4, 12, dtype=torch.bool)
    unique[0] = True
    out = fa.efficient_cross_frame_attention(q, k, v, fa.unique_token_index(unique), frames=4, heads=4)
    for chunk, frame in itertools.product(range(2), range(4)):
        first = chunk * 4
        expected = _naive_attention(q[first + frame], k[first], v[first], 4)
        torch.testing.assert_close(out[first + frame], expected, rtol=1e-5, atol=1e-5)


def test_efficient_attention_gives_identical_frames_identical_outputs():
    q, k, v = (x[:1].repeat(4, 1, 1) for x in _qkv(1, 1, 16, 8, 2))
    unique = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    unique[0] = True
    out = fa.efficient_cross_frame_attention(q, k, v, fa.unique_token_index(unique), frames=4, heads=2)
    for frame in range(1, 4):
        torch.testing.assert_close(out[frame], out[0], rtol=0, atol=1e-6)
    # with every token marked each key appears once per frame, which leaves softmax attention unchanged
    every = fa.efficient_cross_frame_attention(q, k, v, torch.arange(64), frames=4, heads=2)
    torch.testing.assert_close(every[0], _naive_attention(q[0], k[0], v[0], 2), rtol=1e-5, atol=1e-5)


def test_spatial_guided_query_matches_a_direct_implementation():
    q, ref_q, ref_k = _qkv(2, 2, 9, 12, 3)
    out = fa.spatial_guided_query(q, ref_q, ref_k, heads=3)
    d = 4
    for b in range(4):
        for h in range(3):
            cols = slice(h * d, (h + 1) * d)
            weights = torch.softmax(ref_q[b, :, cols] @ ref_k[b, :, cols].T * 0.2 / d ** 0.5, dim=-1)
            torch.testing.assert_close(out[b, :, cols], weights @ q[b, :, cols], rtol=1e-5, atol=1e-5)
    broadcast = fa.spatial_guided_query(q, ref_q[:2], ref_k[:2], heads=3)  # one reference for both chunks
    torch.testing.assert_close(broadcast[2:], fa.spatial_guided_query(q[2:], ref_q[:2], ref_k[:2], heads=3))


def _naive_temporal(q, k, hidden, traj, heads, allowed=True):
    frames, tokens = traj.forward.shape
    out = torch.empty_like(hidden)
    for chunk in range(q.shape[0] // frames):
        rows = torch.arange(frames) + chunk * frames
        for track in range(tokens):
            cols = traj.forward[:, track]
            mask = traj.allowed[track] if allowed else None
            out[rows, cols] = _naive_attention(q[rows, cols], k[rows, cols], hidden[rows, cols], heads, 0.2, mask)
    return out


def test_temporal_attention_matches_a_direct_implementation_along_tracks():
    flows = _random_flows(4, 8, 8, seed=5, magnitude=2.0, occluded=0.3)
    traj = trajectories(flows, torch.rand(4, 3, 8, 8), (4, 4))
    assert not traj.allowed.all()  # some breaks, so the mask matters
    q, k, hidden = _qkv(2, 4, 16, 8, 4)
    out = fa.temporal_guided_attention(q, k, hidden, traj, heads=2)
    torch.testing.assert_close(out, _naive_temporal(q, k, hidden, traj, 2), rtol=1e-5, atol=1e-5)


def test_temporal_attention_leaves_identical_still_frames_unchanged():
    traj = trajectories(_zero_flows(4, 8, 8), torch.full((4, 3, 8, 8), 0.3), (8, 8))
    q, k, hidden = (x[:1].repeat(4, 1, 1) for x in _qkv(1, 1, 64, 8, 6))
    out = fa.temporal_guided_attention(q, k, hidden, traj, heads=2)
    torch.testing.assert_close(out, hidden, rtol=1e-5, atol=1e-6)


def test_the_break_mask_stops_attention_across_a_broken_trajectory():
    occlusion = torch.zeros(3, 1, 8, 8)
    occlusion[1] = 1  # pair (1 -> 2) fully occluded: every track breaks between frames 1 and 2
    traj = trajectories(_zero_flows(3, 8, 8, occlusion), torch.full((3, 3, 8, 8), 0.3), (4, 4))
    q, k, hidden = _qkv(1, 3, 16, 8, 7)
    changed = hidden.clone()
    changed[2] = torch.randn(16, 8)
    for use_breaks in (True, False):
        a = fa.temporal_guided_attention(q, k, hidden, traj, heads=2, use_breaks=use_breaks)
        b = fa.temporal_guided_attention(q, k, changed, traj, heads=2, use_breaks=use_breaks)
        if use_breaks:
            torch.testing.assert_close(a[:2], b[:2], rtol=0, atol=0)  # frames 0, 1 do not see frame 2
            torch.testing.assert_close(b[2], _naive_attention(q[2], k[2], changed[2], 2, 0.2,
                                                              torch.eye(16, dtype=torch.bool)), rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(a[:2], b[:2])  # without the mask the change leaks back


def test_fresco_attention_with_everything_off_is_plain_attention_and_composes_in_order():
    q, k, v = _qkv(2, 3, 16, 8, 8)
    torch.testing.assert_close(fa.fresco_attention(q, k, v, heads=2, frames=3), fa.sdpa_attention(q, k, v, 2))
    ref_q, ref_k = _qkv(2, 3, 16, 8, 9)[:2]
    unique = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    unique[0] = True
    index = fa.unique_token_index(unique)
    traj = trajectories(_random_flows(3, 8, 8, 2), torch.rand(3, 3, 8, 8), (4, 4))
    out = fa.fresco_attention(q, k, v, 2, 3, index, ref_q, ref_k, traj)
    guided = fa.spatial_guided_query(q, ref_q, ref_k, 2)
    hidden = fa.efficient_cross_frame_attention(guided, k, v, index, 3, 2)
    torch.testing.assert_close(out, fa.temporal_guided_attention(q, k, hidden, traj, 2))


# ---------------------------------------------------------------------------------------- feature optimisation

def _cosine_gram(f):
    return F.cosine_similarity(f.flatten(2)[:, :, :, None], f.flatten(2)[:, :, None, :], dim=1)


def test_gram_forms_agree_with_a_direct_cosine_similarity_loss():
    g = torch.Generator().manual_seed(0)
    ref, x = torch.randn(4, 6, 5, 5, generator=g), torch.randn(4, 6, 5, 5, generator=g)
    direct = (_cosine_gram(x) - _cosine_gram(ref)).pow(2).mean()
    values, grads = [], []
    for form in ("tokens", "channels"):
        reference = fo.GramReference(ref, form, distance="squared")
        assert reference.form == form
        leaf = x.clone().requires_grad_(True)
        loss = reference.loss(leaf)
        loss.backward()
        values.append(loss.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values[1], direct, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
    # the code's L1 distance (the default) has only the HW x HW form
    l1 = fo.GramReference(ref)
    assert l1.form == "tokens" and l1.distance == "l1"
    torch.testing.assert_close(l1.loss(x), F.l1_loss(_cosine_gram(x), _cosine_gram(ref)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="L1"):
        fo.GramReference(ref, "channels")


@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_token_gram_loss_value_and_gradient_are_autograds(distance):
    """The written-out gradient of the HW x HW Gram loss (2 E T through F.normalize) against autograd on the
    direct formula, a token of zeros included (F.normalize's eps branch)."""
    g = torch.Generator().manual_seed(3)
    ref, x = torch.randn(3, 7, 4, 5, generator=g), torch.randn(3, 7, 4, 5, generator=g)
    x[1, :, 2, 3] = 0.0
    reference = fo.GramReference(ref, "tokens", distance)
    fast, direct = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    value = reference.loss(fast)
    value.backward()
    tokens = F.normalize(direct.flatten(2).transpose(1, 2), dim=-1)
    difference = tokens @ tokens.transpose(1, 2) - reference.gram
    expected = difference.abs().mean() if distance == "l1" else difference.pow(2).mean()
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.grad, direct.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no graph: the value alone
        torch.testing.assert_close(reference.loss(x), expected.detach(), rtol=1e-5, atol=1e-7)


def test_temporal_loss_with_precomputed_grids_is_the_warp_residual_and_its_gradient():
    """`TemporalLoss` (grids and weights made once per optimisation, both directions in one grid_sample) against
    the two directions written with `flow_warp`, value and gradient, flows that leave the frame included."""
    from rerender.warp import flow_warp
    g = torch.Generator().manual_seed(8)
    n, chunks = 3, 2
    flows = _direction_sensitive_flows(n, 6, 7, 9)
    flows = CyclicFlows(flows.backward * 3, flows.backward_occlusion, flows.forward * 3, flows.forward_occlusion)
    feature = torch.randn(chunks * n, 4, 6, 7, generator=g)
    for both in (True, False):
        fast, direct = feature.clone().requires_grad_(True), feature.clone().requires_grad_(True)
        value = fo.TemporalLoss(flows, chunks, both)(fast)
        value.backward()
        x = direct.view(chunks, n, 4, 6, 7)
        pairs = n if both else n - 1
        earlier = x[:, :pairs].reshape(-1, 4, 6, 7)
        later = x[:, [(k + 1) % n for k in range(pairs)]].reshape(-1, 4, 6, 7)
        repeat = lambda t: t[:pairs].repeat(chunks, 1, 1, 1)  # noqa: E731
        residual = (later - flow_warp(earlier, repeat(flows.backward))).abs() * (1 - repeat(flows.backward_occlusion))
        if both:
            residual = residual + (earlier - flow_warp(later, repeat(flows.forward))).abs() * (
                1 - repeat(flows.forward_occlusion))
        expected = residual.mean()
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fast.grad, direct.grad, rtol=1e-5, atol=1e-7)


def test_gram_form_choice_and_memory_report():
    # SD1.5 decoder up-block inputs at 512^2, 8 frames x 2 CFG chunks
    layers = [(1280, 8, 8), (1280, 16, 16), (1280, 32, 32), (640, 64, 64)]
    report = fo.feature_optimization_memory(layers, frames=8, distance="squared")
    assert [r.form for r in report] == ["tokens", "tokens", "tokens", "channels"]
    tokens_form = fo.feature_optimization_memory(layers[-1:], frames=8, form="tokens")[0]
    assert tokens_form.reference_bytes == 16 * 4096 ** 2 * 4  # the ~1 GB of Gram matrices the issue quotes
    total = lambda r: r.reference_bytes + r.working_bytes  # noqa: E731
    assert total(report[-1]) < total(tokens_form) / 2
    kept, peak = fo.memory_totals(report)  # bounded: well under the HW x HW form's ~4 GiB at the 64x64 layer
    assert kept < 256 * 2 ** 20 and peak < 1.5 * 2 ** 30
    code = fo.feature_optimization_memory(layers, frames=8)  # the code's L1: HW x HW everywhere, as the reference
    assert [r.form for r in code] == ["tokens"] * 4
    assert code[-1].working_bytes == 16 * 4096 ** 2 * 4 + 8 * 16 * 640 * 4096 * 4  # one HW x HW buffer + features
    for shape, form in (((6, 5, 5), "tokens"), ((6, 5, 5), "channels")):
        estimate = fo.feature_optimization_memory([shape], frames=2, chunks=2, form=form, distance="squared")[0]
        assert fo.GramReference(torch.randn(4, *shape), form, "squared").nbytes() == estimate.reference_bytes


def _direction_sensitive_flows(n, h, w, seed):
    """Cyclic flows whose forward fields and occlusions are not the backward ones mirrored."""
    g = torch.Generator().manual_seed(seed)
    field = lambda: F.interpolate(torch.randn(n, 2, 3, 3, generator=g) * 1.5, size=(h, w), mode="bilinear")  # noqa
    occlusion = lambda: (torch.rand(n, 1, h, w, generator=g) < 0.15).float()  # noqa: E731
    return CyclicFlows(field(), occlusion(), field(), occlusion())


def test_default_feature_optimisation_is_the_reference_code():
    """The defaults are FRESCO's optimize_feature (src/diffusion_hacked.py), written out here from its rules:
    Adam at lr 0.2 for 20 steps on 100 * L1(Gram, reference Gram) + 2 * mean over the cyclic pairs (wrap pair
    included) of both directions' occlusion-masked warp residuals, the LAST iterate, AdaIN to the input."""
    from rerender.warp import flow_warp
    g = torch.Generator().manual_seed(4)
    n, chunks = 3, 2
    feature = torch.randn(chunks * n, 6, 8, 8, generator=g) * 2 + 0.3
    reference_feature = torch.randn(chunks * n, 6, 8, 8, generator=g)
    flows = _direction_sensitive_flows(n, 8, 8, 5)
    out, report = fo.optimize_feature(feature, fo.GramReference(reference_feature), flows)

    reference_gram = _cosine_gram(reference_feature)
    following = list(range(1, n)) + [0]
    backward, backward_occ = flows.backward.repeat(chunks, 1, 1, 1), flows.backward_occlusion.repeat(chunks, 1, 1, 1)
    forward, forward_occ = flows.forward.repeat(chunks, 1, 1, 1), flows.forward_occlusion.repeat(chunks, 1, 1, 1)

    def objective(c):
        c1 = c
        c2 = c.view(chunks, n, *c.shape[1:])[:, following].reshape(c.shape)
        temporal = ((c2 - flow_warp(c1, backward)).abs() * (1 - backward_occ)
                    + (c1 - flow_warp(c2, forward)).abs() * (1 - forward_occ)).mean() * 2
        return temporal + F.l1_loss(_cosine_gram(c), reference_gram) * 100

    cs = feature.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([cs], lr=0.2)
    for _ in range(20):
        optimizer.zero_grad()
        objective(cs).backward()
        optimizer.step()
    expected = fo.restore_statistics(cs.detach(), feature)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(report.spatial_after + report.temporal_after), objective(out),
                               rtol=1e-4, atol=1e-5)


def test_paper_form_is_one_direction_over_adjacent_pairs_and_keeps_the_best_iterate():
    g = torch.Generator().manual_seed(6)
    n = 3
    feature = torch.randn(2 * n, 6, 8, 8, generator=g)
    reference = fo.GramReference(torch.randn(2 * n, 6, 8, 8, generator=g), distance="squared")
    flows = _direction_sensitive_flows(n, 8, 8, 7)
    one_way = fo.temporal_loss(feature, flows)
    from rerender.warp import flow_warp
    x = feature.view(2, n, 6, 8, 8)
    direct = ((x[:, 1:].reshape(-1, 6, 8, 8) - flow_warp(x[:, :-1].reshape(-1, 6, 8, 8),
                                                           flows.backward[:-1].repeat(2, 1, 1, 1)))
              * (1 - flows.backward_occlusion[:-1].repeat(2, 1, 1, 1))).abs().mean()
    torch.testing.assert_close(one_way, direct)
    out, report = fo.optimize_feature(feature, reference, flows, iterations=20, lr=10.0, form="paper")
    objective = lambda r: r.spatial_after + r.temporal_after  # noqa: E731
    assert objective(report) <= report.spatial_before + report.temporal_before  # a rate far too high: never worse
    with pytest.raises(ValueError, match="loss form"):
        fo.optimize_feature(feature, reference, flows, form="neither")


def _statistics_match(a, b):
    for sa, sb in zip(fo.channel_statistics(a), fo.channel_statistics(b)):
        torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial, temporal", [(True, True), (True, False), (False, True)])
def test_feature_optimisation_lowers_its_losses_and_restores_statistics(spatial, temporal):
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(2 * 3, 8, 12, 12, generator=g) * 2 + 0.5
    reference = fo.GramReference(torch.randn(6, 8, 12, 12, generator=g)) if spatial else None
    # full-resolution flows, resized inside
    flows = _random_flows(3, 24, 24, 3, magnitude=1.5, occluded=0.1) if temporal else None
    out, report = fo.optimize_feature(feature, reference, flows, iterations=10)
    assert out.shape == feature.shape and out.dtype == feature.dtype and not torch.equal(out, feature)
    _statistics_match(out, feature)
    assert (report.spatial_before is None) == (not spatial) and (report.temporal_before is None) == (not temporal)
    if spatial:
        assert report.spatial_after < report.spatial_before
        torch.testing.assert_close(torch.tensor(report.spatial_after), 100 * reference.loss(out), rtol=1e-4, atol=0)
    if temporal:
        assert report.temporal_after < report.temporal_before
        resized = flows.resized((12, 12))
        torch.testing.assert_close(torch.tensor(report.temporal_after), 2 * fo.temporal_loss(out, resized, True),
                                   rtol=1e-4, atol=0)


def test_feature_optimisation_with_no_loss_changes_nothing():
    feature = torch.randn(3, 4, 6, 6)
    out, report = fo.optimize_feature(feature)
    assert torch.equal(out, feature) and report.spatial_before is None and report.temporal_before is None


def test_feature_optimisation_runs_in_inference_mode_and_leaves_weights_alone():
    torch.manual_seed(2)
    module = torch.nn.Conv2d(3, 8, 3, padding=1)
    weights = [p.detach().clone() for p in module.parameters()]
    with torch.inference_mode():  # everything the host hands over is an inference tensor
        flows = _random_flows(3, 24, 24, 4, magnitude=1.5, occluded=0.1)
        feature = module(torch.randn(6, 3, 12, 12))
        reference = fo.GramReference(module(torch.randn(6, 3, 12, 12)))
        out, report = fo.optimize_feature(feature, reference, flows, iterations=5)
        assert feature.is_inference()
    assert report.spatial_after < report.spatial_before and report.temporal_after < report.temporal_before
    _statistics_match(out, feature)
    for p, before in zip(module.parameters(), weights):
        assert p.grad is None and p.requires_grad and torch.equal(p.detach(), before)


# ---------------------------------------------------------------------------------------- background smoothing

def test_all_foreground_changes_nothing():
    x = torch.randn(2 * 4, 5, 8, 8)
    background = background_from_foreground(torch.ones(1, 32, 32), 4, (32, 32))
    assert torch.equal(smooth_background(x, _random_flows(4, 32, 32, 0), background), x)


def test_all_background_with_still_flow_copies_frame_zero_through_the_batch():
    x = torch.randn(2 * 4, 5, 8, 8)
    background = background_from_foreground(torch.zeros(4, 32, 32), 4, (32, 32))
    out = smooth_background(x, _zero_flows(4, 32, 32), background)
    for chunk in range(2):
        for frame in range(4):
            torch.testing.assert_close(out[chunk * 4 + frame], x[chunk * 4], rtol=0, atol=1e-5)
    images = torch.rand(4, 3, 32, 32)  # at full resolution too (occlusion dilation path)
    smoothed = smooth_background(images, _zero_flows(4, 32, 32), background)
    torch.testing.assert_close(smoothed, images[:1].expand(4, -1, -1, -1), rtol=0, atol=1e-5)


def test_smoothing_keeps_the_foreground_and_occluded_pixels():
    x = torch.randn(3, 2, 8, 8)  # a feature grid at half the flows' resolution
    mask = torch.zeros(3, 16, 16)
    mask[:, :8] = 1  # top half foreground
    occlusion = torch.zeros(3, 1, 16, 16)
    occlusion[0, :, :, 12:] = 1  # frame 1's right columns have no source in frame 0
    out = smooth_background(x, _zero_flows(3, 16, 16, occlusion), background_from_foreground(mask, 3, (16, 16), 1))
    assert torch.equal(out[:, :, :4], x[:, :, :4])
    torch.testing.assert_close(out[1, :, 4:, :6], x[0, :, 4:, :6], rtol=0, atol=1e-5)
    assert torch.equal(out[1, :, 4:, 6:], x[1, :, 4:, 6:])


@pytest.mark.parametrize("mask", [torch.zeros(2, 8, 8), torch.zeros(8, 8, 3, 1)])
def test_bad_mask_names_the_input(mask):
    with pytest.raises(ValueError, match="mask"):
        background_from_foreground(mask, 4, (8, 8))


# ------------------------------------------------------------------- conventions against the pack's flow stage

@pytest.fixture(scope="module")
def panning_clip():
    """Three 64x64 crops of a smooth texture whose content moves 4 px right per frame, with the flow stage's own
    DIS flows: checks that every consumer here reads the flow stage's direction conventions the right way."""
    from rerender.flow import DISEstimator
    from rerender.warp import gaussian_blur
    texture = gaussian_blur(torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)), 9, 2.0)[0]
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    frames = torch.stack([texture[:, :, 16 - 4 * k:80 - 4 * k] for k in range(3)])  # [3,3,64,64]
    video_flow = VideoFlow(frames.movedim(1, -1), DISEstimator("medium"))
    return frames, cyclic_flows(video_flow.pair, [0, 1, 2], frames)


def test_flow_stage_flows_give_the_pan(panning_clip):
    _, flows = panning_clip
    interior = (slice(None), slice(8, -8), slice(8, -8))
    assert abs(float(flows.backward[0, 0][interior[1:]].median()) + 4) < 0.5  # frame 1's pixel came from x - 4
    assert abs(float(flows.forward[0, 0][interior[1:]].median()) - 4) < 0.5


def test_temporal_loss_and_smoothing_follow_the_motion(panning_clip):
    frames, flows = panning_clip
    still = _zero_flows(3, 64, 64)
    assert fo.temporal_loss(frames, flows) < 0.3 * fo.temporal_loss(frames, still)
    background = background_from_foreground(torch.zeros(1, 64, 64), 3, (64, 64))
    smoothed = smooth_background(frames, flows, background)
    change = (smoothed - frames)[:, :, 8:-8, 8:-8].abs().mean()
    assert change < 0.3 * (frames[1:] - frames[:-1])[:, :, 8:-8, 8:-8].abs().mean()


def test_trajectories_follow_the_pan(panning_clip):
    frames, flows = panning_clip
    traj = trajectories(flows, frames, (16, 16))  # 4 px per token: one token per frame
    grid = torch.arange(256).view(16, 16)
    tracks = grid[2:-2, 2:-4].flatten()
    assert (traj.forward[1, tracks] == tracks + 1).float().mean() > 0.9
    assert (traj.forward[2, tracks] == tracks + 2).float().mean() > 0.9
