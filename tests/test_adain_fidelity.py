import pytest
import torch
import torch.nn.functional as F

from rerender.adain import adain, channel_stats
from rerender.fidelity import fidelity_encode, latent_scale


def test_adain_matches_reference_statistics():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 128, 6, 5, generator=gen) * 3 + 1
    ref = torch.randn(1, 128, 9, 7, generator=gen) * 0.5 - 2
    mean, std = channel_stats(ref)
    out = adain(x, mean, std)
    out_mean, out_std = channel_stats(out)
    # instance_norm uses the biased variance and channel_stats the unbiased one, as in the reference
    n = 30
    assert torch.allclose(out_mean, mean.expand_as(out_mean), atol=1e-4)
    assert torch.allclose(out_std, std.expand_as(out_std) * (n / (n - 1)) ** 0.5, rtol=1e-3)
    assert torch.equal(adain(x, mean, std, strength=0.0), x)


def test_adain_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        adain(torch.zeros(1, 4, 4, 4), torch.zeros(1, 16, 1, 1), torch.ones(1, 16, 1, 1))


class BlurryCodec:
    """A lossy stand-in autoencoder with a known bias: the decoder loses contrast (x -> 0.5 + 0.8 (x - 0.5))."""
    factor, channels = 4, 6

    def encode(self, images):
        x = images.movedim(-1, 1)
        pooled = F.avg_pool2d(x, self.factor)
        return torch.cat([pooled, pooled ** 2], dim=1)

    def decode(self, latent):
        x = latent[:, :3]
        x = 0.5 + 0.8 * (x - 0.5)
        return F.interpolate(x, scale_factor=self.factor, mode="nearest").clamp(0, 1).movedim(1, -1)


def test_fidelity_encode_compensates_a_lossy_codec():
    codec = BlurryCodec()
    gen = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(32, 32), mode="nearest")
    images = smooth.movedim(1, -1)
    plain = codec.decode(codec.encode(images))
    latent, rejected = fidelity_encode(codec.encode, codec.decode, images, strength=1.0, error_threshold=0.25)
    improved = codec.decode(latent)
    assert latent.shape == (1, 6, 8, 8) and rejected.shape == (1, 8, 8)
    assert (improved - images).abs().mean() < 0.5 * (plain - images).abs().mean()
    assert torch.equal(fidelity_encode(codec.encode, codec.decode, images, strength=0.0)[0], codec.encode(images))


def test_fidelity_rejects_compensation_where_it_hurts():
    codec = BlurryCodec()
    images = torch.full((1, 32, 32, 3), 0.5)
    images[:, :16] = 0.1   # λ=2 over-compensates away from mid-grey: decoded 0.052 instead of 0.1 here
    latent, rejected = fidelity_encode(codec.encode, codec.decode, images, strength=2.0, error_threshold=0.05)
    assert rejected[0, :2].min() == 1 and rejected[0, -2:].max() == 0
    assert torch.equal(latent[:, :, :2], codec.encode(images)[:, :, :2])


def test_latent_scale_is_read_from_shapes():
    assert latent_scale((512, 640), (32, 40)) == 16
    with pytest.raises(ValueError):
        latent_scale((512, 640), (30, 40))
