"""Patch propagator (reference §3): guided PatchMatch synthesis, guides, passes, temporal-aware blending."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rerender import patchmatch, propagate

HEIGHT, WIDTH = 40, 56


def smooth_texture(height: int, width: int, seed: int, margin: int = 0) -> torch.Tensor:
    """[3,H,W+margin] 0..1 random texture, blurred so Lab gradients stay well under the Poisson clip."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, height + 4, width + margin + 4, generator=generator)
    texture = F.avg_pool2d(noise, 5, stride=1)[0]
    low, high = texture.amin(dim=(1, 2), keepdim=True), texture.amax(dim=(1, 2), keepdim=True)
    return 0.15 + 0.7 * (texture - low) / (high - low)


class ShiftFlow:
    """Exact flow of a clip whose frame t is a texture shifted left by t pixels (duck-types VideoFlow.pair)."""

    def __init__(self, num_frames: int, height: int, width: int, speed: int = 1):
        self.num_frames, self.height, self.width, self.speed = num_frames, height, width, speed

    def pair(self, src: int, dst: int, device=None):
        flow = torch.zeros(1, 2, self.height, self.width, device=device)
        flow[:, 0] = (dst - src) * self.speed  # frame_dst(x) = frame_src(x + (dst - src) * speed)
        xs = torch.arange(self.width, device=device).view(1, 1, 1, -1) + flow[:, :1]
        occlusion = ((xs < 0) | (xs > self.width - 1)).float().expand(1, 1, self.height, self.width)
        return flow, occlusion.contiguous()


class NoWorkFlow(ShiftFlow):
    def pair(self, src, dst, device=None):
        raise AssertionError("flow requested: the input check should have failed before any work")


