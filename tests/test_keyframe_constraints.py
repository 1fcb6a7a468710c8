"""Pure tests of the key frame constraint math and the cross-frame attention cache (no host needed)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rerender.rerender_a_video import keyframe_constraints as kc
from rerender.rerender_a_video.cross_frame_attention import CrossFrameAttention, Mode, cross_frame_inputs
from rerender.evaluation_plan import Evaluation, EvaluationKey, EvaluationPlan

SCHEDULE = torch.linspace(14.6, 0.03, 20).tolist() + [0.0]


def test_periods_reproduce_the_reference_steps_at_20():
    assert kc.period_steps(0.0, 0.1, 20) == frozenset({0, 1, 2})
    assert kc.period_steps(0.5, 0.8, 20, exclusive=True) == frozenset(range(11, 16))
    assert kc.period_steps(0.8, 1.0, 20) == frozenset(range(16, 20))
    assert kc.period_steps(0.0, 1.0, 20) == frozenset(range(20))
    assert kc.period_steps(1.0, 1.0, 20) == frozenset() and kc.period_steps(0.3, 0.3, 20) == frozenset()


@pytest.mark.parametrize("start, end", [(-0.1, 0.5), (0.2, 1.5)])
def test_bad_periods_are_rejected(start, end):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kc.validate_period("AdaIN", start, end)


def test_start_at_or_after_end_switches_a_constraint_off():
    """The reference webUI's (1, 0) and any start >= end: off, no error."""
    for start, end in ((1.0, 0.0), (0.8, 0.5), (0.3, 0.3)):
        kc.validate_period("AdaIN", start, end)
        assert kc.period_steps(start, end, 20) == frozenset()


def test_hidden_periods_are_reported_only_when_really_hidden():
    lines = kc.hidden_period_report({"shape": (0.0, kc.period_steps(0, 0.1, 20)),
                                     "pixel": (0.5, kc.period_steps(0.5, 0.8, 20, exclusive=True)),
                                     "adain": (0.2, kc.period_steps(0.2, 0.4, 20)),
                                     "attention": (0.0, kc.period_steps(0.0, 1.0, 20))},
                                    first_step=5, total_steps=20)
    assert [inert for _, inert in lines] == [True, False]     # attention from 0 to 1 just runs from step 5
    assert lines[0][0].startswith("shape") and "no effect" in lines[0][0]
    assert lines[1][0].startswith("adain") and "5..8" in lines[1][0]


def test_evaluations_are_attributed_to_their_steps():
    """Heun-like: each step evaluates at σ_i and again at σ_{i+1} (its correction), the last step once; DPM-2-like:
    a midpoint inside each interval. The state response carries an offset between evaluations."""
    schedule = [8.0, 4.0, 2.0, 1.0, 0.0]
    heun = EvaluationPlan.from_sigmas(schedule, 1, [4.0, 2.0, 2.0, 1.0, 1.0], [1, .5, .5, .25, .25], 0.0)
    assert [(e.step, e.starts_step) for e in heun.evaluations] == [(1, True), (1, False), (2, True), (2, False),
                                                                   (3, True)]
    assert heun.carry(2) == 1.0 and heun.carry(3) == 0.5 and heun.carry(5) == 0.0
    dpm2 = EvaluationPlan.from_sigmas(schedule, 0, [8.0, 5.6, 4.0, 2.8, 2.0, 1.4, 1.0], [1] * 7, 0.0)
    assert [e.step for e in dpm2.evaluations] == [0, 0, 1, 1, 2, 2, 3]
    assert [e.starts_step for e in dpm2.evaluations] == [True, False] * 3 + [True]
    assert dpm2.first_evaluation_of_step(2) == 4 and dpm2.steps_without_start({0, 3}) == []
    churned = EvaluationPlan.from_sigmas(schedule, 0, [8.5, 4.0], [1, 1], 0.0)
    assert churned.evaluations[0].starts_step and churned.evaluations[0].step == 0
    assert EvaluationKey(3, 2.0).matches(EvaluationKey(3, 2.0 * (1 + 1e-6)))
    assert not EvaluationKey(3, 2.0).matches(EvaluationKey(3, 2.1))


