"""Evaluation across processes and clips decoded ahead of the model: torchrun with two CPU processes (gloo) gives
the single-process results, resumes after a rank was killed, and DataLoader workers change no prediction."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evals.mcq import evaluate_mcq
from evals.shard import Shard, merge_logs, split_free
from tests.eval_helpers import ScriptedModel, make_bench
from tests.mcq_shard_worker import pixel_scores
from vlm.cli import main as vlm_main
from vlm.video import VideoDecodeError, read_clip
from vlm.video.prefetch import prefetch_clips

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench"))


def same_numbers(a: dict, b: dict) -> None:
    """Two results.json agree in everything but timing and how the work was split."""
    for key in ("metrics", "per_task", "settings", "profile", "dataset", "model"):
        assert a[key] == b[key], key
    assert split_free(a["counts"]) == split_free(b["counts"])


def records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, "--nproc_per_node", "2", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_prefetch_keeps_the_order_and_returns_errors(bench):
    videos = sorted((bench / "video").glob("*.mp4")) + [bench / "video" / "nope.mp4"]
    for workers in (0, 2):
        got = list(prefetch_clips(videos, read_clip, workers=workers))
        assert [job for job, _, _ in got] == videos
        assert all(clip is not None and error is None for _, clip, error in got[:-1])
        _, clip, error = got[-1]
        assert clip is None and isinstance(error, VideoDecodeError) and "nope.mp4" in str(error)
        assert (got[0][1].frames == read_clip(videos[0]).frames).all()
    e = pickle.loads(pickle.dumps(VideoDecodeError("/v/x.mp4", "truncated")))  # what a worker sends back
    assert (e.path, e.reason, str(e)) == ("/v/x.mp4", "truncated", "/v/x.mp4: truncated")


def test_decoding_in_workers_changes_no_prediction(bench, tmp_path):
    runs = {}
    for workers in (0, 2):
        model = ScriptedModel(scores=pixel_scores)
        res = evaluate_mcq(model, bench, tmp_path / str(workers), profile="loglik", progress=False, workers=workers)
        runs[workers] = (res, records(tmp_path / str(workers)))
        # questions about one clip still share one decoded clip
        assert model.clips["Moving Direction/0"] is model.clips["Moving Direction/1"]
    (a, ra), (b, rb) = runs[0], runs[2]
    assert a.metrics == b.metrics and a.counts["clips_decoded"] == b.counts["clips_decoded"] > 0
    assert {r["uid"]: r.get("scores") for r in ra} == {r["uid"]: r.get("scores") for r in rb}
    errors = [r for r in rb if r.get("error")]
    assert errors and all("missing.mp4" in r["error"] and r["error"].startswith("decode: ") for r in errors)


def test_shards_take_every_nth_clip_and_merge_in_benchmark_order(tmp_path):
    assert Shard(1, 3).mine(list(range(8))) == [1, 4, 7] and Shard().mine([1, 2]) == [1, 2]
    assert Shard(1, 2).log_path(tmp_path).name == "predictions.rank1.jsonl"
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"uid": "c", "error": "decode: x"}) + "\n")
    (tmp_path / "predictions.rank0.jsonl").write_text(json.dumps({"uid": "b", "pred": "A"}) + "\n")
    (tmp_path / "predictions.rank1.jsonl").write_text(json.dumps({"uid": "c", "pred": "B"}) + "\n{\"uid\": \"a")
    assert merge_logs(tmp_path, {}, order=["a", "b", "c"]) == 2
    assert records(tmp_path) == [{"uid": "b", "pred": "A"}, {"uid": "c", "pred": "B"}]  # newer record wins
    assert not list(tmp_path.glob("predictions.rank*"))


def test_two_processes_give_the_single_process_results_and_resume_after_a_rank_dies(bench, tmp_path):
    single = evaluate_mcq(ScriptedModel(scores=pixel_scores), bench, tmp_path / "one", profile="loglik",
                          progress=False, batch_size=1)
    worker = str(REPO / "tests" / "mcq_shard_worker.py")
    died = torchrun(worker, str(tmp_path / "two"), str(bench), "2")
    assert died.returncode != 0, died.stderr[-2000:]
    assert not (tmp_path / "two" / "results.json").exists()
    assert (tmp_path / "two" / "predictions.rank1.jsonl").is_file()
    rerun = torchrun(worker, str(tmp_path / "two"), str(bench))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    same_numbers(single.to_dict(), two)
    assert two["counts"]["processes"] == 2 and 0 < two["counts"]["resumed"] < two["counts"]["questions"]
    assert two["counts"]["asked"] + two["counts"]["resumed"] - two["counts"]["skipped"] == two["counts"]["scored"]
    assert [r["uid"] for r in records(tmp_path / "two")] == [r["uid"] for r in records(tmp_path / "one")]
    assert {r["uid"]: r.get("pred") for r in records(tmp_path / "two")} == \
        {r["uid"]: r.get("pred") for r in records(tmp_path / "one")}
    assert not list((tmp_path / "two").glob("predictions.rank*"))


def test_the_command_line_under_torchrun(bench, tmp_path, tiny_model_dir):
    """`torchrun -m vlm.cli eval mcq` with a saved model: the numbers of one process."""
    args = ["eval", "mcq", "--model", str(tiny_model_dir), "--bench", str(bench), "--profile", "loglik",
            "--frames", "4", "--batch-size", "2", "--model-name", "tiny"]
    assert vlm_main([*args, "--out", str(tmp_path / "one")]) == 0
    two = torchrun("-m", "vlm.cli", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    same_numbers(a, b)
    assert {r["uid"]: r.get("pred") for r in records(tmp_path / "one")} == \
        {r["uid"]: r.get("pred") for r in records(tmp_path / "two")}
