"""VideoChat: cached multi-turn answers equal from-scratch ones, streaming, settings, errors, the REPL and `vlm chat`."""

from __future__ import annotations

import copy
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.chat import ContextOverflowError, NoVideoError, StreamDecoder, VideoChat, repl
from vlm.llm.template import VISUAL_TOKEN
from vlm.model import VideoLLM
from vlm.video import Clip, VideoDecodeError, write_video

CONNECTORS = {
    "mlp": {"name": "mlp"},
    "qformer_instruct": {"name": "qformer", "num_queries": 2, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
                         "temporal_layers": 1, "per_frame": True, "instruction_aware": True},
    "diff_prune": {"name": "mlp", "reduce": [{"name": "diff_prune", "threshold": 0.05}]},
}
NEW = 8  # max_new_tokens everywhere: the tiny random LLM babbles until the limit


def tiny_model(connector: str = "mlp", **extra) -> VideoLLM:
    torch.manual_seed(0)
    cfg = {"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": copy.deepcopy(CONNECTORS[connector]),
           "llm": copy.deepcopy(TINY_LLM), "num_frames": 4, **extra}
    return VideoLLM.from_config(cfg).eval()


def static_clip(frames: int = 4) -> Clip:
    """Identical frames (a token-pruning connector keeps only the first frame's tokens)."""
    still = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return Clip(np.stack([still] * frames), np.arange(frames) * 0.5, np.arange(frames), "still", 2.0, frames)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, above all on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> VideoLLM:
    return tiny_model()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("media") / "tiny.mp4"
    write_video(path, [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(12)], fps=6)
    return str(path)


class TowerRuns:
    """Counts forward calls of a model's tower while active."""

    def __init__(self, model: VideoLLM):
        self.count = 0
        self.handle = model.tower.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.count += 1

    def __enter__(self) -> "TowerRuns":
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def from_scratch(model: VideoLLM, chat: VideoChat, question: str) -> str:
    """The next answer computed the plain way: the whole conversation through build_batch + HF generate."""
    turns = chat.conversation(question)
    batch = model.processor.build_batch([model.processor.make_sample(turns, chat.clip, chat.media_type)], generation=True)
    return model.generate(batch, max_new_tokens=NEW)[0]


@pytest.mark.parametrize("connector", list(CONNECTORS))
def test_cached_turns_equal_from_scratch_and_tower_runs_once(video, connector):
    model = tiny_model(connector)
    chat = VideoChat(model, max_new_tokens=NEW)
    with TowerRuns(model) as runs:
        if connector == "diff_prune":
            chat.load_clip(static_clip())
            assert chat.num_visual_tokens < chat._video.slot.count(VISUAL_TOKEN)  # the pruning path is exercised
        else:
            chat.load_video(video)
        first = chat.ask("What happens in the video?")
        turn1_prompt = chat.last_stats.reused_tokens + chat.last_stats.prefilled_tokens
        expected = from_scratch(model, chat, "And after that?")
        second = chat.ask("And after that?")  # turn 2 with the cache == turn 2 from scratch (greedy)
        assert first and second == expected
        stats = chat.last_stats
        assert stats.reused_tokens >= turn1_prompt and stats.prefilled_tokens < stats.reused_tokens
        assert runs.count == 1 + 1  # once for two turns by the session, + the from-scratch reference
        # reset keeps the video and its prefix; the next answer is a first answer again
        chat.reset()
        assert chat.history == [] and chat.clip is not None and 0 < chat.context_tokens <= turn1_prompt
        expected = from_scratch(model, chat, "Describe the colors.")
        assert chat.ask("Describe the colors.") == expected
        assert runs.count == 1 + 2  # still once by the session, + the two from-scratch references


def test_baseline_reencodes_every_turn_and_matches(model, video):
    cached, baseline = VideoChat(model, max_new_tokens=NEW), VideoChat(model, max_new_tokens=NEW, reuse_cache=False)
    with TowerRuns(model) as runs:
        for chat in (cached, baseline):
            chat.load_video(video)
        assert runs.count == 1  # the baseline does not encode at load time
        for question in ("What is shown?", "Anything else?", "Why?"):
            assert cached.ask(question) == baseline.ask(question)
            assert baseline.last_stats.reused_tokens == 0 and baseline.last_stats.visual_encode_s > 0
            assert cached.last_stats.visual_encode_s == 0
        assert runs.count == 1 + 3


def test_streaming_joins_to_the_answer_and_keeps_history(model, video):
    a, b = VideoChat(model, max_new_tokens=NEW), VideoChat(model, max_new_tokens=NEW)
    a.load_video(video)
    b.load_video(video)
    pieces = list(a.ask("What is this?", stream=True))
    assert len(pieces) > 1 and "".join(pieces) == b.ask("What is this?") == a.history[-1].text
    assert [t.role for t in a.history] == ["user", "assistant"] and a.history[0].text == "What is this?"
    # a stream closed early keeps the partial answer, and the next turn still equals the uncached result
    stream = a.ask("More?", stream=True)
    partial = next(iter(stream))
    stream.close()
    assert a.history[-1].text == partial.strip() and a.last_stats.stopped == "interrupted"
    baseline = VideoChat(model, max_new_tokens=NEW, reuse_cache=False)
    baseline.load_clip(a.clip)
    baseline._turns = a.history
    assert a.ask("Go on.") == baseline.ask("Go on.")