@pytest.mark.parametrize("factor", [8, 16])
def test_latent_warp_field_derives_the_scale_from_shapes(factor):
    h, w = 4, 6
    flow = torch.zeros(1, 2, h * factor, w * factor)
    flow[:, 0] = 2.0 * factor  # two latent cells to the right
    occlusion = torch.zeros(1, 1, h * factor, w * factor)
    occlusion[..., 0, 0] = 1.0
    latent_flow, mask = kc.latent_warp_field(flow, occlusion, (h, w))
    assert latent_flow.shape == (1, 2, h, w) and torch.allclose(latent_flow[:, 0], torch.full((1, h, w), 2.0))
    assert mask.shape == (1, 1, h, w) and mask[0, 0, 0, 0] == 0 and mask[0, 0, -1, -1] == 1


def test_fusion_copies_the_anchor_with_zero_flow_and_keeps_x0_where_invalid():
    x0, anchor = torch.randn(1, 4, 5, 7), torch.randn(1, 4, 5, 7)
    zero_flow = torch.zeros(1, 2, 5, 7)
    assert torch.equal(kc.fuse_x0(x0, anchor, zero_flow, torch.ones(1, 1, 5, 7)), anchor)
    assert torch.equal(kc.fuse_x0(x0, anchor, zero_flow, torch.zeros(1, 1, 5, 7)), x0)
    shifted = torch.zeros(1, 2, 5, 7)
    shifted[:, 0] = 1.0  # each cell takes its right neighbour in the anchor
    fused = kc.fuse_x0(x0, anchor, shifted, torch.ones(1, 1, 5, 7))
    assert torch.equal(fused[..., :-1], anchor[..., 1:]) and torch.equal(fused[..., -1], torch.zeros(1, 4, 5))


def test_pixel_reference_priorities():
    size = (1, 3, 32, 32)
    rough, anchor, previous = torch.full(size, 0.1), torch.full(size, 0.5), torch.full(size, 0.9)
    zero_flow, clear, blocked = torch.zeros(1, 2, 32, 32), torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 32, 32)
    assert torch.allclose(kc.pixel_reference(rough, anchor, previous, zero_flow, clear, zero_flow, clear), anchor)
    assert torch.allclose(kc.pixel_reference(rough, anchor, previous, zero_flow, blocked, zero_flow, clear), previous)
    assert torch.allclose(kc.pixel_reference(rough, anchor, previous, zero_flow, blocked, zero_flow, blocked), rough)


def test_inpaint_mask_needs_both_occluded():
    occluded = torch.zeros(1, 1, 64, 64)
    occluded[..., 24:40, 24:40] = 1.0
    clear = torch.zeros(1, 1, 64, 64)
    assert torch.equal(kc.inpaint_mask(occluded, clear, (8, 8)), torch.ones(1, 1, 8, 8))
    mask = kc.inpaint_mask(occluded, occluded, (8, 8))
    assert mask[0, 0, 4, 4] == 0 and mask[0, 0, 0, 0] == 1 and mask.shape == (1, 1, 8, 8)


def test_blend_weights_follow_the_reference_formula():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    mask[..., :, 4] = 0.5
    weight, keep = kc.blend_weights(mask, 0.5, 0.9, smooth_boundary=False)
    assert torch.allclose(weight[..., 0, 0], torch.tensor(0.5))
    assert math.isclose(keep[0, 0, 0, 0].item(), max(0.5, math.sqrt(0.75) * 0.9), rel_tol=1e-6)
    assert torch.equal(keep[..., 7], torch.ones(1, 1, 8))  # w = 0 leaves the noise part whole
    weight, smooth_keep = kc.blend_weights(mask, 0.5, 0.9, smooth_boundary=True)
    flat = kc.flat_region(mask)
    assert flat[0, 0, 0, 0] == 1 and flat[0, 0, 0, 4] == 0 and flat[0, 0, 0, 3] == 0
    assert torch.allclose(smooth_keep[..., 4], 1.0 - weight[..., 4])  # linear on the soft band
    assert torch.allclose(smooth_keep[..., 0], keep[..., 0])


def test_blend_in_sigma_form():
    x, signal, reference = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    weight, keep = kc.blend_weights(torch.zeros(1, 1, 8, 8), 0.5, 0.9, True)
    assert torch.allclose(kc.blend_toward_reference(x, signal, reference, weight, keep), x, atol=1e-6)
    weight, keep = kc.blend_weights(torch.ones(1, 1, 8, 8), 1.0, 0.9, True)
    assert torch.equal(kc.blend_toward_reference(x, signal, reference, weight, keep), reference)


