"""Tune-A-Video through the real host: tuning, what it trains and leaves alone, save/load, sampling, bad input."""
import pytest
import torch

from tiny_models import conditioning, tiny_sd15


def test_smoke(host):
    model = tiny_sd15(0)
    latent = {"samples": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    out = host.run_node("Rerender_TuneAVideo", model=model, positive=conditioning(0), latent=latent, frame_count=4,
                        frame_stride=1, steps=3, learning_rate=1e-3, mixed_precision="fp32")
    print(out[2], host.last_ui)
