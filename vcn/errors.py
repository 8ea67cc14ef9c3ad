"""Errors the platform raises on bad input.

Each names the offending file and what is wrong with it, so that a user who
drops a bad file in the inbox reads the reason in the run log instead of a
stack trace from FFmpeg.
"""

from __future__ import annotations


class VcnError(Exception):
    """Base class of every error the platform raises on purpose."""


class VideoError(VcnError):
    """A video file cannot be processed."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class VideoNotFoundError(VideoError):
    """The path does not exist or is not a regular file."""


class NotAVideoError(VideoError):
    """The file is not a media container FFmpeg can open."""


class NoVideoStreamError(VideoError):
    """The container opens but holds no video stream (for example audio only)."""


class UnsupportedCodecError(VideoError):
    """The video stream's codec is unknown, or FFmpeg has no decoder for it."""


class EmptyVideoError(VideoError):
    """The container has a video stream but no decodable frame."""


class CorruptVideoError(VideoError):
    """The stream is damaged beyond what the decoder can skip."""


class VideoTooLargeError(VideoError):
    """The frame size exceeds what the platform accepts."""
