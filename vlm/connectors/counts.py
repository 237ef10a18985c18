"""Clip-level count sentences of the word-slot connector, written after the last frame.

A 135M LLM does not learn in a few steps to count objects over frames from per-frame words (docs/GROUNDING.md has
the numbers), so the connector does it: the heads' detections are linked into tracks (`vlm.connectors.tracks`) and
a rule says which tracks count: those showing some words, e.g. {"action": ["moves left", "moves right", ...]}, or
those first seen after the clip's first frame ({"appears": true}) or last seen before its last ({"disappears": true}),
or those whose words change from some to another ({"size": ["small"], "becomes": "large"}: grown).
The sentence states the number, and with `names` the counted objects too, as a caption names them:

    " moving objects: 2: white diamond, red cross. still objects: 1: blue square. appearing objects: 0."

or, with `verb`, one sentence per counted object in the words an answer would use (" blue star appears.").
The options of a rule beside its attribute: `every: true` counts the objects that show the words in every frame
they are seen ({"action": ["still"]}: never moved); `names: true` also names the counted objects (at most 4, the
longest seen first); `becomes: large` beside {"size": ["small"]} counts the objects whose words change (small in
the first two frames, large in the last two); `several: true` those showing two or more of the words (" moves left"
and " moves right": it bounced); `changes: true` those whose words change, among the rule's words, and how often
(each colour change of an object; " moves left" to " moves right": a bounce); `verb: appears` writes one sentence
per counted object instead of the count, `says: "the object that moves to the right is the {name}"` one in a
question's words, where `{times}` is how often its words changed ("1 time", "2 times"):

    counts: {colour changes: {color: [red, green, ...], changes: true, says: "the {name} changes color {times}"}}
    -> " the red cross changes color 2 times."

`{swaps: true}` counts how often look-alike objects trade places (a shell game: `tracks.swap_counts`), per name
of two or more objects at the clip's end; with `says`, one sentence per name whose objects swapped, `{times}` the
swaps ("the {name}es swap places {times}" -> " the red boxes swap places 2 times.").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from vlm.connectors.tracks import (Detection, Track, change_count, changed_tracks, counted_tracks, object_tracks,
                                  swap_counts, track_name, varied_tracks)

MAX_COUNT = 9  # a sentence says 0-9 (more is written as 9)
MAX_NAMES = 4  # and names at most this many objects, the longest seen first


@dataclass(frozen=True)
class CountRule:
    phrase: str  # what the sentence says ("moving objects")
    attribute: int = -1  # the index of the attribute in a detection's identity + motion words (-1: none)
    words: tuple[str, ...] = ()  # the words counted
    every: bool = False  # counted when every frame of the object says one of them (else: at least two frames)
    names: bool = False  # the sentence also names the counted objects
    appears: bool = False  # (without words) counted when first seen after the clip's first frame
    disappears: bool = False  # (without words) counted when last seen before the clip's last frame
    verb: str = ""  # instead of the count, one sentence per counted object: " <name> <verb>." (" blue star appears.")
    becomes: str = ""  # counted when the words, smoothed over time, start as one of `words` and end as this one
                       # (in two frames each)
    several: bool = False  # counted when two or more of the words show, each in at least two frames (e.g. " moves
                           # left" and " moves right": it bounces)
    changes: bool = False  # counted when the words change among `words` (smoothed; other words skipped between)
    says: str = ""  # instead of the count, one sentence per counted object from this template with {name} (and
                    # {times}: how often its words changed)
    swaps: bool = False  # (without words) counts the times look-alike objects trade places, per name

    @property
    def template(self) -> str:
        """The sentence written per counted object ("{name} appears"), or "" when the rule writes a count."""
        return self.says or (f"{{name}} {self.verb}" if self.verb else "")

    def times(self, track: Track) -> int:
        """How often a track's words of the rule's attribute change among its words."""
        return change_count(track, self.attribute, self.words) if self.attribute >= 0 else 0

    def sentence(self, name: str, times: int = 0) -> str:
        """The template said of one counted object (or, for swaps, one name), `times` its count."""
        n = min(MAX_COUNT, times)
        return " " + self.template.replace("{name}", name).replace("{times}", f"{n} time{'s' * (n != 1)}") + "."

    def pick(self, tracks: Sequence[Track], last: int) -> list[Track]:
        """The objects this rule counts among a clip's `object_tracks` (its last frame: `last`), longest seen first."""
        if self.becomes:
            return changed_tracks(tracks, self.attribute, self.words, self.becomes)
        if self.several:
            return varied_tracks(tracks, self.attribute, self.words)
        if self.changes:
            return sorted((tr for tr in tracks if self.times(tr)), key=lambda tr: -len(tr.frames))
        if self.words:
            return counted_tracks(tracks, self.attribute, self.words, every=self.every)
        found = [tr for tr in tracks if (tr.frames[0] > 0 or not self.appears)
                 and (tr.frames[-1] < last or not self.disappears)]
        return sorted(found, key=lambda tr: -len(tr.frames))


