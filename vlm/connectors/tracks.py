"""Object tracks from per-frame detections, and the text a word-slot connector writes from them.

A `word_slots` connector with `layout: tracks` does not write its words frame by frame: it links each frame's
detected objects to those of the frames before (nearest cell, fewest differing attributes), smooths every word
sequence over time (the majority of each frame and its neighbours: a head that is right most of the time gives
clean runs), and writes one sentence per object as a caption would, with the time at which each change begins:

    " gray. red circle, top right: still; from 0.6 s grows; from 1.6 s still. orange triangle, top center: still."

What a 135M LLM cannot learn in a few steps from per-frame words (when something starts, how many objects move, what
happens first) is then stated once per object (docs/GROUNDING.md has the numbers). The scene's words are written
the same way, first. Everything here is plain Python on a handful of detections per frame.
"""

from __future__ import annotations

import functools
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence


@dataclass
class Detection:
    cell: tuple[int, int]  # (row, column) on the feature grid
    identity: tuple[str, ...]  # the object attributes' words (colour, shape, ...): what says which object it is
    motion: tuple[str, ...] = ()  # the motion attributes' words (what it is doing)
    scores: tuple[Mapping[str, float], ...] = ()  # per attribute of identity + motion, each word's log-probability
    distinct: bool = False  # its detector already named each object once (centre offsets): never merged as a repeat


@dataclass
class Track:
    frames: list[int] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)


# what a clip's frames showed: the scene's words per frame, the detections per frame, the frames' times (seconds)
Seen = tuple[list[tuple[str, ...]], list[list[Detection]], list[float]]


def merge_duplicates(dets: Sequence[Detection]) -> list[Detection]:
    """One frame's detections without the repeats a large object makes: a detection next to (within one cell of)
    an earlier one with the same identity words is dropped, unless its detector marked it `distinct`."""
    kept: list[Detection] = []
    for d in dets:
        if d.distinct or not any(k.identity == d.identity and max(abs(k.cell[0] - d.cell[0]),
                                                                  abs(k.cell[1] - d.cell[1])) <= 1 for k in kept):
            kept.append(d)
    return kept


def without_repeat_tracks(frames: Sequence[Sequence[Detection]]) -> list[list[Detection]]:
    """Each frame's detections without those of a repeat track: one seen only beside a longer track of the same
    identity words (within one cell of it in every frame it is seen). It is a second reading of that object, as
    `merge_duplicates` drops one in a single frame: a moving or large object lights a neighbouring cell that the
    centre offsets keep as `distinct`, for a frame or a few ("a blue diamond appears ... the blue diamond
    disappears"). Words that several objects show in the last frame are left alone: look-alikes side by side (a
    shuffle's boxes, whose tracks break as they cross) are objects, not repeats."""
    frames = [merge_duplicates(f) for f in frames]
    tracks = link(frames)
    shared = resting_places(frames)
    tracks = [tr for tr in tracks if tr.detections[0].identity not in shared]  # several there at the end: not repeats
    seen: dict[int, list[tuple[int, Detection]]] = {}  # frame -> (track length, detection)
    for tr in tracks:
        for t, d in zip(tr.frames, tr.detections):
            seen.setdefault(t, []).append((len(tr.frames), d))
    dropped = {id(d) for tr in tracks
               if all(any(n > len(tr.frames) and o.identity == d.identity
                          and max(abs(o.cell[0] - d.cell[0]), abs(o.cell[1] - d.cell[1])) <= 1 for n, o in seen[t])
                      for t, d in zip(tr.frames, tr.detections))
               for d in tr.detections}
    return [[d for d in f if id(d) not in dropped] for f in frames]


# the cost of each differing motion word in `link`, as the connector running it sets it (`linked`)
MOTION_COST: ContextVar[float] = ContextVar("MOTION_COST", default=0.0)


@contextmanager
def linking(motion_cost: float) -> Iterator[None]:
    """Every `link` inside charges `motion_cost` per differing motion word."""
    token = MOTION_COST.set(motion_cost)
    try:
        yield
    finally:
        MOTION_COST.reset(token)


def linked(method: Callable[..., Any]) -> Callable[..., Any]:
    """A connector method during which every `link` charges the connector's `link_motion` (`linking`)."""
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with linking(self.link_motion):
            return method(self, *args, **kwargs)
    return run


