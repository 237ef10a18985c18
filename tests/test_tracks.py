"""The tracks layout of word slots: linking detections over frames, smoothing, and the text it writes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.test_word_slots import nearest_words, tiny_slots_model
from vlm.connectors.tracks import (Detection, counted_tracks, describe, link, linked, linking, merge_duplicates,
                                  object_tracks, ramp, ramp_rule, settle, size_ramps, smooth, track_name, viterbi,
                                  without_repeat_tracks)
from vlm.towers.base import VisualFeatures

TIMES = [0.1, 0.4, 0.6, 0.9, 1.1, 1.4]


def det(row, col, color="red", shape="circle", action="still"):
    return Detection((row, col), (color, shape), (action,))


def test_smooth_removes_one_frame_flickers_only():
    assert smooth(["a", "b", "a", "a", "c", "c", "d"]) == ["a", "a", "a", "a", "c", "c", "d"]
    assert smooth(["a", "b", "c"]) == ["a", "b", "c"]  # all differ: kept
    assert smooth(["a"]) == ["a"]


def test_viterbi_drops_doubtful_flips_and_keeps_confident_ones():
    def frames(*pairs):  # per frame: log-probabilities of "a" and "b"
        return [{"a": a, "b": b} for a, b in pairs]

    doubtful = frames((0, -3), (-1, -0.5), (-1, -0.5), (0, -3), (0, -3))  # "b" by half a nat for two frames
    assert viterbi(doubtful, 0.0) == ["a", "b", "b", "a", "a"]  # no cost: each frame's likeliest word
    assert viterbi(doubtful, 2.0) == ["a", "a", "a", "a", "a"]  # two changes cost 4 nats, "b" gains 1
    confident = frames((-6, 0), (0, -6), (0, -6), (0, -6))  # a sure "b" in the first frame, then "a"
    assert viterbi(confident, 2.0) == ["b", "a", "a", "a"] and viterbi(confident, 8.0) == ["a"] * 4
    lasting = frames((0, -3), (-3, 0), (-3, 0), (-3, 0))  # a real change: held, and sure
    assert viterbi(lasting, 2.0) == ["a", "b", "b", "b"]


def test_settle_decodes_each_track_and_the_scene_over_time():
    def scored(row, col, color, p_red):
        lp = {"red": torch.tensor(p_red).log().item(), "blue": torch.tensor(1 - p_red).log().item()}
        return Detection((row, col), (color, "circle"), ("still",), (lp, {"circle": 0.0}, {"still": 0.0}))

    # a red circle read as blue in frames 1-2 by a hair; a sure blue square elsewhere keeps its colour
    frames = [[scored(1, 1, "red", 0.9)], [scored(1, 1, "blue", 0.45)], [scored(1, 2, "blue", 0.45)],
              [scored(1, 2, "red", 0.9)]]
    frames[1].append(Detection((5, 5), ("blue", "square"), ("still",), ({"red": -5.0, "blue": 0.0}, {"square": 0.0},
                                                                       {"still": 0.0})))
    scene_scores = [({"gray": 0.0, "black": -2.0},), ({"gray": -0.8, "black": -0.6},), ({"gray": 0.0, "black": -2.0},),
                    ({"gray": 0.0, "black": -2.0},)]
    seen = ([("gray",), ("black",), ("gray",), ("gray",)], frames, TIMES[:4])
    scenes, settled, times = settle(seen, scene_scores, 2.0)
    assert [d.identity[0] for f in settled for d in f if d.identity[1] == "circle"] == ["red"] * 4
    assert [d.identity for d in settled[1] if d.cell == (5, 5)] == [("blue", "square")]
    assert scenes == [("gray",)] * 4 and times == TIMES[:4]
    assert settle(seen, scene_scores, 0.0)[1][1][0].identity[0] == "blue"  # no cost: the words as read
    unscored = ([("gray",)] * 2, [[det(1, 1)], [det(1, 1, "blue")]], TIMES[:2])
    assert settle(unscored, [], 2.0)[1][1][0].identity[0] == "blue"  # no scores (e.g. annotations): as given


def test_link_follows_objects_by_place_then_by_words():
    # a red circle moves right along row 1; a blue square stays at row 5; the circle turns green in frame 2
    frames = [[det(1, 0), det(5, 5, "blue", "square")],
              [det(5, 5, "blue", "square"), det(1, 2)],
              [det(1, 3, "green"), det(5, 5, "blue", "square")],
              [det(5, 6, "blue", "square")]]  # the circle is missed once (a gap of one frame) ...
    frames.append([det(1, 6, "green"), det(5, 6, "blue", "square")])  # ... and found again 3 cells away
    tracks = link(frames)
    assert [t.frames for t in tracks] == [[0, 1, 2, 4], [0, 1, 2, 3, 4]]
    assert [d.identity[0] for d in tracks[0].detections] == ["red", "red", "green", "green"]
    # too far to be the same object: a new track
    assert len(link([[det(0, 0)], [det(0, 4)]])) == 2


def passing_boxes():
    """Two red boxes pass each other on row 4: the left one moving right, the right one moving left; one frame on,
    each is nearer the other's last cell (1 cell) than its own (2 cells)."""
    return [[det(4, 2, shape="box", action="moves right"), det(4, 5, shape="box", action="moves left")],
            [det(4, 4, shape="box", action="moves right"), det(4, 3, shape="box", action="moves left")]]


