"""Word slots: per-frame annotations, the connector's words, the "slots" objective in a recipe, its evaluation."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_TOWERS
from tests.train_helpers import COLORS, make_tiny_data, tiny_recipe
from vlm.data.regions import cell_of, nearest_frames, region_problems
from vlm.towers.base import VisualFeatures

VOCAB = {"scene": {"tone": ["gray", "dark teal"]}, "objects": {"color": list(COLORS), "shape": ["square", "circle"]},
         "motion": {"action": ["still", "moves left", "moves right"]}}


def tiny_slots_model(**connector):
    from vlm.model import VideoLLM

    return VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                                 "connector": {"name": "word_slots", **copy.deepcopy(VOCAB), "slots": 2, **connector},
                                 "num_frames": 4})


def with_regions(data: dict[str, Path]) -> Path:
    """make_tiny_data's regions file plus a record without regions."""
    records = json.loads(data["regions"].read_text())
    records.append({"id": "noregions", "video": "videos/v0.mp4", "conversations": records[0]["conversations"]})
    data["regions"].write_text(json.dumps(records))
    return data["regions"]


def test_silent_words_must_be_words_of_the_vocabulary():
    with pytest.raises(ValueError, match=r"silent words \['stil'\] are not in its vocabulary"):
        tiny_slots_model(silent=["stil"])


def test_region_problems_name_what_is_wrong():
    good = [{"t": 0.0, "scene": {"tone": "gray"}, "objects": [{"center": [0.5, 0.2], "color": "red", "shape": "square"}]}]
    assert region_problems(good, VOCAB["scene"], VOCAB["objects"] | VOCAB["motion"]) == ["regions[0].objects[0]: no 'action'"]
    assert region_problems(good, VOCAB["scene"], VOCAB["objects"]) == []
    assert region_problems([], VOCAB["scene"]) == ["'regions' must be a non-empty list of annotated frames"]
    bad = [{"t": 0.0, "scene": {"tone": "pink"}, "objects": [{"center": [1.5, 0], "color": "red", "shape": "square"},
                                                             {"center": [0.1, 0.1], "color": "red"}]}, {"scene": {}}]
    problems = region_problems(bad, VOCAB["scene"], VOCAB["objects"])
    assert "regions[0]: tone 'pink' is not one of the connector's words ['gray', 'dark teal']" in problems
    assert "regions[0].objects[0]: 'center' must be [x, y] in [0, 1]" in problems
    assert "regions[0].objects[1]: no 'shape'" in problems
    assert "regions[1]: must be an object with a time 't' in seconds" in problems


def test_nearest_frame_and_cell():
    regions = [{"t": 0.0, "k": 0}, {"t": 0.5, "k": 1}, {"t": 1.0, "k": 2}]
    assert [f["k"] for f in nearest_frames(regions, [0.1, 0.3, 0.74, 5.0])] == [0, 1, 1, 2]
    assert cell_of([0.0, 0.0], 4, 4) == 0
    assert cell_of([0.99, 0.3], 4, 4) == 1 * 4 + 3
    assert cell_of([1.0, 1.0], 4, 4) == 15  # the edge belongs to the last cell


def nearest_words(model, embeds: torch.Tensor) -> str:
    """The text whose token embeddings are the given rows (each row is exactly one token's embedding)."""
    table = model.llm.get_input_embeddings().weight
    ids = [int((table - row).abs().sum(-1).argmin()) for row in embeds]
    assert all(torch.equal(table[i], row) for i, row in zip(ids, embeds)), "visual tokens must be word embeddings"
    return model.processor.tokenizer.decode(ids)


@pytest.mark.parametrize("silent", [[], ["still"]])
def test_the_visual_tokens_are_the_words_of_what_the_heads_chose(monkeypatch, silent):
    model = tiny_slots_model(silent=silent)
    conn = model.connector
    grid = (2, 4, 4)
    feats = VisualFeatures(tokens=torch.zeros(1, 2, 16, 32), grid=grid, timestamps=torch.tensor([[0.0, 0.5]]))
    found = torch.full((1, 2, 16), -5.0)
    found[0, 0, 13] = 5.0  # frame 0: an object in the bottom row, second column
    found[0, 0, 2] = 4.0  # and one in the top row, third column (read first: reading order)
    colors, shapes = torch.zeros(1, 2, 16, 4), torch.zeros(1, 2, 16, 2)
    colors[0, 0, 13, 2], shapes[0, 0, 13, 1] = 1, 1  # blue circle
    colors[0, 0, 2, 0], shapes[0, 0, 2, 0] = 1, 1  # red square
    tones = torch.zeros(1, 2, 2)
    tones[0, 1, 1] = 1  # frame 1: dark teal (three tokens), no object
    monkeypatch.setattr(conn, "split_logits", lambda f: (found, [colors, shapes], [tones]))

    def motion(f, b, t, c):  # queried at each frame's slot cells; the object at cell 13 moves left
        logits = torch.zeros(len(c), 3)
        logits[:, 0] = 1
        logits[(b == 0) & (t == 0) & (c == 13), 1] = 5
        return [logits]

    monkeypatch.setattr(conn, "motion_logits", motion)
    out = conn(feats)
    per_frame = conn.project_grid(grid)[1]
    assert out.groups == 2 and out.embeds.shape[1] == 2 * per_frame == model.num_visual_tokens(2)
    frames = out.embeds[0].split(per_frame), out.mask[0].split(per_frame)
    still = "" if silent else " still"  # a silent word is chosen but not written
    assert (nearest_words(model, frames[0][0][frames[1][0]])
            == f" gray red square{still} top center blue circle moves left bottom left")
    assert nearest_words(model, frames[0][1][frames[1][1]]) == " dark teal"
    assert conn.written(feats) == [f" gray red square{still} top center blue circle moves left bottom left | dark teal"]


