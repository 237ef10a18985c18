"""Decoding and sampling of clips: video files, frame folders, GIFs and images, all as uint8 RGB frames."""

from vlm.video.backends import BACKENDS, Backend, register_backend
from vlm.video.clip import Clip, VideoInfo
from vlm.video.decode import VideoReader, choose_backend, probe_video, read_clip, read_frames
from vlm.video.encode import write_video
from vlm.video.errors import VideoDecodeError
from vlm.video.sampling import POLICIES, SamplingPolicy, SamplingRequest, register_policy, sample_indices
