"""VideoLLMProcessor: saved and loaded with the model (and alone), old folders without one, and the model's
video-to-LLM path (splice, pruned positions, KV-cache prefill + extend) that chat, scoring and training share."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.data.conversation import Turn
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN
from vlm.model import VideoLLM
from vlm.processor import CONFIG_NAME, VideoLLMProcessor, drop_pruned
from vlm.video import Clip
from vlm.weights import CheckpointMismatchError

CONVERSATION = [Turn("user", "<video>\nWhat happens?"), Turn("assistant", "A red circle moves left.")]


def tiny(**extra) -> VideoLLM:
    torch.manual_seed(0)
    return VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": {"name": "mlp"},
                                 "llm": copy.deepcopy(TINY_LLM), "num_frames": 4, **extra}).eval()


def clip(seed: int = 0, frames: int = 4) -> Clip:
    video = np.random.default_rng(seed).integers(0, 255, (frames, 40, 48, 3), dtype=np.uint8)
    return Clip(video, np.arange(frames) * 0.5, np.arange(frames), "synthetic", 2.0, frames)


def samples(processor: VideoLLMProcessor) -> list[dict]:
    return [processor.make_sample(CONVERSATION, clip(0), sample_id="a"),
            processor.make_sample([Turn("user", "Hi"), Turn("assistant", "Hello.")], sample_id="t")]


def assert_same_batch(a, b) -> None:
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(torch.equal(x, y) for x, y in zip(a.pixel_values + a.timestamps, b.pixel_values + b.timestamps))


def test_preprocess_clip_is_the_towers_preprocessing_with_timestamps():
    model = tiny()
    c = clip(1)
    pixels, stamps = model.processor.preprocess_clip(c)
    assert torch.equal(pixels, model.tower.preprocessor(c.frames)) and pixels.shape == (4, 3, 32, 32)
    assert stamps.dtype == torch.float32 and stamps.tolist() == [0.0, 0.5, 1.0, 1.5]
    bare, zeros = model.tower.preprocessor.clip(c.frames)  # bare frames: no timestamps known
    assert torch.equal(bare, pixels) and zeros.tolist() == [0.0] * 4


def test_distinct_frames_reads_a_repeated_frame_once_in_evaluation_training_and_saved_models(tmp_path):
    from vlm.train.engine import VisualLoader
    from vlm.train.feature_cache import clip_key

    frames = np.random.default_rng(3).integers(0, 255, (3, 40, 48, 3), dtype=np.uint8)
    window = Clip(frames[[0, 0, 1, 1, 1, 2]], np.array([0, 0, 0.5, 0.5, 0.5, 1.0]), np.array([4, 4, 5, 5, 5, 6]),
                  "synthetic", 2.0, 8)  # six samples of a three-frame window
    once = window.distinct()
    assert once.indices.tolist() == [4, 5, 6] and once.timestamps.tolist() == [0, 0.5, 1.0]
    assert np.array_equal(once.frames, frames) and len(clip(0).distinct()) == 4  # no repeat: the clip as it was
    model = tiny()
    assert model.processor.preprocess_clip(window)[0].shape[0] == 6  # off by default: MVBench's repeats kept
    model = tiny(distinct_frames=True)
    pixels, stamps = model.processor.preprocess_clip(window)
    assert torch.equal(pixels, model.tower.preprocessor(frames)) and stamps.tolist() == [0.0, 0.5, 1.0]
    loader = VisualLoader(model, 6, "uniform")  # training decodes clips as the processor reads them
    (video := tmp_path / "a.mp4").write_bytes(b"x")  # the feature cache keys a clip read once apart
    assert loader.distinct and clip_key(video, 6, "uniform", 0.5, 1.0, True) != clip_key(video, 6, "uniform", 0.5, 1.0)
    model.save_pretrained(tmp_path / "m")
    assert VideoLLM.from_pretrained(tmp_path / "m").processor.distinct_frames
    plain = tiny()
    plain.apply_settings({"distinct_frames": True})  # a setting: no weights change
    assert plain.config.distinct_frames and plain.processor.preprocess_clip(window)[0].shape[0] == 3


def test_save_load_round_trip_alone_and_with_the_model(tmp_path):
    model = tiny(time_stamps=True, system_prompt="Answer briefly.", max_length=512)
    processor = model.processor
    processor.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "tokenizer").is_dir()
    saved = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    assert (saved["system_prompt"], saved["max_length"], saved["time_stamps"]) == ("Answer briefly.", 512, True)
    again = VideoLLMProcessor.from_pretrained(tmp_path / "p", visual_grid=model.visual_grid)
    assert {k: v for k, v in again.to_dict().items()} == processor.to_dict()
    assert_same_batch(again.build_batch(samples(again)), processor.build_batch(samples(processor)))
    prompt = [Turn("user", "<video>\nWhy?")]
    assert again.build_batch([again.make_sample(prompt, clip(2))], generation=True, prefill="It").input_ids.tolist() == \
        processor.build_batch([processor.make_sample(prompt, clip(2))], generation=True, prefill="It").input_ids.tolist()

    model.save_pretrained(tmp_path / "m")  # with the model: the processor is saved beside config.json
    assert (tmp_path / "m" / CONFIG_NAME).is_file() and (tmp_path / "m" / "tokenizer").is_dir()
    loaded = VideoLLM.from_pretrained(tmp_path / "m")
    assert loaded.processor.visual_grid(4) == model.visual_grid(4)
    batch = processor.build_batch(samples(processor))
    assert_same_batch(loaded.processor.build_batch(samples(loaded.processor)), batch)
    assert torch.equal(loaded(batch, return_logits=True).logits, model(batch, return_logits=True).logits)


def test_a_processor_loaded_alone_preprocesses_and_tokenizes_but_cannot_size_a_visual_slot(tmp_path):
    model = tiny()
    model.processor.save_pretrained(tmp_path)
    alone = VideoLLMProcessor.from_pretrained(tmp_path)
    assert torch.equal(alone.preprocess_clip(clip(3))[0], model.processor.preprocess_clip(clip(3))[0])
    text = alone.build_batch([samples(alone)[1]])
    assert torch.equal(text.input_ids, model.processor.build_batch([samples(model.processor)[1]]).input_ids)
    assert (text.labels != IGNORE_INDEX).any() and not text.pixel_values
    with pytest.raises(ValueError, match="cannot size a visual slot: it was loaded without its model"):
        alone.build_batch(samples(alone)[:1])
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME}"):
        VideoLLMProcessor.from_pretrained(tmp_path / "tokenizer")


def test_saved_processor_settings_win_and_old_folders_build_one_from_config(tmp_path):
    model = tiny(system_prompt="From the config.")
    model.processor.system_prompt = "Edited after building."
    model.save_pretrained(tmp_path / "m")
    assert VideoLLM.from_pretrained(tmp_path / "m").processor.system_prompt == "Edited after building."
    (tmp_path / "m" / CONFIG_NAME).unlink()  # a folder saved before processors were: built from config.json
    old = VideoLLM.from_pretrained(tmp_path / "m")
    assert old.processor.system_prompt == "From the config." and old.processor.max_length == model.config.max_length
    batch = old.processor.build_batch(samples(old.processor))
    assert torch.equal(old(batch, return_logits=True).logits, model(batch, return_logits=True).logits)


def test_a_processor_that_preprocesses_otherwise_than_the_tower_is_an_error(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_NAME
    settings = json.loads(path.read_text())
    settings["preprocessor"]["size"] = 48
    path.write_text(json.dumps(settings))
    with pytest.raises(CheckpointMismatchError, match=f"{CONFIG_NAME} preprocesses frames as .*size=48"):
        VideoLLM.from_pretrained(tmp_path / "m")


def test_prefill_then_extend_equals_one_forward_and_splice_checks_the_count():
    model = tiny()
    batch = model.processor.build_batch([model.processor.make_sample(CONVERSATION, clip(4))], generation=True)
    with torch.no_grad():
        embeds, attention, _ = model.embed(batch)  # [1, S, D]
        whole = model.llm(inputs_embeds=embeds, attention_mask=attention).logits  # [1, S, V]
        head, cache = model.prefill(embeds[:, :-3], attention[:, :-3])
        tail = model.extend(cache, embeds[:, -3:], attention, logits_to_keep=0)  # [1, 3, V]
    assert head.shape == (1, 1, whole.shape[-1]) and cache.get_seq_length() == embeds.shape[1]
    assert torch.allclose(head[0, -1], whole[0, -4], atol=1e-5) and torch.allclose(tail[0], whole[0, -3:], atol=1e-5)
    ids = batch.input_ids
    n = int((ids == VISUAL_TOKEN).sum())
    with pytest.raises(ValueError, match=f"the ids have {n} visual positions but {n - 1} visual tokens"):
        model.splice(ids, torch.zeros(n - 1, embeds.shape[-1]))


def test_drop_pruned_keeps_order_labels_and_the_padding_side():
    v = VISUAL_TOKEN
    ids = torch.tensor([[0, 0, 5, v, v, v, 6], [7, v, v, v, 8, 9, 10]])
    attention = (torch.arange(7) >= torch.tensor([[2], [0]])).long()  # row 0 left-padded by 2
    labels = torch.tensor([[-100, -100, -100, -100, -100, -100, 6], [-100, -100, -100, -100, 8, 9, 10]])
    keep = torch.tensor([True, False, True, False, False, True])  # per visual position, in order
    new_ids, new_attention, new_labels = drop_pruned(ids, attention, labels, keep)
    assert new_ids.tolist() == [[0, 5, v, v, 6], [7, v, 8, 9, 10]]  # the padding id is masked out
    assert new_attention.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, -100, -100, -100, 6], [-100, -100, 8, 9, 10]]
    with pytest.raises(ValueError, match="6 visual positions, the keep mask 5"):
        drop_pruned(ids, attention, labels, keep[:5])
    # rows of one length carry no padding to see: a generation batch says it is left-padded, so the row that
    # loses more positions is padded on the left and still ends where its answer begins
    same = torch.ones(2, 7, dtype=torch.long)
    ids2 = torch.tensor([[5, v, v, v, 6, 7, 8], [5, v, v, v, 6, 7, 9]])
    keep2 = torch.tensor([True, True, True, True, False, False])
    assert drop_pruned(ids2, same, None, keep2, left=True)[0].tolist() == [[5, v, v, v, 6, 7, 8], [0, 0, 5, v, 6, 7, 9]]
    assert drop_pruned(ids2, same, None, keep2)[0].tolist() == [[5, v, v, v, 6, 7, 8], [5, v, 6, 7, 9, 0, 0]]
