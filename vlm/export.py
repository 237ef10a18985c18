"""`vlm export`: a saved VideoLLM as a transformers LLaVA-NeXT-Video model folder.

    vlm export runs/my_model/final --to llava_next_video --out exported/
    model = transformers.LlavaNextVideoForConditionalGeneration.from_pretrained("exported/")

What can be exported is what `LlavaNextVideoForConditionalGeneration` computes: a CLIP or SigLIP vision model at
its native resolution, one hidden layer tapped (CLS dropped, or kept with `select: cls_patch`), 2x2 average
pooling of each frame's patch grid, LLaVA's two-layer GELU projector, and any causal LM (LoRA merged). Anything
else is refused with the reason, before any file is written: our other towers and connectors, token reducers,
output normalisation, time stamps between frames, and LLaVA-OneVision, whose video path appends a learned newline
embedding after the frames and pools by bilinear interpolation, neither of which a model here has.

The folder holds the model (the LLM's vocabulary grows by `<image>` and `<video>`; generation never emits them),
the tokenizer with a chat template that places the video as ours does and opens with our system prompt, and the
processor configuration (LlavaNextVideoProcessor; its video processor needs torchvision).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TARGETS = ("llava_next_video", "llava_onevision")
_SPECIAL = ("<image>", "<video>")


class ExportError(ValueError):
    """The model cannot be expressed by the target class; the message says why."""


def check_exportable(model: Any, target: str) -> None:
    """Raise ExportError naming every part that `target` cannot express."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}")
    hint = "; load it with vlm.model.VideoLLM.from_pretrained instead"
    if target == "llava_onevision":
        raise ExportError("llava_onevision: its video path appends a learned newline embedding after the frames and "
                          "pools by bilinear interpolation, which no model here has, so the exported model could not "
                          "reproduce this one; export --to llava_next_video" + hint)
    cfg = model.config
    faults = []
    tower, conn = cfg.tower, dict(cfg.connector)
    if tower.get("name") not in ("clip", "siglip"):
        faults.append(f"tower {tower.get('name')!r}: LLaVA-NeXT-Video's vision tower is a CLIP or SigLIP vision model")
    elif model.tower.preprocessor.hw != (model.tower.native_image_size,) * 2:
        faults.append(f"tower at {model.tower.preprocessor.hw} px: LLaVA-NeXT-Video runs the vision model at its native "
                      f"{model.tower.native_image_size} px (no position interpolation)")
    elif model.tower.preprocessor.mode == "pad":
        faults.append("preprocess_mode 'pad': LLaVA-NeXT-Video's video processor resizes and crops, it does not pad")
    if conn.get("name") != "mlp":
        faults.append(f"connector {conn.get('name')!r}: LLaVA-NeXT-Video's projector is LLaVA's MLP")
    else:
        if conn.get("projector", "mlp2x_gelu") != "mlp2x_gelu":
            faults.append(f"projector {conn.get('projector')!r}: LLaVA-NeXT-Video's is mlp2x_gelu")
        if conn.get("pool", 1) != 2:
            faults.append(f"pool {conn.get('pool', 1)}: LlavaNextVideoProcessor counts tokens for 2x2 pooling")
        if tower.get("select") == "cls_patch":
            faults.append("select 'cls_patch': pooling needs the square patch grid")
    if conn.get("reducers"):
        faults.append("token reducers: LLaVA-NeXT-Video has none")
    if conn.get("output_norm", "none") != "none":
        faults.append(f"output_norm {conn['output_norm']!r}: LLaVA-NeXT-Video's projector output is not normalised")
    if cfg.time_stamps:
        faults.append("time_stamps: LLaVA-NeXT-Video places one block of video tokens, without text between frames")
    if faults:
        raise ExportError(f"{target} cannot express this model: " + "; ".join(faults) + hint)


def _chat_template(llm_template: str, system_prompt: str | None) -> str:
    """The LLM's template behind a preamble that turns OpenAI/HF content lists into our text form: the video
    (or image) as `<video>\\n` before the text, and our system prompt when the conversation has none."""
    system = "" if not system_prompt else (
        "{%- if messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', 'content': "
        + json.dumps(system_prompt) + "}] + messages -%}{%- endif -%}")
    return ("{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
            "{%- set text = m['content'] -%}{%- else -%}{%- set t = namespace(s='') -%}{%- for c in m['content'] -%}"
            "{%- if c['type'] == 'video' -%}{%- set t.s = t.s + '<video>\\n' -%}{%- elif c['type'] == 'image' -%}"
            "{%- set t.s = t.s + '<image>\\n' -%}{%- elif c['type'] == 'text' -%}{%- set t.s = t.s + c['text'] -%}"
            "{%- endif -%}{%- endfor -%}{%- set text = t.s -%}{%- endif -%}"
            "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text}] -%}{%- endfor -%}"
            "{%- set messages = ns.msgs -%}" + system + llm_template)


