"""Short video clips made from real photographs, for tests and checks that need videos without downloading any.

:func:`photo_frames` cuts frames from one of scikit-image's sample photographs (``skimage.data``: astronaut, coffee,
chelsea, rocket, ...) as a window panning along its diagonal; :func:`write_clip` encodes frames with PyAV into an MP4
file with a real codec (H.264 through ``libx264``, or MPEG-4 Part 2 through ``mpeg4``).

Usage: ``python examples/clips.py NAME OUT.mp4 [--frames 8] [--fps 4] [--size 56]`` writes one clip.
"""

from __future__ import annotations

import argparse
import os


def photo_frames(name: str, count: int = 4, size: int = 56) -> list:
    """`count` RGB PIL frames of `size`x`size` pixels from the scikit-image photograph `name`: a window of half the
    photograph's shorter side, moving from its top-left corner along the diagonal."""
    import skimage.data
    from PIL import Image

    pixels = getattr(skimage.data, name)()
    height, width = pixels.shape[:2]
    window = min(height, width) // 2
    frames = []
    for index in range(count):
        top, left = index * (height - window) // count, index * (width - window) // count
        crop = Image.fromarray(pixels[top:top + window, left:left + window]).convert("RGB")
        frames.append(crop.resize((size, size), Image.BICUBIC))
    return frames


def write_clip(path: str | os.PathLike, frames: list, fps: int = 4, codec: str = "libx264") -> str | os.PathLike:
    """Encodes PIL frames (all of one even size) at `fps` frames per second into the MP4 file `path`; returns `path`."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a scikit-image sample photograph (skimage.data), e.g. astronaut")
    parser.add_argument("out")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--codec", default="libx264")
    args = parser.parse_args()
    print(write_clip(args.out, photo_frames(args.name, args.frames, args.size), args.fps, args.codec))


if __name__ == "__main__":
    main()
