"""VideoLLM assembly: every tower x connector builds, trains a step, counts its tokens, saves and reloads."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.llm.lora import has_lora
from vlm.weights import CheckpointMismatchError
from vlm.data.conversation import Turn
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN, TemplateMismatchError
from vlm.model import VideoLLM, VideoLLMConfig
from vlm.objectives import word_alignment_loss

TINY_CONNECTORS = {
    "mlp": {"name": "mlp"},
    "mlp_linear_pool": {"name": "mlp", "projector": "linear", "pool": 2},
    "qformer": {"name": "qformer", "num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                "temporal_layers": 1},
    "qformer_instruct_per_frame": {"name": "qformer", "num_queries": 2, "hidden_size": 32, "num_layers": 2,
                                   "num_heads": 4, "temporal_layers": 1, "per_frame": True, "instruction_aware": True},
    "stc": {"name": "stc", "depth": 1, "hidden_size": 32},
    "pool2d+mlp": {"name": "mlp", "reduce": [{"name": "pool2d", "mode": "bilinear"}]},
    "tome+qformer": {"name": "qformer", "num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                     "temporal_layers": 1, "reduce": [{"name": "tome", "tokens_per_frame": 3}]},
    "diff_prune+mlp": {"name": "mlp", "reduce": [{"name": "diff_prune", "threshold": 0.05}]},
}

CONVERSATION = [Turn("user", "<video>\nWhat happens in the video?"), Turn("assistant", "A red circle moves to the left.")]


def config(tower: str, connector: str, frames: int = 4, **extra) -> VideoLLMConfig:
    return VideoLLMConfig(tower=copy.deepcopy(TINY_TOWERS[tower]), connector=copy.deepcopy(TINY_CONNECTORS[connector]),
                          llm=copy.deepcopy(TINY_LLM), num_frames=frames, **extra)


def sample(model: VideoLLM, frames: int, seed: int = 0, turns=CONVERSATION, moving: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 255, (frames, 40, 48, 3), dtype=np.uint8)
    if not moving:
        video[:] = video[0]
    return {"id": f"s{seed}", "turns": turns, "media_type": "video",
            "pixel_values": model.processor.preprocess_clip(video)[0], "timestamps": torch.arange(frames) * 0.5}


@pytest.fixture(scope="module")
def models():
    cache: dict[tuple[str, str], VideoLLM] = {}

    def get(tower: str, connector: str) -> VideoLLM:
        if (tower, connector) not in cache:
            torch.manual_seed(0)
            cache[(tower, connector)] = VideoLLM.from_config(config(tower, connector))
        return cache[(tower, connector)]

    return get


@pytest.mark.parametrize("connector", list(TINY_CONNECTORS))
@pytest.mark.parametrize("tower", list(TINY_TOWERS))
def test_every_tower_and_connector_trains_a_step(models, tower, connector):
    model = models(tower, connector)
    model.set_mode("tower", "full")
    batch = model.processor.build_batch([sample(model, 4, 0), sample(model, 4, 1)])
    n = model.num_visual_tokens(4)
    assert (batch.input_ids == VISUAL_TOKEN).sum(dim=1).tolist() == [n, n]
    assert ((batch.labels != IGNORE_INDEX) & (batch.input_ids == VISUAL_TOKEN)).sum() == 0
    pixels = torch.stack(batch.pixel_values)  # [B, T, 3, H, W]
    feats = model.tower(pixels)
    assert feats.grid == model.tower.grid_for(4, pixels.shape[-2], pixels.shape[-1])
    visual = model.connector(feats)
    assert visual.embeds.shape == (2, n, model.llm.config.hidden_size)
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("connector", "tower"):
        grads = [p.grad for p in model.part(part).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    assert all(p.grad is None for p in model.llm.parameters())  # frozen LLM
    model.zero_grad(set_to_none=True)
    model.set_mode("tower", "frozen")


def test_images_are_one_frame_videos_and_mix_with_videos(models):
    model = models("siglip", "stc")
    image = sample(model, 1, 3, turns=[Turn("user", "<image> What is this?"), Turn("assistant", "A square.")])
    image["media_type"] = "image"
    batch = model.processor.build_batch([sample(model, 4, 0), image])
    assert (batch.input_ids == VISUAL_TOKEN).sum(dim=1).tolist() == [model.num_visual_tokens(4), model.num_visual_tokens(1)]
    assert torch.isfinite(model(batch).loss)


def test_text_only_sample_and_pruned_tokens_are_dropped(models):
    model = models("clip", "diff_prune+mlp")
    text = {"id": "t", "turns": [Turn("user", "Hi"), Turn("assistant", "Hello.")], "media_type": None}
    static = sample(model, 4, 5, moving=False)
    batch = model.processor.build_batch([static, text])
    embeds, attention, labels = model.embed(batch)
    per_frame = model.visual_grid(4)[1]
    # a static clip keeps only its first frame's tokens (+ any pruned-frame tokens) -> shorter sequence
    kept_visual = int(attention[0].sum()) - int((batch.input_ids[0] != VISUAL_TOKEN).sum())
    assert kept_visual == per_frame
    assert labels.shape == attention.shape and torch.isfinite(model.llm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss)


def test_time_stamps_between_groups(models):
    model = VideoLLM.from_config(config("clip", "mlp", time_stamps=True))
    slot = model.processor.visual_slot(4, [0.0, 0.5, 1.0, 1.5])
    text = model.processor.tokenizer.decode([t for t in slot if t != VISUAL_TOKEN])
    assert text == "Time: 0.0sTime: 0.5sTime: 1.0sTime: 1.5s"
    assert slot.count(VISUAL_TOKEN) == model.num_visual_tokens(4)
    assert torch.isfinite(model(model.processor.build_batch([sample(model, 4)])).loss)


def test_generate_greedy_is_deterministic_and_batched(models):
    model = models("clip", "mlp").eval()
    prompts = [dict(sample(model, 4, i), turns=CONVERSATION[:1]) for i in range(2)]
    batch = model.processor.build_batch(prompts, generation=True, prefill="Best option:(")
    assert batch.attention_mask[:, -1].all()  # left padded
    a = model.generate(batch, max_new_tokens=5)
    b = model.generate(batch, max_new_tokens=5)
    assert a == b and len(a) == 2
    torch.manual_seed(0)
    c = model.generate(batch, max_new_tokens=5, do_sample=True, temperature=1.5)
    assert len(c) == 2


def test_batched_greedy_rows_equal_each_prompt_generated_alone(models):
    """Prompts of different lengths are left padded in a batch; each row's greedy answer must be the one the same
    prompt gets alone (padding, attention mask and positions are right), and the rows must differ from each other
    (the check is not passing on a constant output)."""
    model = models("clip", "mlp").eval()
    questions = ["What happens?", "Which way does the small red square move in the whole video, left or right?",
                 "Count the objects."]
    prompts = [dict(sample(model, 4, i), turns=[Turn("user", "<video>\n" + q)]) for i, q in enumerate(questions)]
    batch = model.processor.build_batch(prompts, generation=True)
    assert not batch.attention_mask[:, 0].all()  # some rows really are padded
    together = model.generate(batch, max_new_tokens=6)
    alone = [model.generate(model.processor.build_batch([p], generation=True), max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1


def test_save_load_identical_logits_with_lora_and_full_tower(tmp_path):
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "qformer_instruct_per_frame"))
    model.set_mode("llm", "lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    model.set_mode("tower", "full")
    with torch.no_grad():  # make every trained part differ from its initialisation
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = model.processor.build_batch([sample(model, 4, 0), sample(model, 4, 1)])
    before = model(batch, return_logits=True).logits
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert set(saved["saved_parts"]) >= {"connector", "tower", "llm_lora", "llm"}  # random LLM base is saved too
    loaded = VideoLLM.from_pretrained(tmp_path / "m")
    after = loaded(loaded.processor.build_batch([sample(loaded, 4, 0), sample(loaded, 4, 1)]), return_logits=True).logits
    assert torch.equal(before, after)


def test_merge_lora_on_load_keeps_outputs_and_saves_merged_weights(tmp_path):
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "mlp"))
    model.set_mode("llm", "lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]})
    model.set_mode("tower", "lora", {"r": 4, "targets": ["q_proj"]})
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "m")
    adapted = VideoLLM.from_pretrained(tmp_path / "m")
    merged = VideoLLM.from_pretrained(tmp_path / "m", merge_lora=True)
    assert not has_lora(merged.llm) and not has_lora(merged.tower) and merged.config.lora == {}
    assert has_lora(adapted.llm) and has_lora(adapted.tower)
    batch = adapted.processor.build_batch([sample(adapted, 4, 0), sample(adapted, 4, 1)])
    with torch.no_grad():
        ref = adapted(batch, return_logits=True).logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()  # the model without its adapters: a merge that dropped them would give this
        assert not torch.allclose(model.eval()(batch, return_logits=True).logits, ref, atol=1e-3)
        torch.testing.assert_close(merged(batch, return_logits=True).logits, ref, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # a plain model now: the merged weights are written whole
    again = VideoLLM.from_pretrained(tmp_path / "merged")
    assert not has_lora(again.llm)
    with torch.no_grad():
        torch.testing.assert_close(again(batch, return_logits=True).logits, ref, atol=1e-5, rtol=1e-5)


def test_lora_on_the_last_blocks_only(tmp_path):
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "mlp"))  # the tiny LLM has 2 blocks
    model.set_mode("llm", "lora", {"r": 4, "targets": ["q_proj", "v_proj"], "layers": [-1]})
    lora = [n for n, p in model.llm.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora), lora
    batch = model.processor.build_batch([sample(model, 4, 0)])
    model(batch).loss.backward()
    assert all(p.grad is not None for n, p in model.llm.named_parameters() if "lora_" in n)
    model.save_pretrained(tmp_path / "m")
    loaded = VideoLLM.from_pretrained(tmp_path / "m")
    assert [n for n, _ in loaded.llm.named_parameters() if "lora_" in n] == lora
    with pytest.raises(ValueError, match=r"LoRA layers \[2\] are not all among its 2 blocks"):
        VideoLLM.from_config(config("clip", "mlp")).set_mode("llm", "lora", {"layers": [2]})


def test_connector_only_save_reattaches_and_mismatch_names_part_and_key(tmp_path):
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("siglip", "stc"))
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(0.1)
    model.eval()
    batch = model.processor.build_batch([sample(model, 4)])
    model.save_connector(tmp_path / "c")
    record = json.loads((tmp_path / "c" / "connector.json").read_text())
    assert record["num_visual_tokens"] == model.num_visual_tokens(4) and record["tower"]["name"] == "siglip"
    fresh = VideoLLM.from_connector(tmp_path / "c")
    fresh.tower.load_state_dict(model.tower.state_dict())  # random tiny towers: same weights for the comparison
    fresh.llm.load_state_dict(model.llm.state_dict())
    assert torch.equal(fresh(batch, return_logits=True).logits, model(batch, return_logits=True).logits)
    other = VideoLLM.from_config(replace(config("siglip", "stc"), connector={"name": "stc", "depth": 1, "hidden_size": 16}))
    with pytest.raises(CheckpointMismatchError, match="'connector' was"):
        other.load_connector(tmp_path / "c")
    # same config, wrong weights: the key and both shapes are named
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "c" / "connector.safetensors"))
    key = next(iter(state))
    state[key] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "c" / "connector.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=f"connector .*key '{key}': checkpoint shape \\(3, 3\\)"):
        fresh.load_connector(tmp_path / "c")


def test_template_mismatch_is_an_error_naming_the_sample(models):
    model = VideoLLM.from_config(config("clip", "mlp"))
    model.processor.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | lower }}"
                                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateMismatchError, match="s0: the chat template does not render assistant turn"):
        model.processor.build_batch([sample(model, 4)])


def test_truncation_never_cuts_visual_tokens():
    model = VideoLLM.from_config(config("clip", "mlp", max_length=20))
    with pytest.raises(TemplateMismatchError, match="inside the visual tokens; use fewer frames"):
        model.processor.build_batch([sample(model, 4)])


def test_sparse_head_loss_equals_the_full_lm_loss(models):
    model = models("clip", "stc").eval()
    batch = model.processor.build_batch([sample(model, 4, 0), sample(model, 4, 1, turns=CONVERSATION + [
        Turn("user", "And then?"), Turn("assistant", "It stops.")])])
    full = model(batch, return_logits=True).loss
    sparse = model(batch).loss
    assert torch.allclose(full, sparse, atol=1e-5), (full, sparse)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model config keys"):
        VideoLLMConfig.from_dict({"tower": {}, "connector": {}, "llm": {}, "frames": 3})
    with pytest.raises(KeyError, match="unknown vision tower 'nope'; registered:"):
        VideoLLM.from_config(replace(config("clip", "mlp"), tower={"name": "nope"}))
    model = VideoLLM.from_config(config("clip", "mlp"))
    with pytest.raises(ValueError, match="LoRA targets \\['nope'\\] match no module"):
        model.set_mode("llm", "lora", {"targets": ["nope"]})


def test_llm_loaders_hf_folder_and_qlora_error(tmp_path):
    from vlm.llm.load import load_llm

    model, tok = load_llm(**TINY_LLM)
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    again, tok2 = load_llm("hf", path=str(tmp_path / "llm"))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, again(ids).logits) and len(tok2) == len(tok)
    with pytest.raises(RuntimeError, match="QLoRA\\) needs a CUDA GPU and `pip install bitsandbytes`"):
        load_llm("hf", path=str(tmp_path / "llm"), quantization="4bit")
    with pytest.raises(KeyError, match="unknown LLM loader 'nope'"):
        load_llm("nope")


def _worded(model: VideoLLM, answers: list[str], seed: int = 0) -> list[dict]:
    return [sample(model, 4, seed + i, [Turn("user", "<video>\nWhat is it?"), Turn("assistant", a)])
            for i, a in enumerate(answers)]


def test_word_alignment_loss_ignores_shared_words_and_trains_only_the_connector(models):
    """The words objective asks which clip each word belongs to: words that every clip's text has carry no
    signal (a zero loss with a gradient), the LLM gets no gradient, and a few steps on the connector lower it."""
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "mlp"))
    same = model.processor.build_batch(_worded(model, ["red circle", "red circle"]))
    loss = model(same, objective="words").loss
    assert float(loss.detach()) == 0.0 and loss.requires_grad

    batch = model.processor.build_batch(_worded(model, ["red circle left", "blue square right", "red square up"]))
    for p in model.llm.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.connector.parameters(), lr=1e-2)
    first = float(model(batch, objective="words").loss.detach())
    assert first > 0.0
    for _ in range(30):
        opt.zero_grad()
        model(batch, objective="words").loss.backward()
        opt.step()
    assert float(model(batch, objective="words").loss.detach()) < 0.5 * first
    assert all(p.grad is None for p in model.llm.parameters())
    with pytest.raises(KeyError, match="unknown stage objective 'nope'"):
        model(batch, objective="nope")


def test_word_alignment_matches_a_hand_computed_value(models):
    """Two clips, texts 'A B' and 'A C': only B and C are informative; each is owned by one clip, so the loss is
    the mean over {B, C} of -log softmax over clips of the owner's best cosine / temperature."""
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "mlp"))
    batch = model.processor.build_batch(_worded(model, ["cat dog", "cat fish"]))
    loss = word_alignment_loss(model, batch, temperature=0.5)
    vis = torch.nn.functional.normalize(model.encode_visual(batch.pixel_values, batch.timestamps).embeds.float(), dim=-1)
    table = torch.nn.functional.normalize(model.llm.get_input_embeddings().weight.float(), dim=-1)
    ids = [set(r[r >= 0].tolist()) for r in batch.labels]
    only = [sorted(ids[0] - ids[1]), sorted(ids[1] - ids[0])]
    terms = []
    for owner, vs in enumerate(only):
        for v in vs:
            score = (vis @ table[v]).amax(1) / 0.5  # [2]
            terms.append(-torch.log_softmax(score, 0)[owner])
    assert terms
    assert float(loss.detach()) == pytest.approx(float(torch.stack(terms).mean().detach()), rel=1e-5)