def test_count_sentences_are_written_once_after_the_last_frame(monkeypatch):
    moves = {"action": ["moves left", "moves right"]}
    with pytest.raises(ValueError, match=r"counts\['movers'\] names 'speed', not an object or motion attribute"):
        tiny_slots_model(counts={"movers": {"speed": ["fast"]}})
    with pytest.raises(ValueError, match=r"counts\[.movers.\] is one \{attribute: \[words\]\} \(options: every, several, becomes or changes; names, verb or says\) or"):
        tiny_slots_model(counts={"movers": {"action": ["moves left"], "color": ["red"]}})
    with pytest.raises(ValueError, match=r"\['jumps'\] are not words of 'action'"):
        tiny_slots_model(counts={"movers": {"action": ["jumps"]}})
    model = tiny_slots_model(counts={"moving objects": moves, "red things": {"color": ["red"]}})
    conn = model.connector
    feats = VisualFeatures(tokens=torch.zeros(1, 3, 16, 32), grid=(3, 4, 4), timestamps=torch.tensor([[0.0, 0.5, 1.0]]))
    found = torch.full((1, 3, 16), -5.0)
    found[0, :, 5] = 5.0  # a red square in every frame
    found[0, :, 10] = 4.0  # a blue square in every frame
    colors, shapes, tones = torch.zeros(1, 3, 16, 4), torch.zeros(1, 3, 16, 2), torch.zeros(1, 3, 2)
    colors[0, :, 5, 0] = colors[0, :, 10, 2] = shapes[..., 0] = tones[..., 0] = 1
    monkeypatch.setattr(conn, "split_logits", lambda f: (found, [colors, shapes], [tones]))

    def motion(f, b, t, c):  # the red square moves left in every frame, the blue one in the middle frame only
        logits = torch.zeros(len(c), 3)
        logits[:, 0] = 1
        logits[(c == 5) | ((c == 10) & (t == 1)), 1] = 5
        return [logits]

    monkeypatch.setattr(conn, "motion_logits", motion)
    frames = conn.written(feats)[0].split(" |")
    assert frames[0] == " gray red square moves left top left blue square still middle center"
    assert frames[2] == " gray red square moves left top left blue square still middle center moving objects: 1. red things: 1."
    out = conn(feats)
    assert out.embeds.shape[1] == 3 * conn.project_grid((3, 4, 4))[1] == model.num_visual_tokens(3)
    conn.configure(layout="tracks")
    assert conn.written(feats)[0].endswith(" moving objects: 1. red things: 1.")
    # a setting (no weights): a recipe adds counts to a model whose heads an earlier stage trained without them
    plain = tiny_slots_model()
    monkeypatch.setattr(plain.connector, "split_logits", conn.split_logits)
    monkeypatch.setattr(plain.connector, "motion_logits", motion)
    before = plain.num_visual_tokens(3)
    plain.apply_settings({"connector": {"counts": {"moving objects": moves}}})
    assert plain.connector.written(feats)[0].endswith("center moving objects: 1.")
    assert plain.num_visual_tokens(3) > before and plain.config.connector["counts"] == {"moving objects": moves}
    # names: the counted objects said outright; every: the objects that show the words in every frame
    named = {"moving objects": {**moves, "names": True}, "still objects": {"action": ["still"], "every": True, "names": True}}
    plain.apply_settings({"connector": {"counts": named}})
    assert plain.connector.written(feats)[0].endswith(
        "center moving objects: 1: red square. still objects: 1: blue square.")  # its one moving frame smoothed away
    out = plain.connector(feats)
    assert out.embeds.shape[1] == plain.num_visual_tokens(3) and plain.connector.truncated == 0


def test_sentence_widths_are_tokenized_once_per_setting_not_per_batch():
    model = tiny_slots_model(counts={"moving objects": {"action": ["moves left", "moves right"]}})
    conn = model.connector
    tokenizer, calls = conn._tokenizer[0], []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return tokenizer(*args, **kwargs)

    conn._tokenizer[0] = counting
    width = conn.project_grid((4, 4, 4))[1]
    first = len(calls)
    assert conn.project_grid((4, 4, 4))[1] == width and len(calls) == first  # the second batch tokenizes nothing
    conn.configure(counts={"moving objects": {"action": ["moves left"], "names": True}},
                   events={"action": {"still > moves left": "starts moving to the left"}})
    assert conn.project_grid((4, 4, 4))[1] > width and len(calls) > first  # a new setting is measured again
    conn.attach_llm(conn._embedding[0], tokenizer)  # a new tokenizer forgets the widths measured with the old one
    assert conn._sentence_widths == {}
    conn.project_grid((4, 4, 4))
    assert set(conn._sentence_widths) == {"counts", "events"}


