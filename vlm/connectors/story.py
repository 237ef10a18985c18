"""The story layout of a word-slot connector: what the heads saw, told as a caption with times tells it.

The frames layout writes each frame's words and leaves what happened to be composed from frames compared; the tracks
layout (`vlm.connectors.tracks`) writes one sentence per object with the times its words change. The story writes
the same tracks as a timed caption does: the scene, then every change of every object in one time order, each as a
sentence that begins with its time and names its object,

    " A red circle and an orange triangle are on a noisy gray background. The red circle: still, small. The orange
    triangle: moves left, large. At 0.6 seconds, the red circle starts growing. At 1.1 seconds, the orange triangle
    bounces off the left wall. At 1.4 seconds, a blue star appears: still, small."

so the order of events and their times are stated, not inferred. A change is named by the connector's `events`
rules (`vlm.connectors.events`: "still > grows" -> "starts growing"); one no rule names is said with its new word
(" At 1.2 seconds, the red circle: moves right."); appearing and disappearing use the `events` extent verbs
(default "appears" / "disappears"). Each track's words are smoothed over time first, as in the tracks layout; no
position words: a caption names an object by its words.

Object permanence (the `events` extent `covered`, a preposition such as "under"): an object whose track ends in or
beside the cell of an object of another name that stays to the end, and that is not seen again, is hidden by it, not
gone, and moves with it. Its disappearance is told with the other object (" At 0.6 seconds, the blue ball
disappears under the red box.") and the story ends with where it is (" At the end, the blue ball is under the second
red box from the left."): an object that shares its name with others there at the end is named by its place among
them, left to right.

Look-alike objects that trade places (the `events` extent `swaps`, a sentence with {places} and {name}, e.g. "the
{places} {name}es swap places"): each time some of the objects that share a name at the end leave their resting
places and all come back (`vlm.connectors.tracks.swap_events`), " At 0.8 seconds, the first and third red boxes swap
places.", the places counted left to right.

A change into the `events` extent word `stops` (a rest word, e.g. "still") is dated by the last frame of the word
before it: the heads read a motion from the frames on both sides, so an object that moves until frame k reads
"moves" there and "still" from the next; it stopped at k.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

from vlm.connectors.events import EventRule
from vlm.connectors.tracks import Detection, Track, _columns, changes, link, merge_duplicates, swap_events


class Event(NamedTuple):
    """One change a story tells: the frame it is first seen in, its words, and its kind ("appears", "disappears",
    "background", the rule's words as written in `events`, e.g. "turns {to}", or "other" where no rule names it)."""
    frame: int
    text: str
    kind: str


def _article(words: str) -> str:
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _name(row: tuple[str, ...], identity: int) -> str:
    return " ".join(row[:identity])


def _state(row: tuple[str, ...], identity: int) -> str:
    return ", ".join(row[identity:])


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def hiders(tracks: Sequence[Track], frames: int) -> dict[int, Track]:
    """Tracks that end before the clip's last frame in the cell of (within one cell of) a track of
    another name that lasts to it, and whose object is not seen again later (a look-alike beside it, or the object
    seen again, is a head's second reading, not a hider), by index in `tracks`: the object that hides each (the
    nearest, in the frame or the next; ties: the fewer cells apart in rows and columns together, then the longest
    seen)."""
    out = {}
    for i, tr in enumerate(tracks):
        end, cell = tr.frames[-1], tr.detections[-1].cell
        if end >= frames - 1 or any(o.frames[0] > end and o.detections[0].identity == tr.detections[-1].identity
                                    for o in tracks):  # seen again later: not hidden at the end
            continue
        near = []
        for j, other in enumerate(tracks):
            same = other.detections[-1].identity == tr.detections[-1].identity
            if other is tr or same or other.frames[-1] != frames - 1:
                continue
            for k in (end, end + 1):
                if k in other.frames:
                    c = other.detections[other.frames.index(k)].cell
                    dy, dx = abs(c[0] - cell[0]), abs(c[1] - cell[1])
                    near.append((max(dy, dx), dy + dx, -len(other.frames), j, other))
        nearest = min((n for n in near if n[0] <= 1), key=lambda n: n[:4], default=None)
        if nearest:
            out[i] = nearest[4]
    return out


def place(track: Track, tracks: Sequence[Track], name: Callable[[Track], str], frames: int) -> str:
    """How a story names `track` at the clip's end: "the red box", or among others of its name there then, "the
    second red box from the left" (left to right by column, then top to bottom)."""
    same = sorted((t for t in tracks if t.frames[-1] == frames - 1 and name(t) == name(track)),
                  key=lambda t: (t.detections[-1].cell[1], t.detections[-1].cell[0]))
    if len(same) < 2 or len(same) > len(ORDINALS):
        return f"the {name(track)}"
    return f"the {ORDINALS[same.index(track)]} {name(track)} from the left"


def timeline(scene: Sequence[tuple[str, ...]], frames: Sequence[Sequence[Detection]], times: Sequence[float],
             rules: Sequence[EventRule] = (), extent: Mapping[str, str] | None = None, max_tracks: int = 6
             ) -> tuple[list[str], list[str], str, list[Event]]:
    """What a clip's story says, before it is written: the objects there from the first frame (with their articles,
    "a red circle"), their first states ("The red circle: still, small."), the first background ("a gray
    background"), and every change as an `Event` in time order; the input of `story`, and what `vlm eval slots`
    compares with the annotations'."""
    extent = dict(extent or {})
    tracks = [tr for tr in link([merge_duplicates(f) for f in frames]) if len(tr.frames) > 1 or len(times) < 4]
    tracks = sorted(sorted(tracks, key=lambda tr: -len(tr.frames))[:max_tracks],
                    key=lambda tr: (tr.frames[0], tr.detections[0].cell))
    scenes = _columns(scene) if scene and scene[0] else []
    events = [Event(k, f"the background becomes {' '.join(scenes[k])}", "background") for k, _ in changes(scenes)[1:]]
    opening, states = [], []
    words = {id(tr): _columns([d.identity + d.motion for d in tr.detections]) for tr in tracks}
    n = len(tracks[0].detections[0].identity) if tracks else 0
    last_name = lambda tr: _name(words[id(tr)][-1], n)  # noqa: E731
    hidden = hiders(tracks, len(times)) if "covered" in extent else {}
    for i, tr in enumerate(tracks):
        rows = words[id(tr)]
        first = f"{_name(rows[0], n)}" + (f": {_state(rows[0], n)}" if len(rows[0]) > n else "")
        if tr.frames[0] == 0:
            opening.append(_article(_name(rows[0], n)))
            states.append(f"The {first}." if len(rows[0]) > n else "")
        else:
            events.append(Event(tr.frames[0], f"{_article(_name(rows[0], n))} {extent.get('appears', 'appears')}"
                                + first[len(_name(rows[0], n)):], "appears"))
        for k, _ in changes(rows)[1:]:
            for a, (before, after) in enumerate(zip(rows[k - 1], rows[k])):
                if before == after:
                    continue
                rule = next((r for r in rules if r.attribute == a and r.template(before, after)), None)
                at = tr.frames[k - 1] if after == extent.get("stops") else tr.frames[k]  # it stops where it last moved
                events.append(Event(at, f"the {_name(rows[k - 1], n)} {rule.predicate(before, after)}",
                                    rule.template(before, after)) if rule
                              else Event(at, f"the {_name(rows[k - 1], n)}: {after}", "other"))
        if tr.frames[-1] < len(times) - 1:
            under = f" {extent['covered']} the {last_name(hidden[i])}" if i in hidden else ""
            events.append(Event(tr.frames[-1] + 1, f"the {_name(rows[-1], n)} {extent.get('disappears', 'disappears')}"
                                + under, "disappears"))
    if "swaps" in extent:  # look-alikes that trade places, named by the places they leave, left to right
        for frame, name, places in swap_events(frames):
            said = " and ".join(ORDINALS[p - 1] for p in places if p <= len(ORDINALS))
            events.append(Event(frame, extent["swaps"].format(places=said, name=" ".join(name)), "swaps"))
    for i, by in hidden.items():  # where each hidden object is at the end, after every change
        events.append(Event(len(times), f"the {last_name(tracks[i])} is {extent['covered']} "
                            f"{place(by, tracks, last_name, len(times))}", "covered"))
    background = f"a {' '.join(w for w in scenes[0])} background" if scenes else "the background"
    return opening, [s for s in states if s], background, sorted(events, key=lambda e: e.frame)


def story(scene: Sequence[tuple[str, ...]], frames: Sequence[Sequence[Detection]], times: Sequence[float],
          rules: Sequence[EventRule] = (), extent: Mapping[str, str] | None = None, max_tracks: int = 6) -> str:
    """The story text of one clip: its scene's words per frame, its detections per frame and the frames' times
    (seconds), as `vlm.connectors.word_slots` gives them. At most `max_tracks` objects (the longest seen); an
    object seen in one frame only is dropped when the clip has 4 frames or more (a head's slip)."""
    opening, states, background, events = timeline(scene, frames, times, rules, extent, max_tracks)
    parts = [f"{_and(opening)} {'is' if len(opening) == 1 else 'are'} on {background}." if opening
             else f"The video starts with {background} and no objects."]
    parts[0] = parts[0][0].upper() + parts[0][1:]
    parts += states
    parts += [(f"At {times[e.frame]:.1f} seconds, " if e.frame < len(times) else "At the end, ") + f"{e.text}."
              for e in events]
    return " " + " ".join(parts)
