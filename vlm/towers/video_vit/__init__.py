"""`video_vit`: video transformers from the literature, written here, as one tower family.

    build_tower("video_vit", attention="divided", depth=12, width=768, heads=12, patch_size=16, tubelet=2,
                image_size=224, num_frames=16, pos_embed="factorized")
    build_tower("video_vit", checkpoint="runs/videomae/encoder")        # e.g. after VideoMAE pretraining

Pixels [B, T, 3, H, W] are cut into tubelets of `tubelet` frames x `patch_size`^2 pixels by a Conv3d (ViViT's
tubelet embedding), learned positions are added (factorised time + space, or one joint table; interpolated to
the input's grid), and `depth` blocks of one attention mode follow:

| attention               | what a token attends to                                    | from                        |
|-------------------------|------------------------------------------------------------|-----------------------------|
| joint                   | every token of the clip                                    | ViViT model 1 (Arnab et al. 2021) |
| factorized_encoder      | spatial encoder per time step, then a temporal encoder     | ViViT model 2               |
|                         | over frame tokens (output: see VideoViT's docstring)       |                             |
| divided                 | the T tokens at its position, then the N tokens of its     | TimeSformer (Bertasius et   |
|                         | time step (two attentions per block)                       | al. 2021) = ViViT model 3   |
| factorized_dot_product  | half the heads: its time step; half: its position          | ViViT model 4               |
| window                  | its 3D window (shifted every second block), relative bias  | Video Swin (Liu et al. 2022)|
| pooling                 | keys/values pooled by a stride (queries optionally)        | MViT (Fan et al. 2021)      |

Simplifications (documented in docs/VIDEO_TRANSFORMERS.md): no CLS token (tokens are mean-pooled by heads);
Video Swin is a single isotropic stage (no patch merging); MViT keeps its width when queries are pooled and
uses absolute positions (no relative ones); TimeSformer's temporal attention has no extra zero-init fc.
"""

from vlm.towers.video_vit.config import ATTENTION_MODES, POS_EMBEDS, VideoViTConfig
from vlm.towers.video_vit.encoder import MAE_MASKINGS, VideoViT, load_encoder, read_encoder_config, save_encoder
from vlm.towers.video_vit.tower import VideoViTTower