def test_event_sentences_follow_the_words_of_the_frame_that_shows_the_change(monkeypatch):
    model = tiny_slots_model()
    conn = model.connector
    feats = VisualFeatures(tokens=torch.zeros(1, 4, 16, 32), grid=(4, 4, 4),
                           timestamps=torch.tensor([[0.0, 0.5, 1.0, 1.5]]))
    found = torch.full((1, 4, 16), -5.0)
    found[0, :, 5] = 5.0  # a red square in every frame, still in the first two, moving left in the last two
    colors, shapes, tones = torch.zeros(1, 4, 16, 4), torch.zeros(1, 4, 16, 2), torch.zeros(1, 4, 2)
    colors[0, :, 5, 0] = shapes[..., 0] = tones[..., 0] = 1
    monkeypatch.setattr(conn, "split_logits", lambda f: (found, [colors, shapes], [tones]))

    def motion(f, b, t, c):
        logits = torch.zeros(len(c), 3)
        logits[:, 0] = 1
        logits[t >= 2, 1] = 5
        return [logits]

    monkeypatch.setattr(conn, "motion_logits", motion)
    before = model.num_visual_tokens(4)
    starts = {"action": {"still > moves left": "starts moving to the left"}}
    model.apply_settings({"connector": {"events": starts}})
    assert model.config.connector["events"] == starts  # saved with the model: a setting, not a weight
    frames = conn.written(feats)[0].split(" |")
    assert frames[2] == " gray red square moves left top left red square starts moving to the left."
    assert frames[1] == " gray red square still top left" and frames[3] == " gray red square moves left top left"
    out = conn(feats)
    assert out.embeds.shape[1] == model.num_visual_tokens(4) > before and conn.truncated == 0
    with pytest.raises(ValueError, match="'events' apply to layout 'frames'"):
        conn.configure(layout="tracks")
    with pytest.raises(ValueError, match="events hold"):
        conn.configure(events={"hold": 0})
    with pytest.raises(ValueError, match="'covered' .* layout 'story' only"):  # refused, nothing changed
        conn.configure(events={**starts, "covered": "under"}, slots=5)
    with pytest.raises(ValueError, match="'stops': layout"):
        conn.configure(events={**starts, "stops": "still"})
    assert conn.event_extent == {} and conn.slots != 5 and conn.events


def fixed_heads(monkeypatch, conn, centres: dict[int, float], color_of: dict[int, int]):
    """Heads that see objects at the given cells (centre logits) with the given colour (index into COLORS), all
    squares, still, on a gray background, in every frame."""
    found = torch.full((1, 2, 16), -5.0)
    colors, shapes, tones = torch.zeros(1, 2, 16, 4), torch.zeros(1, 2, 16, 2), torch.zeros(1, 2, 2)
    shapes[..., 0] = 1
    tones[..., 0] = 1
    for cell, logit in centres.items():
        found[0, :, cell] = logit
    for cell, color in color_of.items():
        colors[0, :, cell, color] = 1
    monkeypatch.setattr(conn, "split_logits",
                        lambda f, with_offsets=False: (found, [colors, shapes], [tones], None)[:3 + with_offsets])
    monkeypatch.setattr(conn, "motion_logits", lambda f, b, t, c: [torch.eye(3)[torch.zeros(len(c), dtype=torch.long)]])


def test_slot_counts_say_how_many_objects_the_llm_is_told_and_whether_they_are_right(monkeypatch):
    conn = tiny_slots_model().connector
    fixed_heads(monkeypatch, conn, {5: 3.0, 6: 2.0}, {5: 0, 6: 0})  # one red square over two cells: named twice
    feats = VisualFeatures(tokens=torch.zeros(1, 2, 16, 32), grid=(2, 4, 4), timestamps=torch.tensor([[0.0, 0.5]]))
    red = {"color": "red", "shape": "square", "action": "still"}
    frames = [{"t": 0.0, "scene": {"tone": "gray"}, "objects": [{"center": [0.3, 0.3], **red}]},  # named right
              {"t": 0.5, "scene": {"tone": "gray"}, "objects": [{"center": [0.3, 0.3], **red},
                                                                {"center": [0.9, 0.9], **red, "color": "blue"}]}]
    from evals.slots import event_counts, matched_events, slot_counts, slot_metrics
    c = slot_counts(conn, feats, [frames])
    # frame 0: two named for one there (one right); frame 1: two named for two there (the red one right)
    assert (c["frames"], c["frames_count_right"], c["named"], c["named_right"], c["named_true"]) == (2, 1, 4, 2, 3)
    m = slot_metrics(c)
    assert m["count_accuracy"] == 50.0 and m["named_precision"] == 50.0 and round(m["named_recall"], 1) == 66.7
    # over time: the annotations say a blue square appears in frame 1; the heads never see it
    e = event_counts(conn, feats, [frames])
    assert (e["events_true"], e["events_said"], e["events_right"], e["clips_events_right"]) == (1, 0, 0, 0)
    assert all(c[k] == v for k, v in e.items())  # slot_counts includes them
    assert m["event_recall"] == 0.0 and m["clips_order_right"] == 0.0
    from evals.slots import events_by_kind
    kinds = dict(e)
    assert events_by_kind(kinds) == {"appears": {"true": 1, "said": 0, "missed": 1, "invented": 0}}
    assert not any(k.startswith("kind/") for k in kinds)  # taken out of the counts
    conn.configure(switch_cost=2.0)  # decoded: slot_counts hands its one read of the heads to event_counts
    decoded = slot_counts(conn, feats, [frames])
    assert all(decoded[k] == v for k, v in event_counts(conn, feats, [frames]).items())
    said, true = [(2, "a"), (3, "b"), (3, "c")], [(2, "a"), (2, "b"), (5, "c")]
    assert matched_events(said, true, 0) == 1 and matched_events(said, true, 1) == 2  # "c" is two frames off


