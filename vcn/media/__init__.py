"""Media in: probing and decoding a movie's video (PyAV), its shots and its frame index.

``VideoReader`` streams decoded frames without holding the movie in memory
(parallel over key-frame segments on larger machines); ``shots`` cuts the movie
into shots (PySceneDetect); ``frames`` numbers every frame and picks those the
face detector sees.
"""

from vcn.media.decode import DecodedFrame, DecodeReport, VideoReader, scaled_size
from vcn.media.probe import MAX_PIXELS, VideoInfo, probe_video

__all__ = ["DecodedFrame", "DecodeReport", "VideoReader", "VideoInfo", "probe_video", "scaled_size", "MAX_PIXELS"]
