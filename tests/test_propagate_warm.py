"""Warm-started search (issue 25): each frame of a pass starts from the previous frame's field carried along the
flow, at half and full resolution, with a short random search."""
import pytest
import torch

from rerender import patchmatch, propagate
from test_propagate import HEIGHT, WIDTH, ShiftFlow, moving_clip, psnr, smooth_texture


def shifted_field(height: int, width: int, dx: int, dy: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack(((xs + dx) % width, (ys + dy) % height))


def test_carry_field_takes_the_match_of_the_pixel_each_came_from():
    field = torch.stack((torch.arange(WIDTH).view(1, -1).expand(HEIGHT, WIDTH) * 3,
                         torch.arange(HEIGHT).view(-1, 1).expand(HEIGHT, WIDTH) * 5))
    flow = torch.zeros(1, 2, HEIGHT, WIDTH)
    flow[:, 0], flow[:, 1] = 2.4, -1.0  # pixel (x, y) came from (x + 2.4, y - 1)
    carried = propagate.carry_field(field, flow)
    assert torch.equal(carried[0, :, :WIDTH - 2], field[0, :, 2:])  # nearest: 2.4 -> 2
    assert torch.equal(carried[1, 1:], field[1, :-1])
    assert torch.equal(carried[0, :, -2:], field[0, :, -1:].expand(HEIGHT, 2))  # from outside: the edge pixel
    assert torch.equal(carried[1, 0], field[1, 0])


def test_warm_start_near_the_answer_finds_it_with_a_short_search():
    """A target that is the source shifted: started 2-3 pixels off the true field, the warm search (half and full
    resolution, random radii up to 4) lands on it, as the cold pyramid search does."""
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    shifted = torch.roll(image, shifts=(3, -5), dims=(1, 2))
    truth = shifted_field(HEIGHT, WIDTH, 5, -3)
    start = shifted_field(HEIGHT, WIDTH, 7, -1)
    guides = [patchmatch.Guide(image, shifted, 6.0)]
    warm = patchmatch.synthesize(image, guides, uniformity=0.0, style_weight=0.0, initial_field=start,
                                 search_radius=4)
    interior = (slice(8, HEIGHT - 8), slice(10, WIDTH - 10))  # away from the wrapped borders
    found = (warm.nnf == truth).all(0)[interior]
    assert float(found.float().mean()) > 0.9
    assert float(warm.error[interior][found].max()) < 1e-3
    # from the start alone (no search) the image would be off by the 2-pixel shift
    no_search = patchmatch.synthesize(image, guides, uniformity=0.0, style_weight=0.0, initial_field=start,
                                      patchmatch_iters=0)
    assert psnr(no_search.image[:, interior[0], interior[1]], shifted[:, interior[0], interior[1]]) < 30.0


def test_warm_start_caps_the_patchmatch_iterations_and_the_cold_search_keeps_them(monkeypatch):
    """From a warm start each round runs at most WARM_PATCHMATCH_ITERS PatchMatch iterations (fewer if asked);
    a cold search runs as many as asked, as EbSynth."""
    asked = []
    original = patchmatch._LevelSolver._patchmatch

    def spy(self, descriptors, xs, ys, active, iters, occupancy):
        asked.append(iters)
        return original(self, descriptors, xs, ys, active, iters, occupancy)

    monkeypatch.setattr(patchmatch._LevelSolver, "_patchmatch", spy)
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    guides = [patchmatch.Guide(image, torch.roll(image, shifts=(1, 2), dims=(1, 2)), 6.0)]
    start = shifted_field(HEIGHT, WIDTH, -2, -1)
    runs = {}
    for name, kwargs in (("warm", dict(initial_field=start, search_radius=4, patchmatch_iters=6)),
                         ("warm, fewer asked", dict(initial_field=start, search_radius=4, patchmatch_iters=2)),
                         ("cold", dict(patchmatch_iters=6))):
        asked.clear()
        patchmatch.synthesize(image, guides, **kwargs)
        runs[name] = set(asked)
    assert patchmatch.WARM_PATCHMATCH_ITERS < 6
    assert runs == {"warm": {patchmatch.WARM_PATCHMATCH_ITERS}, "warm, fewer asked": {2}, "cold": {6}}


def test_wide_search_reaches_the_answer_from_a_made_up_warm_start():
    """Started 80 pixels off everywhere, the capped random search (radii up to 4) cannot reach the true field; the
    pixels marked `wide_search` search the whole source and find it. (Unblurred noise: on a smooth texture short
    steps can walk downhill to the answer.)"""
    height, width = 48, 192
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(5))
    shifted = torch.roll(image, shifts=(3, -5), dims=(1, 2))
    truth = shifted_field(height, width, 5, -3)
    start = shifted_field(height, width, 5 + 80, -3)
    guides = [patchmatch.Guide(image, shifted, 6.0)]
    interior = (slice(8, height - 8), slice(10, width - 10))

    def found(wide_search, seed=0):
        result = patchmatch.synthesize(image, guides, uniformity=0.0, style_weight=0.0, initial_field=start,
                                       search_radius=4, wide_search=wide_search, seed=seed)
        return float((result.nnf == truth).all(0)[interior].float().mean())

    assert found(None) == 0.0
    assert found(torch.zeros(height, width, dtype=torch.bool)) == 0.0
    assert min(found(torch.ones(height, width, dtype=torch.bool), seed) for seed in range(3)) > 0.9
    with pytest.raises(ValueError, match="wide_search"):
        found(torch.ones(height, width - 1, dtype=torch.bool))