def test_peaks_name_an_object_that_lights_two_cells_once(monkeypatch):
    conn = tiny_slots_model().connector  # two slots, a 4 x 4 grid
    fixed_heads(monkeypatch, conn, {5: 3.0, 6: 2.0, 15: 1.0}, {5: 0, 6: 0, 15: 1})  # a red square lights 5 and 6
    feats = VisualFeatures(tokens=torch.zeros(1, 2, 16, 32), grid=(2, 4, 4), timestamps=torch.tensor([[0.0, 0.5]]))

    def named() -> list[int]:
        _, cells, keep, _ = conn.detect(feats)
        return cells[0, 0][keep[0, 0]].tolist()
    assert named() == [5, 6]  # the red square twice, the blue one (cell 15) left out
    conn.configure(peaks=True)
    assert named() == [5, 15]
    assert "peaks" in conn.settings  # a setting: a saved model can switch it on


def test_slots_objective_trains_the_heads_then_the_llm_reads_them(tmp_path, capsys):
    from evals.slots import evaluate_slots
    from vlm.model import VideoLLM
    from vlm.data.conversation import resolve_media
    from vlm.train.engine import run_recipe, setup_stage
    from vlm.train.recipe import parse_recipe

    data = make_tiny_data(tmp_path / "data", n=8)
    regions = with_regions(data)
    raw = tiny_recipe(data, tmp_path / "run")
    raw["model"]["connector"] = {"name": "word_slots", **copy.deepcopy(VOCAB), "slots": 2}
    raw["stages"][0].update({"name": "slots", "objective": "slots", "max_steps": 60, "batch_size": 4,
                             "parts": {"connector": {"mode": "full", "lr": 3e-3}}, "schedule": {"warmup_steps": 0}})
    raw["stages"][0]["data"]["mixture"] = [{"path": str(regions)}]
    raw["stages"][1]["parts"]["connector"] = {"mode": "frozen"}
    final = run_recipe(parse_recipe(raw))
    stage = json.loads((tmp_path / "run" / "1-slots" / "stage.json").read_text())
    assert stage["malformed_records"] == 2  # the record without regions and the one without a placeholder
    assert stage["trainable"]["llm"] == 0
    assert stage["skipped_samples"]  # the missing and the broken clip were skipped and named
    model = VideoLLM.from_pretrained(final)
    result = evaluate_slots(model, regions, tmp_path / "eval", workers=0)
    assert result.counts["scored"] == 8 and result.counts["skipped"] == 4  # missing, broken, no placeholder, no regions
    m = result.metrics
    assert m["tone_accuracy"] == 100.0 and m["color_accuracy"] > 60 and m["object_recall"] > 60, m
    assert m["action_accuracy"] > 60, m  # which way the square moves, from the frames around each one
    assert m["count_accuracy"] > 60 and m["named_precision"] > 60, m  # what the LLM is told, frame by frame
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["task_type"] == "slots"
    assert all(set(v) == {"true", "said", "missed", "invented"} for v in result.per_task.values())  # per kind
    assert not any(k.startswith("kind/") for k in result.counts["cells"])
    # the saved heads come back: the same visual tokens after reloading
    stage1 = VideoLLM.from_pretrained(tmp_path / "run" / "1-slots" / "final")
    clip = torch.rand(1, 4, 3, 32, 32)
    ts = torch.arange(4.0)[None] / 4
    a = stage1.connector(stage1.tower_features(clip, ts))
    b = model.connector(model.tower_features(clip, ts))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.embeds[a.mask], b.embeds[b.mask])
    # a stage that reads the frozen heads groups its batches by the length of the story they write
    raw["model"]["connector"].update(layout="story", text_tokens=400)  # settings: the same heads tell each clip
    raw["model"]["max_length"] = 1024
    recipe = parse_recipe(raw)
    recipe.stages[1].group_window = 2
    _, data = setup_stage(recipe, 1, tmp_path / "run" / "1-slots" / "final", tmp_path / "regroup", resume=False)
    written = data.dataset.visual_tokens
    assert isinstance(written, list) and len(written) == len(data.items), written
    assert max(written) < 400  # the stories told (16 tokens here), not the budget the stage would otherwise assume
    stage1.connector.configure(layout="story", text_tokens=400)
    for it, n in zip(data.items, written):
        v = data.visual(resolve_media(it.media_root, it.sample.media, it.sample.location), it.sample)
        out = stage1.encode_visual([], [v["timestamps"]], features=[v["features"]], grids=[v["grid"]])
        assert n == int(out.mask.sum())
    assert data.plan.window == 2 and list(data.plan.lengths) == [data.dataset.length(i) for i in range(len(written))]
    # the padding benchmark builds the same stage and counts its batches' padding for each order
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_padding

    (tmp_path / "recipe.yaml").write_text(json.dumps(raw))
    bench_padding.main(["--recipe", str(tmp_path / "recipe.yaml"), "--stage", "2", "--init",
                        str(tmp_path / "run" / "1-slots" / "final"), "--window", "2", "--time", "1", "--no-docs"])
    table = capsys.readouterr().out
    rows = [r for r in table.splitlines() if r.startswith(("| random", "| LLaVA", "| window"))]
    assert len(rows) == 8 and "| window 2, written lengths | 1 |" in table, table
    assert "| random, padding-free | 0.0% |" in table and "| random, padding-free | 1 |" in table, table
    assert "faster padding-free; largest relative difference of their losses" in table, table


