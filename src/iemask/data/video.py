"""Reading and writing video with PyAV (FFmpeg's libraries): frames stream one at a time, so memory stays flat.

:class:`VideoReader` decodes a file's first video stream into RGB uint8 (3, H, W) tensors with their
timestamps; :class:`VideoWriter` encodes such tensors into an MP4 file as they come, on the reader's
time base, so a written clip keeps the timing of the one it was made from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# Encoders tried when none is named, best first: H.264 (libx264, in PyAV's wheels), else MPEG-4 part 2
# (FFmpeg's own, always built in).
ENCODERS = ("libx264", "mpeg4")
FALLBACK_FPS = 25  # a stream that states no frame rate at all


class VideoDecodeError(ValueError):
    """A video file cannot be opened or decoded, or has no video stream; the message names it."""


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video file (by its suffix, one of :data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _unreadable(path: Path, what: str) -> VideoDecodeError:
    return VideoDecodeError(
        f"cannot read video {path}: {what}; check that it plays (`ffprobe {path}`), or re-encode it "
        f"(`ffmpeg -i {path} fixed.mp4`) and give that as input"
    )


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its position in the stream (from 0), timestamp and pixels."""

    index: int
    pts: int  # presentation timestamp, in the stream's time base
    time_s: float  # the same in seconds
    image: torch.Tensor  # uint8 (3, H, W), RGB


class VideoReader:
    """The first video stream of a file, decoded frame by frame (a context manager).

    Attributes:
        fps: the stream's average frame rate (its guessed one, else :data:`FALLBACK_FPS` with a warning).
        time_base: the unit of the frames' timestamps, in seconds.
        width, height: the frame size in pixels.
        frame_count: the number of frames the container states (0 when it does not say).

    Raises:
        VideoDecodeError: the file cannot be opened as a video or has no video stream.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video not found: {self.path} (give an existing video file as input)")
        try:
            self._container = av.open(str(self.path))
        except av.FFmpegError as e:
            raise _unreadable(self.path, str(e)) from e
        if not self._container.streams.video:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            self._container.close()
            raise VideoDecodeError(
                f"{self.path} has no video stream (streams: {', '.join(kinds)}); give a file with video in it "
                "as input, or images"
            )
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"  # FFmpeg decodes on its own threads
        rate = self._stream.average_rate or self._stream.guessed_rate
        if not rate:
            log.warning("%s states no frame rate; assuming %d fps", self.path, FALLBACK_FPS)
        self.fps: Fraction = Fraction(rate or FALLBACK_FPS)
        self.time_base: Fraction = self._stream.time_base or 1 / self.fps
        self.width: int = self._stream.codec_context.width
        self.height: int = self._stream.codec_context.height
        self.frame_count: int = self._stream.frames

    def frames(self, every_n_frames: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
        """Every ``every_n_frames``-th frame from the first, at most ``max_frames`` of them (``None``: all).

        Frames are decoded one at a time; only those yielded are converted to tensors.

        Raises:
            ValueError: a stride below 1 or a non-positive ``max_frames`` (at once, not at the first frame).
            VideoDecodeError: decoding fails part-way (the frames before were yielded).
        """
        if every_n_frames < 1:
            raise ValueError(f"every_n_frames={every_n_frames}: predict every n-th frame, n >= 1")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames={max_frames}: give a positive number, or null for all frames")
        return self._decode(every_n_frames, max_frames)

    def _decode(self, every_n_frames: int, max_frames: int | None) -> Iterator[Frame]:
        taken, index = 0, -1
        try:
            for index, frame in enumerate(self._container.decode(self._stream)):
                if index % every_n_frames:
                    continue
                pts = frame.pts if frame.pts is not None else round(index / self.fps / self.time_base)
                image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # (3, H, W)
                yield Frame(index, pts, float(pts * self.time_base), image)
                taken += 1
                if taken == max_frames:
                    return
        except av.FFmpegError as e:
            raise _unreadable(self.path, f"decoding failed after frame {index} ({e})") from e

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pick_encoder(name: str | None = None) -> str:
    """The encoder ``name`` if PyAV's FFmpeg has it, else (``None``) the first of :data:`ENCODERS` it has."""
    if name is not None:
        try:
            av.codec.Codec(name, "w")
        except av.codec.codec.UnknownCodecError:
            raise ValueError(
                f"video.codec={name}: not an encoder of PyAV's FFmpeg; give one of "
                f"{', '.join(e for e in ENCODERS if e in av.codecs_available)}, or null for the best available"
            ) from None
        return name
    for encoder in ENCODERS:
        if encoder in av.codecs_available:
            return encoder
    raise RuntimeError(f"PyAV's FFmpeg has none of the encoders {', '.join(ENCODERS)}; reinstall PyAV (`av`)")


class VideoWriter:
    """An MP4 file written frame by frame (a context manager: closing flushes the encoder and finishes the file).

    Frames keep the timestamps they are given, to the nearest 1/``fps`` s (the encoder's time base, as in
    FFmpeg's own default), so every n-th frame of a clip plays at the clip's speed; a timestamp that does
    not increase on that grid moves on by one step. The file's stream is on ``time_base`` where the muxer
    accepts it (MP4 may choose a finer one: the times are the same). The pixels are
    yuv420p, which needs an even width and height: an odd-sized frame gets its last row or column repeated.

    Args:
        path: the .mp4 file to write.
        fps: the frame rate.
        time_base: the unit of the timestamps given to :meth:`write`, in seconds.
        codec: an FFmpeg encoder name; ``None``: :func:`pick_encoder`'s choice.
        options: FFmpeg options of the encoder, e.g. ``{"crf": "18"}`` for libx264.
    """

    def __init__(
        self,
        path: str | Path,
        fps: Fraction,
        time_base: Fraction,
        codec: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.codec = pick_encoder(codec)
        self._fps, self._time_base = fps, time_base
        self._options = {str(k): str(v) for k, v in (options or {}).items()}
        self._container = av.open(str(self.path), "w")
        self._stream: av.VideoStream | None = None  # made at the first frame, which gives the size
        self._last_step: int | None = None  # the last frame's timestamp, in 1/fps steps
        self.frames_written = 0

    def write(self, image: torch.Tensor, pts: int) -> None:
        """Encode a uint8 (3, H, W) RGB frame shown at ``pts`` (time-base units, increasing)."""
        array = image.permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
        height, width = array.shape[:2]
        array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream(self.codec, rate=self._fps, options=self._options)
            self._stream.width, self._stream.height = array.shape[1], array.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = 1 / self._fps
            self._stream.time_base = self._time_base
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
        if (frame.width, frame.height) != (self._stream.width, self._stream.height):
            frame = frame.reformat(width=self._stream.width, height=self._stream.height)
        step = round(pts * self._time_base * self._fps)  # encoders refuse timestamps that do not increase
        self._last_step = step if self._last_step is None else max(step, self._last_step + 1)
        frame.pts, frame.time_base = self._last_step, 1 / self._fps
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (an MP4 is playable only once closed); no frames, no file."""
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        self._container.close()
        if self._stream is None:  # no frame came: no video, rather than an empty file
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
