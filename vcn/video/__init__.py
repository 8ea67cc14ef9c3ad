"""Video probing and streaming decoding (PyAV)."""

from vcn.video.decode import DecodedFrame, DecodeReport, VideoReader, scaled_size
from vcn.video.probe import MAX_PIXELS, VideoInfo, probe_video

__all__ = ["DecodedFrame", "DecodeReport", "VideoReader", "VideoInfo", "probe_video", "scaled_size", "MAX_PIXELS"]
