"""Mixture weights and the per-epoch batch plan: exact counts per source and per sample, on every process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlm.data.dataset import BatchPlan, SourceSpec, load_mixture, subsample


def source(root: Path, name: str, n: int, video: bool = True, jsonl: bool = False) -> str:
    records = []
    for i in range(n):
        human = ("<video>\n" if video else "") + "What happens?" + " more" * i  # lengths differ
        rec = {"id": f"{name}{i}", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "x"}]}
        if video:
            rec["video"] = f"{name}{i}.mp4"
        records.append(rec)
    path = root / (f"{name}.jsonl" if jsonl else f"{name}.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return str(path)


def ids(items) -> Counter:
    return Counter(it.sample.id for it in items)


def test_weights_give_exact_counts_per_source_and_per_sample(tmp_path):
    a, b, c = source(tmp_path, "a", 10), source(tmp_path, "b", 10, jsonl=True), source(tmp_path, "c", 8)
    specs = [SourceSpec(a, weight=1.0), SourceSpec(b, weight=2.3), SourceSpec(c, weight=0.5),
             SourceSpec(c, weight=0.375, media_root=str(tmp_path / "media")), SourceSpec(a, weight=3.0)]
    items, bad = load_mixture(specs, seed=0)
    assert bad == []
    assert len(items) == 10 + 23 + 4 + 3 + 30
    count = ids(items)
    assert all(count[f"a{i}"] == 1 + 3 for i in range(10))  # listed twice: weight 1 + weight 3
    b_counts = sorted(count[f"b{i}"] for i in range(10))
    assert b_counts == [2] * 7 + [3] * 3  # 2.3 x 10: every sample twice, 3 distinct samples a third time
    c_counts = Counter(count[f"c{i}"] for i in range(8))
    assert sum(count[f"c{i}"] for i in range(8)) == 4 + 3 and max(c_counts) <= 2
    first_c = [it.sample.id for it in items[33:37]]
    second_c = [it.sample.id for it in items[37:40]]
    assert len(set(first_c)) == 4 and len(set(second_c)) == 3  # a fraction draws distinct samples
    assert [it.sample.id for it in items[:10]] == [f"a{i}" for i in range(10)]  # sources in order, samples in order
    assert [it.sample.id for it in items[10:30]] == [f"b{i}" for i in range(10)] * 2
    assert [it.sample.id for it in items[40:]] == [f"a{i}" for i in range(10)] * 3
    assert [it.media_root for it in items] == [tmp_path] * 37 + [tmp_path / "media"] * 3 + [tmp_path] * 30
    again, _ = load_mixture(specs, seed=0)
    assert [it.sample.id for it in again] == [it.sample.id for it in items]  # seeded
    other = [[it.sample.id for it in load_mixture(specs, seed=s)[0]] for s in range(1, 6)]
    assert any(o != [it.sample.id for it in items] for o in other)  # the fractional picks follow the seed
    assert all(Counter(o[:10]) == Counter(f"a{i}" for i in range(10)) and len(o) == 70 for o in other)


def test_malformed_records_are_left_out_and_listed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"id": "g", "video": "g.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}]}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"id": "nohuman", "conversations": []}) + "\n")
    items, bad = load_mixture([SourceSpec(str(path), weight=2.0)])
    assert [it.sample.id for it in items] == ["g", "g"] and len(bad) == 2
    assert bad[0].startswith(f"{path}:2") and "nohuman" in bad[1]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_one_epoch_over_every_process_uses_each_mixture_item_exactly_once(tmp_path, group_by_length):
    specs = [SourceSpec(source(tmp_path, "v", 10), weight=2.3), SourceSpec(source(tmp_path, "w", 8), weight=0.5),
             SourceSpec(source(tmp_path, "t", 5, video=False), weight=1.2)]  # 23 + 4 + 6 text-only = 33
    items, _ = load_mixture(specs, seed=0)
    lengths = [(1 if it.sample.media else -1) * (10 + len(it.sample.turns[0].text)) for it in items]
    assert len(items) == 33
    world, bs = 3, 2
    plans = [BatchPlan(lengths, bs, world, rank, seed=4, group_by_length=group_by_length) for rank in range(world)]
    assert len(plans[0]) == 33 // 6 == 5
    epochs = []
    for epoch in range(3):
        per_rank = [p.epoch(epoch) for p in plans]
        assert [len(b) for b in per_rank] == [5, 5, 5] and all(len(x) == bs for b in per_rank for x in b)
        used = [i for b in per_rank for batch in b for i in batch]
        assert len(used) == len(set(used)) == 30  # no sample twice in an epoch, 3 (33 % 6) left for later epochs
        per_source = Counter(items[i].sample.id[0] for i in used)
        assert sum(per_source.values()) == 30 and per_source["v"] <= 23 and per_source["w"] <= 4
        assert per_rank == [p.epoch(epoch) for p in plans]  # a pure function of (seed, epoch, rank)
        if group_by_length:  # one modality per global batch except the single batch of leftovers
            mixed = [k for k in range(5) if len({lengths[i] >= 0 for r in range(world) for i in per_rank[r][k]}) > 1]
            assert len(mixed) <= 1
        epochs.append(used)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    unseen = set(range(33)) - set(epochs[0])
    assert len(unseen) == 3


def test_exact_per_source_counts_when_the_epoch_divides(tmp_path):
    specs = [SourceSpec(source(tmp_path, "a", 6), weight=1.5), SourceSpec(source(tmp_path, "b", 4), weight=2.0),
             SourceSpec(source(tmp_path, "c", 10), weight=0.3)]  # 9 + 8 + 3 = 20 = 5 global batches of 2 x 2
    items, _ = load_mixture(specs, seed=1)
    lengths = [10 + len(it.sample.turns[0].text) for it in items]
    for group_by_length in (True, False):
        plans = [BatchPlan(lengths, 2, 2, rank, seed=0, group_by_length=group_by_length) for rank in range(2)]
        for epoch in range(2):
            used = [i for p in plans for batch in p.epoch(epoch) for i in batch]
            assert sorted(used) == list(range(20))
            per_sample = Counter(items[i].sample.id for i in used)
            assert Counter(k[0] for k in per_sample.elements()) == {"a": 9, "b": 8, "c": 3}
            assert all(per_sample[f"b{i}"] == 2 for i in range(4))
            assert sorted(per_sample[f"a{i}"] for i in range(6)) == [1, 1, 1, 2, 2, 2]
    short = [BatchPlan(lengths, 4, 6, rank, group_by_length=group_by_length) for rank in range(6)
             for group_by_length in (True, False)]
    assert all(len(p) == 1 for p in short)  # fewer samples than a global batch: one short batch, shared evenly
    assert all(sorted(i for p in short[k::2] for i in p.epoch(0)[0]) == list(range(20)) for k in (0, 1))
    assert sorted(len(p.epoch(0)[0]) for p in short[::2]) == [3, 3, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="20 samples cannot give each of 24 processes one"):
        BatchPlan(lengths, 1, 24)


def test_the_trainers_orders_are_kept():
    """VideoMAE's and classification's orders are the ones their runs have always drawn (same numbers)."""
    import torch

    torch_plan = BatchPlan(10, 3, shuffle="torch", group_by_length=False, seed=2)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2 * 100_003 + 1)).tolist()
    assert torch_plan.epoch(1) == [perm[0:3], perm[3:6], perm[6:9]]
    stream = BatchPlan(10, 4, shuffle="torch_stream", group_by_length=False, seed=5)
    g = torch.Generator().manual_seed(5)
    perms = [torch.randperm(10, generator=g).tolist() for _ in range(3)]
    assert [stream.epoch(e) for e in range(3)] == [[p[0:4], p[4:8]] for p in perms]
    with pytest.raises(ValueError, match="grouping by length needs 'numpy'"):
        BatchPlan(10, 2, shuffle="torch")


def test_a_source_listed_twice_draws_its_fractions_independently(tmp_path):
    c = source(tmp_path, "c", 8)
    items, _ = load_mixture([SourceSpec(c, weight=0.5), SourceSpec(c, weight=0.5)], seed=0)
    first, second = {it.sample.id for it in items[:4]}, {it.sample.id for it in items[4:]}
    assert len(first) == len(second) == 4 and first != second  # not the same half twice


def test_leftovers_of_both_modalities_still_fill_the_epoch():
    lengths = [5, 6, 7, 8, 9] + [-3, -4, -5, -6, -7, -8, -9]  # 5 with video, 7 text-only; global batch 6
    plans = [BatchPlan(lengths, 3, 2, rank, seed=0, group_by_length=True) for rank in range(2)]
    assert len(plans[0]) == 2
    for epoch in range(3):
        batches = [p.epoch(epoch) for p in plans]
        assert [len(b) for b in batches] == [2, 2]
        used = [i for b in batches for batch in b for i in batch]
        assert sorted(used) == list(range(12))


def test_max_samples_keeps_every_source_in_mixture_order(tmp_path):
    a, b = source(tmp_path, "a", 40), source(tmp_path, "b", 40)
    items, _ = load_mixture([SourceSpec(a), SourceSpec(b)], seed=0)
    cut = subsample(items, 20, seed=3)
    names = [it.sample.id for it in cut]
    assert len(names) == 20 == len(set(names))
    assert 4 <= sum(n.startswith("b") for n in names) <= 16  # the first 20 alone would be all of source a
    order = [it.sample.id for it in items]
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)  # mixture order kept
    assert [it.sample.id for it in subsample(items, 20, seed=3)] == names  # seeded
    assert [it.sample.id for it in subsample(items, 20, seed=4)] != names
    assert subsample(items, 80) == items and subsample(items, 500) == items


def test_a_wider_window_puts_samples_of_similar_length_together():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=400).tolist()

    def padding(plan: BatchPlan) -> float:
        batches = plan.epoch(0)
        used = sorted(i for b in batches for i in b)
        assert used == list(range(400))  # every sample once, whatever the window
        return 1 - sum(lengths[i] for i in used) / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain, llava, wide = (padding(BatchPlan(lengths, 8, group_by_length=g, window=w)) for g, w in
                          ((False, 1), (True, 1), (True, 25)))
    assert plain > 0.3 and llava == pytest.approx(plain, abs=0.1) and wide < 0.05, (plain, llava, wide)
    wide_plan = BatchPlan(lengths, 8, window=25)
    assert wide_plan.epoch(0) != wide_plan.epoch(1)  # windows are drawn anew each epoch
    with pytest.raises(ValueError, match="window must be >= 1"):
        BatchPlan(lengths, 8, window=0)
