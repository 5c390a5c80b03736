"""Video decoding (and test-video encoding) through PyAV.

``VideoSource`` opens a file, a byte string (a WebDataset member, an in-memory
synthetic video) or a slice of a tar file, reports what the stream claims
(size, fps, frame count) and decodes a strided run of frames straight to the
working resolution: swscale resizes each kept frame during the RGB conversion,
so a 1080p source never exists as a full-size RGB array.

Every failure to open or decode raises ``ItemError("decode", ...)`` with the
library's message, so the job records it and goes on.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import numpy as np

from pipelines.common.errors import ItemError
from pipelines.common.video import av


VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")


class _TarSlice(io.RawIOBase):
    """A read-only, seekable window onto ``size`` bytes at ``offset`` of a file (a tar member)."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        self._fh = open(path, "rb")
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + pos), self._size)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        self._fh.seek(self._offset + self._pos)
        got = self._fh.readinto(memoryview(buf)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()
        super().close()


def open_input(path: str | None = None, data: bytes | None = None, tar: tuple[str, int, int] | None = None
               ) -> str | BinaryIO:
    """What ``av.open`` should read: a path, an in-memory byte string, or a tar member slice."""
    if data is not None:
        return io.BytesIO(data)
    if tar is not None:
        return io.BufferedReader(_TarSlice(*tar), buffer_size=1 << 20)
    if path is None:
        raise ValueError("open_input needs a path, data or tar slice")
    return path


@dataclass
class StreamInfo:
    width: int
    height: int
    fps: float
    frames: int
    """Frame count the container claims (or duration x fps); 0 when it says nothing."""


class VideoSource:
    """One video stream, opened once; ``read`` decodes a strided clip at a chosen size."""

    def __init__(self, src: str | BinaryIO, threads: int = 1) -> None:
        self._src = src
        self._threads = threads
        self._container = self._open()
        self._used = False
        self.frames_to_end: int | None = None
        """Frames a decode from the top found before the stream ended; None until one reached the end."""
        stream = self._container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not (fps > 0 and math.isfinite(fps)):
            raise ItemError("decode", "video stream reports no frame rate")
        frames = int(stream.frames or 0)
        if frames <= 0:
            if stream.duration is not None and stream.time_base is not None:
                frames = int(float(stream.duration * stream.time_base) * fps)
            elif self._container.duration:
                frames = int(self._container.duration / av.time_base * fps)
        if ctx.width <= 0 or ctx.height <= 0:
            raise ItemError("decode", f"video stream has no frame size ({ctx.width}x{ctx.height})")
        # Phone videos are stored sideways with a display rotation; frames are turned upright on
        # conversion, so everything downstream (and info) sees the video as a player shows it.
        self._quarter_turns = self._peek_rotation() // 90 % 4
        w, h = (ctx.height, ctx.width) if self._quarter_turns % 2 else (ctx.width, ctx.height)
        self.info = StreamInfo(int(w), int(h), fps, max(0, frames))

    def _open(self):
        if hasattr(self._src, "seek"):
            self._src.seek(0)  # type: ignore[union-attr]
        try:
            container = av.open(self._src, mode="r")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise ItemError("decode", f"cannot open video: {exc}") from None
        if not container.streams.video:
            container.close()
            raise ItemError("decode", "file holds no video stream")
        stream = container.streams.video[0]
        stream.thread_count = self._threads
        stream.thread_type = "AUTO" if self._threads != 1 else "SLICE"
        return container

    def _peek_rotation(self) -> int:
        """Display rotation (degrees counter-clockwise, a multiple of 90) read from the first frame."""
        try:
            for frame in self._container.decode(self._container.streams.video[0]):
                self._used = True
                return int(round(frame.rotation / 90.0)) * 90
        except av.FFmpegError as exc:
            raise ItemError("decode", f"decoding failed: {exc}") from None
        raise ItemError("decode", "video stream has no decodable frames")

    def close(self) -> None:
        self._container.close()
        if hasattr(self._src, "close"):
            self._src.close()  # type: ignore[union-attr]

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _index(self, frame: av.VideoFrame, stream, counter: int) -> int:
        """Frame index from its timestamp (right after a seek) or, without timestamps, by counting."""
        if frame.pts is None or stream.time_base is None:
            return counter
        t0 = stream.start_time or 0
        return int(round(float((frame.pts - t0) * stream.time_base) * self.info.fps))

    def read(self, start: int, count: int, stride: int, size: tuple[int, int],
             box: tuple[int, int, int, int]) -> tuple[np.ndarray, list[int]]:
        """Decode frames ``start, start+stride, ...`` (``count`` of them) as uint8 [T, h, w, 3].

        Each kept frame is resized to ``size`` (w, h) and cropped to ``box``
        (x0, y0, x1, y1). Returns the frames and their indices. Raises
        ItemError("short") when the stream ends early, telling how many frames it had.
        """
        wanted = [start + k * stride for k in range(count)]
        got: dict[int, np.ndarray] = {}
        decoded = self._decode_into(wanted, got, size, box, seek=start > 0)
        if len(got) < count and start > 0:
            # The seek missed (sparse keyframes, odd timestamps): decode from the top, counting frames.
            got.clear()
            decoded = self._decode_into(wanted, got, size, box, seek=False)
        if len(got) < count:
            raise ItemError("short", f"video ended after {decoded} decoded frames; the clip needs frames "
                                     f"{wanted[0]}..{wanted[-1]}")
        return np.stack([got[i] for i in wanted]), wanted

    def _decode_into(self, wanted: list[int], got: dict[int, np.ndarray], size: tuple[int, int],
                     box: tuple[int, int, int, int], seek: bool) -> int:
        container = self._container
        stream = container.streams.video[0]
        want = set(wanted)
        last = wanted[-1]
        x0, y0, x1, y1 = box
        try:
            if self._used and not seek:
                # A decode from the top needs a fresh demuxer: seeking back to 0 is unreliable in some
                # formats. A seek (which flushes the decoder) can reuse the open one.
                self._container.close()
                self._container = container = self._open()
                stream = container.streams.video[0]
            self._used = True
            if seek:
                t = Fraction(wanted[0]) / Fraction(self.info.fps).limit_denominator(100000)
                target = int((t / stream.time_base) + (stream.start_time or 0))
                container.seek(target, stream=stream, backward=True, any_frame=False)
            counter = 0
            for frame in container.decode(stream):
                idx = self._index(frame, stream, counter) if seek else counter
                counter += 1
                if idx in want and idx not in got:
                    if self._quarter_turns % 2:
                        rgb = frame.to_ndarray(width=size[1], height=size[0], format="rgb24", interpolation="AREA")
                    else:
                        rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
                    if self._quarter_turns:
                        rgb = np.rot90(rgb, self._quarter_turns)
                    got[idx] = np.ascontiguousarray(rgb[y0:y1, x0:x1])
                if idx >= last:
                    break
            else:
                if not seek:
                    self.frames_to_end = counter
            return counter
        except av.FFmpegError as exc:
            raise ItemError("decode", f"decoding failed: {exc}") from None
