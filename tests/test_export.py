"""`vlm export --to llava_next_video`: transformers' own class reproduces our logits and greedy answers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.data.conversation import PLACEHOLDERS, Turn
from vlm.export import ExportError, check_exportable, export
from vlm.llm.template import VISUAL_TOKEN
from vlm.model import VideoLLM
from vlm.video import read_clip
from vlm.video.encode import write_video


def _model(tower: str = "clip", **connector) -> VideoLLM:
    torch.manual_seed(0)
    return VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS[tower]), "llm": copy.deepcopy(TINY_LLM),
                                 "connector": {"name": "mlp", "pool": 2, **connector}, "num_frames": 4,
                                 "system_prompt": "You describe videos."})


@pytest.fixture(scope="module", params=["clip", "siglip"])
def exported(request, tmp_path_factory):
    """A tiny model with trained-looking LoRA (random B), saved, exported; and a clip."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    model = _model(request.param)
    model.set_mode("llm", "lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA that changes the outputs: merging must carry it
    saved = model.save_pretrained(root / "model")
    write_video(root / "clip.mp4", np.random.default_rng(0).integers(0, 255, (8, 40, 40, 3), dtype=np.uint8), fps=4.0)
    return saved, export(saved, "llava_next_video", root / "hf"), root / "clip.mp4"


def _ours(folder, video, question):
    """Our model's prompt ids (visual slot = VISUAL_TOKEN), pixels and next-token logits for every position."""
    model = VideoLLM.from_pretrained(folder).eval()
    proc = model.processor
    clip = read_clip(video, model.config.num_frames)
    pixels, stamps = proc.preprocess_clip(clip)
    turns = [Turn("user", f"{PLACEHOLDERS['video']}\n{question}")]
    ids = proc.template.encode_prompt(turns, "video", proc.visual_slot(pixels.shape[0], stamps.tolist()), where="chat")
    with torch.no_grad():
        visual = model.encode_visual([pixels], [stamps]).embeds[0]
        logits, _ = model.prefill(model.splice(torch.as_tensor([ids]), visual), logits_to_keep=0)
    return model, ids, pixels, logits[0]


def test_logits_and_greedy_answer_equal_ours(exported):
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    saved, out, video = exported
    model, ids, pixels, ours = _ours(saved, video, "What happens in the video?")
    hf = LlavaNextVideoForConditionalGeneration.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    video_id = hf.config.video_token_index
    hf_ids = torch.as_tensor([[video_id if i == VISUAL_TOKEN else i for i in ids]])
    # the exported tokenizer and chat template write the same prompt from an HF-style conversation
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                 {"type": "text", "text": "What happens in the video?"}]}],
                                   tokenize=False, add_generation_prompt=True)
    text = text.replace("<video>", "<video>" * ids.count(VISUAL_TOKEN))
    assert tok(text, add_special_tokens=False)["input_ids"] == hf_ids[0].tolist()
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values_videos=pixels[None]).logits[0]
    vocab = ours.shape[-1]
    assert theirs.shape[-1] == vocab + 2  # <image>, <video> added
    torch.testing.assert_close(theirs[:, :vocab], ours, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        generated = hf.generate(input_ids=hf_ids, pixel_values_videos=pixels[None], max_new_tokens=6, do_sample=False)
    answer = tok.decode(generated[0, hf_ids.shape[1]:], skip_special_tokens=True).strip()
    from vlm.chat import VideoChat

    chat = VideoChat(model, max_new_tokens=6)
    chat.load_video(video)
    assert answer == chat.ask("What happens in the video?")


def test_folder_holds_the_processor_configuration(exported):
    _, out, _ = exported
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextVideoProcessor" and processor["video_token"] == "<video>"
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video["crop_size"] == {"height": 32, "width": 32}
    try:
        from transformers import LlavaNextVideoProcessor

        loaded = LlavaNextVideoProcessor.from_pretrained(out)
    except ImportError as e:  # its video processor needs torchvision, which this machine cannot install
        pytest.skip(f"LlavaNextVideoProcessor cannot load here: {e}")
    assert loaded.video_token == "<video>"


@pytest.mark.parametrize("change,words", [
    (dict(tower="efficientnet_lite0"), "CLIP or SigLIP"),
    (dict(pool=1), "2x2 pooling"),
    (dict(output_norm="standardize"), "not normalised"),
    (dict(projector="linear"), "mlp2x_gelu"),
])
def test_refused_configurations_say_why(change, words):
    model = _model(**change)
    with pytest.raises(ExportError, match=words) as err:
        check_exportable(model, "llava_next_video")
    assert "VideoLLM.from_pretrained" in str(err.value)


def test_stc_and_onevision_are_refused(tmp_path):
    torch.manual_seed(0)
    stc = VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                                "connector": {"name": "stc", "downsample": [1, 2, 2]}, "num_frames": 4})
    with pytest.raises(ExportError, match="connector 'stc'"):
        check_exportable(stc, "llava_next_video")
    with pytest.raises(ExportError, match="newline"):
        check_exportable(_model(), "llava_onevision")
    saved = stc.save_pretrained(tmp_path / "stc")
    with pytest.raises(ExportError):
        export(saved, "llava_next_video", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any file is written


def test_command_line(exported, tmp_path):
    """`vlm export` writes the folder; a refused model is one line on stderr and exit code 2."""
    from vlm.cli import main

    saved, _, _ = exported
    assert main(["export", str(saved), "--to", "llava_next_video", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", str(saved), "--to", "llava_onevision", "--out", str(tmp_path / "ov")]) == 2