def test_link_with_a_motion_cost_keeps_look_alikes_apart_where_they_pass():
    frames = passing_boxes()
    def ways(tracks):
        return [[d.motion[0] for d in tr.detections] for tr in tracks]
    assert ways(link(frames)) == [["moves right", "moves left"], ["moves left", "moves right"]]  # by place: traded
    with linking(2.0):
        assert ways(link(frames)) == [["moves right", "moves right"], ["moves left", "moves left"]]
    assert ways(link(frames)) == [["moves right", "moves left"], ["moves left", "moves right"]]  # reset after

    class Conn:
        link_motion = 2.0
        @linked
        def ways(self, frames):
            return ways(link(frames))
    assert Conn().ways(frames) == [["moves right", "moves right"], ["moves left", "moves left"]]


def test_merge_duplicates_keeps_one_of_a_large_objects_neighbouring_cells():
    dets = [det(2, 2), det(2, 3), det(2, 3, "blue"), det(4, 4)]
    assert [d.cell for d in merge_duplicates(dets)] == [(2, 2), (2, 3), (4, 4)]
    # two look-alikes a detector with centre offsets named apart stay two
    distinct = [replace(d, distinct=True) for d in dets]
    assert [d.cell for d in merge_duplicates(distinct)] == [(2, 2), (2, 3), (2, 3), (4, 4)]


def test_a_track_seen_only_beside_a_longer_one_with_the_same_words_is_a_repeat():
    def moving(col):  # a blue diamond moving right, named apart from its neighbour by the centre offsets
        return replace(det(1, col, "blue", "diamond", "moves right"), distinct=True)

    frames = [[moving(t)] for t in range(6)]
    frames[2].append(moving(3))  # its second reading, one cell ahead, for two frames
    frames[3].append(moving(4))
    frames[1].append(replace(det(4, 4, "blue", "diamond"), distinct=True))  # another blue diamond, far off
    frames[2].append(replace(det(4, 4, "blue", "diamond"), distinct=True))
    boxes = [replace(det(3, c, "red", "box"), distinct=True) for c in (0, 1)]  # look-alikes resting side by side
    frames = [f + boxes for f in frames]
    kept = without_repeat_tracks(frames)
    assert [len(f) for f in kept] == [3, 4, 4, 3, 3, 3]  # the repeat's two detections gone, nothing else
    assert [sum(d.cell[0] == 1 for d in f) for f in kept] == [1] * 6  # one moving diamond in every frame
    assert len(object_tracks(frames)) == 5 and len(object_tracks(kept)) == 4
    frames[2].append(replace(det(3, 2, "red", "box"), distinct=True))  # beside a box: boxes are several at the end
    assert [len(f) for f in without_repeat_tracks(frames)] == [3, 4, 5, 3, 3, 3]


def test_ramp_finds_where_a_level_starts_and_stops_changing():
    assert ramp([-10, -10, -10, -5, 0, 5, 10, 10]) == (2, 6, 20.0)
    s, e, change = ramp([3, 3.5, 2.5, 3, 1, -1, -3, -5, -7, -7.5, -6.5, -7])  # noisy levels, a fall of 10
    assert (s, e) == (3, 8) and change == pytest.approx(-10, abs=0.5)


def test_size_ramps_say_growing_from_the_size_scores_where_the_motion_head_missed_it():
    def sized(col, margin, action="still", color="red"):  # margin: log p(large) - log p(small)
        return Detection((1, col), (color, "star"), (action, "small" if margin < 0 else "large"),
                         ({}, {}, {}, {"small": 0.0, "large": float(margin)}))

    margins = [-10, -10, -10, -5, 0, 5, 10, 10]
    heads = ["still", "still", "still", "still", "grows", "still", "still", "grows"]  # a slow change, seen once
    frames = [[sized(2, m, a), sized(6, 5 - m / 10, "shrinks" if k == 3 else "still", "blue")]
              for k, (m, a) in enumerate(zip(margins, heads))]
    out = size_ramps(frames, 3, 2, ("still", "grows", "shrinks"), min_change=15)
    assert [f[0].motion[0] for f in out] == ["still", "still", "grows", "grows", "grows", "grows", "grows", "still"]
    assert [f[1].motion[0] for f in out] == ["still"] * 8  # a change of 2 nats: the head's one "shrinks" is a slip
    assert [f[0].motion[1] for f in out] == [f[0].motion[1] for f in frames]  # the size words as read
    down = [[replace(sized(2, -m), motion=("moves left" if k == 0 else "still", "small"))]
            for k, m in enumerate(margins)]
    assert [f[0].motion[0] for f in size_ramps(down, 3, 2, ("still", "grows", "shrinks"), 15)] == \
        ["moves left", "still", "shrinks", "shrinks", "shrinks", "shrinks", "shrinks", "still"]  # motions kept
    assert [f[0].motion[0] for f in size_ramps(frames, 3, 2, ("still", "grows", "shrinks"), 25)] == ["still"] * 8
    vocab = {"color": ["red"], "shape": ["star"], "action": ["still", "grows", "shrinks"], "size": ["small", "large"]}
    rule = {"read": "size", "write": "action", "words": ["still", "grows", "shrinks"], "min_change": 15}
    assert ramp_rule(rule, vocab, 2) == (3, 2, ("still", "grows", "shrinks"), 15.0) and ramp_rule(None, vocab, 2) is None
    for bad, message in (({**rule, "write": "color"}, "writes a motion attribute"), ({"read": "size"}, "ramps takes"),
                         ({**rule, "words": ["still", "grows"]}, r"\[rest, up, down\]")):
        with pytest.raises(ValueError, match=message):
            ramp_rule(bad, vocab, 2)


