"""Patch propagator on a subject that grows from frame to frame (issue 25): the scale read off the flow, the atlas
of the key at that scale, and a zoom clip where searching the rescaled key beats searching the key alone."""
import math

import torch
import torch.nn.functional as F

from rerender import patchmatch, propagate

HEIGHT, WIDTH = 48, 64


def zoomed_positions(height: int, width: int, scale: float) -> torch.Tensor:
    """The positional guide of a target that shows the key `scale` times larger about the centre."""
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    rows = (cy + (ys - cy) / scale) / (height - 1)
    cols = (cx + (xs - cx) / scale) / (width - 1)
    return torch.stack((rows, cols, torch.zeros_like(rows)))


def test_flow_scale_recovers_a_known_zoom_and_ignores_filled_pixels():
    for scale in (0.7, 1.0, 1.25, 1.8):
        assert math.isclose(propagate.flow_scale(zoomed_positions(HEIGHT, WIDTH, scale)), scale, rel_tol=1e-3)
    positions = zoomed_positions(HEIGHT, WIDTH, 1.4)
    # the left 60% of the frame filled with coordinates at another scale: marked as filled, it is left out
    positions[:, :, :38] = zoomed_positions(HEIGHT, WIDTH, 1.0)[:, :, :38]
    valid = torch.ones(HEIGHT, WIDTH, dtype=torch.bool)
    valid[:, :38] = False
    assert math.isclose(propagate.flow_scale(positions, valid), 1.4, rel_tol=1e-3)
    assert propagate.flow_scale(positions) < 1.2  # unmarked, it takes the median over


def test_search_scales_add_the_rescaled_key_only_past_the_threshold():
    settings = propagate.PropagationSettings(scale_search=True)
    assert propagate.search_scales(1.03, settings) == [1.0]
    assert propagate.search_scales(1 / 1.03, settings) == [1.0]
    assert propagate.search_scales(1.3, settings) == [1.0, 1.3]
    assert propagate.search_scales(0.5, settings) == [1.0, 0.5]
    assert propagate.search_scales(1.3, propagate.PropagationSettings(scale_search=False)) == [1.0]


def test_atlas_copy_holds_the_key_at_that_scale_with_its_own_coordinates():
    generator = torch.Generator().manual_seed(0)
    image = F.avg_pool2d(torch.rand(1, 3, HEIGHT + 4, WIDTH + 4, generator=generator), 5, stride=1)[0]
    coordinates = propagate.coordinate_image(HEIGHT, WIDTH)
    positions = zoomed_positions(HEIGHT, WIDTH, 1.5)
    (atlas, coords), share = propagate.scaled_atlas((image, coordinates), [1.0, 1.5], positions, margin=4)
    assert torch.equal(atlas[:, :HEIGHT, :WIDTH], image)
    copy, copy_coords = atlas[:, :, WIDTH:], coords[:, :, WIDTH:]
    # cropped to what the target reaches (its middle two thirds of the key, at 1.5x) plus the margin
    assert copy.shape[-1] < 1.5 * WIDTH and copy.shape[-1] >= WIDTH
    assert math.isclose(share, HEIGHT * WIDTH / (atlas.shape[-2] * atlas.shape[-1]))
    # every copy pixel carries the key coordinates of the content it shows
    rows = (copy_coords[0] * (HEIGHT - 1)).round().long().clamp(0, HEIGHT - 1)
    cols = (copy_coords[1] * (WIDTH - 1)).round().long().clamp(0, WIDTH - 1)
    inner = (slice(2, -2), slice(2, -2))
    assert (image[:, rows, cols] - copy)[:, inner[0], inner[1]].abs().mean() < 0.02


class ZoomFlow:
    """Exact flow of a clip whose frame t shows a texture magnified by `growth`^t about the centre."""

    def __init__(self, num_frames: int, height: int, width: int, growth: float):
        self.num_frames, self.height, self.width, self.growth = num_frames, height, width, growth

    def pair(self, src: int, dst: int, device=None):
        ys = torch.arange(self.height, dtype=torch.float32).view(-1, 1).expand(self.height, self.width)
        xs = torch.arange(self.width, dtype=torch.float32).view(1, -1).expand(self.height, self.width)
        cy, cx = (self.height - 1) / 2, (self.width - 1) / 2
        factor = self.growth ** (src - dst)  # frame_dst(p) = frame_src(c + (p - c) * factor)
        qx, qy = cx + (xs - cx) * factor, cy + (ys - cy) * factor
        flow = torch.stack((qx - xs, qy - ys))[None]
        outside = (qx < 0) | (qx > self.width - 1) | (qy < 0) | (qy > self.height - 1)
        return flow.to(device), outside.float()[None, None].to(device)