def link(frames: Sequence[Sequence[Detection]], max_jump: int = 3, max_gap: int = 2) -> list[Track]:
    """Tracks from each frame's detections: greedily, the pairs (track, detection) of lowest cost first, where the
    cost is the cells' Chebyshev distance plus 2 per differing identity word (plus `MOTION_COST` per differing
    motion word: look-alikes passing each other keep their ways); a track takes a detection that
    shares at least one identity word with it (an object may change colour, not colour and shape at once), at most
    `max_jump` cells from where it was last seen, at most `max_gap` frames before. Unmatched detections start
    tracks."""
    motion_cost = MOTION_COST.get()
    tracks: list[Track] = []
    for t, dets in enumerate(frames):
        live = [tr for tr in tracks if t - tr.frames[-1] <= max_gap]
        pairs = []
        for i, tr in enumerate(live):
            last = tr.detections[-1]
            for j, d in enumerate(dets):
                jump = max(abs(last.cell[0] - d.cell[0]), abs(last.cell[1] - d.cell[1]))
                differ = sum(a != b for a, b in zip(last.identity, d.identity))
                moves = sum(a != b for a, b in zip(last.motion, d.motion)) if motion_cost else 0
                if jump <= max_jump and (differ < len(d.identity) or not d.identity):
                    pairs.append((jump + 2 * differ + motion_cost * moves, i, j))
        taken_tracks, taken_dets = set(), set()
        for _, i, j in sorted(pairs):
            if i not in taken_tracks and j not in taken_dets:
                live[i].frames.append(t)
                live[i].detections.append(dets[j])
                taken_tracks.add(i)
                taken_dets.add(j)
        tracks += [Track([t], [d]) for j, d in enumerate(dets) if j not in taken_dets]
    return tracks


def smooth(values: Sequence[str]) -> list[str]:
    """Each value replaced by the majority of itself and its two neighbours (kept when all three differ)."""
    out = list(values)
    for k in range(1, len(values) - 1):
        a, b, c = values[k - 1], values[k], values[k + 1]
        if a == c != b:
            out[k] = a
    return out


