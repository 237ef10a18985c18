"""Staged training: recipes, the loop, bad samples, feature cache, checkpoints and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_helpers import make_tiny_data, tiny_recipe
from vlm.model import VideoLLM
from vlm.train.engine import run_recipe
from vlm.train.metrics import read_jsonl
from vlm.train.recipe import RecipeError, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def test_two_stage_recipe_trains_saves_and_reports_bad_samples(data, tmp_path):
    recipe = parse_recipe(tiny_recipe(data, tmp_path / "run"))
    final = run_recipe(recipe)
    assert final == tmp_path / "run" / "2-instruct" / "final"
    stage1 = json.loads((tmp_path / "run" / "1-align" / "stage.json").read_text())
    assert stage1["malformed_records"] == 1  # the record without a placeholder never enters the mixture
    assert stage1["skipped_samples"] >= 1  # missing / broken videos are skipped, counted and listed
    skipped = (tmp_path / "run" / "1-align" / "skipped.txt").read_text()
    assert "broken.mp4" in skipped or "nope.mp4" in skipped
    for stage, steps in (("1-align", 4), ("2-instruct", 3)):
        rows = read_jsonl(tmp_path / "run" / stage / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert all(r["loss"] > 0 and "connector" in r["lr"] for r in rows)
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    model = VideoLLM.from_pretrained(final)
    assert model.config.lora["llm"]["r"] == 4 and model.modes["llm"] == "lora"
    stage2 = json.loads((tmp_path / "run" / "2-instruct" / "stage.json").read_text())
    assert stage2["trainable"]["llm"] > 0 and stage2["trainable"]["tower"] == 0


def test_feature_cache_hits_and_invalidation(data, tmp_path):
    raw = tiny_recipe(data, tmp_path / "run")
    raw["stages"] = raw["stages"][:1]
    run_recipe(parse_recipe(raw))
    first = json.loads((tmp_path / "run" / "1-align" / "stage.json").read_text())["feature_cache"]
    assert first["encoded"] == 8 and first["bad"] == 1  # 8 good clips, the broken one fails (the missing one is no job)
    run_recipe(parse_recipe(raw), resume=False)
    again = json.loads((tmp_path / "run" / "1-align" / "stage.json").read_text())["feature_cache"]
    assert again["encoded"] == 0  # every clip came from the cache
    raw["stages"][0]["data"]["frames"] = 2  # other sampling -> other keys
    run_recipe(parse_recipe(raw), resume=False)
    assert json.loads((tmp_path / "run" / "1-align" / "stage.json").read_text())["feature_cache"]["encoded"] == 8
    raw["model"]["tower"]["config"]["image_size"] = 48  # other preprocessing/tower -> other namespace
    run_recipe(parse_recipe(raw), resume=False)
    assert json.loads((tmp_path / "run" / "1-align" / "stage.json").read_text())["feature_cache"]["encoded"] == 8
    assert len(list((tmp_path / "run" / "feature_cache").iterdir())) == 2


def test_resume_after_sigkill_reproduces_the_loss_curve(data, tmp_path):
    """Kill a run with SIGKILL after its first checkpoint, resume it, and compare with an uninterrupted run."""
    raw = tiny_recipe(data, tmp_path / "ref", save_every=2, max_steps=6)
    raw["stages"] = raw["stages"][1:]  # LoRA + connector: dropout RNG, optimizer and scheduler state all matter
    raw["stages"][0]["feature_cache"] = False
    run_recipe(parse_recipe(raw))
    reference = [r["loss"] for r in read_jsonl(tmp_path / "ref" / "1-instruct" / "metrics.jsonl")]
    assert len(reference) == 6

    raw["output_dir"] = str(tmp_path / "killed")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "vlm.cli", "train", str(tmp_path / "r.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "1-instruct" / "checkpoints" / "step-0000002" / "state.json"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run died before its first checkpoint"
    assert not (tmp_path / "killed" / "1-instruct" / "final").exists()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = [r["loss"] for r in read_jsonl(tmp_path / "killed" / "1-instruct" / "metrics.jsonl")]
    assert len(resumed) == 6
    assert resumed == pytest.approx(reference, abs=1e-5)


def test_recipe_validation_errors(data, tmp_path):
    good = tiny_recipe(data, tmp_path / "run")
    parse_recipe(good)
    cases = [
        (lambda r: r["stages"][0].update(batchsize=2), "unknown key\\(s\\) \\['batchsize'\\]"),
        (lambda r: r["stages"][0]["parts"]["connector"].update(mode="half"), "mode 'half'"),
        (lambda r: r["stages"][0]["parts"]["connector"].pop("lr"), "needs a positive lr"),
        (lambda r: r["stages"][0]["data"]["mixture"][0].update(path="nope.json"), "nope.json not found"),
        (lambda r: r["model"]["connector"].update(name="nope"), "model.connector.name 'nope' is not registered"),
        (lambda r: r["stages"][0]["parts"].update(vision={"mode": "full"}), "unknown part\\(s\\) \\['vision'\\]"),
        (lambda r: r["stages"][0].update(precision="fp8"), "precision 'fp8'"),
        (lambda r: r["stages"][0]["data"].update(sampling="random"), "sampling 'random'"),
        (lambda r: r["stages"][0]["parts"]["connector"].update(mode="frozen"), "every part is frozen"),
        (lambda r: r["stages"][0].update(deepspeed="missing.json"), "deepspeed: missing.json not found"),
        (lambda r: r["stages"][0].update(objective="contrastive"), "objective 'contrastive'"),
        (lambda r: r["stages"][1].update(objective="words"), "trains the connector only"),
    ]
    for mutate, message in cases:
        raw = json.loads(json.dumps(good))
        mutate(raw)
        with pytest.raises(RecipeError, match=message):
            parse_recipe(raw)


def test_yaml_overrides_and_variables(data, tmp_path):
    raw = tiny_recipe(data, tmp_path / "run")
    raw["vars"] = {"frames": 4}
    raw["stages"][0]["data"]["frames"] = "${frames}"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "r.yaml", ["data.frames=2", "stages.1.batch_size=1", "seed=7"], stage=0)
    assert recipe.stages[0].data.frames == 2 and recipe.stages[1].data.frames == 4
    assert recipe.stages[1].batch_size == 1 and recipe.seed == 7
    with pytest.raises(RecipeError, match="unknown variable \\$\\{nope\\}"):
        raw["output_dir"] = "${nope}"
        parse_recipe(raw)


def test_schedule_warmup_and_logged_rates(data, tmp_path):
    from vlm.train.engine import lr_lambda

    f = lr_lambda(30, 2, 0.0)
    assert [round(f(s), 3) for s in (0, 1, 2)] == [0.333, 0.667, 1.0] and f(29) < 0.01
    raw = tiny_recipe(data, tmp_path / "run", max_steps=3, schedule={"warmup_steps": 0})
    raw["stages"] = raw["stages"][:1]
    run_recipe(parse_recipe(raw))
    rates = [r["lr"]["connector"] for r in read_jsonl(tmp_path / "run" / "1-align" / "metrics.jsonl")]
    assert rates == pytest.approx([1e-3, 7.5e-4, 2.5e-4])  # the rate each step used, not the next one


def test_words_objective_stage_trains_the_connector_through_the_engine(data, tmp_path):
    """A stage with `objective: words` runs the loop on cached features without the LLM: its logged loss is the
    word-alignment loss, the connector changes, the LLM does not."""
    raw = tiny_recipe(data, tmp_path / "run", max_steps=3)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(objective="words", batch_size=4)
    raw["stages"][0]["data"]["mixture"] = [{"path": str(data["captions"])}]
    recipe = parse_recipe(raw)
    torch.manual_seed(0)
    before = VideoLLM.from_config(recipe.model_config())
    final = run_recipe(recipe)
    after = VideoLLM.from_pretrained(final)
    rows = read_jsonl(Path(recipe.output_dir) / "1-align" / "metrics.jsonl")
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    changed = [k for k, v in after.connector.state_dict().items() if not torch.equal(v, before.connector.state_dict()[k])]
    assert changed
    llm_before, llm_after = before.llm.state_dict(), after.llm.state_dict()
    assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
