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

    def spy(self, style, xs, ys, active, iters, occupancy):
        asked.append(iters)
        return original(self, style, xs, ys, active, iters, occupancy)

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