def test_output_norm_standardizes_tokens_to_the_text_embedding_scale_and_reloads(tmp_path):
    """output_norm=standardize: in train mode the tokens of a batch have zero mean and unit variance per channel
    times the text embeddings' RMS; the running statistics and the scale are saved with the connector."""
    torch.manual_seed(0)
    cfg = replace(config("clip", "mlp"), connector={"name": "mlp", "output_norm": "standardize"})
    model = VideoLLM.from_config(cfg)
    rms = float(model.llm.get_input_embeddings().weight.float().pow(2).mean().sqrt())
    assert float(model.connector.output_norm.scale) == pytest.approx(rms)
    samples = [sample(model, 4, seed) for seed in range(6)]
    batch = model.processor.build_batch(samples)
    model.connector.train()
    with torch.no_grad():
        tokens = model.encode_visual(batch.pixel_values, batch.timestamps).embeds  # [6, L, D]
    flat = tokens.reshape(-1, tokens.shape[-1])
    assert float(flat.mean(0).abs().max()) < 1e-4 * rms + 1e-6
    assert float(flat.std(0, unbiased=False).mean()) == pytest.approx(rms, rel=1e-2)
    assert float(model.connector.output_norm.stats.num_batches_tracked) == 1  # running statistics were updated
    model.eval()
    with torch.no_grad():
        before = model.encode_visual(batch.pixel_values, batch.timestamps).embeds
        model.save_pretrained(tmp_path / "m")
        again = VideoLLM.from_pretrained(tmp_path / "m").eval()
        assert torch.allclose(again.encode_visual(batch.pixel_values, batch.timestamps).embeds, before, atol=1e-5)
    with pytest.raises(ValueError, match="output_norm"):
        VideoLLM.from_config(replace(cfg, connector={"name": "mlp", "output_norm": "batch"}))