def moving_clip(num_frames: int, seed: int = 0) -> torch.Tensor:
    texture = smooth_texture(HEIGHT, WIDTH, seed, margin=num_frames)
    return torch.stack([texture[:, :, t:t + WIDTH].permute(1, 2, 0) for t in range(num_frames)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def test_style_equal_to_input_reproduces_the_input_frames():
    frames = moving_clip(11)
    keys = [0, 8]
    video = propagate.propagate_video(frames, keys, frames[keys], ShiftFlow(11, HEIGHT, WIDTH))
    for t in range(11):
        assert psnr(video[t], frames[t]) > 33.0, f"frame {t}: {psnr(video[t], frames[t]):.1f} dB"


def test_identical_frames_and_zero_flow_give_the_key_frame():
    frame = smooth_texture(HEIGHT, WIDTH, seed=1).permute(1, 2, 0)
    frames = frame.expand(7, -1, -1, -1).contiguous()
    style = (frame ** 2.0).flip(-1)  # any rendering of the frame
    keys = [0, 4]
    video = propagate.propagate_video(frames, keys, torch.stack((style, style)), ShiftFlow(7, HEIGHT, WIDTH, speed=0))
    for t in range(7):
        torch.testing.assert_close(video[t], style, atol=2e-4, rtol=0, msg=f"frame {t}")


def test_key_frames_come_out_unchanged():
    frames = moving_clip(9, seed=2)
    styles = torch.rand(3, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(3))
    keys = [1, 4, 8]
    settings = propagate.PropagationSettings(search_vote_iters=2, patchmatch_iters=2)
    video = propagate.propagate_video(frames, keys, styles, ShiftFlow(9, HEIGHT, WIDTH), settings)
    assert video.shape == frames.shape
    for key, style in zip(keys, styles):
        assert torch.equal(video[key], style)
    assert not torch.equal(video[0], frames[0])  # before the first key: propagated backwards, not copied


def test_patch_error_is_zero_exactly_where_the_patches_are_identical():
    source = smooth_texture(HEIGHT, WIDTH, seed=4)
    target = source.clone()
    target[:, 20, 30] += 0.3
    ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    error = patchmatch.patch_error(source * 255, target * 255, torch.stack((xs, ys)))
    near = ((ys - 20).abs() <= 2) & ((xs - 30).abs() <= 2)
    assert torch.all(error[~near] == 0)
    assert torch.all(error[near] > 0)
    torch.testing.assert_close(error[20, 30], torch.tensor(3 * (0.3 * 255) ** 2), rtol=1e-4, atol=0)


@pytest.mark.parametrize("band_rows", [1, 4, 64])
def test_patch_error_in_bands_is_the_patch_ssd_with_repeated_edges(band_rows):
    """Against the definition, pixel by pixel, on fields that reach every border of both images: a band that took
    the wrong rows of the target, or padded a band's edge instead of the image's, would differ."""
    generator = torch.Generator().manual_seed(3)
    source, target = torch.rand(5, 13, 17, generator=generator), torch.rand(5, 11, 9, generator=generator)
    nnf = torch.stack((torch.randint(0, 17, (11, 9), generator=generator),
                       torch.randint(0, 13, (11, 9), generator=generator)))
    nnf[:, 0, 0], nnf[:, -1, -1] = torch.tensor([0, 0]), torch.tensor([16, 12])
    error = patchmatch.patch_error(source, target, nnf, patch_size=5, band_rows=band_rows)
    expected = torch.zeros(11, 9, dtype=torch.float64)
    for y in range(11):
        for x in range(9):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    sy, sx = min(max(int(nnf[1, y, x]) + dy, 0), 12), min(max(int(nnf[0, y, x]) + dx, 0), 16)
                    ty, tx = min(max(y + dy, 0), 10), min(max(x + dx, 0), 8)
                    expected[y, x] += float((target[:, ty, tx] - source[:, sy, sx]).double().square().sum())
    torch.testing.assert_close(error.double(), expected, rtol=1e-5, atol=1e-6)


def test_synthesis_finds_identical_patches_and_reports_zero_error_there():
    image = smooth_texture(HEIGHT, WIDTH, seed=5)
    shifted = torch.roll(image, shifts=(3, -5), dims=(1, 2))
    result = patchmatch.synthesize(image, [patchmatch.Guide(image, shifted, 6.0)], uniformity=0.0, style_weight=0.0)
    interior = (slice(None), slice(8, HEIGHT - 8), slice(10, WIDTH - 10))  # away from the wrapped borders
    torch.testing.assert_close(result.image[interior], shifted[interior], atol=1e-5, rtol=0)
    ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    found = (result.nnf[0] == (xs + 5) % WIDTH) & (result.nnf[1] == (ys - 3) % HEIGHT)
    assert float(found[interior[1:]].float().mean()) > 0.9
    assert float(result.error[interior[1:]][found[interior[1:]]].max()) < 1e-3
    same = patchmatch.synthesize(image, [patchmatch.Guide(image, image, 1.0)])
    assert float(same.error.max()) < 1e-3
    torch.testing.assert_close(same.image, image, atol=1e-5, rtol=0)


def test_synthesis_transfers_the_style_along_the_guide():
    """The style follows the guide: swapping the guide's halves swaps the style's (away from the seams)."""
    guide = smooth_texture(HEIGHT, WIDTH, seed=6)
    style = smooth_texture(HEIGHT, WIDTH, seed=7)
    swap = lambda x: torch.cat((x[..., WIDTH // 2:], x[..., :WIDTH // 2]), dim=-1)  # noqa: E731
    result = patchmatch.synthesize(style, [patchmatch.Guide(guide, swap(guide), 1.0)], style_weight=0.0)
    away_from_seams = torch.cat((torch.arange(3, WIDTH // 2 - 3), torch.arange(WIDTH // 2 + 3, WIDTH - 3)))
    inner = (slice(None), slice(None), away_from_seams)
    assert psnr(result.image[inner], swap(style)[inner]) > 35.0


def test_a_guide_is_left_out_where_it_is_not_reliable():
    """A heavy guide that contradicts the true one in the right half wins there, unless it is marked unreliable
    there: then the right half follows the true guide as the left half does."""
    guide = smooth_texture(HEIGHT, WIDTH, seed=6)
    style = smooth_texture(HEIGHT, WIDTH, seed=7)
    swap = lambda x: torch.cat((x[..., WIDTH // 2:], x[..., :WIDTH // 2]), dim=-1)  # noqa: E731
    half = WIDTH // 2
    liar_target = swap(guide).clone()
    liar_target[..., half:] = guide[..., half:]  # says "no swap" on the right
    right = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    right[:, half:] = True
    inner_right = (slice(None), slice(3, HEIGHT - 3), slice(half + 3, WIDTH - 3))

    def right_half(reliable):
        guides = [patchmatch.Guide(guide, swap(guide), 1.0), patchmatch.Guide(guide, liar_target, 4.0, reliable)]
        return patchmatch.synthesize(style, guides, style_weight=0.0).image[inner_right]

    assert psnr(right_half(None), style[inner_right]) > 30.0  # the liar decides
    assert psnr(right_half(~right), swap(style)[inner_right]) > 30.0  # left out: the true guide decides


def test_a_guide_reliable_nowhere_has_no_say_and_one_reliable_everywhere_changes_nothing():
    image = smooth_texture(HEIGHT, WIDTH, seed=8)
    target = torch.roll(image, shifts=(2, -3), dims=(1, 2))
    other = smooth_texture(HEIGHT, WIDTH, seed=9)

    def field(second_target, reliable):
        guides = [patchmatch.Guide(image, target, 6.0), patchmatch.Guide(other, second_target, 2.0, reliable)]
        return patchmatch.synthesize(image, guides, seed=3).nnf

    nowhere = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    assert torch.equal(field(torch.rand(3, HEIGHT, WIDTH), nowhere), field(torch.rand(3, HEIGHT, WIDTH), nowhere))
    assert torch.equal(field(other, ~nowhere), field(other, None))
    with pytest.raises(ValueError, match="reliable"):
        field(other, torch.ones(HEIGHT, WIDTH + 1, dtype=torch.bool))


def test_incremental_uniformity_bookkeeping_matches_a_full_recount():
    generator = torch.Generator().manual_seed(17)
    solver = patchmatch._LevelSolver(torch.rand(6, 30, 40, generator=generator), torch.rand(3, 25, 35),
                                     torch.ones(6, 1, 1), 3, torch.randn(4, 6, 5, 5), 3500.0, generator)
    random_x = lambda count: torch.randint(0, 40, (count,), generator=generator)  # noqa: E731
    random_y = lambda count: torch.randint(0, 30, (count,), generator=generator)  # noqa: E731
    xs, ys = random_x(25 * 35), random_y(25 * 35)
    occupancy = solver._full_occupancy(xs, ys)
    moved = torch.arange(0, 25 * 35, 7)
    new_x, new_y = random_x(moved.numel()), random_y(moved.numel())
    solver._move_occupancy(occupancy, xs[moved], ys[moved], new_x, new_y)
    xs[moved], ys[moved] = new_x, new_y
    torch.testing.assert_close(occupancy, solver._full_occupancy(xs, ys), atol=0.05, rtol=1e-5)
    uniform = solver._full_occupancy(torch.arange(40).repeat(30), torch.arange(30).repeat_interleave(40))
    # every source patch used once: the same price everywhere, border patches included
    assert float(uniform.std() / uniform.mean()) < 0.05


def test_search_basis_does_not_depend_on_the_thread_count():
    # the propagator's feature stack (style 3 + guides 12 channels): a 375-dim patch basis, where float32 LAPACK
    # rounded differently with 1 and 2 threads and the search turned that into a different result
    features = torch.cat([smooth_texture(64, 64, seed=30 + i) for i in range(5)]) * 255
    threads = torch.get_num_threads()
    bases = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            bases.append(patchmatch._pca_basis(features, 5, 8, torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bases[0], bases[1])


def test_synthesis_is_deterministic_for_a_seed():
    style = smooth_texture(HEIGHT, WIDTH, seed=8)
    guides = [patchmatch.Guide(style, torch.roll(style, 2, dims=2).flip(1), 2.0)]
    first = patchmatch.synthesize(style, guides, seed=3)
    again = patchmatch.synthesize(style, guides, seed=3)
    assert torch.equal(first.image, again.image) and torch.equal(first.nnf, again.nnf)


def test_blending_with_one_pass_only_reproduces_that_pass():
    frame_a = propagate.PassFrame(smooth_texture(HEIGHT, WIDTH, seed=9), torch.rand(HEIGHT, WIDTH))
    frame_b = propagate.PassFrame(smooth_texture(HEIGHT, WIDTH, seed=10), torch.rand(HEIGHT, WIDTH))
    for histogram_blend, poisson in ((True, True), (True, False), (False, False)):
        settings = propagate.PropagationSettings(histogram_blend=histogram_blend, poisson=poisson)
        image, selection = propagate.blend_frame(frame_a, frame_b, 0.0, None, None, settings)
        torch.testing.assert_close(image, frame_a.image, atol=1e-4, rtol=0)
        assert not selection.any()
        image, selection = propagate.blend_frame(frame_a, frame_b, 1.0, None, None, settings)
        torch.testing.assert_close(image, frame_b.image, atol=1e-4, rtol=0)
        assert selection.all()


def test_selection_mask_sticks_along_the_flow():
    error_a, error_b = torch.zeros(HEIGHT, WIDTH), torch.ones(HEIGHT, WIDTH)  # errors alone would take pass A
    frame_a = propagate.PassFrame(torch.full((3, HEIGHT, WIDTH), 0.2), error_a)
    frame_b = propagate.PassFrame(torch.full((3, HEIGHT, WIDTH), 0.8), error_b)
    previous = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    previous[10:20, 10:20] = True
    flow, _ = ShiftFlow(2, HEIGHT, WIDTH, speed=3).pair(0, 1)
    settings = propagate.PropagationSettings(histogram_blend=False, poisson=False)
    _, selection = propagate.blend_frame(frame_a, frame_b, 0.5, previous, flow, settings)
    expected = torch.zeros_like(previous)
    expected[10:20, 7:17] = True  # moved 3 pixels left with the content
    assert torch.equal(selection, expected)


def test_blend_selects_the_pass_with_the_smaller_weighted_error():
    frame_a = propagate.PassFrame(torch.full((3, HEIGHT, WIDTH), 0.2), torch.ones(HEIGHT, WIDTH))
    error_b = torch.full((HEIGHT, WIDTH), 3.0)
    error_b[:, :10] = 0.5
    frame_b = propagate.PassFrame(torch.full((3, HEIGHT, WIDTH), 0.8), error_b)
    settings = propagate.PropagationSettings(histogram_blend=False, poisson=False)
    _, selection = propagate.blend_frame(frame_a, frame_b, 0.5, None, None, settings)
    assert selection[:, :10].all() and not selection[:, 10:].any()


def test_blend_weighs_each_pixel_by_the_inverse_patch_error_of_each_pass():
    error_a = torch.ones(HEIGHT, WIDTH)
    error_b = torch.ones(HEIGHT, WIDTH)
    error_b[:, :10] = 0.25  # pass B matched its guides 4x better on the left
    frame_a = propagate.PassFrame(torch.zeros(3, HEIGHT, WIDTH), error_a)
    frame_b = propagate.PassFrame(torch.ones(3, HEIGHT, WIDTH), error_b)
    settings = propagate.PropagationSettings(histogram_blend=False, poisson=False)
    image, _ = propagate.blend_frame(frame_a, frame_b, 0.2, None, None, settings)
    # equal errors: the temporal weight; elsewhere (0.2 / 0.25) / (0.8 / 1 + 0.2 / 0.25) = 0.5
    torch.testing.assert_close(image[:, :, 10:], torch.full_like(image[:, :, 10:], 0.2))
    torch.testing.assert_close(image[:, :, :10], torch.full_like(image[:, :, :10], 0.5))
    zero_errors = propagate.PassFrame(torch.ones(3, HEIGHT, WIDTH), torch.zeros(HEIGHT, WIDTH))
    image, _ = propagate.blend_frame(propagate.PassFrame(torch.zeros(3, HEIGHT, WIDTH), torch.zeros(HEIGHT, WIDTH)),
                                     zero_errors, 0.2, None, None, settings)
    torch.testing.assert_close(image, torch.full_like(image, 0.2))  # no division by zero


def test_blend_weights_follow_the_reference():
    assert [propagate.blend_weight(k, 10) for k in (1, 5, 9)] == [0.0, 4 / 9, 8 / 9]
    assert propagate.blend_weight(1, 2) == 0.0


def test_screened_poisson_matches_a_dense_least_squares_solve():
    generator = torch.Generator().manual_seed(11)
    h, w = 5, 6
    data = torch.rand(3, h, w, generator=generator) * 100
    grad_x = torch.randn(3, h, w - 1, generator=generator) * 10
    grad_y = torch.randn(3, h - 1, w, generator=generator) * 10
    weights = (2.5, 0.5, 1.0)
    solved = propagate.screened_poisson(data, grad_x, grad_y, weights)
    eye = torch.eye(h * w, dtype=torch.float64).view(h, w, h * w)
    dx = (eye[:, 1:] - eye[:, :-1]).reshape(-1, h * w)
    dy = (eye[1:] - eye[:-1]).reshape(-1, h * w)
    for c, g in enumerate(weights):
        system = torch.cat((g * dx, g * dy, torch.eye(h * w, dtype=torch.float64)))
        rhs = torch.cat((g * grad_x[c].reshape(-1), g * grad_y[c].reshape(-1), data[c].reshape(-1))).double()
        expected = torch.linalg.lstsq(system, rhs[:, None]).solution.view(h, w)
        torch.testing.assert_close(solved[c].double(), expected, atol=1e-3, rtol=0)


def test_screened_poisson_keeps_an_image_given_its_own_gradients():
    image = smooth_texture(HEIGHT, WIDTH, seed=12) * 255
    grad_x, grad_y = image[:, :, 1:] - image[:, :, :-1], image[:, 1:] - image[:, :-1]
    torch.testing.assert_close(propagate.screened_poisson(image, grad_x, grad_y, (2.5, 0.5, 0.5)), image,
                               atol=1e-2, rtol=0)


def test_histogram_blend_takes_the_composite_statistics():
    generator = torch.Generator().manual_seed(13)
    lab_a = torch.rand(3, 20, 30, generator=generator) * 80 + 60
    lab_b = torch.rand(3, 20, 30, generator=generator) * 40 + 100
    composite = torch.rand(3, 20, 30, generator=generator) * 50 + 90
    blended = propagate.histogram_blend(lab_a, lab_b, composite, 0.3)
    torch.testing.assert_close(blended.mean(dim=(1, 2)), composite.mean(dim=(1, 2)), atol=1e-3, rtol=0)
    torch.testing.assert_close(blended.std(dim=(1, 2), unbiased=False), composite.std(dim=(1, 2), unbiased=False),
                               atol=1e-3, rtol=0)


def test_lab_matches_opencv_and_round_trips():
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(14))
    lab = propagate.rgb_to_lab255(image)
    expected = cv2.cvtColor(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2Lab)
    expected = torch.from_numpy(expected).permute(2, 0, 1) * torch.tensor([255 / 100, 1, 1]).view(3, 1, 1)
    # OpenCV interpolates tables (~0.2 L units off); ours is the exact CIE formula
    torch.testing.assert_close(lab, expected + torch.tensor([0, 128, 128]).view(3, 1, 1), atol=0.6, rtol=0)
    torch.testing.assert_close(propagate.lab255_to_rgb(lab), image, atol=1e-4, rtol=0)


def test_edge_guide_matches_the_reference_opencv_filter():
    image = torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(15))
    as_uint8 = (image * 255).round().byte().permute(1, 2, 0).numpy()
    expected = cv2.filter2D(as_uint8, -1, np.array(propagate.EDGE_KERNEL, np.float32))
    ours = (propagate.edge_guide(image) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("method", propagate.HOLE_FILLS)
def test_fill_holes_keeps_known_pixels_and_fills_from_them(method):
    holes = torch.zeros(30, 40, dtype=torch.bool)
    holes[10:20, 5:15] = True
    holes[0:8, 25:40] = True
    constant = torch.full((3, 30, 40), 0.4)
    damaged = constant.masked_fill(holes, 0.0)
    filled = propagate.fill_holes(damaged, holes, method)
    assert torch.equal(filled[:, ~holes], damaged[:, ~holes])
    torch.testing.assert_close(filled, constant, atol=3 / 255, rtol=0)  # TELEA works in 8 bits


def test_pyramid_fill_takes_the_nearby_colour():
    image = torch.zeros(3, 30, 40)
    image[:, :, 20:] = 0.75
    holes = torch.zeros(30, 40, dtype=torch.bool)
    holes[10:20, 25:35] = True
    filled = propagate.fill_holes(image.masked_fill(holes, 0.5), holes, "pyramid")
    torch.testing.assert_close(filled[:, 12:18, 27:33], torch.full((3, 6, 6), 0.75), atol=0.02, rtol=0)


def test_advect_follows_the_flow_and_fills_what_came_from_outside():
    image = smooth_texture(HEIGHT, WIDTH, seed=16)
    flow, occlusion = ShiftFlow(3, HEIGHT, WIDTH, speed=2).pair(0, 1)
    moved = propagate.advect(image, flow, occlusion, "pyramid")
    torch.testing.assert_close(moved[:, :, :-2], image[:, :, 2:])
    assert moved[:, :, -2:].min() > 0.1  # filled, not the zero padding


def test_coordinate_image_is_the_reference_positional_guide():
    coords = propagate.coordinate_image(5, 9)
    assert coords.shape == (3, 5, 9)
    assert float(coords[0, -1, 0]) == 1.0 and float(coords[1, 0, -1]) == 1.0 and float(coords[2].abs().max()) == 0.0


def test_passes_side_by_side_give_the_sequential_result_and_leave_the_thread_setting():
    frames = moving_clip(9, seed=21)
    keys = [1, 4, 8]
    settings = propagate.PropagationSettings(search_vote_iters=2, patchmatch_iters=2)
    threads = torch.get_num_threads()
    sequential = propagate.propagate_video(frames, keys, frames[keys].flip(-1), ShiftFlow(9, HEIGHT, WIDTH), settings,
                                           workers=1)
    parallel = propagate.propagate_video(frames, keys, frames[keys].flip(-1), ShiftFlow(9, HEIGHT, WIDTH), settings,
                                         workers=3)
    assert torch.equal(sequential, parallel)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("workers", [1, 3])
def test_progress_counts_every_synthesis_and_an_exception_stops_the_work(workers):
    frames = moving_clip(8, seed=18)
    keys = [2, 5, 6]
    assert propagate.pass_frame_count(8, keys) == 2 * 2 + 2 + 1
    settings = propagate.PropagationSettings(search_vote_iters=1, patchmatch_iters=1)
    seen = []
    propagate.propagate_video(frames, keys, frames[keys], ShiftFlow(8, HEIGHT, WIDTH), settings, on_frame=seen.append,
                              workers=workers)
    assert seen == list(range(propagate.pass_frame_count(8, keys)))

    class Interrupted(Exception):
        pass

    def interrupt(done):
        if done == 2:
            raise Interrupted
        seen.append(done)

    seen.clear()
    with pytest.raises(Interrupted):
        propagate.propagate_video(frames, keys, frames[keys], ShiftFlow(8, HEIGHT, WIDTH), settings, on_frame=interrupt,
                                  workers=workers)
    assert seen == [0, 1]


@pytest.mark.parametrize("case, message", [
    ("count", "2 key frame indices but 3"),
    ("range", "outside the clip"),
    ("order", "strictly increasing"),
    ("size", "resize the key frames"),
    ("flow", "compute the flow from these same frames"),
    ("empty", "at least one rendered key frame"),
])
def test_bad_input_is_reported_before_any_work(case, message):
    frames = moving_clip(6)
    keys, styles, flows = [0, 5], frames[[0, 5]], NoWorkFlow(6, HEIGHT, WIDTH)
    if case == "count":
        styles = frames[[0, 2, 5]]
    elif case == "range":
        keys = [0, 6]
    elif case == "order":
        keys = [5, 0]
    elif case == "size":
        styles = torch.zeros(2, HEIGHT, WIDTH + 8, 3)
    elif case == "flow":
        flows = NoWorkFlow(6, HEIGHT + 8, WIDTH)
    elif case == "empty":
        keys, styles = [], frames[:0]
    with pytest.raises(ValueError, match=message):
        propagate.propagate_video(frames, keys, styles, flows)


def test_synthesis_rejects_mismatched_guides():
    style = torch.rand(3, 20, 20)
    with pytest.raises(ValueError, match="aligned with the style"):
        patchmatch.synthesize(style, [patchmatch.Guide(torch.rand(3, 20, 21), torch.rand(3, 20, 20), 1.0)])
    with pytest.raises(ValueError, match="odd"):
        patchmatch.synthesize(style, [patchmatch.Guide(style, style, 1.0)], patch_size=4)
    with pytest.raises(ValueError, match="at least one guide"):
        patchmatch.synthesize(style, [])
