"""Word slots: a connector whose visual tokens are the LLM's own input embeddings of words chosen from the frames.

Per frame, small heads on the tower's grid decide which cells hold an object's centre and, for each, one word per
object attribute (colour, shape, ...), and one word per scene attribute (the background's tone, ...). The frame's
tokens are the words a caption would use, one embedding per token: <scene words>, then per object in reading order
(at most `slots`) <attribute words> <row> <column> (" top" ... " right", from its cell). Empty slots and the padding
of short words are pruned (the mask). The heads learn with the stage objective "slots" from per-frame annotations
(`vlm.data.regions`), before the LLM is tuned on them with the connector frozen: the LLM only has to read words.
`layout: tracks` links the detections into one sentence per object (`vlm.connectors.tracks`), `story` into a timed
caption (`vlm.connectors.story`)."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlm.connectors.base import Connector, VisualTokens, register_connector
from vlm.connectors.slot_heads import MotionHead, SlotHead, distinct_peaks, slot_loss, slot_targets
from vlm.connectors.counts import count_rules, count_text, count_width
from vlm.connectors.events import event_rules, event_texts, event_width, settings as event_settings
from vlm.connectors.story import story
from vlm.connectors.tracks import (Detection, Seen, describe, linked, ramp_rule, settle, size_ramps,
                                  without_repeat_tracks)
from vlm.data.regions import region_problems
from vlm.towers.base import VisualFeatures

log = logging.getLogger(__name__)

POSITION = (("top", "middle", "bottom"), ("left", "center", "right"))


@register_connector("word_slots")
class WordSlots(Connector):
    """scene / objects: attribute -> its words (e.g. {"tone": [...]}, {"color": [...], "shape": [...]});
    motion: object attributes that need time (e.g. {"action": ["still", "moves left", "grows", ...]}), read from
    the object's cell and its neighbourhood in the previous and next frame (`MotionHead`);
    silent: words the heads choose but never write (e.g. "still": an object without a motion word is still),
    which keeps the visual tokens to what is worth reading;
    slots: objects named per frame at most; position: the row and column words (null: no position words);
    threshold: the centre probability above which a cell holds an object; peaks: a cell holds one only where its
    centre logit is also the highest of its 3x3 neighbourhood (peak picking, as CenterNet reads its heatmap: an
    object whose centre lies near a cell border lights two cells and is named once; two objects in adjacent cells
    are then named once too, which is rarer); centre_offsets: the centre head also says where in its cell (and the
    cells around it) an object's centre lies (CenterNet's offset), and `peaks` then keeps a cell beside a higher one
    when their predicted centres lie `centre_radius` cells or more apart: two look-alikes in neighbouring cells are
    named twice; hidden: the heads' width;
    scene_grid: the scene head also reads the means of the frame's g x g regions (g > 1; e.g. 2 tells a gradient's
    two tones apart by where they are);
    layout: "frames" (each frame's words in turn), "tracks" (one sentence per object over time) or "story" (every
    change of every object in time order, as a timed caption: `vlm.connectors.story`), the last two in one slot of
    `text_tokens` (default: as many as the frames layout's; a fixed budget for long videos); same heads;
    preface: words the LLM reads before that one text, e.g. "Video description:": then the prompt's tokens are
    those of the text oracle's prompt (`vlm eval mcq --descriptions`) for the same story, token for token;
    counts: clip-level sentences written after the last frame, phrase -> {attribute: words, options}, e.g.
    {"moving objects": {"action": ["moves left", ...]}} writes " moving objects: 2." when two of the objects linked
    over frames show one of those words in at least two frames (the rules and their options, appearing, changing
    and named objects, one sentence per object: `vlm.connectors.counts`);
    events: sentences written after the words of the frame where a change is first seen, attribute ->
    {"<word> > <word>": what the change is called}, e.g. {"action": {"moves left > moves right": "bounces off the left
    wall"}} writes " red star bounces off the left wall." there (`hold`, `{to}`, appears / disappears:
    `vlm.connectors.events`): the frame's time stamp then says when, the sentences' order what came first;
    repeats: "frames" (a detection beside one of the same words in its frame is a repeat, unless the offsets named
    both) or "tracks" (also a track seen only beside a longer one of its words: `tracks.without_repeat_tracks`);
    ramps: growing and shrinking read from each track's size scores (layouts that link tracks; `tracks.size_ramps`),
    e.g. {read: size, write: action, words: [still, grows, shrinks], min_change: 15 (nats)};
    switch_cost: > 0 decodes each object's words over its track, and the scene's over the clip, as the sequence of
    highest log-probability when a change of word costs that many nats (`vlm.connectors.tracks.settle`), where 0
    takes each frame's likeliest word, then the majority of three frames; for the layouts that link tracks, and
    for counts and events; link_motion: what each differing motion word adds to the cost of linking a detection to
    a track (`tracks.link`; 0: cells and identity words only). Each word is written with the LLM's tokens of
    " <word>" (several tokens when the tokenizer splits it)."""

    def __init__(self, in_dim: int, out_dim: int, reducers=(), scene: Mapping[str, Sequence[str]] | None = None,
                 objects: Mapping[str, Sequence[str]] | None = None,
                 motion: Mapping[str, Sequence[str]] | None = None, silent: Sequence[str] = (), slots: int = 3,
                 position: Sequence[Sequence[str]] | None = POSITION, threshold: float = 0.5, hidden: int = 256,
                 layout: str = "frames", text_tokens: int | None = None, scene_grid: int = 1,
                 counts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                 events: Mapping[str, Any] | None = None, switch_cost: float = 0.0,
                 peaks: bool = False, centre_offsets: bool = False, centre_radius: float = 0.75, repeats: str = "frames",
                 ramps: Mapping[str, Any] | None = None, preface: str | None = None, link_motion: float = 0.0):
        super().__init__(in_dim, out_dim, reducers)
        self.scene_vocab = {k: list(v) for k, v in (scene or {}).items()}
        self.object_vocab = {k: list(v) for k, v in (objects or {}).items()}
        self.motion_vocab = {k: list(v) for k, v in (motion or {}).items()}
        if not self.object_vocab and not self.scene_vocab:
            raise ValueError("word_slots: give at least one attribute and its words in 'scene' or 'objects'")
        if position is not None and (len(position) != 2 or not all(position)):
            raise ValueError("word_slots: 'position' is [row words, column words] (or null)")
        self.position = [list(p) for p in position] if position is not None else []
        # every word once, by group: scene attributes, object attributes, motion attributes, then rows and columns
        self.groups = [*self.scene_vocab.values(), *self.object_vocab.values(), *self.motion_vocab.values(),
                       *self.position]
        self.offsets = [sum(len(g) for g in self.groups[:i]) for i in range(len(self.groups))]
        self.words = [w for g in self.groups for w in g]
        self.silent = [str(w) for w in silent]
        if not set(self.silent) <= set(self.words):
            raise ValueError(f"word_slots: silent words {sorted(set(self.silent) - set(self.words))} are not in its vocabulary")
        self.configure(slots=slots, layout=layout, text_tokens=text_tokens, threshold=threshold, counts=counts or {},
                       events=events or {}, switch_cost=switch_cost, peaks=peaks, centre_radius=centre_radius,
                       repeats=repeats, ramps=ramps, preface=preface, link_motion=link_motion)
        self.head = SlotHead(in_dim, sum(len(g) for g in self.object_vocab.values()),
                             sum(len(g) for g in self.scene_vocab.values()), hidden, scene_grid, centre_offsets)
        if self.motion_vocab:
            self.motion_head = MotionHead(in_dim, sum(len(g) for g in self.motion_vocab.values()), hidden)
        self.register_buffer("word_tokens", torch.zeros(len(self.words), 1, dtype=torch.long), persistent=False)
        self.widths: list[int] = []  # tokens per group position (the longest word of the group)
        self._embedding: list[nn.Embedding] = []  # the LLM's input embeddings (a list: not a submodule)
        self._tokenizer: list[Any] = []
        self.truncated = 0  # clips whose text (tracks, counts) was cut to the token budget

    settings = ("slots", "layout", "text_tokens", "threshold", "peaks", "centre_radius", "counts", "events",
                "switch_cost", "repeats", "ramps", "preface", "link_motion")
    def configure(self, **values: Any) -> None:
        slots = int(values.get("slots", getattr(self, "slots", 3)))
        if slots < 1:
            raise ValueError(f"word_slots: slots ({slots}) is how many objects a frame names at most, >= 1")
        radius = float(values.get("centre_radius", getattr(self, "centre_radius", 0.75)))
        if radius < 0:
            raise ValueError(f"word_slots: centre_radius ({radius}) is a distance in cells, >= 0")
        layout = values.get("layout", getattr(self, "layout", "frames"))
        text_tokens = values.get("text_tokens", getattr(self, "text_tokens", None) if layout != "frames" else None)
        if layout not in ("frames", "tracks", "story"):
            raise ValueError(f"word_slots: layout is 'frames', 'tracks' or 'story', not {layout!r}")
        if layout != "frames" and self.silent:
            raise ValueError(f"word_slots: 'silent' words apply to layout 'frames' (layout {layout!r} writes changes)")
        if text_tokens is not None and (layout == "frames" or int(text_tokens) < 1):
            raise ValueError(f"word_slots: text_tokens ({text_tokens}) is a positive token count for layouts 'tracks' "
                             "and 'story'")
        switch_cost = float(values.get("switch_cost", getattr(self, "switch_cost", 0.0)))
        link_motion = float(values.get("link_motion", getattr(self, "link_motion", 0.0)))
        if min(switch_cost, link_motion) < 0:
            raise ValueError(f"word_slots: switch_cost ({switch_cost}) and link_motion ({link_motion}) are costs, >= 0")
        counts = count_rules(values["counts"] or {}, self.object_vocab | self.motion_vocab) if "counts" in values \
            else getattr(self, "counts", [])
        rules, hold, extent = event_settings(values["events"]) if "events" in values else \
            (None, getattr(self, "event_hold", 2), getattr(self, "event_extent", {}))
        events = getattr(self, "events", []) if rules is None else event_rules(rules, self.object_vocab | self.motion_vocab)
        if layout == "tracks" and (events or extent):
            raise ValueError("word_slots: 'events' apply to layout 'frames' (the tracks layout writes each change)")
        if layout != "story" and {"covered", "swaps", "stops"} & set(extent):
            raise ValueError("word_slots: events 'covered' (a hidden object), 'swaps' and 'stops': layout 'story' only")
        preface = values.get("preface", getattr(self, "preface", None))
        if preface is not None and not isinstance(preface, str):
            raise ValueError(f"word_slots: preface is text (quote it in YAML: \"Video description:\"), not {preface!r}")
        if preface is not None and layout == "frames":
            raise ValueError("word_slots: a 'preface' goes before the one text of layouts 'tracks' and 'story'")
        repeats = values.get("repeats", getattr(self, "repeats", "frames"))
        if repeats not in ("frames", "tracks"):
            raise ValueError(f"word_slots: repeats is 'frames' or 'tracks' (where second readings are), not {repeats!r}")
        ramps = ramp_rule(values["ramps"], self.object_vocab | self.motion_vocab, len(self.object_vocab)) \
            if "ramps" in values else getattr(self, "ramps", None)
        self.slots, self.layout, self.centre_radius, self.switch_cost = slots, layout, radius, switch_cost
        self.repeats, self.ramps, self.preface, self.link_motion = repeats, ramps, preface, link_motion
        self.text_tokens = None if text_tokens is None else int(text_tokens)
        self.threshold = float(values.get("threshold", getattr(self, "threshold", 0.5)))
        self.peaks = bool(values.get("peaks", getattr(self, "peaks", False)))
        self.counts, self.events, self.event_hold, self.event_extent = counts, events, hold, extent
        self._sentence_widths: dict[str, int] = {}  # count_width / event_width, computed once per setting

    # ---------------------------------------------------------------- assembly
    def attach_llm(self, embeddings: nn.Embedding, tokenizer: Any) -> None:
        super().attach_llm(embeddings, tokenizer)
        ids = [[] if w in self.silent else tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in self.words]
        if any(not i and w not in self.silent for w, i in zip(self.words, ids)):
            raise ValueError(f"word_slots: the tokenizer writes no token for {[w for w, i in zip(self.words, ids) if not i]}")
        width = max(1, max(len(i) for i in ids))  # a silent word is a row of -1: nothing written
        table = torch.full((len(ids), width), -1, dtype=torch.long)
        for row, i in enumerate(ids):
            table[row, :len(i)] = torch.tensor(i)
        self.word_tokens = table.to(self.word_tokens.device)
        self.widths = [max(len(ids[o + k]) for k in range(len(g))) for o, g in zip(self.offsets, self.groups)]
        self._embedding = [embeddings]
        self._tokenizer = [tokenizer]
        self._sentence_widths = {}

    def sentence_width(self, kind: str) -> int:
        """The tokens the count sentences ("counts") or a frame's event sentences ("events") may take
        (`counts.count_width`, `events.event_width`; tokenized once per setting and tokenizer, not per batch)."""
        if kind not in self._sentence_widths:
            name = sum(self.widths[len(self.scene_vocab):][:len(self.object_vocab)])  # the longest object name
            tokens = lambda text: len(self._tokenizer[0](text, add_special_tokens=False)["input_ids"])  # noqa: E731
            self._sentence_widths[kind] = count_width(self.counts, tokens, name) if kind == "counts" else \
                event_width(self.events, self.event_extent, tokens, name)
        return self._sentence_widths[kind]

    def positions(self) -> list[int]:
        """The group of each word position of a frame: scene attributes, then per slot object and motion attributes,
        row, column."""
        ns, no = len(self.scene_vocab), len(self.object_vocab) + len(self.motion_vocab)
        per_object = list(range(ns, ns + no + len(self.position)))
        return list(range(ns)) + per_object * self.slots

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        if not self.widths:
            raise RuntimeError("word_slots: attach_llm(embeddings, tokenizer) first (VideoLLM does it at assembly)")
        per_frame = sum(self.widths[g] for g in self.positions()) + self.sentence_width("counts") + self.sentence_width("events")
        if self.layout == "frames":
            return grid[0], per_frame
        return 1, self.text_tokens or grid[0] * per_frame

    # ---------------------------------------------------------------- the words of each frame
    def detect(self, feats: VisualFeatures, scores: bool = False) -> tuple[Any, ...]:
        """What the heads see in each frame: the scene attributes' words [B, T, S], the cells of the (at most
        `slots`) most likely object centres [B, T, k] in reading order, whether each is an object [B, T, k], and
        each one's object then motion attributes' words [B, T, k, A] (word indices into `self.words`). `scores`:
        also the log-probabilities behind the words, per scene attribute [B, T, V] and per object then motion
        attribute [B, T, k, V]."""
        offsets = None
        if self.head.offsets:
            found, object_logits, scene_logits, offsets = self.split_logits(feats, with_offsets=True)
        else:
            found, object_logits, scene_logits = self.split_logits(feats)
        b, t, n = found.shape
        scene = torch.stack([logits.argmax(-1) + self.offsets[g] for g, logits in enumerate(scene_logits)], -1) \
            if scene_logits else found.new_zeros(b, t, 0, dtype=torch.long)
        prob = found.sigmoid()
        if self.peaks:  # only the highest cell of each 3x3 neighbourhood (or each predicted centre's)
            h, w = feats.grid[1], feats.grid[2]
            near = None if offsets is None else offsets.reshape(b * t, h, w, 2).float()
            prob = prob * distinct_peaks(found.reshape(b * t, h, w), near, self.centre_radius).reshape(b, t, n)
        prob, cells = prob.topk(min(self.slots, n), -1)  # [B, T, k]
        keep = prob > self.threshold
        order = torch.where(keep, cells, cells + n).argsort(-1)  # kept ones first, in reading order
        cells, keep = cells.gather(-1, order), keep.gather(-1, order)
        ns = len(self.scene_vocab)
        per_cell = [logits.gather(2, cells[..., None].expand(*cells.shape, logits.shape[-1])) for logits in object_logits]
        if self.motion_vocab:
            bi = torch.arange(b, device=cells.device)[:, None, None].expand_as(cells)
            ti = torch.arange(t, device=cells.device)[None, :, None].expand_as(cells)
            moved = self.motion_logits(feats, bi.flatten(), ti.flatten(), cells.flatten())
            per_cell += [logits.reshape(*cells.shape, -1) for logits in moved]
        attrs = [logits.argmax(-1) + self.offsets[ns + g] for g, logits in enumerate(per_cell)]
        out = (scene, cells, keep, torch.stack(attrs, -1) if attrs else cells.new_zeros(*cells.shape, 0))
        return out + ([x.log_softmax(-1) for x in scene_logits], [x.log_softmax(-1) for x in per_cell]) if scores else out

    def choose(self, feats: VisualFeatures, detected: tuple[torch.Tensor, ...] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per frame, the word of every position (indices into `self.words`, [B, T, P]) and whether the position is
        used ([B, T, P] bool: False for empty object slots). `detected`: `detect(feats)` when already computed."""
        scene, cells, keep, attrs = detected if detected is not None else self.detect(feats)
        b, t, k = cells.shape
        h, w = feats.grid[1], feats.grid[2]
        per_slot = list(attrs.unbind(-1))
        if self.position:
            base = len(self.scene_vocab) + len(self.object_vocab) + len(self.motion_vocab)
            row, col = self.place(cells, h, w)
            per_slot += [row + self.offsets[base], col + self.offsets[base + 1]]
        objects = torch.stack(per_slot, -1)  # [B, T, k, A]
        pad = self.slots - k
        objects = F.pad(objects, (0, 0, 0, pad)).flatten(2)
        slot_used = F.pad(keep, (0, pad))[..., None].expand(b, t, self.slots, len(per_slot)).flatten(2)
        used = torch.ones(b, t, scene.shape[-1], dtype=torch.bool, device=scene.device)
        return torch.cat([scene, objects], -1), torch.cat([used, slot_used], -1)

    def place(self, cells: Any, h: int, w: int) -> tuple[Any, Any]:
        """The row and column word (indices into the two `position` lists) of cells (flat indices, tensor or int) of
        an h x w grid."""
        return (cells // w) * len(self.position[0]) // h, (cells % w) * len(self.position[1]) // w

    @linked
    def detections(self, feats: VisualFeatures, detected: tuple[torch.Tensor, ...] | None = None) -> list[Seen]:
        """Per clip, what the heads saw in each frame: (the scene's words per frame, the detections per frame, the
        frames' times in seconds), the input of `vlm.connectors.tracks.describe`. `feats`: after the reducers;
        `detected`: `detect(feats)` (or `detect(feats, scores=True)`) when already computed. With `switch_cost` > 0
        and the heads' scores at hand, each track's words and the scene's are decoded over time (`settle`); with
        `ramps`, growing and shrinking are read from the size scores (`size_ramps`)."""
        wanted = self.switch_cost > 0 or bool(self.ramps)  # the heads' scores
        detected = detected if detected is not None else self.detect(feats, scores=wanted)
        scored = wanted and len(detected) > 4
        scene, cells, keep, attrs = (x.cpu() for x in detected[:4])
        w = feats.grid[2]
        ni = len(self.object_vocab)
        times = feats.timestamps.cpu() if feats.timestamps is not None else \
            torch.arange(cells.shape[1], dtype=torch.float)[None].expand(cells.shape[0], -1)
        groups = [list(g) for g in [*self.object_vocab.values(), *self.motion_vocab.values()]]
        scene_lp, object_lp = ([x.cpu().tolist() for x in detected[4]], [x.cpu().tolist() for x in detected[5]]) \
            if scored else ([], [])  # nested lists: indexed per detection, no small tensor ops
        scene_words = [list(g) for g in self.scene_vocab.values()]
        distinct = self.peaks and self.head.offsets  # one detection per predicted centre: no repeats to merge
        def object_scores(i: int, j: int, s: int) -> tuple[dict[str, float], ...]:  # per attribute, word -> log p
            return tuple(dict(zip(ws, lp[i][j][s])) for lp, ws in zip(object_lp, groups))
        seen = [([tuple(self.words[x] for x in row.tolist()) for row in scene[i]],
                 [[Detection((int(c) // w, int(c) % w), tuple(self.words[x] for x in a[:ni].tolist()),
                             tuple(self.words[x] for x in a[ni:].tolist()), object_scores(i, j, s), distinct)
                   for s, (c, kept, a) in enumerate(zip(cells[i, j], keep[i, j], attrs[i, j])) if kept]
                  for j in range(cells.shape[1])],
                 times[i].tolist()) for i in range(cells.shape[0])]
        if scored and self.switch_cost > 0:
            seen = [settle(clip, [tuple(dict(zip(ws, lp[i][j])) for lp, ws in zip(scene_lp, scene_words))
                                  for j in range(cells.shape[1])], self.switch_cost)
                    for i, clip in enumerate(seen)]
        if self.repeats == "tracks":
            seen = [(scenes, without_repeat_tracks(frames), times) for scenes, frames, times in seen]
        if self.ramps and scored:
            seen = [(scenes, size_ramps(frames, *self.ramps), times) for scenes, frames, times in seen]
        return seen

    @linked
    def text(self, seen: Seen, grid: tuple[int, int, int]) -> str:
        """The tracks text of one clip's `detections` on a feature grid (T, h, w)."""
        h, w = grid[1], grid[2]

        def position(cell: tuple[int, int]) -> list[str]:
            row, col = self.place(cell[0] * w + cell[1], h, w)
            return [self.position[0][row], self.position[1][col]]

        scenes, frames, times = seen
        if self.layout == "story":
            return story(scenes, frames, times, self.events, self.event_extent, 2 * self.slots) \
                + count_text(self.counts, frames)
        return describe(scenes, frames, times, position if self.position else None, max_tracks=2 * self.slots) \
            + count_text(self.counts, frames)

    def describe(self, feats: VisualFeatures) -> list[str]:
        """Per clip, the text the `tracks` layout writes (`vlm.connectors.tracks`): the scene, then one sentence per
        object with the times its words change. `feats`: after the reducers, with timestamps."""
        return [self.text(seen, feats.grid) for seen in self.detections(feats)]

    def prefaced(self, text: str) -> str:
        """A clip's text as the LLM reads it: after the `preface` (e.g. "Video description:"), if one is set."""
        return text if not self.preface else f"{self.preface} {text.strip()}"

    def text_ids(self, text: str, budget: int) -> torch.Tensor:
        """A text's token ids, cut to `budget` (counted in `truncated`)."""
        row = self._tokenizer[0](text, add_special_tokens=False)["input_ids"]
        if len(row) > budget:
            self.truncated += 1
            if self.truncated == 1:
                log.warning("word_slots: a clip's text has %d tokens, over the slot's %d; cut there "
                            "(counted in .truncated)", len(row), budget)
        return torch.tensor(row[:budget], dtype=torch.long)

    def embed_ids(self, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """The LLM's input embeddings of token ids (-1: nothing written, embedded as id 0 and masked by the caller),
        on `device` (default: the embedding table's)."""
        table = self._embedding[0]
        embeds = table(ids.clamp(min=0).to(table.weight.device))
        return embeds if device is None else embeds.to(device)

    def project(self, feats: VisualFeatures, instruction=None) -> VisualTokens:
        if not self._embedding:
            raise RuntimeError("word_slots: attach_llm(embeddings, tokenizer) first (VideoLLM does it at assembly)")
        if self.layout != "frames":
            return self._project_tracks(feats)
        ids, mask = self.frame_ids(feats)  # [B, T, tokens per frame]
        b, t = ids.shape[:2]
        embeds = self.embed_ids(ids, feats.tokens.device)
        return VisualTokens(embeds=embeds.reshape(b, -1, embeds.shape[-1]), groups=t, mask=mask.reshape(b, -1),
                            timestamps=feats.timestamps)

    @linked
    def frame_ids(self, feats: VisualFeatures, detected: tuple[torch.Tensor, ...] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames layout's token ids [B, T, tokens per frame] and which are written (bool, same shape); a frame's
        event sentences follow its words, the count sentences the last frame's. `detected`: as `detect` returns."""
        detected = self.detect(feats) if detected is None else detected
        words, used = self.choose(feats, detected)  # [B, T, P]
        ids, mask = [], []
        for p, g in enumerate(self.positions()):
            tokens = self.word_tokens[words[..., p], :self.widths[g]]  # [B, T, width]
            ids.append(tokens)
            mask.append((tokens >= 0) & used[..., p:p + 1])
        b, t = words.shape[:2]
        seen = self.detections(feats, detected) if self.counts or self.events or self.event_extent else []
        if self.events or self.event_extent:  # each frame's event sentences after its words
            said = torch.full((b, t, self.sentence_width("events")), -1, dtype=torch.long)
            for i, (_, frames, _) in enumerate(seen):
                for j, text in enumerate(event_texts(self.events, frames, self.event_hold, self.event_extent)):
                    row = self.text_ids(text, said.shape[2])
                    said[i, j, :len(row)] = row
            ids.append(said.to(words.device))
            mask.append(ids[-1] >= 0)
        if self.counts:
            said = torch.full((b, self.sentence_width("counts")), -1, dtype=torch.long)
            for i, (_, frames, _) in enumerate(seen):
                row = self.text_ids(count_text(self.counts, frames), said.shape[1])
                said[i, :len(row)] = row
            said = said.to(words.device)
            ids.append(said[:, None].expand(b, t, -1))
            last = torch.arange(t, device=words.device) == t - 1
            mask.append((said >= 0)[:, None] & last[None, :, None])
        return torch.cat(ids, -1), torch.cat(mask, -1)

    @torch.no_grad()
    def written(self, feats: VisualFeatures) -> list[str]:
        """Per clip, the text this connector writes for the LLM: what the model sees, to read or print (frames
        layout: each frame's words, frames separated by " |"). `feats`: the tower's, before the reducers."""
        feats = self.reduced(feats)
        if self.layout != "frames":
            return [self.prefaced(text) for text in self.describe(feats)]
        ids, mask = self.frame_ids(feats)
        decode = self._tokenizer[0].decode
        return [" |".join(decode(ids[i, t][mask[i, t]].tolist()) for t in range(ids.shape[1])) for i in range(ids.shape[0])]

    def _project_tracks(self, feats: VisualFeatures) -> VisualTokens:
        """The tracks layout: each clip's `describe` text as the LLM's token embeddings, in a slot of `text_tokens` (or
        as many tokens as the frames layout would take; cut there, and counted in `truncated`, in a clip that needs
        more)."""
        budget = self.project_grid(feats.grid)[1]
        ids = torch.full((feats.tokens.shape[0], budget), -1, dtype=torch.long)
        for i, text in enumerate(self.describe(feats)):
            row = self.text_ids(self.prefaced(text), budget)
            ids[i, :len(row)] = row
        return VisualTokens(embeds=self.embed_ids(ids, feats.tokens.device), groups=1,
                            mask=(ids >= 0).to(feats.tokens.device))

    # ---------------------------------------------------------------- training the heads
    def region_problems(self, regions: Any) -> list[str]:
        return region_problems(regions, self.scene_vocab, self.object_vocab | self.motion_vocab)

    def reduced(self, feats: VisualFeatures) -> VisualFeatures:
        """Tower features through this connector's token reducers: what its heads read (as in `forward`)."""
        for reducer in self.reducers:
            feats = reducer(feats)
        return feats

    def slot_targets(self, feats: VisualFeatures, regions: Sequence[Sequence[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """Each clip's annotations at its frames' timestamps, on the features' grid (`slot_heads.slot_targets`)."""
        if feats.timestamps is None:
            raise ValueError("word_slots: annotations are matched to frames by timestamp, and these features have none")
        target = slot_targets(regions, feats.timestamps.tolist(), feats.grid, self.scene_vocab,
                              self.object_vocab | self.motion_vocab, self.head.offsets)
        return {k: v.to(feats.tokens.device) for k, v in target.items()}

    def split_logits(self, feats: VisualFeatures, with_offsets: bool = False) -> tuple[Any, ...]:
        """The heads' outputs: centre logits [B, T, N], per object attribute [B, T, N, V_a], per scene attribute
        [B, T, V_s], and `with_offsets` the centre offsets [B, T, N, 2] (cells; None without them)."""
        cell, scene = self.head(feats.tokens, feats.grid)
        sizes = [len(v) for v in self.object_vocab.values()]
        objects = list(cell[..., 1:1 + sum(sizes)].split(sizes, -1))
        scenes = list(scene.split([len(v) for v in self.scene_vocab.values()], -1)) if self.scene_vocab else []
        if not with_offsets:
            return cell[..., 0], objects, scenes
        return cell[..., 0], objects, scenes, cell[..., -2:] if self.head.offsets else None

    def motion_logits(self, feats: VisualFeatures, b: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        """Per motion attribute, its logits [M, V] at clip b, frame t, cell c of each of M queries."""
        logits = self.motion_head(feats.tokens, feats.grid, b, t, c)
        return list(logits.split([len(v) for v in self.motion_vocab.values()], -1))

    def slot_loss(self, feats: VisualFeatures, regions: Sequence[Sequence[dict[str, Any]]]) -> torch.Tensor:
        """The heads' detector-style loss against each clip's annotations (`slot_heads.slot_loss`). `feats`: the
        tower's, before the reducers."""
        return slot_loss(self, self.reduced(feats), regions)