def test_importing_vlm_flushes_denormal_floats_on_the_cpu():
    """CPU arithmetic on denormals is ~30x slower; vlm turns them into zeros (a training step took 10 min without)."""
    import vlm  # noqa: F401

    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
    assert (tiny * 1.0).item() == 0.0


@pytest.mark.parametrize("connector", ["mlp", "qformer_instruct_per_frame"])
def test_a_clip_given_twice_is_encoded_once_without_gradients(models, connector, monkeypatch):
    """One clip's questions scored together: the tower runs on each distinct clip once (same tokens as encoding
    every sample); with gradients, or a connector that reads each sample's instruction, every sample is encoded."""
    model = models("clip", connector).eval()
    clips = [sample(model, 4, seed=s) for s in (0, 1, 0, 0)]
    turns = [CONVERSATION, CONVERSATION, CONVERSATION, [Turn("user", "<video>\nWhat else?"), Turn("assistant", "x")]]
    batch = model.processor.build_batch([dict(c, turns=t) for c, t in zip(clips, turns)], generation=True)
    seen: list[int] = []
    real = model.tower.forward
    monkeypatch.setattr(model.tower, "forward", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    with torch.no_grad():
        once = model.embed(batch)[0]
    deduped = seen[0]
    seen.clear()
    with torch.enable_grad():
        every = model.embed(batch)[0]
    assert torch.allclose(once, every.detach(), atol=1e-6)
    uses_instruction = getattr(model.connector, "uses_instruction", False)
    frames_per_clip = seen[0] // 4
    assert deduped == (4 if uses_instruction else 2) * frames_per_clip