def zoom_clip(num_frames: int, growth: float, seed: int) -> torch.Tensor:
    """[N,H,W,3]: a fine texture (blobs of a few pixels), magnified by growth^t in frame t."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, HEIGHT + 2, WIDTH + 2, generator=generator)
    texture = F.avg_pool2d(noise, 3, stride=1)
    texture = (texture - texture.amin()) / (texture.amax() - texture.amin())
    frames = []
    for t in range(num_frames):
        positions = zoomed_positions(HEIGHT, WIDTH, growth ** t)
        grid = torch.stack((positions[1] * 2 - 1, positions[0] * 2 - 1), -1)[None]
        frames.append(F.grid_sample(texture, grid, mode="bicubic", align_corners=True)[0].clamp(0, 1))
    return torch.stack(frames).permute(0, 2, 3, 1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def test_searching_the_rescaled_key_beats_the_key_alone_on_a_zoom():
    growth, count = 1.08, 9
    frames = zoom_clip(count, growth, seed=4)
    styles = frames.flip(-1) ** 1.5  # the "rendering": per pixel, so the truth of every frame is known
    keys = [0, count - 1]
    flows = ZoomFlow(count, HEIGHT, WIDTH, growth)
    fast = dict(search_vote_iters=4, patchmatch_iters=3, coverage_weights=False)  # the search alone
    plain = propagate.propagate_video(frames, keys, styles[keys], flows,
                                      propagate.PropagationSettings(scale_search=False, **fast))
    scaled = propagate.propagate_video(frames, keys, styles[keys], flows,
                                       propagate.PropagationSettings(scale_search=True, **fast))
    middle = range(2, count - 2)  # scale 1.17..1.36 from the nearer key; measured gain 0.96 dB
    gain = sum(psnr(scaled[t], styles[t]) - psnr(plain[t], styles[t]) for t in middle) / len(middle)
    assert gain > 0.5, f"mean gain {gain:.2f} dB over frames {list(middle)}"


def test_uniform_share_scales_the_uniformity_term():
    generator = torch.Generator().manual_seed(1)
    source = torch.rand(3, 24, 40, generator=generator)
    target = torch.rand(3, 20, 20, generator=generator)
    guides = [patchmatch.Guide(source, target, 1.0)]
    features, basis = torch.cat((source, source)) * 255, torch.rand(4, 6, 5, 5, generator=generator)
    full = patchmatch._LevelSolver(features, target * 255, torch.ones(6, 1, 1), 3, basis, 3500.0, generator)
    half = patchmatch._LevelSolver(features, target * 255, torch.ones(6, 1, 1), 3, basis, 3500.0, generator,
                                   uniform_share=0.5)
    torch.testing.assert_close(half.occupancy_weight, full.occupancy_weight * 0.5)
    patchmatch.synthesize(source, guides, search_vote_iters=1, patchmatch_iters=1, uniform_share=0.5)


def test_blend_trusts_the_pass_whose_guides_were_carried_not_filled():
    settings = propagate.PropagationSettings(coverage_weights=True)
    error = torch.ones(HEIGHT, WIDTH)
    coverage_b = torch.ones(HEIGHT, WIDTH)
    coverage_b[:, :20] = 0.0  # the backward pass's left part came from outside its key: guides filled
    forward = propagate.PassFrame(torch.full((3, HEIGHT, WIDTH), 0.2), error, torch.ones(HEIGHT, WIDTH))
    backward = propagate.PassFrame(torch.full((3, HEIGHT, WIDTH), 0.8), error, coverage_b)
    weights = propagate.error_weights(forward.error, backward.error, 0.7, forward.coverage, backward.coverage)
    assert float(weights[:, :20].max()) < 0.03
    torch.testing.assert_close(weights[:, 20:], torch.full((HEIGHT, WIDTH - 20), 0.7))
    _, selection = propagate.blend_frame(forward, backward, 0.7, None, None, settings)
    assert not bool(selection[:, :20].any()) and bool(selection[:, 20:].all())
    _, selection = propagate.blend_frame(forward, backward, 0.7, None, None, propagate.PropagationSettings())
    assert bool(selection.all())  # off by default: the blend as before
