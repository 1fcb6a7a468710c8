"""DDIM inversion on tensors (no host): the grid, and convergence on data whose probability-flow ODE is known."""
import pytest
import torch

from rerender.inversion import Inversion, inversion_grid, invert, inversion_step

TABLE = torch.linspace(0.03, 14.6, 1000)  # any ascending sigma table


def gaussian_denoiser(x, sigma):
    """The exact denoiser of unit-Gaussian data: its ODE trajectory is x(σ) = x0·√(1+σ²)."""
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


def sd_input_scale(sigma):
    return 1 / (sigma ** 2 + 1) ** 0.5


def test_grid_contains_every_editing_level_and_the_requested_density():
    editing = torch.tensor([10.0, 5.0, 1.0, 0.0])
    grid = inversion_grid(editing, TABLE, 100)
    assert grid[0] == 0 and grid[-1] == 10.0
    assert torch.all(grid[1:] > grid[:-1])
    for level in editing.double():
        assert torch.any(grid == level)
    assert 100 * 10 / 14.6 - 2 <= len(grid) - 4 <= 100 * 10 / 14.6 + 2  # table levels below the start kept


def test_inversion_converges_to_the_exact_trajectory():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 50, 200):
        grid = inversion_grid(torch.tensor([8.0, 0.0]), TABLE, steps)
        top = invert(x0, grid, gaussian_denoiser, sd_input_scale)[8.0]
        errors.append((top - x0 * (1 + 8.0 ** 2) ** 0.5).abs().mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.2 * errors[0]  # first order in the step size


def test_one_step_evaluates_the_model_at_the_next_level_on_the_rescaled_latent():
    seen = {}

    def denoiser(x, sigma):
        seen["x"], seen["sigma"] = x.clone(), sigma.clone()
        return torch.zeros_like(x)

    x = torch.ones(1, 1, 2, 2)
    out = inversion_step(x, 1.0, 2.0, denoiser, sd_input_scale)
    ratio = (5 / 2) ** 0.5  # c_in(1)/c_in(2)
    assert torch.allclose(seen["x"], x * ratio) and torch.allclose(seen["sigma"], torch.tensor([2.0]))
    assert torch.allclose(out, x + (2.0 - 1.0) * x * ratio / 2.0)  # ε̂ = (x_in - 0)/σ'


def test_kept_levels_must_be_on_the_grid():
    with pytest.raises(ValueError, match="not on the inversion grid"):
        invert(torch.zeros(1, 1, 2, 2), torch.tensor([0.0, 1.0]), gaussian_denoiser, sd_input_scale, keep=[0.5])


def test_inversion_refuses_another_schedule_and_another_clip():
    source = torch.randn(3, 4, 8, 8)
    inverted = Inversion(torch.zeros(3, 3, 4, 8, 8, dtype=torch.float16), torch.tensor([5.0, 1.0, 0.0]), source,
                         torch.tensor([0.0, 1.0, 5.0]), [], {"steps": 2}, "EPS")
    inverted.check_schedule(torch.tensor([5.0, 1.0, 0.0]), "X", "fix")
    with pytest.raises(ValueError, match="another schedule"):
        inverted.check_schedule(torch.tensor([5.0, 2.0, 1.0, 0.0]), "X", "fix")
    with pytest.raises(ValueError, match="another schedule"):
        inverted.check_schedule(torch.tensor([5.0, 1.5, 0.0]), "X", "fix")
    inverted.check_clip(source.clone(), "X", "latent")
    with pytest.raises(ValueError, match="shape"):
        inverted.check_clip(source[:2], "X", "latent")
    with pytest.raises(ValueError, match="not the clip"):
        inverted.check_clip(source + 1e-3, "X", "latent")
