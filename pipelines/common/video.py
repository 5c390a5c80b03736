"""Writing video (H.264 MP4s of contact sheets and generated grids, and the synthetic sources of tests and
benchmarks), and PyAV itself, imported on first use. Reading sources stays with the pseudo-4D job
(pipelines/video_io.py); writing is here because the picture helpers of every job need it."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np


class _LazyAV:
    """PyAV, imported on first use: procedural videos with ``procedural.codec=none`` never touch a codec, so
    the pseudo-4D job runs where PyAV (tens of MB of FFmpeg) is not installed, e.g. a GPU node's image."""

    def __getattr__(self, name: str):
        try:
            import av as module
        except ImportError as exc:
            from pipelines.common.errors import UserError
            raise UserError("reading or writing video needs PyAV ('pip install av'); procedural input with "
                            "--procedural.codec none needs no codec") from exc
        return getattr(module, name)


av = _LazyAV()

def encode_video(target: str | Path | BinaryIO, frames: np.ndarray, fps: float, codec: str = "libx264",
                 crf: int = 18, container_format: str | None = None, display_rotation: int = 0) -> None:
    """Write uint8 [T, H, W, 3] frames as a video (tests, benchmarks, synthetic sources).

    H.264 needs even sizes; odd sizes are padded by one edge pixel. ``display_rotation``
    (degrees counter-clockwise) tags the stream the way phones tag portrait video.
    """
    T, H, W, _ = frames.shape
    if codec in ("libx264", "h264", "mpeg4", "libvpx", "libvpx-vp9") and (H % 2 or W % 2):
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
        T, H, W, _ = frames.shape
    fmt = container_format
    if fmt is None and not isinstance(target, (str, Path)):
        fmt = "mp4"
    with av.open(str(target) if isinstance(target, Path) else target, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = W, H
        if display_rotation:
            stream.set_display_rotation(display_rotation)
        if codec in ("libx264", "h264"):
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        elif codec == "ffv1":
            stream.pix_fmt = "yuv444p"
        else:
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 8_000_000
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def encode_video_bytes(frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18) -> bytes:
    buf = io.BytesIO()
    encode_video(buf, frames, fps, codec=codec, crf=crf, container_format="mp4")
    return buf.getvalue()