def test_frames_mostly_new_to_the_key_are_searched_harder_and_patches_into_holes_widely(monkeypatch):
    """Moving 1 px a frame across 56 columns: from frame 6 on less than 90 % of the pixels were carried from the key,
    and those frames get all PatchMatch iterations and the larger descriptor where their pixels were not carried;
    in every frame the patches that reach the column the motion brings in search the whole key, that column is
    matched without the temporal guide, and every column whose positions were ever filled without the positional
    guide."""
    frames = moving_clip(8)
    calls = []
    original = patchmatch.synthesize

    def spy(style, guides, **kwargs):
        calls.append(dict(kwargs, guides=guides))
        return original(style, guides, **kwargs)

    monkeypatch.setattr(patchmatch, "synthesize", spy)
    settings = propagate.PropagationSettings()
    list(propagate.run_pass(frames, 0, 1.0 - frames[0], range(1, 8), ShiftFlow(8, HEIGHT, WIDTH), settings))
    new_content = [t >= 6 for t in range(1, 8)]  # carried share (56 - t) / 56 < 0.9
    assert [c["descriptor_size"] for c in calls] == [
        settings.new_content_descriptor_size if n else settings.descriptor_size for n in new_content]
    assert {c.get("warm_patchmatch_iters", patchmatch.WARM_PATCHMATCH_ITERS) for c in calls} == {
        patchmatch.WARM_PATCHMATCH_ITERS}
    assert {c["patchmatch_iters"] for c in calls} == {settings.patchmatch_iters}
    carried = [torch.arange(WIDTH).expand(HEIGHT, WIDTH) < WIDTH - t for t in range(1, 8)]
    assert all(torch.equal(c["short_descriptor"], kept) if n else c["short_descriptor"] is None
               for c, kept, n in zip(calls, carried, new_content))  # carried pixels keep the short descriptor
    assert all(torch.equal(c["thorough_search"], ~kept) if n else c["thorough_search"] is None
               for c, kept, n in zip(calls, carried, new_content))  # the others search for all iterations
    assert {c["short_descriptor_size"] for c in calls} == {settings.descriptor_size}
    entering = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    entering[:, WIDTH - 1] = True
    reaching = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    reaching[:, WIDTH - 1 - settings.patch_size // 2:] = True  # the new column, and the patches that overlap it
    assert all(torch.equal(c["wide_search"], reaching) for c in calls)
    _, _, temporal, positional = zip(*(c["guides"] for c in calls))  # colour, edges, temporal, positional
    assert all(torch.equal(guide.reliable, ~entering) for guide in temporal)
    assert all(torch.equal(guide.reliable, kept) for guide, kept in zip(positional, carried))


def test_a_thorough_search_goes_on_where_marked_and_nowhere_else(monkeypatch):
    """From a warm start, pixels marked `thorough_search` search on after the warm iterations, up to all
    `patchmatch_iters`: marked everywhere, the field is the one a warm search with that many iterations finds;
    marked nowhere, the warm search's. Only marked pixels search in the extra iterations."""
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    target = smooth_texture(HEIGHT, WIDTH, seed=6)
    guides = [patchmatch.Guide(image, target, 6.0)]
    start = shifted_field(HEIGHT, WIDTH, -2, -1)
    run = lambda **kwargs: patchmatch.synthesize(image, guides, initial_field=start, search_radius=4,  # noqa: E731
                                                 patchmatch_iters=5, seed=3, **kwargs).nnf
    everywhere = torch.ones(HEIGHT, WIDTH, dtype=torch.bool)
    assert patchmatch.WARM_PATCHMATCH_ITERS == 3  # 5 leaves 2 more, told apart from the 3
    assert not torch.equal(run(), run(warm_patchmatch_iters=5))
    assert torch.equal(run(thorough_search=everywhere), run(warm_patchmatch_iters=5))
    assert torch.equal(run(thorough_search=~everywhere), run())
    left = torch.arange(WIDTH).expand(HEIGHT, WIDTH) < WIDTH // 2
    searched = []
    original = patchmatch._LevelSolver._patchmatch

    def spy(self, descriptors, xs, ys, active, iters, occupancy):
        searched.append((iters, active.clone(), self.target_hw))
        return original(self, descriptors, xs, ys, active, iters, occupancy)

    monkeypatch.setattr(patchmatch._LevelSolver, "_patchmatch", spy)
    run(thorough_search=left)
    extra = [(active, hw) for iters, active, hw in searched if iters == 5 - patchmatch.WARM_PATCHMATCH_ITERS]
    assert extra and {iters for iters, _, _ in searched} == {patchmatch.WARM_PATCHMATCH_ITERS,
                                                              5 - patchmatch.WARM_PATCHMATCH_ITERS}
    assert all(bool((active % hw[1] < hw[1] // 2).all()) for active, hw in extra)
    with pytest.raises(ValueError, match="thorough_search"):
        run(thorough_search=everywhere[1:])


def test_a_short_descriptor_compares_as_a_search_with_that_many_components():
    """Pixels marked `short_descriptor` search as a synthesis with `short_descriptor_size` components would (the
    leading principal directions are the same); unmarked, the longer descriptor's search is unchanged."""
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    target = smooth_texture(HEIGHT, WIDTH, seed=6)
    guides = [patchmatch.Guide(image, target, 6.0)]
    run = lambda size, **kwargs: patchmatch.synthesize(image, guides, descriptor_size=size, seed=4, **kwargs).nnf  # noqa: E731
    everywhere = torch.ones(HEIGHT, WIDTH, dtype=torch.bool)
    short = run(24, short_descriptor=everywhere, short_descriptor_size=8)
    assert float((short == run(8)).all(0).float().mean()) > 0.99
    assert float((short == run(24)).all(0).float().mean()) < 0.9
    assert torch.equal(run(24, short_descriptor=~everywhere, short_descriptor_size=8), run(24))
    with pytest.raises(ValueError, match="short_descriptor"):
        run(24, short_descriptor=everywhere[1:])


def test_a_pixel_that_drops_guides_gives_their_weight_to_the_guides_it_keeps():
    """Row k of the masks scales the kept guides' (square-root) features so that their weights add up to all the
    guides' weights; the style channels are never scaled."""
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    reliable = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    reliable[:, :10] = True
    guides = [patchmatch.Guide(image, image, 6.0), patchmatch.Guide(image, image, 0.5),
              patchmatch.Guide(image, image, 0.5, reliable), patchmatch.Guide(image[:2], image[:2], 2.0, reliable)]
    code, masks = patchmatch._dropped_guides(guides, 3, "cpu")
    assert torch.equal(code, 3 * (~reliable).long())  # one bit per guide with a reliable map
    torch.testing.assert_close(masks[0], torch.ones(14))
    both = masks[3]  # channels: style 0-2, colour 3-5, edges 6-8, temporal 9-11, positional 12-13
    assert torch.equal(both[:3], torch.ones(3)) and torch.equal(both[9:], torch.zeros(5))
    torch.testing.assert_close(both[3:9], torch.full((6,), (9.0 / 6.5) ** 0.5))
    temporal_only = masks[1]
    assert torch.equal(temporal_only[9:12], torch.zeros(3))
    torch.testing.assert_close(temporal_only[3:9], torch.full((6,), (9.0 / 8.5) ** 0.5))
    torch.testing.assert_close(temporal_only[12:], torch.full((2,), (9.0 / 8.5) ** 0.5))


def test_initial_field_of_another_size_is_refused():
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    with pytest.raises(ValueError, match="initial_field"):
        patchmatch.synthesize(image, [patchmatch.Guide(image, image, 1.0)],
                              initial_field=torch.zeros(2, HEIGHT - 1, WIDTH, dtype=torch.int64))


def test_warm_pass_follows_the_motion_and_searches_once_per_frame_at_full_size(monkeypatch):
    """On a clip moving 1 px a frame with exact flow, the warm pass reproduces the moving style as the cold one
    does, and every frame starts from the carried field."""
    frames = moving_clip(6)
    style = 1.0 - frames  # any per-pixel style: the truth is the same mapping of every frame
    flows = ShiftFlow(6, HEIGHT, WIDTH)
    starts = []
    original = patchmatch.synthesize

    def spy(*args, **kwargs):
        starts.append(kwargs.get("initial_field"))
        return original(*args, **kwargs)

    monkeypatch.setattr(patchmatch, "synthesize", spy)
    warm = dict(propagate.run_pass(frames, 0, style[0], range(1, 6), flows, propagate.PropagationSettings()))
    assert len(starts) == 5 and all(s is not None and s.shape == (2, HEIGHT, WIDTH) for s in starts)
    # the first frame starts from the key's identity field carried one pixel along
    assert torch.equal(starts[0][0, :, :WIDTH - 1], torch.arange(1, WIDTH).view(1, -1).expand(HEIGHT, -1))
    starts.clear()
    cold = dict(propagate.run_pass(frames, 0, style[0], range(1, 6), flows,
                                   propagate.PropagationSettings(warm_start=False)))
    assert starts == [None] * 5
    inner = (slice(4, HEIGHT - 4), slice(4, WIDTH - 10))  # away from the edge the motion brings in
    for t in range(1, 6):
        truth = style[t].permute(2, 0, 1)[:, inner[0], inner[1]]
        assert psnr(warm[t].image[:, inner[0], inner[1]], truth) > 35.0
        assert psnr(warm[t].image[:, inner[0], inner[1]], truth) > psnr(cold[t].image[:, inner[0], inner[1]],
                                                                        truth) - 1.0


def test_pyramid_levels_widget_zero_is_the_warm_start_and_n_searches_every_frame_from_scratch():
    d = propagate.PropagationSettings()
    widgets = lambda levels: propagate.settings_from_widgets(  # noqa: E731
        d.colour_weight, d.edge_weight, d.temporal_weight, d.positional_weight, d.patch_size, d.search_vote_iters,
        d.patchmatch_iters, d.hole_fill, d.histogram_blend, d.poisson, d.uniformity, d.stop_threshold, levels,
        d.descriptor_size, d.seed)
    assert widgets(0) == d and d.warm_start
    cold = widgets(3)
    assert not cold.warm_start and cold.pyramid_levels == 3
