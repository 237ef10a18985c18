"""Mixtures and benchmarks in Hugging Face `datasets` storage (saved folders, Parquet, streamed Parquet): the same
samples as the JSON files, bad rows named by file and row, a stage trained from a saved dataset, streamed plans
that resume exactly, and `vlm data synth`'s saved-dataset twins."""

from __future__ import annotations

import filecmp
import json
import pickle
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from tests.train_helpers import make_tiny_data, tiny_recipe
from vlm.data.conversation import DataFormatError
from vlm.data.dataset import ConversationDataset, RowItem, SourceSpec, load_mixture
from vlm.data.hf import save_records, source_kind, source_problem
from vlm.data.mvbench import load_mvbench
from vlm.data.stream import StreamItems, StreamPlan, is_streamed, streamed_data
from vlm.train.metrics import read_jsonl


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    """Parquet conversions go to a folder of the test session, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def conversation(i: int, video: bool = True) -> dict:
    human = ("<video>\n" if video else "") + "What happens?" + " more" * (i % 5)
    record = {"id": f"r{i}", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": f"a{i}"}]}
    if video:
        record["video"] = f"videos/v{i}.mp4"
    return record


def records(n: int = 12) -> list[dict]:
    out = [conversation(i, video=i % 4 != 3) for i in range(n)]
    out[2]["start"], out[2]["end"] = 1.5, 3.0  # extra keys of one record only
    out[5] = {"id": "noanswer", "video": "videos/v5.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"}]}
    return out


def write_formats(root: Path, recs: list[dict]) -> dict[str, str]:
    """The same records as a JSON list, a saved dataset, one Parquet file, a folder of 3 shards and a glob."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.json").write_text(json.dumps(recs))
    save_records(recs, root / "data.hf")
    ds = datasets.load_from_disk(str(root / "data.hf"))
    ds.to_parquet(str(root / "data.parquet"))
    (root / "shards").mkdir(exist_ok=True)
    for k in range(3):
        ds.shard(3, k, contiguous=True).to_parquet(str(root / "shards" / f"part-{k}.parquet"))
    return {"json": str(root / "data.json"), "saved": str(root / "data.hf"), "parquet": str(root / "data.parquet"),
            "folder": str(root / "shards"), "glob": str(root / "shards" / "part-*.parquet")}


def described(items) -> list[tuple]:
    return [(it.sample.id, [(t.role, t.text) for t in it.sample.turns], it.sample.media, it.sample.media_type,
             it.sample.extra, it.media_root, it.text_tokens, it.has_media) for it in items]


def test_every_format_gives_the_samples_of_the_json_file(tmp_path):
    paths = write_formats(tmp_path / "d", records())
    def specs(path: str) -> list[SourceSpec]:
        return [SourceSpec(path, weight=1.5), SourceSpec(path, media_root=str(tmp_path), weight=0.5)]

    expected, bad_json = load_mixture(specs(paths["json"]), seed=3)
    assert len(expected) == 17 + 6 and bad_json[0].startswith(f"{paths['json']}[5] (id noanswer)")
    assert [source_kind(p) for p in paths.values()] == ["json", "saved", "parquet", "parquet", "parquet"]
    for kind, path in paths.items():
        items, bad = load_mixture(specs(path), seed=3)
        assert described(items) == described(expected), kind
        assert len(bad) == 2 and all("(id noanswer): the last turn must be 'gpt'" in b for b in bad), kind
        if kind != "json":
            assert all(isinstance(it, RowItem) for it in items)  # rows are parsed when read, not held
    assert described(load_mixture([SourceSpec(paths["saved"])])[0])[2][4] == {"start": 1.5, "end": 3.0}


