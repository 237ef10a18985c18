"""Vision towers: pixels [B, T, 3, H, W] -> VisualFeatures(tokens [B, T', N, D]).

Importing this package registers the built-in families:
  clip, siglip, videomae   (transformers; vlm/towers/hf.py)
  efficientnet_lite0       (the packaged ImageNet weights; vlm/towers/efficientnet.py)
  open_clip                (optional extra; open_clip is imported only when the tower is built)
  video_vit                (our ViViT / TimeSformer / Video Swin / MViT attention modes; vlm/towers/video_vit/)
  patches                  (no encoder: raw pixel patches through one linear map, Fuyu's way; vlm/towers/patches.py)
"""

from vlm.towers.base import TOWERS, VisionTower, VisualFeatures, build_tower, register_tower
from vlm.towers.efficientnet import EfficientNetLite0Tower
from vlm.towers.hf import CLIPTower, SigLIPTower, VideoMAETower
from vlm.towers.open_clip import OpenCLIPTower
from vlm.towers.patches import PatchTower
from vlm.towers.video_vit import VideoViTTower