def _columns(rows: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Rows of words (one per frame), each column smoothed over time."""
    if not rows or not rows[0]:
        return [tuple(r) for r in rows]
    columns = [smooth([r[a] for r in rows]) for a in range(len(rows[0]))]
    return [tuple(c[k] for c in columns) for k in range(len(rows))]


def changes(rows: Sequence[tuple[str, ...]]) -> list[tuple[int, list[str]]]:
    """(index, the words that differ from the previous row) where a row differs; the first row in full."""
    out = []
    for k, row in enumerate(rows):
        if k == 0:
            out.append((0, list(row)))
        elif row != rows[k - 1]:
            out.append((k, [w for w, before in zip(row, rows[k - 1]) if w != before]))
    return out


def object_tracks(frames: Sequence[Sequence[Detection]]) -> list[Track]:
    """Each frame's detections linked into tracks (`link`), without the tracks of one frame (a head's one-frame
    slip would otherwise be an object)."""
    return [tr for tr in link([merge_duplicates(f) for f in frames]) if len(tr.frames) > 1]


def viterbi(scores: Sequence[Mapping[str, float]], switch: float) -> list[str]:
    """The words, one per frame, of highest summed log-probability (`scores`: each frame's words' log-probabilities)
    when every change of word costs `switch` nats: a confident one-frame word stays, a doubtful run of two goes."""
    best, back = dict(scores[0]), []
    for frame in scores[1:]:
        top = max(best, key=best.get)
        came = {w: w if best[w] >= best[top] - switch else top for w in frame}
        best = {w: best[came[w]] - switch * (came[w] != w) + frame[w] for w in frame}
        back.append(came)
    word = max(best, key=best.get)
    out = [word]
    for came in reversed(back):
        word = came[word]
        out.append(word)
    return out[::-1]


def settle(seen: Seen, scene_scores: Sequence[Sequence[Mapping[str, float]]], switch: float) -> Seen:
    """A clip's detections with every word sequence decoded by `viterbi` at a cost of `switch` nats per change:
    the scene's words per attribute over the frames (`scene_scores`: per frame, per scene attribute), each object's
    over the frames of its track (`link`; the detections' `scores`). What the heads say once per frame becomes
    what they say over the clip: a colour, shape or motion word that flips for a frame or two against the heads'
    own doubt is read as the word around it."""
    scenes, frames, times = seen
    if scene_scores and switch > 0:
        columns = [viterbi([frame[a] for frame in scene_scores], switch) for a in range(len(scene_scores[0]))]
        scenes = [tuple(c[k] for c in columns) for k in range(len(scene_scores))]
    frames = [merge_duplicates(f) for f in frames]
    decoded: dict[int, Detection] = {}
    for track in link(frames):
        if switch > 0 and all(d.scores for d in track.detections):
            columns = [viterbi([d.scores[a] for d in track.detections], switch)
                       for a in range(len(track.detections[0].scores))]
            for k, d in enumerate(track.detections):
                words, n = tuple(c[k] for c in columns), len(d.identity)
                decoded[id(d)] = replace(d, identity=words[:n], motion=words[n:])
    return scenes, [[decoded.get(id(d), d) for d in f] for f in frames], times


def ramp(values: Sequence[float]) -> tuple[int, int, float]:
    """The least-squares fit of a level, then a straight ramp from index s to index e, then a level, to `values`:
    (s, e, the change from the first level to the last). Every (s, e) is tried, each in constant time from prefix
    sums (the ramp's regressor is 0 up to s, (k - s) / (e - s) between, 1 from e): n^2 / 2 fits for n values."""
    n = len(values)
    total = [0.0]  # prefix sums of y and of k * y
    weighted = [0.0]
    for k, v in enumerate(values):
        total.append(total[-1] + v)
        weighted.append(weighted[-1] + k * v)
    mean = total[n] / n
    spread = sum((v - mean) ** 2 for v in values)
    best = (float("inf"), 0, 0, 0.0)
    for s in range(n - 1):
        for e in range(s + 1, n):
            span, tail = e - s, n - e
            sx = (span - 1) / 2 + tail  # sum of the regressor, of its square, of it times y
            sxx = (span - 1) * (2 * span - 1) / (6 * span) + tail
            sxy = (weighted[e] - weighted[s + 1] - s * (total[e] - total[s + 1])) / span + total[n] - total[e]
            var, cov = sxx - sx * sx / n, sxy - sx * mean
            if var > 1e-12:
                best = min(best, (spread - cov * cov / var, s, e, cov / var))
    return best[1], best[2], best[3]


def ramp_rule(setting: Mapping[str, object] | None, vocab: Mapping[str, Sequence[str]], identity: int
              ) -> tuple[int, int, tuple[str, str, str], float] | None:
    """`size_ramps`' arguments from a connector setting {read: size attribute, write: motion attribute, words: [rest,
    up, down], min_change: nats} (null: off), checked against the attributes' words (`vocab`: the `identity` object
    attributes, then the motion attributes)."""
    if not setting:
        return None
    names, keys = list(vocab), {"read", "write", "words", "min_change"}
    if set(setting) != keys:
        raise ValueError(f"word_slots: ramps takes {sorted(keys)}, not {sorted(setting)}")
    read, write, words = setting["read"], setting["write"], tuple(setting["words"])  # type: ignore[arg-type]
    if read not in names or len(vocab[read]) < 2 or write not in names[identity:]:
        raise ValueError(f"word_slots: ramps reads a size attribute of two or more words and writes a motion "
                         f"attribute, among {names}; not {read!r} and {write!r}")
    if len(words) != 3 or not set(words) <= set(vocab[write]):
        raise ValueError(f"word_slots: ramps words are [rest, up, down] among {write!r}'s {list(vocab[write])}")
    return names.index(read), names.index(write), words, float(setting["min_change"])  # type: ignore[arg-type]


def size_ramps(frames: Sequence[Sequence[Detection]], size: int, motion: int, words: Sequence[str],
               min_change: float, min_frames: int = 4) -> list[list[Detection]]:
    """Each track's growing and shrinking read from its size scores, not from the motion head, which sees one frame
    on each side and misses most slow changes: the margin of the `size` attribute's last word over its first (e.g.
    log p(large) - log p(small)), frame by frame, is fitted with a level, a ramp and a level (`ramp`); where it
    changes by `min_change` nats or more, the `motion` attribute's words = (rest, up, down), e.g. ("still",
    "grows", "shrinks"), say up (or down) from the ramp's first frame to its last where they said one of the three,
    and rest elsewhere where they said up or down; a track with a smaller change (or fewer than `min_frames`
    frames, or no scores) says rest where it said up or down. `size` and `motion`: attribute indices into identity
    + motion words, as in `track_words`; `motion` one of the motion words."""
    rest, up, down = words
    frames = [merge_duplicates(f) for f in frames]
    said: dict[int, Detection] = {}
    for track in link(frames):
        dets = track.detections
        change, s, e = 0.0, 0, -1
        if len(dets) >= min_frames and all(d.scores for d in dets):
            first, *_, last = dets[0].scores[size]
            s, e, change = ramp([d.scores[size][last] - d.scores[size][first] for d in dets])
        way = (up if change > 0 else down) if abs(change) >= min_change else rest
        for k, d in enumerate(dets):
            m = motion - len(d.identity)
            word = d.motion[m]
            if word in (rest, up, down) and (word != rest or way != rest):
                word = way if s <= k <= e else rest
            said[id(d)] = replace(d, motion=d.motion[:m] + (word,) + d.motion[m + 1:])
    return [[said.get(id(d), d) for d in f] for f in frames]


def track_words(track: Track, attribute: int) -> list[str]:
    """A track's words of one attribute (its index in identity + motion), frame by frame, smoothed over time."""
    return smooth([(d.identity + d.motion)[attribute] for d in track.detections])


def change_count(track: Track, attribute: int, words: Sequence[str]) -> int:
    """How often a track's words of `attribute`, smoothed over time, change among `words` (the frames showing other
    words skipped): each colour change; " moves left", " still", " moves right": one bounce."""
    wanted = set(words)
    kept = [v for v in track_words(track, attribute) if v in wanted]
    return sum(a != b for a, b in zip(kept, kept[1:]))


def counted_tracks(tracks: Sequence[Track], attribute: int, words: Sequence[str], min_frames: int = 2,
                   every: bool = False) -> list[Track]:
    """The tracks whose words of `attribute` (its index in identity + motion), smoothed over time, are one of `words`
    in at least `min_frames` frames (`every`: in all their frames); longest tracks first."""
    wanted, out = set(words), []
    for tr in tracks:
        values = track_words(tr, attribute)
        hits = sum(v in wanted for v in values)
        if hits == len(values) if every else hits >= min_frames:
            out.append(tr)
    return sorted(out, key=lambda tr: -len(tr.frames))


def varied_tracks(tracks: Sequence[Track], attribute: int, words: Sequence[str], min_frames: int = 2) -> list[Track]:
    """The tracks whose words of `attribute`, smoothed over time, include two or more of `words`, each in at least
    `min_frames` frames (e.g. " moves left", then " moves right": it bounced); longest tracks first."""
    out = []
    for tr in tracks:
        values = track_words(tr, attribute)
        if sum(values.count(w) >= min_frames for w in set(words)) >= 2:
            out.append(tr)
    return sorted(out, key=lambda tr: -len(tr.frames))


def changed_tracks(tracks: Sequence[Track], attribute: int, words: Sequence[str], becomes: str,
                   ends: int = 2) -> list[Track]:
    """The tracks whose words of `attribute`, smoothed over time, are one of `words` in their first `ends` frames
    and `becomes` in their last `ends` (e.g. a size that goes from "small" to "large"; a head's slip in a first or
    last frame, which smoothing cannot mend, is not a change); longest tracks first."""
    out = []
    for tr in tracks:
        values = track_words(tr, attribute)
        if len(values) >= 2 * ends and set(values[:ends]) <= set(words) and set(values[-ends:]) == {becomes}:
            out.append(tr)
    return sorted(out, key=lambda tr: -len(tr.frames))


def resting_places(frames: Sequence[Sequence[Detection]]) -> dict[tuple[str, ...], set[tuple[int, int]]]:
    """The identities that two or more objects show in the last frame (look-alikes), each with their cells there."""
    cells: dict[tuple[str, ...], set[tuple[int, int]]] = {}
    for d in frames[-1] if frames else ():
        cells.setdefault(d.identity, set()).add(d.cell)
    return {name: c for name, c in cells.items() if len(c) >= 2}


def swap_events(frames: Sequence[Sequence[Detection]], min_moved: int = 2
                ) -> list[tuple[int, tuple[str, ...], tuple[int, ...]]]:
    """Each time look-alike objects trade places (`resting_places`: e.g. four red boxes shuffled): the first frame
    of the move, the identity, and the places they left (1-based, left to right among their resting cells, read in
    the frames that show every object when there are such), in time order. A move is counted from the frames
    between two in which they rest in exactly those cells, when at some frame `min_moved` of the cells are empty and
    an object of that identity is seen elsewhere. Needs no tracks, so two identical objects that cross cannot be
    mixed up; a clip must rest between two swaps for them to be two (back-to-back swaps at a low frame rate are one,
    leaving up to four places), and the clip's start, before the objects first rest, is not counted."""
    out = []
    for name, rest in resting_places(frames).items():
        order = sorted(rest, key=lambda c: (c[1], c[0]))
        rested, start, left, seen_all = False, None, set(), set()
        for t, dets in enumerate(frames):
            here = {d.cell for d in dets if d.identity == name}
            if here == rest:
                if rested and start is not None:  # the places left in frames that show every object, if any
                    out.append((start, name, tuple(sorted(order.index(c) + 1 for c in seen_all or left))))
                rested, start, left, seen_all = True, None, set(), set()
            elif rested and len(rest - here) >= min_moved and here - rest:
                start = t if start is None else start
                left |= rest - here
                if len(here) >= len(rest):
                    seen_all |= rest - here
    return sorted(out)


def swap_counts(frames: Sequence[Sequence[Detection]], min_moved: int = 2) -> dict[tuple[str, ...], int]:
    """How often look-alike objects trade places (`swap_events`), per identity of `resting_places`."""
    out = dict.fromkeys(resting_places(frames), 0)
    for _, name, _ in swap_events(frames, min_moved):
        out[name] += 1
    return out


def track_name(track: Track) -> str:
    """A track's identity words as a caption names the object ("white diamond"): each word the one it shows most."""
    rows = [d.identity for d in track.detections]
    return " ".join(Counter(r[a] for r in rows).most_common(1)[0][0] for a in range(len(rows[0])))


def _at(t: float) -> str:
    return f"from {t:.1f} s"


def describe(scene: Sequence[tuple[str, ...]], frames: Sequence[Sequence[Detection]], times: Sequence[float],
             position: Callable[[tuple[int, int]], list[str]] | None = None, max_tracks: int = 6) -> str:
    """The text of one clip: the scene's words and their changes, then one sentence per object track (at most
    `max_tracks`, the longest; one-frame tracks dropped when the clip has 4 frames or more), objects in the order
    they first appear, then top to bottom and left to right. `position(cell)` gives the words of a track's first
    cell (e.g. ["top", "right"])."""
    parts = []
    if scene and scene[0]:
        said = [f"{_at(times[k])} " * (k > 0) + " ".join(words) for k, words in changes(_columns(scene))]
        parts.append("; ".join(said) + ".")
    tracks = [tr for tr in link([merge_duplicates(f) for f in frames]) if len(tr.frames) > 1 or len(times) < 4]
    tracks = sorted(tracks, key=lambda tr: -len(tr.frames))[:max_tracks]
    for tr in sorted(tracks, key=lambda tr: (tr.frames[0], tr.detections[0].cell)):
        rows = _columns([d.identity + d.motion for d in tr.detections])
        n = len(tr.detections[0].identity)
        first = (f"{_at(times[tr.frames[0]])} " if tr.frames[0] > 0 else "") + " ".join(rows[0][:n])
        if position is not None:
            first += ", " + " ".join(position(tr.detections[0].cell))
        said = [" ".join(rows[0][n:])]  # what it is doing first
        for k, words in changes(rows)[1:]:
            said.append(f"{_at(times[tr.frames[k]])} " + " ".join(words))
        if tr.frames[-1] < len(times) - 1:
            said.append(f"{_at(times[tr.frames[-1] + 1])} gone")
        parts.append(first + (": " + "; ".join(s for s in said if s) if any(said) else "") + ".")
    return " " + " ".join(parts) if parts else ""
