"""Make the `propagate --demo` material in rerender_cli/demo/ from the shared test clip (run once; the files are
committed): the first frames of man_talking_512x640_25fps.mp4 at half size, and its first and last frame "painted"
by a deterministic stylisation (cv2.stylization, then a warm colour curve per channel), as bench/propagator_bench.py
makes its ground truth.

    python -m rerender_cli.make_demo [--source ../shared/data/videos/man_talking_512x640_25fps.mp4]

The clip is Pexels video 8048492 by Antoni Shkraba, under the Pexels licence (free use, no attribution needed);
see ../shared/data/SOURCES.md for how the shared copy was cut from it.
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

from .propagate_video import DEMO, DEMO_KEYS, DEMO_VIDEO
from .video_files import VideoReader, VideoWriter

SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos" / "man_talking_512x640_25fps.mp4"
SIZE = (256, 320)  # W x H: half the source


def paint(rgb: np.ndarray) -> np.ndarray:
    """A deterministic 'painting' of an RGB frame: edge-preserving stylisation and a warm colour curve."""
    stylised = cv2.stylization(rgb, sigma_s=60, sigma_r=0.45).astype(np.float32) / 255.0
    curves = np.stack([1.2 * stylised[..., 0] ** 0.8, stylised[..., 1] ** 0.9, 0.85 * stylised[..., 2] ** 1.25], -1)
    return (np.clip(curves, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args(argv)
    reader = VideoReader(args.source)
    count = max(DEMO_KEYS) + 1
    frames = [cv2.resize(reader.read(), SIZE, interpolation=cv2.INTER_AREA) for _ in range(count)]
    reader.close()
    DEMO.mkdir(exist_ok=True)
    with VideoWriter(DEMO_VIDEO, reader.fps, *SIZE) as writer:
        for frame in frames:
            writer.write(frame)
        writer.commit()
    for index, path in DEMO_KEYS.items():
        cv2.imwrite(str(path), cv2.cvtColor(paint(frames[index]), cv2.COLOR_RGB2BGR))
    names = ", ".join(path.name for path in DEMO_KEYS.values())
    print(f"wrote {DEMO_VIDEO} ({count} frames at {reader.fps:g} fps) and {names}")


if __name__ == "__main__":
    main()