def test_a_bad_row_is_left_out_counted_and_named_by_file_and_row(tmp_path):
    recs = records()
    recs[7] = {"id": "twovideos", "video": "a.mp4", "image": "b.png", "conversations": [
        {"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}]}
    paths = write_formats(tmp_path, recs)
    _, bad_json = load_mixture([SourceSpec(paths["json"])])
    _, bad = load_mixture([SourceSpec(paths["saved"])])
    assert len(bad) == 2 and "(id twovideos): sample has both 'video' and 'image'" in bad[1]
    assert bad == [b.replace(f"{paths['json']}[", f"{paths['saved']}:").replace("] (id", " (id") for b in bad_json]
    _, bad = load_mixture([SourceSpec(paths["parquet"])])
    assert [b.split(" ")[0] for b in bad] == [f"{paths['parquet']}:5", f"{paths['parquet']}:7"]
    _, bad = load_mixture([SourceSpec(paths["glob"])])  # shards of 4 rows: the shard file and its own row
    shards = Path(paths["folder"])
    assert [b.split(" ")[0] for b in bad] == [f"{shards / 'part-1.parquet'}:1", f"{shards / 'part-1.parquet'}:3"]


def test_source_paths_that_cannot_be_read_say_why(tmp_path):
    assert source_problem(tmp_path / "missing.json") == f"{tmp_path / 'missing.json'} not found"
    assert "no Parquet files" in source_problem(tmp_path / "none-*.parquet")
    (tmp_path / "empty").mkdir()
    assert "no Parquet files" in source_problem(tmp_path / "empty")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records()[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert "name a split's folder" in source_problem(tmp_path / "dd")
    assert source_problem(write_formats(tmp_path / "ok", records())["saved"]) is None
    with pytest.raises(ValueError, match="streamed plan"):
        load_mixture([SourceSpec(str(tmp_path / "ok" / "data.parquet"), streaming=True)])
    with pytest.raises(DataFormatError, match="streaming reads Parquet"):
        StreamItems([SourceSpec(str(tmp_path / "ok" / "data.json"), streaming=True)])


def test_rows_survive_pickling_for_dataloader_workers(tmp_path):
    items, _ = load_mixture([SourceSpec(write_formats(tmp_path, records())["parquet"])])
    again = pickle.loads(pickle.dumps(items))
    assert described(again) == described(items)
    dataset = ConversationDataset(items, stub_visual, stub_encode, visual_tokens=10)
    assert dataset.length(0) == items[0].text_tokens + 10 and dataset.length(3) == -items[3].text_tokens
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list)
    assert [s["id"] for batch in loader for s in batch] == [dataset[i]["id"] for i in range(len(dataset))]


def stub_visual(path: Path, sample) -> dict:
    return {}


def stub_encode(sample: dict) -> dict:
    return {"id": sample["id"]}


def test_a_stage_trains_from_a_saved_dataset_as_from_its_json(tmp_path):
    data = make_tiny_data(tmp_path / "data")  # captions.json: 8 good, 2 bad videos, 1 malformed record
    saved = data["captions"].with_suffix(".hf")
    save_records(json.loads(data["captions"].read_text()), saved)
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import parse_recipe

    results = {}
    for name, path in (("json", data["captions"]), ("saved", saved)):
        raw = tiny_recipe(data, tmp_path / name, max_steps=3)
        raw["stages"] = raw["stages"][:1]
        raw["stages"][0]["data"]["mixture"] = [{"path": str(path)}]
        run_recipe(parse_recipe(raw, check_files=False))
        stage = tmp_path / name / "1-align"
        losses = [r["loss"] for r in read_jsonl(stage / "metrics.jsonl")]
        results[name] = (json.loads((stage / "stage.json").read_text()), losses)
    info, losses = results["saved"]
    assert info["malformed_records"] == 1 and len(losses) == 3
    assert losses == results["json"][1]  # the same samples in the same order: the same run
    assert info["skipped_samples"] == results["json"][0]["skipped_samples"]


def test_benchmark_tasks_from_parquet_and_saved_datasets_load_and_validate(tmp_path):
    items = [{"video": f"c{i}.mp4", "question": f"q{i}", "candidates": ["up", "down", "left"], "answer": "left",
              "start": 0.5 * i, "end": 2.0} for i in range(4)]
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "moves.json").write_text(json.dumps(items))
    save_records(items, tmp_path / "json" / "moves_saved")
    datasets.load_from_disk(str(tmp_path / "json" / "moves_saved")).to_parquet(str(tmp_path / "json" / "moves.parquet"))
    manifest = [{"task": name, "json": file, "bound": True}
                for name, file in (("JSON", "moves.json"), ("Saved", "moves_saved"), ("Parquet", "moves.parquet"))]
    (tmp_path / "tasks.json").write_text(json.dumps(manifest))
    bench = load_mvbench(tmp_path)
    strip = lambda its: [{**vars(it), "task": None} for it in its]  # noqa: E731
    assert strip(bench["Saved"]) == strip(bench["Parquet"]) == strip(bench["JSON"])
    assert bench["Parquet"][3].start == 1.5 and bench["Parquet"][3].answer_letter == "C"
    assert list(load_mvbench(tmp_path, ["moves"])) == ["Parquet"]  # the key drops the .parquet suffix
    bad = items[:2] + [{**items[2], "answer": "right"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "json" / "moves.parquet"))
    with pytest.raises(DataFormatError, match=r"moves.parquet:2: answer 'right' is not one of the candidates"):
        load_mvbench(tmp_path, ["Parquet"])
    save_records([{k: v for k, v in items[0].items() if k != "question"}], tmp_path / "json" / "moves_saved")
    with pytest.raises(DataFormatError, match=r"moves_saved:0: missing \['question'\]"):
        load_mvbench(tmp_path, ["Saved"])


# ---------------------------------------------------------------- streamed mixtures
def stream_specs(tmp_path: Path) -> list[SourceSpec]:
    """12 rows in 3 Parquet shards (row 5 malformed) and 5 rows b0..b4 at weight 1.6, both streamed."""
    a = write_formats(tmp_path / "a", records(12))
    b = [{**conversation(i), "id": f"b{i}"} for i in range(5)]
    datasets.Dataset.from_list(b).to_parquet(str(tmp_path / "b.parquet"))
    return [SourceSpec(a["folder"], media_root=str(tmp_path / "media"), streaming=True),
            SourceSpec(str(tmp_path / "b.parquet"), weight=1.6, streaming=True)]


def read_all(items: StreamItems, indices) -> list[str]:
    out = []
    for i in indices:
        try:
            out.append(items[i].sample.id)
        except DataFormatError as e:
            out.append(str(e).split(" ")[0])
    return out


def test_a_streamed_plan_keeps_weights_and_reads_each_row_once_per_pass(tmp_path):
    specs = stream_specs(tmp_path)
    assert is_streamed(specs) and not is_streamed([SourceSpec("x.json")])
    items = StreamItems(specs, seed=1, window=4)
    assert items.counts == [12, 8] and len(items) == 20  # round(5 * 1.6) = 8
    bad_row = f"{tmp_path / 'a' / 'shards' / 'part-1.parquet'}:1"  # the malformed row, named by shard and row
    b_counts = Counter()
    for epoch in range(5):
        count = Counter(read_all(items, range(epoch * 20, (epoch + 1) * 20)))
        assert {k: v for k, v in count.items() if k.startswith("r")} == {f"r{i}": 1 for i in range(12) if i != 5}
        assert count[bad_row] == 1
        b_counts.update({k: v for k, v in count.items() if k.startswith("b")})
        if epoch == 0:  # the source's next 8 rows, cyclically: 0 1 2 3 4 0 1 2
            assert b_counts == {"b0": 2, "b1": 2, "b2": 2, "b3": 1, "b4": 1}
    assert b_counts == {f"b{i}": 8 for i in range(5)}  # 5 epochs of 8 = every row 8 times
    orders = [read_all(StreamItems(specs, seed=1, window=4), range(e * 20, e * 20 + 20)) for e in (0, 1)]
    assert orders[0] != orders[1] and orders[0] == read_all(items, range(20))  # reshuffled per epoch, seeded
    assert {items[i].media_root for i in range(3)} <= {tmp_path / "media", tmp_path}
    assert items[orders[0].index("b0")].media_root == tmp_path  # default: the folder holding the path


def test_a_streamed_plan_resumes_exactly_at_any_batch(tmp_path):
    specs = stream_specs(tmp_path)
    plan = StreamPlan(20, batch_size=3, world_size=2, rank=1, seed=0)
    assert len(plan) == 3 and plan.epoch(1)[0] == [23, 24, 25]
    reference = StreamItems(specs, seed=5, window=4)
    whole = [read_all(reference, b) for e in range(3) for b in plan.epoch(e)]
    for epoch, batch in ((0, 2), (1, 1), (2, 0)):
        fresh = StreamItems(pickle.loads(pickle.dumps(specs)), seed=5, window=4)  # a new process
        resumed = [read_all(fresh, b) for e in range(epoch, 3) for b in plan.epoch(e)[batch if e == epoch else 0:]]
        assert resumed == whole[epoch * 3 + batch:]
    assert sorted(i for r in range(2) for b in StreamPlan(5, 4, 2, r).epoch(0) for i in b) == [0, 1, 2, 3, 4]


def test_a_streamed_mixture_trains_through_the_loop_and_resumes_exactly(tmp_path):
    from vlm.train.loop import CONSTANT_LR, LoopSpec, build_accelerator, setup, train

    specs = stream_specs(tmp_path)

    def run(out: Path, steps: int, workers: int = 0) -> list[list[str]]:
        spec = LoopSpec(batch_size=3, max_steps=steps, precision="fp32", save_every=2)
        accelerator, ds = build_accelerator(spec)
        dataset, plan = streamed_data(specs, stub_visual, stub_encode, batch_size=3, seed=2)
        model = torch.nn.Linear(1, 1)
        seen: list[list[str]] = []

        def collate(samples):
            return [s["id"] for s in samples], [r for s in samples for r in s.pop("skipped")]

        def step(net, batch, epoch, index):
            seen.append(batch)
            return {"loss": (net(torch.ones(1, 1)) ** 2).sum()}

        run_ = setup(spec, CONSTANT_LR, accelerator, ds, model, torch.optim.SGD(model.parameters(), lr=0.1), dataset,
                     collate, plan, out, num_workers=workers)
        train(run_, step, "stream", progress=False)
        return seen

    whole = run(tmp_path / "whole", 9)  # 20 items per epoch, 6 batches of 3: 9 steps cross an epoch
    assert run(tmp_path / "cut", 4, workers=2) == whole[:4]  # each DataLoader worker opens its own streams
    assert run(tmp_path / "cut", 9) == whole[4:]  # resumed from the step-4 checkpoint
    skipped = (tmp_path / "whole" / "skipped.txt").read_text()
    assert f"{tmp_path / 'a' / 'shards' / 'part-1.parquet'}:1 (id noanswer)" in skipped


# ---------------------------------------------------------------- vlm data synth --format hf
def test_synth_format_hf_writes_saved_datasets_of_the_json_records(tmp_path):
    from data_tools.synth import generate
    from data_tools.synth.hf_files import HF_FILES

    summary = generate(tmp_path / "hf", 3, 0, frames=16, size=96, eval_fraction=0.34, workers=1, progress=False,
                       data_format="hf")
    assert sorted(summary["hf_datasets"]) == sorted(n.replace(".json", ".hf") for n in HF_FILES)
    for name in HF_FILES:
        rows = [dict(r) for r in datasets.load_from_disk(str(tmp_path / "hf" / name.replace(".json", ".hf")))]
        expected = json.loads((tmp_path / "hf" / name).read_text())
        assert [json.dumps({k: v for k, v in r.items() if v is not None}) for r in rows] == \
               [json.dumps(r) for r in expected], name
    items, bad = load_mixture([SourceSpec(str(tmp_path / "hf" / "instruct_train.hf"))])
    json_items, _ = load_mixture([SourceSpec(str(tmp_path / "hf" / "instruct_train.json"))])
    assert bad == [] and described(items) == described(json_items)
    generate(tmp_path / "hf2", 3, 0, frames=16, size=96, eval_fraction=0.34, workers=2, progress=False,
             data_format="hf")
    for folder in (tmp_path / "hf").glob("*.hf"):  # byte-identical for any worker count, like the JSON
        assert all(filecmp.cmp(f, tmp_path / "hf2" / folder.name / f.name, shallow=False) for f in folder.iterdir())
    generate(tmp_path / "json", 3, 0, frames=16, size=96, eval_fraction=0.34, workers=1, progress=False)
    assert not list((tmp_path / "json").glob("*.hf"))  # the default writes JSON only
    with pytest.raises(ValueError, match="data_format"):
        generate(tmp_path / "x", 1, data_format="csv")


def test_vlm_train_streams_a_parquet_mixture_reports_bad_rows_and_resumes_exactly(tmp_path):
    """A recipe stage whose mixture streams a Parquet file: bad rows named by file and row, a run killed after the
    step-4 checkpoint resumes with the same losses, and what streaming cannot do is refused by the recipe check."""
    from vlm.train.engine import run_recipe
    from vlm.train.metrics import MetricsLog
    from vlm.train.recipe import RecipeError, parse_recipe

    data = make_tiny_data(tmp_path / "data")
    recs = json.loads(data["captions"].read_text())
    keys = ["id", "video", "conversations"]
    datasets.Dataset.from_dict({k: [r.get(k) for r in recs] for k in keys}).to_parquet(str(tmp_path / "data" / "captions.parquet"))

    def raw(out, steps, **kw):
        r = tiny_recipe(data, tmp_path / out, max_steps=steps, save_every=2)
        r["stages"] = r["stages"][:1]
        r["stages"][0]["data"]["mixture"] = [{"path": str(tmp_path / "data" / "captions.parquet"), "streaming": True}]
        r["stages"][0]["data"].update(kw)
        return r

    run_recipe(parse_recipe(raw("ref", 6)))
    stage = tmp_path / "ref" / "1-align"
    skipped = (stage / "skipped.txt").read_text()
    assert "captions.parquet:10 (id noplaceholder)" in skipped and "nope.mp4" in skipped
    ref = [r["loss"] for r in read_jsonl(stage / "metrics.jsonl")]
    write = MetricsLog.write

    def crash_at_5(self, record):
        if record["step"] == 5:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint
        write(self, record)

    MetricsLog.write = crash_at_5
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe(parse_recipe(raw("cut", 6)))
    finally:
        MetricsLog.write = write
    run_recipe(parse_recipe(raw("cut", 6)))
    cut = [r["loss"] for r in read_jsonl(tmp_path / "cut" / "1-align" / "metrics.jsonl")]
    assert cut == ref
    with pytest.raises(RecipeError, match="max_samples"):
        parse_recipe(raw("x", 2, max_samples=4))
    bad = raw("x", 2)
    bad["stages"][0]["data"]["mixture"][0]["path"] = str(data["captions"])
    with pytest.raises(RecipeError, match="streaming reads Parquet"):
        parse_recipe(bad)
    bad["stages"][0]["data"]["mixture"][0] = {"path": str(tmp_path / "nothing-*.parquet")}
    with pytest.raises(RecipeError, match="no Parquet files"):
        parse_recipe(bad)