def count_rules(counts: Mapping[str, Mapping[str, Any]], vocab: Mapping[str, Sequence[str]]) -> list[CountRule]:
    """The `counts` setting, checked: phrase -> {attribute: [words], every: bool} or {attribute: [words], becomes:
    word} or {attribute: [words], several: true} or {attribute: [words], changes: true} or {appears: true} or
    {disappears: true}, each with the options names: bool, verb: str or says: "... {name} ...", or {swaps: true}
    (options: names or says). `vocab`: the object then motion attributes' words, in the order of a detection's
    words."""
    rules = []
    options = ("every", "names", "appears", "disappears", "verb", "becomes", "several", "changes", "says", "swaps")
    for phrase, rule in counts.items():
        if rule is None:  # null: no such rule (a recipe's rule removed with --set counts.<phrase>=null)
            continue
        rule = rule if isinstance(rule, Mapping) else {}
        named = [k for k in rule if k not in options]
        extent = bool(rule.get("appears") or rule.get("disappears") or rule.get("swaps"))
        how = [k for k in ("every", "becomes", "several", "changes") if rule.get(k)]  # of an attribute's words, at most one
        swaps_with = rule.get("swaps") and (rule.get("appears") or rule.get("disappears") or rule.get("verb"))
        if len(named) != (0 if extent else 1) or len(how) > (0 if extent else 1) or (rule.get("verb") and rule.get("says")) \
                or swaps_with:
            raise ValueError(f"word_slots: counts[{phrase!r}] is one {{attribute: [words]}} (options: every, several, "
                             "becomes or changes; names, verb or says) or {appears: true} or {disappears: true} (options: names, "
                             "verb or says) or {swaps: true} (options: names or says), e.g. {action: [moves left, moves "
                             "right], names: true}")
        if rule.get("says") and "{name}" not in str(rule["says"]):
            raise ValueError(f"word_slots: counts[{phrase!r}] says {rule['says']!r}: the template names the object "
                             "with {name}")
        if "{times}" in str(rule.get("says", "")) and not (rule.get("changes") or rule.get("swaps")):
            raise ValueError(f"word_slots: counts[{phrase!r}] says {{times}}, which a rule with changes: true or "
                             "swaps: true counts")
        flags = {k: bool(rule.get(k, False))
                 for k in ("every", "names", "appears", "disappears", "several", "changes", "swaps")}
        flags |= {k: str(rule.get(k, "")) for k in ("verb", "becomes", "says")}
        if extent:
            rules.append(CountRule(str(phrase), **flags))
            continue
        attr, words = named[0], rule[named[0]]
        if attr not in vocab:
            raise ValueError(f"word_slots: counts[{phrase!r}] names {attr!r}, not an object or motion attribute "
                             f"({list(vocab)})")
        unknown = sorted(set(words) - set(vocab[attr]) | ({flags["becomes"]} - {""} - set(vocab[attr])))
        if unknown:
            raise ValueError(f"word_slots: counts[{phrase!r}]: {unknown} are not words of {attr!r}")
        rules.append(CountRule(str(phrase), list(vocab).index(attr), tuple(str(w) for w in words), **flags))
    return rules


def count_sentence(phrase: str, n: int, names: Sequence[str] = ()) -> str:
    """" moving objects: 2." or, with the counted objects' names, " moving objects: 2: white diamond, red cross." """
    return f" {phrase}: {n}" + (": " + ", ".join(names) if names else "") + "."


def count_text(rules: Sequence[CountRule], frames: Sequence[Sequence[Detection]]) -> str:
    """One clip's sentences, in the rules' order, from its detections per frame."""
    said, objects = [], object_tracks(frames) if rules else []
    for r in rules:
        if r.swaps:
            swapped = [(" ".join(name), n) for name, n in swap_counts(frames).items() if n]
            if r.template:
                said += [r.sentence(name, n) for name, n in swapped[:MAX_NAMES]]
            else:
                names = [name for name, _ in swapped[:MAX_NAMES]] if r.names else []
                said.append(count_sentence(r.phrase, min(MAX_COUNT, sum(n for _, n in swapped)), names))
            continue
        tracks = r.pick(objects, len(frames) - 1)
        if r.template:
            said += [r.sentence(track_name(tr), r.times(tr)) for tr in tracks[:MAX_NAMES]]
            continue
        names = [track_name(tr) for tr in tracks[:MAX_NAMES]] if r.names else []
        said.append(count_sentence(r.phrase, min(MAX_COUNT, len(tracks)), names))
    return "".join(said)


def count_width(rules: Sequence[CountRule], tokens: Callable[[str], int], name_tokens: int) -> int:
    """The tokens the sentences may take: each with the longest number and, if it names, `MAX_NAMES` names of
    `name_tokens` tokens and a comma each. `tokens(text)`: the LLM tokenizer's count."""
    def longest(template: str) -> str:
        return " " + template.replace("{name}", "").replace("{times}", f"{MAX_COUNT} times") + "."

    return sum(MAX_NAMES * (name_tokens + tokens(longest(r.template))) if r.template else
               tokens(count_sentence(r.phrase, MAX_COUNT)) + r.names * (1 + MAX_NAMES * (name_tokens + 1)) for r in rules)