def test_a_built_model_reads_size_ramps_from_its_heads_scores(tmp_path):
    from vlm.model import VideoLLM

    motion = {"action": ["still", "grows", "shrinks"], "size": ["small", "large"]}
    model = tiny_slots_model(motion=motion, slots=3)
    feats = VisualFeatures(tokens=torch.randn(2, 8, 16, 32), grid=(8, 4, 4),
                           timestamps=torch.arange(8.0)[None].expand(2, -1) / 4)
    resized = {"grows", "shrinks"}
    with pytest.raises(ValueError, match="ramps words"):
        model.apply_settings({"connector": {"slots": 5, "ramps": {"read": "size", "write": "action", "min_change": 1,
                                                                  "words": ["still", "grows", "bounces"]}}})
    assert model.connector.slots == 3 and model.connector.ramps is None  # refused whole
    rule = {"read": "size", "write": "action", "words": ["still", "grows", "shrinks"], "min_change": 1e9}
    model.apply_settings({"connector": {"ramps": rule}})
    assert not any(d.motion[0] in resized for seen in model.connector.detections(feats) for f in seen[1] for d in f)
    model.apply_settings({"connector": {"ramps": {**rule, "min_change": 0.0}}})
    for _, frames, _ in model.connector.detections(feats):
        for track in link(frames):  # one way per track: its ramp's
            assert len({d.motion[0] for d in track.detections} & resized) <= 1
    model.save_pretrained(tmp_path / "m")
    assert VideoLLM.from_pretrained(tmp_path / "m").connector.ramps == (3, 2, ("still", "grows", "shrinks"), 0.0)


def count_tracks(frames, attribute, words, min_frames=2):
    return len(counted_tracks(object_tracks(frames), attribute, words, min_frames))


def test_count_tracks_counts_objects_not_frames_and_ignores_one_frame_slips():
    moves = ["moves left", "moves right"]
    # the red circle moves left over four frames (a large one, seen in two cells); the blue square is still but read
    # as moving in its last frame (smoothing keeps a clip's ends: only `min_frames` discounts the slip); a green star
    # is seen once, moving
    frames = [[det(1, 5 - k, action="moves left"), det(1, 6 - k, action="moves left"),
               det(5, 5, "blue", "square", "moves right" if k == 3 else "still")] for k in range(4)]
    frames[1].append(det(3, 0, "green", "star", "moves left"))
    assert count_tracks(frames, 2, moves) == 1
    assert count_tracks(frames, 2, moves, min_frames=1) == 2  # the slip counts; the one-frame star never does
    assert count_tracks(frames, 1, ["square"]) == 1  # any attribute: identity words come first
    frames[3][2] = frames[1][2] = det(5, 5, "blue", "square", "moves right")
    assert count_tracks(frames, 2, moves, min_frames=1) == 2
    frames[3][2] = det(5, 5, "blue", "square")  # a slip in the middle of a track is smoothed away
    assert count_tracks(frames, 2, moves, min_frames=1) == 1
    assert count_tracks([], 2, moves) == 0


def test_counted_tracks_every_frame_and_the_names_they_are_said_by():
    # a red circle moves left throughout, a blue square stays still (read as a green square once), a white star is
    # still but starts moving in the last two frames
    frames = [[det(1, 5 - k, action="moves left"), det(5, 5, "green" if k == 1 else "blue", "square"),
               det(3, 0, "white", "star", "moves up" if k >= 2 else "still")] for k in range(4)]
    still = counted_tracks(object_tracks(frames), 2, ["still"], every=True)
    assert [track_name(t) for t in still] == ["blue square"]  # each word the one it shows most
    moving = counted_tracks(object_tracks(frames), 2, ["moves left", "moves up"])
    assert [track_name(t) for t in moving] == ["red circle", "white star"]
    assert [track_name(t) for t in counted_tracks(object_tracks(frames), 2, ["still"])] == ["blue square", "white star"]
    frames[0][0] = det(1, 5, action="still")  # one frame still is not "every"
    assert [track_name(t) for t in counted_tracks(object_tracks(frames), 2, ["still", "moves up"], every=True)] == \
        ["blue square", "white star"]


