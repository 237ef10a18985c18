"""Event sentences of the word-slot connector, written in the frame where a change is first seen.

The heads say what each object is doing in each frame (" moves left", " still"); what happened ("the red star
bounces off the left wall", "the blue square turns green") is a change between frames, which a 135M LLM does not learn
to compose in a few steps (docs/GROUNDING.md). An event rule names the changes of one attribute worth saying and the
words that say them, e.g. for the action attribute

    {"still > moves left": "starts moving to the left", "moves left > moves right": "bounces off the left wall"}

and for colour {"* > *": "turns {to}"} (`*`: any word, `{from}` / `{to}`: the words of the change). The heads'
detections are linked into tracks (`vlm.connectors.tracks`), each track's words smoothed over time, and a change is
said when the words before and after it each hold for at least `hold` of the track's frames (a head's slip is not an
event), as " red star bounces off the left wall." after the words of the first frame that shows the new word, its
subject the object's identity words before the change. So a frame's time stamp says when, and the order of the
sentences says what came first. `appears` and `disappears` (verbs) say the same of an object's extent: " blue star
appears." in the first frame of a track that begins after the clip's first, " ... disappears." in the frame after the
last of one that ends before the clip's last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from vlm.connectors.tracks import Detection, Track, object_tracks, track_name, track_words

MAX_EVENTS = 3  # sentences written per frame at most (the longest-seen objects' first)
EXTENT = ("appears", "disappears", "covered", "swaps", "stops")  # the keys of the setting that are not attributes


@dataclass(frozen=True)
class EventRule:
    attribute: int  # the attribute's index in a detection's identity + motion words
    changes: tuple[tuple[str, str, str], ...]  # (word before or "*", word after or "*", predicate), first match wins
    words: tuple[str, ...] = ()  # the attribute's words (what {from} and {to} may say)

    def template(self, before: str, after: str) -> str | None:
        """The words of the first change that matches `before` -> `after`, as written ("turns {to}"; None: none)."""
        return next((said for a, b, said in self.changes
                     if before != after and a in ("*", before) and b in ("*", after)), None)

    def predicate(self, before: str, after: str) -> str | None:
        """What the change from `before` to `after` is called (None: not an event of this rule)."""
        said = self.template(before, after)
        return None if said is None else said.replace("{from}", before).replace("{to}", after)


def event_rules(events: Mapping[str, Mapping[str, str]], vocab: Mapping[str, Sequence[str]]) -> list[EventRule]:
    """The `events` setting, checked: attribute -> {"<word> > <word>": predicate}. `vocab`: the object then motion
    attributes' words, in the order of a detection's words."""
    rules = []
    for attr, changes in events.items():
        if attr not in vocab:
            raise ValueError(f"word_slots: events names {attr!r}, not an object or motion attribute ({list(vocab)})")
        if not isinstance(changes, Mapping) or not changes:
            raise ValueError(f"word_slots: events[{attr!r}] maps '<word> > <word>' to what the change is called, e.g. "
                             "{'still > moves left': 'starts moving to the left'}")
        parsed = []
        for change, said in changes.items():
            ends = [w.strip() for w in str(change).split(">")]
            unknown = [w for w in ends if w != "*" and w not in vocab[attr]]
            if len(ends) != 2 or unknown or not str(said).strip():
                raise ValueError(f"word_slots: events[{attr!r}][{change!r}]: write '<word> > <word>' with words of "
                                 f"{attr!r} (or *) and a predicate" + (f"; {unknown} are not its words" if unknown else ""))
            parsed.append((ends[0], ends[1], str(said).strip()))
        rules.append(EventRule(list(vocab).index(attr), tuple(parsed), tuple(vocab[attr])))
    return rules


def _runs(values: Sequence[str]) -> list[tuple[str, int, int]]:
    """(word, first index, last index) of each run of equal words."""
    out: list[tuple[str, int, int]] = []
    for k, v in enumerate(values):
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1], k)
        else:
            out.append((v, k, k))
    return out


def track_events(track: Track, rules: Sequence[EventRule], identity: int, hold: int = 2) -> list[tuple[int, str]]:
    """(clip frame, sentence) of each change of one track that a rule names, where the words before and after hold
    for at least `hold` frames each (runs shorter than that are dropped first). `identity`: how many of a
    detection's words name the object."""
    out = []
    names = [track_words(track, a) for a in range(identity)]
    for rule in rules:
        runs = [r for r in _runs(track_words(track, rule.attribute)) if r[2] - r[1] + 1 >= hold]
        for (before, _, last), (after, first, _) in zip(runs, runs[1:]):
            said = rule.predicate(before, after)
            if said:
                out.append((track.frames[first], f" {' '.join(n[last] for n in names)} {said}."))
    return out