def test_stream_decoder_multibyte_and_merged_tokens(model):
    tok = model.processor.tokenizer
    text = "Ça va? 🎬 frames 世界 of ünïcödé"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == decoder.text
    # whitespace at the ends is never streamed; special tokens are skipped
    decoder = StreamDecoder(tok)
    ids = tok("  hi there \n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert "".join([decoder.push(i) for i in ids] + [decoder.finish()]) == "hi there"


def test_sampling_settings(model, video):
    chat = VideoChat(model, max_new_tokens=NEW)
    chat.load_video(video)
    greedy = chat.ask("Q?")
    chat.reset()
    assert chat.ask("Q?", top_k=1, temperature=2.0) == greedy  # top-k 1 is greedy whatever the temperature
    chat.reset()
    assert chat.ask("Q?", top_p=1e-6, temperature=2.0) == greedy  # so is a tiny nucleus
    chat.reset()
    one = chat.ask("Q?", temperature=1.5, seed=3, max_new_tokens=4)
    assert chat.last_stats.generated_tokens <= 4
    chat.reset()
    assert chat.ask("Q?", temperature=1.5, seed=3, max_new_tokens=4) == one
    # a session seed makes a whole session reproducible
    runs = []
    for _ in range(2):
        s = VideoChat(model, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=7)
        s.load_video(video)
        runs.append([s.ask("A?"), s.ask("B?")])
    assert runs[0] == runs[1] and runs[0][0] != greedy
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        chat.ask("Q?", temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        VideoChat(model, top_p=0)


def test_errors_name_the_cause(model, video, tmp_path):
    chat = VideoChat(model, max_new_tokens=NEW)
    with pytest.raises(NoVideoError, match="no video loaded: call load_video"):
        chat.ask("What is in the video?")
    text_only = VideoChat(model, max_new_tokens=NEW, require_video=False)
    assert isinstance(text_only.ask("Hello?"), str) and text_only.num_visual_tokens == 0
    chat.load_video(video)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 10)
    for path in (bad, tmp_path / "missing.mp4"):
        with pytest.raises(VideoDecodeError, match=str(path.name)):
            chat.load_video(path)
    assert chat.clip is not None and chat.clip.source == video  # the previous video stays loaded
    # context overflow: the numbers and what to reduce
    small = VideoChat(model, max_new_tokens=NEW, max_context=chat.context_tokens + 12)
    small.load_video(video)
    with pytest.raises(ContextOverflowError, match=r"needs \d+ tokens \(64 visual tokens for 4 frame\(s\).*context limit is "
                       r"\d+.*reset\(\).*shorter question.*fewer frames") as info:
        small.ask("Please describe every single thing that happens in this video in great detail, frame by frame.")
    assert info.value.needed > info.value.limit and small.history == []
    short = small.ask("Hi?")  # the answer is cut at the limit, not an error
    assert small.last_stats.stopped in ("context", "eos") and small.context_tokens <= small.max_context and short is not None
    with pytest.raises(ContextOverflowError, match="fewer frames"):
        VideoChat(model, max_context=40).load_video(video)


def test_images_are_one_frame_clips_with_the_image_placeholder(model, tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    chat = VideoChat(model, max_new_tokens=NEW)
    clip = chat.load_video(path)
    assert len(clip) == 1 and chat.media_type == "image"
    answer = chat.ask("What is this?")
    assert chat.conversation()[0].text.startswith("<image>\n")
    assert chat.num_visual_tokens == model.num_visual_tokens(1) and isinstance(answer, str)


def test_repl_commands_and_stream(model, video, tmp_path):
    chat = VideoChat(model, max_new_tokens=NEW)
    script = f"Hello?\n\n/video {tmp_path / 'nope.mp4'}\n/video {video}\nWhat now?\n/bogus\n/reset\nAgain?\n/help\n/quit\nignored\n"
    out = io.StringIO()
    assert repl(chat, io.StringIO(script), out) == 0
    text = out.getvalue()
    assert "error: no video loaded: use /video PATH" in text
    assert "error: VideoDecodeError" in text and "nope.mp4" in text
    assert text.count("bot> ") == 2 and "[conversation cleared" in text and "/reset" in text
    assert "unknown command /bogus" in text
    assert [t.text for t in chat.history if t.role == "user"] == ["Again?"]
    assert repl(chat, io.StringIO("Last one?\n"), io.StringIO()) == 0  # end of input quits


def test_vlm_chat_command(model, video, tmp_path, monkeypatch, capsys):
    from vlm.cli import main

    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What happens?\n/quit\n"))
    assert main(["chat", "--model", str(tmp_path / "m"), "--video", video, "--frames", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 frame(s)" in out and out.count("bot> ") == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "gone.mp4")]) == 2
    assert "gone.mp4: file not found" in capsys.readouterr().err