def test_blend_matches_the_reference_ddim_form():
    """The DDPM-space blend w·q(x_trg) + (1-w)(x_t - dir) + r·dir, divided by sqrt(ᾱ), is the sigma-form blend."""
    alpha_bar = 0.3
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    x0_prev, eps_prev, target, fresh = (torch.randn(1, 4, 8, 8) for _ in range(4))
    weight, keep = kc.blend_weights(torch.rand(1, 1, 8, 8), 0.5, 0.9, True)
    direction = math.sqrt(1 - alpha_bar) * eps_prev
    x_t = math.sqrt(alpha_bar) * x0_prev + direction
    q_target = math.sqrt(alpha_bar) * target + math.sqrt(1 - alpha_bar) * fresh
    reference = (weight * q_target + (1 - weight) * (x_t - direction) + keep * direction) / math.sqrt(alpha_bar)
    ours = kc.blend_toward_reference(x0_prev + sigma * eps_prev, x0_prev, target + sigma * fresh, weight, keep)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_colour_match_moves_colours_and_keeps_luminance():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=gen) * 0.5
    reference = torch.rand(1, 3, 32, 32, generator=gen) * 0.3 + torch.tensor([0.6, 0.1, 0.1]).view(1, 3, 1, 1)
    out = kc.match_colours(image, reference)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert out[:, 0].mean() - out[:, 2].mean() > image[:, 0].mean() - image[:, 2].mean() + 0.1
    luminance = lambda x: (x * torch.tensor([0.3, 0.59, 0.11]).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(luminance(out), luminance(image), atol=0.05)


# ------------------------------------------------------------------------------------------------------ attention

LAYER = ("output", 3, 0)


def attend(q, kv):
    return F.scaled_dot_product_attention(q[:, None], kv[:, None], kv[:, None])[:, 0]


def evaluation_at(sigma, index=None):
    """The evaluation of a one-evaluation-per-step pass at schedule point `sigma`."""
    step = SCHEDULE.index(sigma)
    return Evaluation(EvaluationKey(step if index is None else index, sigma), step, True)


def run_layer(controller, sigma, tokens, branches=(1, 0), layer=LAYER):
    """One self-attention call as the host makes it: K/V inputs = the tokens unless the controller substitutes."""
    controller.evaluation = evaluation_at(sigma)
    context, value = controller.kv_inputs(layer, list(branches), tokens, tokens)
    return attend(tokens, context), context


def started_controller(start=0.0, end=1.0, dtype=None):
    controller = CrossFrameAttention({LAYER}, start, end, dtype=dtype)
    controller.start_run(torch.tensor(SCHEDULE))
    return controller


def test_substitution_is_anchor_then_previous_without_the_frame_itself():
    controller = started_controller()
    anchor = torch.randn(2, 16, 8)  # [uncond, cond] chunks of one frame
    controller.mode = Mode.ANCHOR
    out, context = run_layer(controller, SCHEDULE[2], anchor)
    assert context is anchor and torch.allclose(out, attend(anchor, anchor))
    controller.commit_anchor()
    controller.mode = Mode.KEY_FRAME
    frame = torch.randn(2, 16, 8)
    _, context = run_layer(controller, SCHEDULE[2], frame)
    assert torch.equal(context, torch.cat([anchor, anchor], dim=1))
    _, context = run_layer(controller, SCHEDULE[2], torch.randn(2, 16, 8))
    assert torch.equal(context, torch.cat([anchor, frame], dim=1))


def test_cache_keyed_by_branch_not_call_order():
    """cond and uncond arriving in separate calls, in either order, find their own entries."""
    controller = started_controller()
    uncond, cond = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    controller.mode = Mode.ANCHOR
    run_layer(controller, SCHEDULE[5], torch.cat([uncond, cond]), branches=(1, 0))
    controller.commit_anchor()
    controller.mode = Mode.KEY_FRAME
    _, context = run_layer(controller, SCHEDULE[5], torch.randn(1, 16, 8), branches=(0,))
    assert torch.equal(context, torch.cat([cond, cond], dim=1))
    _, context = run_layer(controller, SCHEDULE[5], torch.randn(1, 16, 8), branches=(1,))
    assert torch.equal(context, torch.cat([uncond, uncond], dim=1))


def test_identical_frame_attends_as_itself():
    controller = started_controller()
    tokens = torch.randn(2, 16, 8)
    controller.mode = Mode.ANCHOR
    plain, _ = run_layer(controller, SCHEDULE[0], tokens)
    controller.commit_anchor()
    controller.mode = Mode.KEY_FRAME
    cross, _ = run_layer(controller, SCHEDULE[0], tokens.clone())
    assert torch.allclose(cross, plain, atol=1e-6)


def test_inactive_steps_and_layers_pass_through_and_end_run_frees_everything():
    controller = started_controller(0.5, 1.0, dtype=torch.float16)
    tokens = torch.randn(2, 16, 8)
    controller.mode = Mode.ANCHOR
    run_layer(controller, SCHEDULE[0], tokens)           # step 0: outside the period, nothing cached
    assert controller.cached_entries() == 0
    run_layer(controller, SCHEDULE[15], tokens)
    _, context = run_layer(controller, SCHEDULE[15], tokens, layer=("output", 9, 0))
    assert context is tokens                             # a layer outside the set
    controller.commit_anchor()
    assert controller.nbytes() == tokens.numel() * 2     # fp16, anchor and previous share storage
    controller.mode = Mode.KEY_FRAME
    run_layer(controller, SCHEDULE[15], tokens.clone())
    assert controller.nbytes() == 2 * tokens.numel() * 2  # two frames' worth: anchor + this frame as "previous"
    controller.end_run()
    assert controller.cached_entries() == 0 and controller.nbytes() == 0 and not controller.running
    _, context = run_layer(controller, SCHEDULE[15], tokens)
    assert context is tokens


def test_an_evaluation_without_an_anchor_entry_at_its_sigma_attends_plainly_and_is_counted():
    controller = started_controller()
    tokens = torch.randn(2, 16, 8)
    controller.mode = Mode.ANCHOR
    run_layer(controller, SCHEDULE[3], tokens)
    controller.commit_anchor()
    controller.mode = Mode.KEY_FRAME
    controller.evaluation = Evaluation(EvaluationKey(3, SCHEDULE[4]), 3, True)   # same index, another σ
    frame = torch.randn(2, 16, 8)
    context, _ = controller.kv_inputs(LAYER, [1, 0], frame, frame)
    assert context is frame and controller.misses == 1



def test_substituted_values_and_cast_cache_equal_the_per_branch_concatenation():
    """The K/V inputs of a call, written in one tensor, equal [anchor; previous] per branch concatenated in the
    call's order, for separate value inputs (another patch gives attn1 its own values) and an fp16 cache read by
    an fp32 model; values that are the context's stay one tensor."""
    controller = started_controller(dtype=torch.float16)
    controller.evaluation = evaluation_at(SCHEDULE[4])
    anchor_context, anchor_value = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    controller.mode = Mode.ANCHOR
    controller.kv_inputs(LAYER, [1, 0], anchor_context, anchor_value)
    controller.commit_anchor()
    controller.mode = Mode.KEY_FRAME
    first_context, first_value = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    controller.kv_inputs(LAYER, [1, 0], first_context, first_value)
    context, value = controller.kv_inputs(LAYER, [0, 1], torch.randn(2, 16, 8), torch.randn(2, 16, 8))

    def expected(anchor, previous):   # branches [0, 1]: cond first; the anchor pass had [uncond, cond]
        halves = lambda t: t.half().float()
        return torch.cat([torch.cat([halves(anchor[1:]), halves(previous[1:])], dim=1),
                          torch.cat([halves(anchor[:1]), halves(previous[:1])], dim=1)])

    assert context.dtype == torch.float32 and torch.equal(context, expected(anchor_context, first_context))
    assert torch.equal(value, expected(anchor_value, first_value))

    shared = started_controller()
    shared.evaluation = evaluation_at(SCHEDULE[4])
    tokens = torch.randn(2, 16, 8)
    shared.mode = Mode.ANCHOR
    shared.kv_inputs(LAYER, [1, 0], tokens, tokens)
    shared.commit_anchor()
    shared.mode = Mode.KEY_FRAME
    frame = torch.randn(2, 16, 8)
    context, value = shared.kv_inputs(LAYER, [1, 0], frame, frame)
    assert value is context and torch.equal(context, torch.cat([tokens, tokens], dim=1))


def test_batched_frames_broadcast_a_single_cached_frame():
    anchor, previous = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    current = torch.randn(3, 4, 8)
    out = cross_frame_inputs(current, anchor, previous)
    assert out.shape == (3, 8, 8) and torch.equal(out[2], torch.cat([anchor[0], previous[0]]))
    with pytest.raises(RuntimeError, match="token layout"):
        cross_frame_inputs(current, torch.randn(2, 4, 8), previous)