def test_describe_writes_one_sentence_per_object_with_the_times_of_its_changes():
    scene = [("gray",)] * 3 + [("navy",)] * 3
    frames = [[det(0, 5, action="still"), det(6, 1, "blue", "square")] for _ in range(6)]
    for k in (1, 2, 3, 4):  # the circle grows in frames 1-4, frame 3 misread as still (smoothed away)
        frames[k][0] = det(0, 5, action="grows" if k != 3 else "still")
    frames[4].append(det(3, 3, "white", "star"))  # a false alarm in one frame only: dropped
    frames[5][1] = det(6, 1, "green", "square")  # the square turns green in the last frame
    del frames[4][1]  # and is missed the frame before (a gap); the star, 3 cells away, is not taken for it
    def position(cell):
        return [("top", "middle", "bottom")[cell[0] * 3 // 8], ("left", "center", "right")[cell[1] * 3 // 8]]

    text = describe(scene, frames, TIMES, position)
    # smoothing takes each frame's neighbours as read: grows, grows, still, grows -> grows in frames 1-3 only
    assert text == (" gray; from 0.9 s navy. red circle, top center: still; from 0.4 s grows; from 1.1 s still."
                    " blue square, bottom left: still; from 1.4 s green.")
    # an object that appears late and leaves early
    late = [[], [], [det(4, 4)], [det(4, 4)], [], []]
    assert describe([()] * 6, late, TIMES) == " from 0.6 s red circle: still; from 1.1 s gone."


def test_the_tracks_layout_writes_the_description_as_word_embeddings(monkeypatch):
    with pytest.raises(ValueError, match="layout is 'frames', 'tracks' or 'story'"):
        tiny_slots_model(layout="track")
    with pytest.raises(ValueError, match="'silent' words apply to layout 'frames'"):
        tiny_slots_model(layout="tracks", silent=["still"])
    model = tiny_slots_model(layout="tracks")
    conn = model.connector
    grid = (3, 4, 4)
    per_frame = tiny_slots_model().connector.project_grid(grid)[1]
    assert conn.project_grid(grid) == (1, 3 * per_frame) and model.num_visual_tokens(3) == 3 * per_frame
    feats = VisualFeatures(tokens=torch.zeros(1, 3, 16, 32), grid=grid, timestamps=torch.tensor([[0.25, 0.75, 1.25]]))
    found = torch.full((1, 3, 16), -5.0)
    found[0, :, 5] = 5.0  # one object in cell (1, 1), every frame
    found[0, 2, 6] = 4.0  # in the last frame also in cell (1, 2)
    colors, shapes = torch.zeros(1, 3, 16, 4), torch.zeros(1, 3, 16, 2)
    colors[..., 2] = 1  # blue
    shapes[..., 1] = 1  # circle
    tones = torch.zeros(1, 3, 2)
    monkeypatch.setattr(conn, "split_logits", lambda f: (found, [colors, shapes], [tones]))

    def motion(f, b, t, c):  # still, then moving left from the second frame (sure of both)
        logits = torch.zeros(len(c), 3)
        logits[:, 0] = 4
        logits[t >= 1, 1] = 8
        return [logits]

    monkeypatch.setattr(conn, "motion_logits", motion)
    assert conn.describe(feats) == [" gray. blue circle, top left: still; from 0.8 s moves left."]
    out = conn(feats)
    assert out.groups == 1 and out.embeds.shape[1] == 3 * per_frame
    assert nearest_words(model, out.embeds[0][out.mask[0]]) == conn.describe(feats)[0]
    assert conn.truncated == 0
    assert conn.written(feats) == conn.describe(feats)
    colors[0, 1:, 5:7, 1] = 1.2  # frames 1 and 2 read the circle as green, by a hair (0.2 nats)
    assert conn.describe(feats) == [" gray. blue circle, top left: still; from 0.8 s green moves left."]
    conn.configure(switch_cost=2.0)  # decoded over the track: a doubtful green is not a change
    assert conn.describe(feats) == [" gray. blue circle, top left: still; from 0.8 s moves left."]
    # the heads' words read once and handed in decode the same way; without their scores, nothing is decoded
    assert conn.detections(feats, conn.detect(feats, scores=True)) == conn.detections(feats)
    def words(seen):
        return [[[(d.identity, d.motion) for d in frame] for frame in clip[1]] for clip in seen]
    assert words(conn.detections(feats, conn.detect(feats))) != words(conn.detections(feats))
    with pytest.raises(ValueError, match="switch_cost"):
        conn.configure(switch_cost=-1)
    with pytest.raises(ValueError, match="link_motion"):
        conn.configure(link_motion=-1)


def test_text_tokens_fix_the_tracks_slot_whatever_the_frame_count():
    with pytest.raises(ValueError, match="text_tokens"):
        tiny_slots_model(text_tokens=8)  # the frames layout has one slot per frame
    model = tiny_slots_model(layout="tracks", text_tokens=6)
    for frames in (3, 12, 40):
        assert model.connector.project_grid((frames, 4, 4)) == (1, 6) and model.num_visual_tokens(frames) == 6
    feats = VisualFeatures(tokens=torch.randn(2, 12, 16, 32), grid=(12, 4, 4),
                           timestamps=torch.arange(12.0)[None].expand(2, -1))
    out = model.connector(feats)
    texts = model.connector.describe(feats)
    assert out.embeds.shape[:2] == (2, 6)
    long = [len(model.processor.tokenizer(t, add_special_tokens=False)["input_ids"]) > 6 for t in texts]
    assert any(long) and model.connector.truncated == sum(long)


def test_a_built_model_switches_to_the_tracks_layout_and_keeps_it_when_saved(tmp_path):
    from vlm.model import VideoLLM

    model = tiny_slots_model()
    with pytest.raises(ValueError, match=r"\['hidden'\] change the weights"):
        model.apply_settings({"connector": {"hidden": 64}})  # the heads' width
    before = model.num_visual_tokens(2)
    with pytest.raises(ValueError, match=r"slots \(0\)"):
        model.apply_settings({"connector": {"slots": 0}})
    assert model.num_visual_tokens(2) == before  # the refused setting left the model as it was
    model.apply_settings({"connector": {"slots": model.connector.slots + 1}})  # objects named per frame: no weights
    assert model.num_visual_tokens(2) > before
    with pytest.raises(ValueError, match="text_tokens"):
        model.apply_settings({"connector": {"text_tokens": 6}})  # still the frames layout
    with pytest.raises(ValueError, match="repeats is 'frames' or 'tracks'"):
        model.apply_settings({"connector": {"repeats": "clips"}})
    model.apply_settings({"connector": {"layout": "tracks", "text_tokens": 6, "threshold": 0.7, "repeats": "tracks"}})
    assert model.num_visual_tokens(12) == 6 and model.connector.threshold == 0.7
    model.save_pretrained(tmp_path / "m")
    again = VideoLLM.from_pretrained(tmp_path / "m")
    assert (again.connector.layout, again.connector.text_tokens, again.connector.threshold, again.connector.repeats) \
        == ("tracks", 6, 0.7, "tracks")
    again.apply_settings({"connector": {"layout": "frames"}})
    assert again.connector.text_tokens is None and again.num_visual_tokens(2) == 2 * again.connector.project_grid((1, 4, 4))[1]


def test_count_text_says_how_many_and_which_objects_a_rule_counts():
    from vlm.connectors.counts import count_rules, count_text
    vocab = {"color": ["red", "blue", "white"], "shape": ["circle", "square", "star"], "action": ["still", "moves left"]}
    # a red circle moves left throughout; a blue square is still; a white star appears in frame 2; the square is
    # gone in the last frame
    frames = [[det(1, 5 - k, action="moves left")] + [det(5, 5, "blue", "square")] * (k < 3)
              + [det(3, 0, "white", "star")] * (k >= 2) for k in range(4)]
    rules = count_rules({"moving objects": {"action": ["moves left"], "names": True},
                         "still objects": {"action": ["still"], "every": True},
                         "appearing objects": {"appears": True, "names": True},
                         "disappearing objects": {"disappears": True, "names": True}}, vocab)
    assert count_text(rules, frames) == (" moving objects: 1: red circle. still objects: 2."
                                         " appearing objects: 1: white star. disappearing objects: 1: blue square.")
    verbs = count_rules({"appearing": {"appears": True, "verb": "appears"}, "gone": {"disappears": True, "verb": "disappears"}},
                        vocab)  # a sentence per object, in the words an answer would use
    assert count_text(verbs, frames) == " white star appears. blue square disappears."
    removed = count_rules({"appearing": {"appears": True, "verb": "appears"}, "gone": None}, vocab)  # null: no rule
    assert count_text(removed, frames) == " white star appears."
    for bad in ({"appears": True, "every": True}, {"action": ["still"], "appears": True}, {"names": True},
                {"appears": True, "becomes": "still"}, {"action": ["still"], "every": True, "becomes": "moves left"}):
        with pytest.raises(ValueError, match=r"is one \{attribute: \[words\]\} \(options: every, several, becomes or changes; names, verb or says\) or \{appears"):
            count_rules({"objects": bad}, vocab)
    with pytest.raises(ValueError, match=r"counts\['grown'\]: \['huge'\] are not words of 'action'"):
        count_rules({"grown": {"action": ["still"], "becomes": "huge"}}, vocab)


def test_a_change_rule_says_which_objects_end_with_other_words_than_they_began():
    from vlm.connectors.counts import count_rules, count_text
    vocab = {"color": ["red", "blue", "white", "purple"], "shape": ["circle"], "size": ["small", "large"]}
    # grows; shrinks; a one-frame slip in the middle, then one in the last frame: both stay small
    sizes = {"red": "ssslll", "blue": "llllss", "white": "sslsss", "purple": "ssssl"}
    frames = [[Detection((2 * i, 1), (c, "circle"), ({"s": "small", "l": "large"}[w[k]],))
               for i, (c, w) in enumerate(sizes.items()) if k < len(w)] for k in range(6)]
    rules = count_rules({"grown": {"size": ["small"], "becomes": "large", "verb": "grows"},
                         "shrunk": {"size": ["large"], "becomes": "small", "verb": "shrinks"},
                         "how many grew": {"size": ["small"], "becomes": "large"}}, vocab)
    assert count_text(rules, frames) == " red circle grows. blue circle shrinks. how many grew: 1."


def test_a_rule_can_say_its_objects_in_a_questions_words_and_count_objects_whose_words_vary():
    from vlm.connectors.counts import count_rules, count_text
    vocab = {"color": ["red", "blue", "white"], "shape": ["circle", "square"],
             "action": ["still", "moves left", "moves right"]}
    L, R, S = "moves left", "moves right", "still"
    acts = {"red": [L, L, R, R, R], "blue": [S] * 5, "white": [R, R, R, S, S]}  # bounces; still; moves right, stops
    frames = [[Detection((2 * i, 1), (c, "circle"), (a[k],)) for i, (c, a) in enumerate(acts.items())] for k in range(5)]
    rules = count_rules({"right": {"action": [R], "says": "the object that moves to the right is the {name}"},
                         "bounce": {"action": [L, R], "several": True, "says": "the object that bounces is the {name}"},
                         "still": {"action": [S], "every": True, "says": "the object that stays still is the {name}"}},
                        vocab)
    assert count_text(rules, frames) == (" the object that moves to the right is the red circle. the object that moves"
                                         " to the right is the white circle. the object that bounces is the red circle."
                                         " the object that stays still is the blue circle.")
    with pytest.raises(ValueError, match=r"the template names the object with \{name\}"):
        count_rules({"right": {"action": [R], "says": "it moves right"}}, vocab)
    with pytest.raises(ValueError, match=r"is one \{attribute"):
        count_rules({"right": {"action": [R], "says": "{name} x", "verb": "moves"}}, vocab)


def test_a_changes_rule_says_how_often_each_objects_words_change():
    from vlm.connectors.counts import count_rules, count_text
    vocab = {"color": ["red", "blue", "green"], "shape": ["circle", "square", "star"],
             "action": ["still", "moves left", "moves right", "moves up"]}
    L, R, S, U = "moves left", "moves right", "still", "moves up"
    tracks = {  # (colour per frame, action per frame) of three objects, each on its own row
        "circle": ("rrbbbbgg", [L, L, R, R, S, R, L, L]),  # two colour changes; left, right, (stop), right, left: 2
        "square": ("bbbbbbbb", [S] * 8),  # nothing changes
        "star": ("rrrrrbrr", [U, U, U, U, R, R, R, R])}  # a one-frame colour slip; up, then right: not among L / R
    colour = {"r": "red", "b": "blue", "g": "green"}
    frames = [[Detection((2 * i, 3), (colour[c[k]], shape), (a[k],)) for i, (shape, (c, a)) in enumerate(tracks.items())]
              for k in range(8)]
    rules = count_rules({"colour": {"color": ["red", "blue", "green"], "changes": True,
                                    "says": "the {name} changes color {times}"},
                         "bounce": {"action": [L, R], "changes": True, "says": "the {name} bounces off a wall {times}"},
                         "changing": {"color": ["red", "blue", "green"], "changes": True}}, vocab)
    assert count_text(rules, frames) == (" the blue circle changes color 2 times. the blue circle bounces off a wall 2 times."
                                         " changing: 1.")
    one = [[Detection((0, 3), ("red" if k < 4 else "blue", "circle"), (S,))] for k in range(8)]
    assert count_text(rules[:1], one) == " the red circle changes color 1 time."
    with pytest.raises(ValueError, match=r"says \{times\}, which a rule with changes: true or swaps: true counts"):
        count_rules({"x": {"color": ["red"], "says": "the {name} changes {times}"}}, vocab)
    with pytest.raises(ValueError, match=r"is one \{attribute"):
        count_rules({"x": {"color": ["red"], "changes": True, "every": True}}, vocab)


def test_event_sentences_say_each_held_change_in_the_frame_that_first_shows_it():
    from vlm.connectors.events import event_rules, event_texts
    vocab = {"color": ["red", "blue", "green"], "shape": ["circle", "square"],
             "action": ["still", "moves left", "moves right"]}
    rules = event_rules({"action": {"still > moves left": "starts moving to the left",
                                    "moves left > moves right": "bounces off the left wall",
                                    "moves left > still": "stops moving"},
                         "color": {"* > *": "turns {to}"}}, vocab)
    L, R, S = "moves left", "moves right", "still"
    # a red circle: still, then moves left, then bounces and turns green; a blue square starts moving left and, in the
    # last frame only, is seen still (not held for two frames)
    circle = [S, S, L, L, R, R]
    square = [S, S, S, L, L, S]
    frames = [[Detection((1, 5), ("red" if k < 4 else "green", "circle"), (circle[k],)),
               Detection((6, 1), ("blue", "square"), (square[k],))] for k in range(6)]
    said = event_texts(rules, frames, hold=2)
    assert said == ["", "", " red circle starts moving to the left.", " blue square starts moving to the left.",
                    " red circle bounces off the left wall. red circle turns green.", ""]
    assert event_texts(rules, frames, hold=1)[5] == " blue square stops moving."  # one frame is enough
    # appears / disappears: where a track begins after the first frame, and after the last frame of one that ends early
    late = [[Detection((3, 3), ("blue", "circle"), (S,))] if 2 <= k <= 3 else [] for k in range(6)]
    extent = {"appears": "appears", "disappears": "disappears"}
    assert event_texts([], late, extent=extent) == ["", "", " blue circle appears.", "", " blue circle disappears.", ""]
    # "moves * > still" is not a word; written plainly it is
    with pytest.raises(ValueError, match=r"events\['action'\]\['moves \* > still'\].*\['moves \*'\] are not its words"):
        event_rules({"action": {"moves * > still": "stops moving"}}, vocab)
    with pytest.raises(ValueError, match=r"events names 'speed', not an object or motion attribute"):
        event_rules({"speed": {"* > *": "changes"}}, vocab)


def test_story_tells_every_change_in_time_order_as_a_timed_caption():
    from vlm.connectors.events import event_rules
    from vlm.connectors.story import story
    vocab = {"color": ["red", "blue", "green"], "shape": ["circle", "square"],
             "action": ["still", "moves left", "moves right"]}
    rules = event_rules({"action": {"still > moves left": "starts moving to the left",
                                    "moves left > moves right": "bounces off the left wall"},
                         "color": {"* > *": "turns {to}"}}, vocab)
    L, R, S = "moves left", "moves right", "still"
    circle = [S, S, L, L, R, R]
    frames = [[Detection((1, 5), ("red" if k < 4 else "green", "circle"), (circle[k],))]
              + ([Detection((6, 1), ("blue", "square"), (S if k < 4 else R,))] if k >= 1 else []) for k in range(6)]
    scene = [("gray",)] * 3 + [("navy",)] * 3
    times = [0.1 + 0.3 * k for k in range(6)]
    text = story(scene, frames, times, rules, {"appears": "fades in"})
    assert text == (" A red circle is on a gray background. The red circle: still."
                    " At 0.4 seconds, a blue square fades in: still."
                    " At 0.7 seconds, the red circle starts moving to the left."
                    " At 1.0 seconds, the background becomes navy."
                    " At 1.3 seconds, the red circle turns green."
                    " At 1.3 seconds, the red circle bounces off the left wall."
                    " At 1.3 seconds, the blue square: moves right.")  # no rule names still > moves right
    # what `vlm eval slots` counts per kind: the rule's words as written, the extent's key, not its verb
    from vlm.connectors.story import timeline
    assert [e.kind for e in timeline(scene, frames, times, rules, {"appears": "fades in"})[3]] == [
        "appears", "starts moving to the left", "background", "turns {to}", "bounces off the left wall", "other"]
    # with `stops`, a change into the rest word is dated by the last frame of the word before: where it last moved
    stopping = [[Detection((1, 5), ("red", "circle"), (L if 1 <= k <= 3 else S,))] for k in range(6)]
    stop_rules = event_rules({"action": {"still > moves left": "starts moving to the left",
                                         "moves left > still": "stops moving"}}, vocab)
    assert story([], stopping, times, stop_rules).endswith(" At 1.3 seconds, the red circle stops moving.")
    assert story([], stopping, times, stop_rules, {"stops": "still"}) == (
        " A red circle is on the background. The red circle: still."
        " At 0.4 seconds, the red circle starts moving to the left. At 1.0 seconds, the red circle stops moving.")
    # an object gone before the end disappears; with none at the start the scene says so
    late = [[Detection((3, 3), ("blue", "circle"), (S,))] if 2 <= k <= 3 else [] for k in range(6)]
    assert story([], late, times) == (" The video starts with the background and no objects."
                                      " At 0.7 seconds, a blue circle appears: still."
                                      " At 1.3 seconds, the blue circle disappears.")


def test_story_with_covered_follows_a_hidden_object_and_says_where_it_is_at_the_end():
    from vlm.connectors.story import story, timeline
    S, box = ("still",), ("red", "box")
    # the blue ball at (5, 2) goes under the box above it, which swaps places with the other box along arcs
    left = [(4, 2), (4, 2), (3, 3), (2, 4), (3, 5), (4, 6)]
    right = [(4, 6), (4, 6), (5, 5), (6, 4), (5, 3), (4, 2)]
    frames = [[Detection(left[k], box, S), Detection(right[k], box, S)]
              + ([Detection((5, 2), ("blue", "ball"), S)] if k < 2 else []) for k in range(6)]
    times = [0.1 + 0.3 * k for k in range(6)]
    tail = " The blue ball: still. At 0.7 seconds, the blue ball disappears"
    assert story([], frames, times, (), {"covered": "under"}).endswith(
        tail + " under the red box. At the end, the blue ball is under the second red box from the left.")
    assert story([], frames, times).endswith(tail + ".")  # without the setting: gone, as before
    assert timeline([], frames, times, (), {"covered": "under"})[3][-1].kind == "covered"
    # one box: no place among others is needed; an object that leaves far from any other is not hidden
    one = [[Detection(left[k], box, S)] + ([Detection((5, 2), ("blue", "ball"), S)] if k < 2 else []) for k in range(6)]
    assert story([], one, times, (), {"covered": "under"}).endswith(" At the end, the blue ball is under the red box.")
    far = [[Detection((0, 7), box, S)] + ([Detection((5, 2), ("blue", "ball"), S)] if k < 2 else []) for k in range(6)]
    assert story([], far, times, (), {"covered": "under"}).endswith(" the blue ball disappears.")
    # a look-alike beside it is a second reading of the heads, and an object seen again was not hidden: gone, as before
    twin = [[Detection(left[k], box, S, distinct=True)] + ([Detection((5, 2), box, S, distinct=True)] if k < 2 else [])
            for k in range(6)]  # two readings the centre offsets keep apart
    assert story([], twin, times, (), {"covered": "under"}).endswith(" the red box disappears.")
    back = [f + ([Detection((0, 0), ("blue", "ball"), S)] if k >= 4 else []) for k, f in enumerate(one)]
    assert " under" not in story([], back, times, (), {"covered": "under"})
    from vlm.connectors.events import settings
    assert settings({"covered": None})[2] == {} and settings({"covered": "under"})[2] == {"covered": "under"}  # null: off


def _shuffle_tracking():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import shuffle_tracking
    return shuffle_tracking


def test_shuffle_tracking_follows_the_covered_ball_and_names_its_box_at_the_end():
    end_position = _shuffle_tracking().end_position
    S, box = ("still",), ("red", "box")
    # the ball at (5, 2) is covered by the box above it; that box swaps with the other along arcs (one over, one
    # under), so it ends second of the two from the left
    left = [(4, 2), (4, 2), (3, 3), (2, 4), (3, 5), (4, 6)]
    right = [(4, 6), (4, 6), (5, 5), (6, 4), (5, 3), (4, 2)]
    frames = [[Detection(left[k], box, S), Detection(right[k], box, S)]
              + ([Detection((5, 2), ("blue", "ball"), S)] if k < 2 else []) for k in range(6)]
    assert end_position(frames, "box", merge=True) == 2
    # neighbouring look-alikes at rest are one object under the one-name rule: the two boxes' tracks merge
    near = [[Detection((4, 2), box, S), Detection((4, 3), box, S)]
            + ([Detection((5, 3), ("blue", "ball"), S)] if k < 2 else []) for k in range(6)]
    assert end_position(near, "box", merge=False) == 2 and end_position(near, "box", merge=True) == 1
    # no ball ever seen, or none near a box: not followed
    assert end_position([f[:2] for f in frames], "box", merge=True) is None
    far = [[Detection((0, 0), box, S)] + ([Detection((5, 5), ("blue", "ball"), S)] if k < 2 else []) for k in range(6)]
    assert end_position(far, "box", merge=True) is None


def test_shuffle_tracking_links_with_the_connectors_motion_cost():
    """With a motion cost (the script links under the connector's `link_motion`), the ball's box is followed
    through a pass."""
    end_position = _shuffle_tracking().end_position
    # the ball under the left box, which moves right past the other: it ends second from the left
    frames = passing_boxes()
    frames[0].append(det(5, 2, "blue", shape="ball"))
    assert end_position(frames, "box", merge=False) == 1  # linked by place: the boxes traded
    with linking(2.0):
        assert end_position(frames, "box", merge=False) == 2


@pytest.mark.slow
def test_shuffle_tracking_reports_perfect_detections_on_a_generated_world(tmp_path, capsys):
    import json
    from pathlib import Path

    from data_tools.synth import generate
    generate(tmp_path / "w", 24, 0, frames=16, size=128, eval_fraction=0.5, workers=1, progress=False)
    main = _shuffle_tracking().main
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "synth_long.yaml")
    strip = tmp_path / "strip.png"
    assert main(["--recipe", recipe, "--data", str(tmp_path / "w"), "--frames", "8", "16", "--strip", str(strip),
                 "--swaps"]) == 0
    assert strip.read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["frames"] for r in rows] == [8, 16] and rows[0]["clips"] >= 1
    # all four resting boxes named when the detections are the annotations; every frame at least as well followed
    assert all(r["rest_all_four_named"] == r["rest_frames"] > 0 for r in rows)
    assert rows[1]["end_right_without_merge"] >= rows[0]["end_right_without_merge"]
    # every frame read: each swap is seen to end, and no swap is said in a clip without one
    assert rows[1]["swaps_right"] == rows[1]["swaps_places_right"] == rows[1]["clips"]  # how many, and which places
    assert rows[1]["swaps_said_in_other_clips"] == 0 < rows[1]["other_clips"]
    with pytest.raises(SystemExit, match="no shuffle clips"):
        (tmp_path / "w" / "regions_test.json").write_text("[]")
        main(["--recipe", recipe, "--data", str(tmp_path / "w")])