def event_texts(rules: Sequence[EventRule], frames: Sequence[Sequence[Detection]], hold: int = 2,
                extent: Mapping[str, str] | None = None) -> list[str]:
    """One clip's event sentences per frame (at most `MAX_EVENTS` each), from its detections per frame; `extent`:
    the verbs of {"appears": ..., "disappears": ...}, either or none."""
    per_frame: list[list[str]] = [[] for _ in frames]
    extent = extent or {}
    if (rules or extent) and frames:
        identity = next((len(d.identity) for f in frames for d in f), 0)
        for track in sorted(object_tracks(frames), key=lambda tr: -len(tr.frames)):
            if "appears" in extent and track.frames[0] > 0:
                per_frame[track.frames[0]].append(f" {track_name(track)} {extent['appears']}.")
            for frame, sentence in track_events(track, rules, identity, hold):
                per_frame[frame].append(sentence)
            if "disappears" in extent and track.frames[-1] < len(frames) - 1:
                per_frame[track.frames[-1] + 1].append(f" {track_name(track)} {extent['disappears']}.")
    return ["".join(said[:MAX_EVENTS]) for said in per_frame]


def event_width(rules: Sequence[EventRule], extent: Mapping[str, str], tokens: Callable[[str], int],
                name_tokens: int) -> int:
    """The tokens a frame's event sentences may take: `MAX_EVENTS` of a name of `name_tokens` tokens and the longest
    predicate. `tokens(text)`: the LLM tokenizer's count."""
    said = [s.replace("{from}", w).replace("{to}", w) for r in rules for *_, s in r.changes for w in r.words]
    told = [s for k, s in extent.items() if k != "stops"]  # `stops` is a word that dates changes, never written
    longest = max((tokens(f" {s}.") for s in [*said, *told]), default=0)
    return MAX_EVENTS * (name_tokens + longest) if longest else 0


def settings(events: Any) -> tuple[Mapping[str, Mapping[str, str]], int, dict[str, str]]:
    """The `events` setting split: the attributes' rules, `hold` (default 2) and the extent verbs (`appears`,
    `disappears`, `covered`, `swaps`, a sentence with {places} and {name}, and `stops`, a rest word whose changes
    are dated by the word before; null: not told), the optional keys beside the attributes."""
    events = dict(events or {})
    hold = int(events.pop("hold", 2))
    if hold < 1:
        raise ValueError(f"word_slots: events hold ({hold}) is the frames a word must hold on each side, >= 1")
    extent = {k: str(v).strip() for k in EXTENT if (v := events.pop(k, None)) is not None}
    if "swaps" in extent and "{places}" not in extent["swaps"]:
        raise ValueError("word_slots: events swaps is a sentence with {places} (and {name}), e.g. "
                         "'the {places} {name}es swap places'")
    if not all(extent.values()):
        raise ValueError(f"word_slots: events {sorted(k for k, v in extent.items() if not v)} need a verb "
                         "(e.g. appears: appears)")
    return events, hold, extent
