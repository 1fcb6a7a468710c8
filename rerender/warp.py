"""Warping and mask helpers shared by every stage.

Conventions (reference §2): a flow is `[N, 2, H, W]` in pixels, channel 0 = dx, channel 1 = dy. A *backward*
flow for the pair (src -> dst) gives, for each pixel p of dst, the displacement to its source in src, so
`warp(src_image, flow)` lays src onto dst. Sampling is `grid_sample(align_corners=True, padding_mode="zeros")`
with coordinates normalised as 2x/(W-1)-1, exactly as the reference code does.
"""
import torch
import torch.nn.functional as F


def _base_grid(height: int, width: int, device, dtype) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack((xs, ys))  # [2, H, W]


def flow_warp(x: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Sample `x` ([N,C,H,W]) at p + flow(p); `flow` is [N,2,H,W] (or [1,2,H,W], broadcast) in pixels."""
    n, _, h, w = x.shape
    if flow.shape[-2:] != (h, w):
        raise ValueError(f"flow is {tuple(flow.shape[-2:])} but the tensor to warp is {(h, w)}")
    grid = sampling_grid(flow, x.device).expand(n, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.to(x.dtype)


def sampling_grid(flow: torch.Tensor, device=None) -> torch.Tensor:
    """The normalised `grid_sample` grid [N,H,W,2] (align_corners=True) sampling at p + flow(p): `flow_warp`'s,
    for callers that warp many tensors along the same flow and make it once."""
    h, w = flow.shape[-2:]
    device = flow.device if device is None else device
    coords = _base_grid(h, w, device, torch.float32) + flow.to(device, torch.float32)
    gx = 2.0 * coords[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * coords[:, 1] / max(h - 1, 1) - 1.0
    return torch.stack((gx, gy), dim=-1)


def resize_flow(flow: torch.Tensor, size: tuple) -> torch.Tensor:
    """Resize a flow field to `size` = (h, w), scaling the vectors with it (bilinear, align_corners=False)."""
    h, w = flow.shape[-2:]
    out = F.interpolate(flow.float(), size=size, mode="bilinear", align_corners=False)
    scale = torch.tensor([size[1] / w, size[0] / h], device=flow.device).view(1, 2, 1, 1)
    return out * scale


def downsample_mask_max(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Conservative downsampling of a [N,1,H,W] mask: a cell takes the worst (max) of its pixels."""
    return F.max_pool2d(mask.float(), kernel_size=factor, stride=factor)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's GaussianBlur semantics) on [N,C,H,W]."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = kernel_size // 2
    y = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y


def soften_occlusion(occlusion: torch.Tensor) -> torch.Tensor:
    """Reference soft occlusion (§1.5): clamp(blur9,σ18(maxpool9(occ)) + occ, 0, 1); 1 = unreliable. [N,1,H,W]."""
    occ = occlusion.float()
    dilated = F.max_pool2d(occ, kernel_size=9, stride=1, padding=4)
    return (gaussian_blur(dilated, 9, 18.0) + occ).clamp(0.0, 1.0)