def test_swaps_count_the_times_look_alike_objects_leave_their_places_and_fill_them_again():
    from vlm.connectors.counts import count_rules, count_text
    from vlm.connectors.events import settings
    from vlm.connectors.story import story
    from vlm.connectors.tracks import swap_counts, swap_events
    vocab = {"color": ["red", "blue"], "shape": ["box", "circle"], "action": ["still"]}
    rest = [(4, 1), (4, 3), (4, 4), (4, 6)]
    boxes = [
        [(2, 6), (4, 1), (4, 3), (4, 4)],  # one box held up before the clip first rests: not a swap
        rest,
        [(3, 2), (5, 2), (4, 4), (4, 6)],  # the first two trade places (crossing: one above, one below)
        rest,
        [(3, 5), (5, 5), (4, 1), (4, 3)],  # the last two
        [(4, 1), (3, 4), (4, 6)],  # still moving, one box unseen
        rest,
        [(3, 6), (4, 1), (4, 3), (4, 4)],  # one box lifted and put back: one place empty, not a swap
        rest,
        [(4, 1), (4, 3)],  # two boxes unseen for a frame, none elsewhere: not a swap
        rest,
    ]
    frames = [[det(*c, shape="box") for c in cells] + [det(5, 1, "blue", "circle")] for cells in boxes]
    assert swap_counts(frames) == {("red", "box"): 2}
    assert swap_counts(frames[:4]) == {("red", "box"): 1}  # cut after the first swap
    assert swap_events(frames) == [(2, ("red", "box"), (1, 2)), (4, ("red", "box"), (3, 4))]  # places left to right
    times = [0.1 * k for k in range(len(frames))]
    told = story([], frames, times, (), {"swaps": "the {places} {name}es swap places"})
    assert " At 0.2 seconds, the first and second red boxes swap places. At 0.4 seconds, the third and fourth red boxes" \
        " swap places." in told, told
    assert "swap" not in story([], frames, times, (), {})
    with pytest.raises(ValueError, match=r"swaps is a sentence with \{places\}"):
        settings({"swaps": "the boxes swap places"})
    rules = count_rules({"swaps": {"swaps": True, "names": True},
                         "boxes": {"swaps": True, "says": "the {name}es swap places {times}"}}, vocab)
    assert count_text(rules, frames) == " swaps: 2: red box. the red boxes swap places 2 times."
    still = [[det(4, 1, shape="box"), det(4, 6, shape="box")]] * 4  # look-alikes that never move
    assert count_text(rules, still) == " swaps: 0."
    for bad in ({"swaps": True, "verb": "swap"}, {"swaps": True, "appears": True}, {"swaps": True, "action": ["still"]}):
        with pytest.raises(ValueError, match=r"or \{swaps: true\} \(options: names or says\)"):
            count_rules({"swaps": bad}, vocab)


def test_link_motion_is_a_scoring_time_setting_saved_with_the_model(tmp_path):
    from vlm.model import VideoLLM

    model = tiny_slots_model(slots=3)
    assert model.connector.link_motion == 0.0
    model.apply_settings({"connector": {"link_motion": 1.0}})
    model.save_pretrained(tmp_path / "m")
    assert VideoLLM.from_pretrained(tmp_path / "m").connector.link_motion == 1.0