def _processor_files(model: Any, out: Path, patch: int) -> None:
    pre = model.tower.preprocessor
    h, w = pre.hw
    if pre.mode == "squash":
        size, crop = {"height": h, "width": w}, False
    else:
        size, crop = {"shortest_edge": min(h, w)}, True
    common = {"do_resize": True, "size": size, "do_center_crop": crop, "crop_size": {"height": h, "width": w},
              "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True,
              "processor_class": "LlavaNextVideoProcessor"}
    files = {
        "video_preprocessor_config.json": {"video_processor_type": "LlavaNextVideoVideoProcessor", **common},
        "preprocessor_config.json": {"image_processor_type": "LlavaNextImageProcessor", **common,
                                     "image_grid_pinpoints": [[h, w]], "do_pad": True},
        "processor_config.json": {"processor_class": "LlavaNextVideoProcessor", "patch_size": patch,
                                  "vision_feature_select_strategy": "default" if model.tower.has_cls else "full",
                                  "num_additional_image_tokens": int(model.tower.has_cls),
                                  "video_token": "<video>", "image_token": "<image>"},
    }
    for name, body in files.items():
        (out / name).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def export(folder: str | os.PathLike, target: str, out: str | os.PathLike) -> Path:
    """Write `target`'s folder for the VideoLLM saved in `folder` to `out`; returns `out`."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from vlm.chat.generation import stop_ids
    from vlm.model import VideoLLM

    model = VideoLLM.from_pretrained(folder, device="cpu", dtype="float32", merge_lora=True)  # LoRA in the weights
    check_exportable(model, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = model.processor.tokenizer
    llm = model.llm
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL)})
    llm.resize_token_embeddings(len(tokenizer))
    image_id, video_id = tokenizer.convert_tokens_to_ids(list(_SPECIAL))
    tower = model.tower
    config = LlavaNextVideoConfig(
        vision_config=tower.model.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=image_id, video_token_index=video_id, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if tower.has_cls else "full",
        vision_feature_layer=tower.layer_index, spatial_pool_mode="average", spatial_pool_stride=2,
        image_grid_pinpoints=[list(tower.preprocessor.hw)], tie_word_embeddings=bool(llm.config.tie_word_embeddings),
        image_seq_length=(tower.preprocessor.hw[0] // tower.patch_size) ** 2 + int(tower.has_cls),
        video_seq_length=model.num_visual_tokens(model.config.num_frames))
    hf = LlavaNextVideoForConditionalGeneration(config).eval()
    _load(hf.model.vision_tower, tower.model.state_dict(), allowed_missing=("post_layernorm", "head"))
    projector = model.connector.projector
    _load(hf.model.multi_modal_projector, {"linear_1.weight": projector[0].weight, "linear_1.bias": projector[0].bias,
                                            "linear_2.weight": projector[2].weight, "linear_2.bias": projector[2].bias})
    _load(hf.model.language_model, llm.get_decoder().state_dict())
    _load(hf.lm_head, llm.get_output_embeddings().state_dict())
    if config.tie_word_embeddings:
        hf.tie_weights()
    gen = hf.generation_config
    gen.eos_token_id = sorted(stop_ids(tokenizer, llm)) or None
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.suppress_tokens = [image_id, video_id]
    hf.save_pretrained(out)
    tokenizer.chat_template = _chat_template(tokenizer.chat_template or "", model.config.system_prompt)
    tokenizer.save_pretrained(out)
    _processor_files(model, out, tower.patch_size)
    (out / "vlm_export.json").write_text(json.dumps({"source": str(folder), "target": target,
                                                     "num_frames": model.config.num_frames}, indent=2) + "\n")
    return out


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...] = ()) -> None:
    """Copy `state` into `module`, refusing unexpected keys and missing ones outside `allowed_missing`."""
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not any(part in k for part in allowed_missing)]
    if missing or result.unexpected_keys:
        raise ExportError(f"export: weights do not line up with {type(module).__name__} (missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]})")