def test_a_slots_stage_reads_its_clips_without_tokenizing_their_text(tmp_path, capsys):
    """The heads never read the conversation: the stage's samples carry no ids (no chat template, no padding of a
    clip-long slot on every step), and the loss is the one the same clips give with their text encoded."""
    from vlm.data.dataset import ConversationDataset
    from vlm.objectives import reads_text
    from vlm.train.engine import setup_stage
    from vlm.train.recipe import parse_recipe

    assert not reads_text("slots") and reads_text("lm") and reads_text("words")
    data = make_tiny_data(tmp_path / "data", n=8, bad=False)
    raw = tiny_recipe(data, tmp_path / "run")
    raw["model"]["connector"] = {"name": "word_slots", **copy.deepcopy(VOCAB), "slots": 2}
    raw["stages"][0].update({"name": "slots", "objective": "slots", "batch_size": 4,
                             "parts": {"connector": {"mode": "full", "lr": 3e-3}}})
    raw["stages"][0]["data"]["mixture"] = [{"path": str(data["regions"])}]
    run, stage = setup_stage(parse_recipe(raw), 0, None, tmp_path / "stage", resume=False)
    indices = stage.plan.epoch(0)[0]
    samples = [stage.dataset[i] for i in indices]
    assert not any("input_ids" in s or "labels" in s for s in samples) and all("regions" in s for s in samples)
    batch, _ = run.collate(samples)
    assert batch.input_ids.shape == batch.labels.shape == (len(indices), 0) and len(batch.regions) == len(indices)
    model = run.accelerator.unwrap_model(run.model).eval()
    texts = ConversationDataset(stage.dataset.items, stage.visual, model.processor.encode_sample)
    with_text, _ = run.collate([texts[i] for i in indices])
    assert with_text.input_ids.shape[1] > 0
    with torch.no_grad():
        assert torch.equal(model(batch, objective="slots").loss, model(with_text, objective="slots").loss)
    # the benchmark times the stage each way on the same batches, and checks that every way gives the same loss
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_slots_stage

    (tmp_path / "recipe.yaml").write_text(json.dumps(raw))
    bench_slots_stage.main(["--recipe", str(tmp_path / "recipe.yaml"), "--steps", "2", "--no-docs"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| before", "| text left", "| shipped"))]
    assert len(rows) == 3 and rows[-1].endswith("| 1.00x |"), rows


def test_slot_targets_keep_the_last_object_named_in_a_cell():
    from vlm.connectors.slot_heads import slot_targets

    red, blue = ({"color": c, "shape": "square", "action": "still"} for c in ("red", "blue"))
    frames = [{"t": 0.0, "scene": {"tone": "dark teal"}, "objects": [{"center": [0.1, 0.1], **red},
                                                                  {"center": [0.15, 0.2], **blue}]},
              {"t": 0.5, "scene": {"tone": "gray"}, "objects": [{"center": [0.9, 0.9], **red}]}]
    attributes = VOCAB["objects"] | VOCAB["motion"]
    target = slot_targets([frames, frames], [[0.0, 0.5], [0.5, 0.0]], (2, 2, 2), VOCAB["scene"], attributes)
    assert target["found"].tolist() == [[[1, 0, 0, 0], [0, 0, 0, 1]], [[0, 0, 0, 1], [1, 0, 0, 0]]]
    colors = target["objects"][0]
    assert colors[0, 0, 0] == list(COLORS).index("blue") and colors[0, 1, 3] == list(COLORS).index("red")
    assert int((colors >= 0).sum()) == 4 and target["scene"].tolist() == [[[1, 0], [0, 1]]]


def test_slots_objective_needs_a_slot_connector(tmp_path):
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import RecipeError, parse_recipe

    data = make_tiny_data(tmp_path / "data", n=4, bad=False)
    raw = tiny_recipe(data, tmp_path / "run")
    raw["stages"][0]["objective"] = "slots"
    with pytest.raises(ValueError, match="word_slots"):
        run_recipe(parse_recipe(raw))
    raw["stages"][0]["parts"]["llm"] = {"mode": "full", "lr": 1e-4}
    with pytest.raises(RecipeError, match="objective 'slots' trains the connector only"):
        parse_recipe(raw)


def test_centre_targets_point_each_cell_around_an_object_to_its_nearest_centre():
    from vlm.connectors.slot_heads import centre_targets

    # a 4 x 4 grid: one object at row 1.25, column 1.5 (cell 5), one at row 1.5, column 3.0 (its cell: column 3)
    targets = centre_targets([(1.5 / 4, 1.25 / 4), (3.0 / 4, 1.5 / 4)], 4, 4)
    assert targets[5] == pytest.approx((-0.25, 0.0))  # its own cell: where in the cell the centre is
    assert targets[0] == pytest.approx((0.75, 1.0))  # a corner of its neighbourhood
    assert targets[6] == pytest.approx((0.0, 0.5))  # in both neighbourhoods: 1.03 cells from the first, 0.5 from
    assert targets[7] == pytest.approx((0.0, -0.5))  # the second, so it points to the second
    assert 3 * 4 + 0 not in targets and 15 not in targets and len(targets) == 9 + 3


def test_centre_offsets_name_two_look_alikes_in_neighbouring_cells_twice(monkeypatch):
    """`peaks` names an object that lights two cells once, and so also two objects in neighbouring cells; with the
    centre offsets the two cells of one object point to one centre, and two objects' cells to two."""
    from vlm.connectors.slot_heads import distinct_peaks

    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 1, 1], logits[0, 1, 2] = 3.0, 2.0
    def lit_peaks(offsets, radius=0.75) -> list[list[int]]:
        return (distinct_peaks(logits, offsets, radius) & (logits > 0))[0].nonzero().tolist()
    assert lit_peaks(None) == [[1, 1]]
    one = torch.zeros(1, 4, 4, 2)
    one[0, 1, 1], one[0, 1, 2] = torch.tensor([0.0, 0.4]), torch.tensor([0.0, -0.5])  # both: column 1.4
    two = torch.zeros(1, 4, 4, 2)
    two[0, 1, 1], two[0, 1, 2] = torch.tensor([0.0, -0.3]), torch.tensor([0.0, 0.3])  # columns 0.7 and 2.3
    assert lit_peaks(one) == [[1, 1]]
    assert lit_peaks(two) == [[1, 1], [1, 2]]
    assert lit_peaks(two, radius=2.0) == [[1, 1]]  # the radius decides

    conn = tiny_slots_model(centre_offsets=True, peaks=True).connector  # two slots, a 4 x 4 grid
    assert "centre_radius" in conn.settings
    fixed_heads(monkeypatch, conn, {5: 3.0, 6: 2.0}, {5: 0, 6: 0})
    found, objects, scenes = conn.split_logits(None)[:3]
    offsets = torch.zeros(1, 2, 16, 2)
    offsets[0, :, 5], offsets[0, :, 6] = two[0, 1, 1], two[0, 1, 2]
    monkeypatch.setattr(conn, "split_logits", lambda f, with_offsets=False: (found, objects, scenes, offsets))
    feats = VisualFeatures(tokens=torch.zeros(1, 2, 16, 32), grid=(2, 4, 4), timestamps=torch.tensor([[0.0, 0.5]]))
    _, cells, keep, _ = conn.detect(feats)
    assert cells[0, 0][keep[0, 0]].tolist() == [5, 6]
    conn.configure(centre_radius=2.0)
    _, cells, keep, _ = conn.detect(feats)
    assert cells[0, 0][keep[0, 0]].tolist() == [5]
    with pytest.raises(ValueError, match=r"centre_radius \(-1.0\) is a distance in cells"):
        conn.configure(centre_radius=-1, slots=1)
    assert (conn.centre_radius, conn.slots) == (2.0, 2)  # refused: nothing changed


def test_the_centre_offsets_are_learned_from_the_annotations():
    """The offset head trains on the cells around each annotated centre; without it the head keeps its shape (a
    model trained before loads as it was)."""
    torch.manual_seed(0)
    plain = tiny_slots_model().connector
    conn = tiny_slots_model(centre_offsets=True).connector
    assert conn.head.cell[-1].out_features == plain.head.cell[-1].out_features + 2
    feats = VisualFeatures(tokens=torch.randn(1, 2, 16, 32), grid=(2, 4, 4), timestamps=torch.tensor([[0.0, 0.5]]))
    red = {"color": "red", "shape": "square", "action": "still"}
    regions = [[{"t": t, "scene": {"tone": "gray"}, "objects": [{"center": [0.3, 0.6], **red}]} for t in (0.0, 0.5)]]
    target = conn.slot_targets(feats, regions)
    assert int(target["near"].sum()) == 2 * 9 and target["offset"][0, 0, 9].tolist() == pytest.approx([-0.1, -0.3])
    opt = torch.optim.Adam(conn.head.parameters(), lr=3e-3)

    def offset_error() -> float:
        offsets = conn.split_logits(feats, with_offsets=True)[3].detach()
        return float((offsets[target["near"]] - target["offset"][target["near"]]).abs().mean())
    before = offset_error()
    for _ in range(60):
        loss = conn.slot_loss(feats, regions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert offset_error() < before / 3
    from evals.slots import slot_counts, slot_metrics

    metrics = slot_metrics(slot_counts(conn, feats, regions))  # at the true centres only
    assert 0 < metrics["centre_error_cells"] < before


def test_a_pooling_budget_drops_frames_for_word_slots_instead_of_blurring_their_grid():
    """Pooling does not shrink a word-slot connector's output (a fixed count per frame): the budget keeps the grid
    its heads were trained on and drops frames."""
    model = tiny_slots_model()
    per_frame = model.connector.project_grid((1, 4, 4))[1]
    model.apply_settings({"token_budget": {"max_tokens": 2 * per_frame, "policy": "pool"}})
    assert model.budget.grid((4, 4, 4), model.connector) == (2, 4, 4)
    assert model.num_visual_tokens(4) == 2 * per_frame


@pytest.mark.parametrize("grid", [1, 2])
def test_scene_grid_lets_the_scene_head_tell_where_a_tone_is(grid):
    """A frame bright on the left and its mirror image have the same mean and spread over cells: only a head that
    also reads the frame's regions (`scene_grid` 2) can learn which is which (a gradient's first tone)."""
    from vlm.connectors.slot_heads import SlotHead

    torch.manual_seed(0)
    left = torch.zeros(4, 4, 3)
    left[:, :2] = torch.tensor([1.0, -1.0, 0.5])
    frames = torch.stack([left, left.flip(1)]).reshape(1, 2, 16, 3)  # [B=1, T=2, N=16, C]
    head = SlotHead(3, object_classes=1, scene_classes=2, hidden=16, scene_grid=grid)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    target = torch.tensor([0, 1])
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head(frames, (2, 4, 4))[1][0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    right = int((head(frames, (2, 4, 4))[1][0].argmax(-1) == target).sum())
    assert right == (2 if grid == 2 else 1)


def test_the_truth_is_written_as_perfect_heads_would_write_it(monkeypatch):
    from vlm.connectors.truth import true_text

    model = tiny_slots_model(counts={"moving objects": {"action": ["moves left", "moves right"]}})
    conn = model.connector
    red = {"color": "red", "shape": "square", "action": "moves left"}
    blue = {"color": "blue", "shape": "circle", "action": "still"}
    green = {"color": "green", "shape": "circle", "action": "still"}
    frames = [{"t": 0.0, "scene": {"tone": "gray"}, "objects": [  # three objects for two slots: the first two read
        {"center": [0.9, 0.9], **blue}, {"center": [0.6, 0.1], **red}, {"center": [0.1, 0.95], **green}]},
        {"t": 0.5, "scene": {"tone": "dark teal"}, "objects": [{"center": [0.7, 0.1], **red}]}]
    stamps = torch.tensor([[0.0, 0.5]])
    text = true_text(conn, [frames], stamps, (2, 4, 4))
    assert text == ["Time: 0.0s gray red square moves left top center green circle still bottom left "
                    "Time: 0.5s dark teal red square moves left top center moving objects: 1."]
    # the same words as the connector writes when its heads see exactly what is there
    still = [{"t": t, "scene": {"tone": "gray"}, "objects": [{"center": [0.6, 0.1], **red, "action": "still"},
                                                             {"center": [0.9, 0.9], **blue, "shape": "square"}]}
             for t in (0.0, 0.5)]
    fixed_heads(monkeypatch, conn, {2: 5.0, 15: 4.0}, {2: 0, 15: 2})  # red square top center, blue bottom right
    feats = VisualFeatures(tokens=torch.zeros(1, 2, 16, 32), grid=(2, 4, 4), timestamps=stamps)
    assert conn.written(feats)[0].replace(" |", " ") == true_text(conn, [still], stamps, (2, 4, 4), stamps=False)[0]
    for layout in ("tracks", "story"):  # one text, as the connector writes it from the same heads
        conn.configure(layout=layout)
        assert conn.written(feats) == true_text(conn, [still], stamps, (2, 4, 4))
    assert true_text(conn, [still], stamps, (2, 4, 4))[0].startswith(" A red square and a blue square are on a gray")


def test_a_preface_makes_the_slot_the_text_oracle_prompt():
    """With preface "Video description:", the LLM reads a clip's story exactly as the text oracle's prompt writes the
    same story: the same input embeddings, attention and labels, token for token."""
    import numpy as np

    from vlm.data.conversation import Turn, describe_in_place
    from vlm.video import Clip

    with pytest.raises(ValueError, match="'preface' goes before the one text of layouts"):
        tiny_slots_model(preface="Video description:")  # the frames layout writes one text per frame
    with pytest.raises(ValueError, match="preface is text"):  # YAML's reading of an unquoted "Video description:"
        tiny_slots_model(layout="story", preface={"Video description": None})
    model = tiny_slots_model(layout="story", preface="Video description:", threshold=0.0, text_tokens=400)
    proc, conn = model.processor, model.connector
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    clip = Clip(frames, np.arange(4) * 0.5, np.arange(4), "synthetic", 2.0, 4)
    ask = [Turn("user", "<video>\nWhich object moves?"), Turn("assistant", "the red square")]
    embeds, attention, labels = model.embed(proc.build_batch([proc.make_sample(ask, clip)]))
    pixels, times = proc.preprocess_clip(clip)
    feats = model.tower_features(pixels[None], times[None])
    told = conn.describe(conn.reduced(feats))[0]
    assert len(told.split()) > 10 and conn.written(feats) == [f"Video description: {told.strip()}"]
    oracle = [Turn("user", describe_in_place(ask[0].text, told)), ask[1]]
    text_embeds, text_attention, text_labels = model.embed(proc.build_batch([proc.make_sample(oracle)]))
    assert conn.truncated == 0 and torch.equal(embeds, text_embeds) and torch.equal(attention, text_attention)
    assert torch.equal(labels, text_labels)
    model.apply_settings({"connector": {"preface": None}})  # a setting: scored with or without, no retraining
    assert conn.written(feats) == [told] and model.config.connector["preface"] is None


def test_words_oracle_script_writes_descriptions_and_text_twins(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from words_oracle import main

    data = make_tiny_data(tmp_path / "data", n=4)
    model_dir = tiny_slots_model().save_pretrained(tmp_path / "model")
    records = json.loads(data["regions"].read_text())
    (tmp_path / "data" / "regions_train.json").write_text(json.dumps(records))
    good = [r for r in records if r["id"].startswith("cap")]
    (tmp_path / "data" / "qa_train.json").write_text(json.dumps([{k: r[k] for k in ("id", "video", "conversations")}
                                                                 for r in good[:2]]))
    assert main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--batch", "3"]) == 0
    out = tmp_path / "data" / "oracle_words"
    descriptions = json.loads((out / "descriptions.json").read_text())
    assert set(descriptions) == {"v0", "v1", "v2", "v3"}  # the missing and the broken video: skipped, named
    assert descriptions["v0"].startswith("Time: 0.0s gray red square moves right middle left Time: 0.2s gray red")
    assert descriptions["v1"].startswith("Time: 0.0s gray green square moves left middle right")
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and "regions_train.json[4]: videos/nope.mp4" in skipped[0] and "broken.mp4" in skipped[1]
    twin = json.loads((out / "qa_train.json").read_text())
    assert len(twin) == 2 and "Video description: Time: 0.0s gray" in twin[0]["conversations"][0]["value"]
    assert "video" not in twin[0]
    # no model needed: the connector's words from a recipe (JSON is YAML), a layout set on the command line
    raw = tiny_recipe(data, tmp_path / "run")
    raw["model"]["connector"] = {"name": "word_slots", **copy.deepcopy(VOCAB), "slots": 2}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    assert main(["--recipe", str(recipe), "--set", "model.connector.layout=story", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "story")]) == 0
    told = json.loads((tmp_path / "story" / "descriptions.json").read_text())
    assert set(told) == {"v0", "v1", "v2", "v3"} and told["v0"].startswith(" A red square is on a gray background.")
    with pytest.raises(SystemExit, match="overrides a --recipe"):
        main(["--model", str(model_dir), "--set", "model.connector.layout=story", "--data", str(tmp_path / "data")])
    # what trained heads write from the video: two models, each for the clips of one regions file
    (tmp_path / "data" / "regions_a.json").write_text(json.dumps(records[:2]))
    (tmp_path / "data" / "regions_b.json").write_text(json.dumps(records[2:]))
    assert main(["--heads", f"{model_dir}=regions_a.json", "--heads", f"{model_dir}=regions_b.json",
                 "--data", str(tmp_path / "data"), "--out", str(tmp_path / "heads")]) == 0
    seen = json.loads((tmp_path / "heads" / "descriptions.json").read_text())
    from vlm.connectors.truth import written_text
    from vlm.model import VideoLLM
    from vlm.video import read_clip
    model = VideoLLM.from_pretrained(model_dir)
    pixels, stamps = model.processor.preprocess_clip(read_clip(tmp_path / "data" / "videos" / "v2.mp4",
                                                               model.config.num_frames, model.config.sampling))
    with torch.no_grad():
        feats = model.tower_features(pixels[None], stamps[None])
    assert set(seen) == {"v0", "v1", "v2", "v3"} and seen["v2"] == written_text(model.connector, feats)[0]
    # the heads of some clips only (e.g. the test clips, to score an oracle on them): no twin of the other files
    (tmp_path / "data" / "regions_c.json").write_text(json.dumps([r for r in records if r["video"] != good[0]["video"]]))
    capsys.readouterr()
    assert main(["--heads", f"{model_dir}=regions_c.json", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "some")]) == 0
    assert Path(good[0]["video"]).stem not in json.loads((tmp_path / "some" / "descriptions.json").read_text())
    assert not (tmp_path / "some" / "qa_train.json").exists()
    assert "not written: 1 of 2 records' clips not described" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="MODEL=REGIONS"):
        main(["--heads", str(model_dir), "--data", str(tmp_path / "data")])


def test_bench_decode_times_both_decodings_on_the_same_features(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_decode import main

    data = make_tiny_data(tmp_path / "data", n=3)
    model_dir = tiny_slots_model(layout="story").save_pretrained(tmp_path / "model")
    records = [r for r in json.loads(data["regions"].read_text()) if r["id"].startswith("cap")]
    (tmp_path / "data" / "clips.json").write_text(json.dumps(records))
    assert main(["--model", str(model_dir), "--data", str(tmp_path / "data" / "clips.json"), "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clips"] == 3 and report["layout"] == "story" and report["ratio"] > 0
    assert 0 <= report["texts_that_differ"] <= 3


def test_eval_set_changes_a_loaded_models_settings_key_by_key_and_refuses_weights(tmp_path, capsys):
    """`vlm eval ... --set`: a setting of the loaded model (a connector's count rule, the system prompt) changed for
    scoring without retraining; a mapping changed key by key; a key that shapes weights refused in one line."""
    from evals.cli import with_settings
    from vlm.cli import main
    from vlm.train.recipe import RecipeError

    model = tiny_slots_model(counts={"moving objects": {"action": ["moves left"]}})
    with_settings(model, ["system_prompt=Answer briefly.", "connector.counts.still objects={action: [still]}",
                          "time_stamps=false"])
    assert model.config.system_prompt == model.processor.system_prompt == "Answer briefly."
    assert list(model.config.connector["counts"]) == ["moving objects", "still objects"]  # the first rule kept
    assert [r.phrase for r in model.connector.counts] == ["moving objects", "still objects"]
    assert model.config.time_stamps is False
    with_settings(model, ["connector.counts.moving objects=null"])  # null: the rule removed
    assert [r.phrase for r in model.connector.counts] == ["still objects"]
    for bad, says in (("connector.hidden=64", "change the weights"), ("llm.loader=x", "change no weights"),
                      ("connector.counts.x={nope: 1}", "counts")):
        with pytest.raises(RecipeError, match=says):
            with_settings(model, [bad])
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "bench" / "json").mkdir(parents=True)
    assert main(["eval", "mcq", "--model", str(tmp_path / "m"), "--bench", str(tmp_path / "bench"),
                 "--out", str(tmp_path / "o"), "--set", "connector.hidden=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "connector.hidden=64" in err[0] and "change the weights" in err[0]


def test_a_stage_takes_the_recipes_changed_settings_and_never_its_weight_keys():
    """A recipe edited after a stage finished: the next stage's model takes the settings that differ from the saved
    config (the connector's key by key), not the keys that shape weights, and nothing when nothing differs."""
    import copy
    from types import SimpleNamespace

    from vlm.train.engine import recipe_settings

    model = tiny_slots_model()
    block = copy.deepcopy({"connector": model.config.connector, "system_prompt": model.config.system_prompt})
    assert recipe_settings(SimpleNamespace(init_from=None, model=block), model) == {}
    block["connector"] |= {"switch_cost": 3.0, "hidden": 64}
    block["system_prompt"] = "Be brief."
    assert recipe_settings(SimpleNamespace(init_from=None, model=block), model) == \
        {"system_prompt": "Be brief.", "connector": {"switch_cost": 3.0}}
