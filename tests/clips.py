"""Reading the shared test clips, and the image metric the tests and benches compare with."""
import cv2
import numpy as np
import torch


def read_frames(path, count: int, stride: int = 1) -> torch.Tensor:
    """Up to `count` frames, `stride` apart from the first, as an IMAGE batch [N,H,W,3] RGB in 0..1."""
    capture, frames, index = cv2.VideoCapture(str(path)), [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if index % stride == 0:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        index += 1
    capture.release()
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in 0..1."""
    return (10 * torch.log10(1.0 / ((a.float() - b.float()) ** 2).mean())).item()
