"""Staged training: recipes, the loop, bad samples, feature cache, checkpoints and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train_helpers import kill_after_step, make_tiny_data, run_vlm, tiny_recipe
from vlm.model import VideoLLM
from vlm.train.engine import run_recipe
from vlm.train.feature_cache import FeatureCache, clip_key, tower_fingerprint
from vlm.train.metrics import MetricsLog, read_jsonl
from vlm.train.recipe import RecipeError, load_recipe, parse_recipe
from vlm.video import read_clip, write_video


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


def cache_stats(run: Path, stage: str = "1-align") -> dict:
    return json.loads((run / stage / "stage.json").read_text())["feature_cache"]


def losses(run: Path, stage: str) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / stage / "metrics.jsonl")]


def fresh_features(model: VideoLLM, video: Path, frames: int = 4) -> torch.Tensor:
    """The tower's features for a clip, encoded now, the way the uncached data path does it."""
    clip = read_clip(video, frames, "uniform")
    px = model.tower.preprocessor(clip.frames)[None]  # [1, T, 3, H, W]
    with torch.no_grad():
        return model.tower(px, torch.as_tensor(clip.timestamps, dtype=torch.float32)[None]).tokens[0]  # [T', N, D]


def open_cache(run: Path, model: VideoLLM) -> FeatureCache:
    fp = tower_fingerprint(model.config.tower, model.tower.preprocessor.to_dict(), model.tower)
    assert (run / "feature_cache" / fp).is_dir(), "the trained model's tower names another namespace"
    return FeatureCache(run / "feature_cache", fp)


def test_feature_cache_hits_give_the_features_and_losses_of_fresh_encoding(data, tmp_path):
    """A hit is exactly what a fresh encode gives: per clip, and for the whole loss curve (cache on vs off)."""
    raw = tiny_recipe(data, tmp_path / "off", max_steps=3)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["feature_cache"] = False
    run_recipe(parse_recipe(raw))
    assert cache_stats(tmp_path / "off") is None and not (tmp_path / "off" / "feature_cache").exists()
    raw["output_dir"] = str(tmp_path / "on")
    raw["stages"][0]["feature_cache"] = True
    final = run_recipe(parse_recipe(raw))
    assert cache_stats(tmp_path / "on") == {"clips": 9, "encoded": 8, "bad": 1}  # the broken clip fails, once
    assert losses(tmp_path / "on", "1-align") == pytest.approx(losses(tmp_path / "off", "1-align"), abs=1e-5)
    model = VideoLLM.from_pretrained(final)
    cache = open_cache(tmp_path / "on", model)
    for i in range(8):
        video = data["captions"].parent / "videos" / f"v{i}.mp4"
        got = cache.get(clip_key(video, 4, "uniform", None, None))
        expected = fresh_features(model, video)
        assert got["tokens"].shape == expected.shape and expected.abs().sum() > 0
        torch.testing.assert_close(got["tokens"], expected, rtol=1e-5, atol=1e-5)
        assert got["grid"].tolist() == [4, 4, 4] and len(got["timestamps"]) == 4
    first = losses(tmp_path / "on", "1-align")
    run_recipe(parse_recipe(raw), resume=False)  # every clip from the cache now
    assert cache_stats(tmp_path / "on") == {"clips": 1, "encoded": 0, "bad": 1}  # only the broken one is retried
    assert losses(tmp_path / "on", "1-align") == first


def test_feature_cache_misses_after_an_edited_video_other_tower_weights_or_preprocessing(tmp_path):
    data = make_tiny_data(tmp_path / "data")  # its own videos: one is edited
    raw = tiny_recipe(data, tmp_path / "run", max_steps=1)
    raw["stages"] = raw["stages"][:1]
    run_recipe(parse_recipe(raw))
    namespace = {p.name for p in (tmp_path / "run" / "feature_cache").iterdir()}
    assert cache_stats(tmp_path / "run")["encoded"] == 8 and len(namespace) == 1

    video = data["captions"].parent / "videos" / "v0.mp4"  # same path, new content (a static square), new mtime
    before = video.stat()
    write_video(video, np.full((4, 32, 32, 3), 200, dtype=np.uint8), fps=4)
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    final = run_recipe(parse_recipe(raw), resume=False)
    assert cache_stats(tmp_path / "run")["encoded"] == 1  # only the edited clip
    model = VideoLLM.from_pretrained(final)
    got = open_cache(tmp_path / "run", model).get(clip_key(video, 4, "uniform", None, None))
    torch.testing.assert_close(got["tokens"], fresh_features(model, video), rtol=1e-5, atol=1e-5)

    raw["stages"][0]["data"]["frames"] = 2  # other sampling -> other keys, same namespace
    run_recipe(parse_recipe(raw), resume=False)
    assert cache_stats(tmp_path / "run")["encoded"] == 8
    assert {p.name for p in (tmp_path / "run" / "feature_cache").iterdir()} == namespace
    raw["stages"][0]["data"]["frames"] = 4

    raw["seed"] = 1  # the same tower config and preprocessing with other weights -> another namespace
    run_recipe(parse_recipe(raw), resume=False)
    assert cache_stats(tmp_path / "run")["encoded"] == 8
    assert len(list((tmp_path / "run" / "feature_cache").iterdir())) == 2
    raw["seed"] = 0

    raw["model"]["tower"]["preprocess_mode"] = "pad"  # other preprocessing, same weights -> another namespace
    run_recipe(parse_recipe(raw), resume=False)
    assert cache_stats(tmp_path / "run")["encoded"] == 8
    assert len(list((tmp_path / "run" / "feature_cache").iterdir())) == 3


def _vlm_run(data: dict[str, Path], tmp_path: Path) -> tuple[str, dict, str, str]:
    raw = tiny_recipe(data, tmp_path, save_every=2, max_steps=6)
    raw["stages"] = raw["stages"][1:]  # LoRA + connector: dropout RNG, optimizer and scheduler state all matter
    raw["stages"][0]["feature_cache"] = False
    return "train", raw, "1-instruct", "final"


def _videomae_run(data: dict[str, Path], tmp_path: Path) -> tuple[str, dict, str, str]:
    raw = {"name": "tiny_mae", "seed": 0,  # 11 videos (2 undecodable) in batches of 2: an epoch boundary at step 5
           "encoder": {"depth": 2, "width": 32, "heads": 4, "patch_size": 8, "tubelet": 2, "image_size": 32, "num_frames": 4},
           "objective": {"mask_ratio": 0.75, "masking": "tube", "decoder_depth": 1},
           "data": {"sources": [str(data["captions"])], "frames": 4},
           "train": {"batch_size": 2, "max_steps": 6, "lr": 1e-3, "precision": "fp32", "warmup_steps": 1, "save_every": 2}}
    return "pretrain", raw, ".", "encoder"


def _classify_run(data: dict[str, Path], tmp_path: Path) -> tuple[str, dict, str, str]:
    rows = [{"video": f"videos/v{i}.mp4", "label": "right" if i % 2 == 0 else "left"} for i in range(8)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"name": "tiny_cls", "dropout": 0.5,  # 8 clips in batches of 2: an epoch boundary at step 4
           "tower": {"name": "video_vit", "depth": 2, "width": 32, "heads": 4, "patch_size": 8, "tubelet": 2,
                     "image_size": 32, "num_frames": 4, "layer": -1},
           "data": {"train": str(tmp_path / "cls.jsonl"), "root": str(data["captions"].parent), "frames": 4,
                    "classes": ["left", "right"]},
           "train": {"batch_size": 2, "max_steps": 6, "lr": 3e-3, "save_every": 2}}
    return "classify", raw, ".", "classifier"


@pytest.mark.parametrize("make_run", [_vlm_run, _videomae_run, _classify_run], ids=["vlm", "videomae", "classify"])
def test_a_run_killed_with_sigkill_resumes_bit_identical(make_run, data, tmp_path):
    """Each trainer on the one loop: a run killed with SIGKILL after step 3 (its checkpoint is step 2's), started
    again on the same folder, ends with the step records and saved weights of an uninterrupted run, bit for bit."""
    command, raw, sub, saved = make_run(data, tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    runs = {name: tmp_path / name / sub for name in ("ref", "killed")}
    for name, folder in runs.items():
        args = [command, str(tmp_path / "r.yaml"), "--set", f"output_dir={tmp_path / name}"]
        if name == "killed":
            kill_after_step(args, 3, tmp_path / "marker")
            assert (folder / "checkpoints" / "step-0000002" / "state.json").is_file()
            assert not (folder / saved).exists() and len(read_jsonl(folder / "metrics.jsonl")) == 3
            assert f"resumed from {folder / 'checkpoints' / 'step-0000002'} (step 2)" in run_vlm(args)
        else:
            run_vlm(args)

    def steps(folder: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_jsonl(folder / "metrics.jsonl")]

    assert [r["step"] for r in steps(runs["ref"])] == [1, 2, 3, 4, 5, 6]
    assert steps(runs["killed"]) == steps(runs["ref"])  # losses, rates, epochs and skipped counts
    files = sorted(f.relative_to(runs["ref"] / saved) for f in (runs["ref"] / saved).rglob("*.safetensors"))
    assert files
    for f in files:
        want, got = load_file(str(runs["ref"] / saved / f)), load_file(str(runs["killed"] / saved / f))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f


class Crash(Exception):
    """Stands for a kill at a chosen point of a run."""


def test_resume_is_exact_across_a_stage_boundary_with_the_feature_cache(data, tmp_path, monkeypatch):
    """Crash a two-stage run (feature cache on, LoRA dropout in stage 2) in stage 1 after an unsaved step, between
    stage 1's last checkpoint and its saved model, and in stage 2; each resume continues the same loss curves."""
    raw = tiny_recipe(data, tmp_path / "ref", save_every=2)
    run_recipe(parse_recipe(raw))
    reference = {s: losses(tmp_path / "ref", s) for s in ("1-align", "2-instruct")}
    assert [len(v) for v in reference.values()] == [4, 3]

    crashes = {("align", "step", 3), ("align", "final", 4), ("instruct", "step", 3)}
    seen = []
    real_write, real_save = MetricsLog.write, VideoLLM.save_pretrained

    def write(self, record):
        real_write(self, record)  # the step is logged, its checkpoint (if any) not yet written
        point = (record["stage"], "step", record["step"])
        if point in crashes - set(seen):
            seen.append(point)
            raise Crash(point)

    def save_pretrained(self, folder, state_dict=None):
        point = (Path(folder).parent.name.split("-", 1)[1], "final", 4)
        if Path(folder).name == "final" and point in crashes - set(seen):
            seen.append(point)
            raise Crash(point)
        return real_save(self, folder, state_dict)

    monkeypatch.setattr(MetricsLog, "write", write)
    monkeypatch.setattr(VideoLLM, "save_pretrained", save_pretrained)
    raw["output_dir"] = str(tmp_path / "crashed")
    for attempt in range(5):
        try:
            final = run_recipe(parse_recipe(raw))
            break
        except Crash:
            continue
    assert seen == [("align", "step", 3), ("align", "final", 4), ("instruct", "step", 3)] and attempt == 3
    for stage, ref in reference.items():
        assert losses(tmp_path / "crashed", stage) == ref, stage  # bit-exact, as if never interrupted
        rows = read_jsonl(tmp_path / "crashed" / stage / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, len(ref) + 1))
    stage2 = json.loads((tmp_path / "crashed" / "2-instruct" / "stage.json").read_text())
    assert stage2["resumed_from_step"] == 2 and stage2["feature_cache"]["encoded"] == 0  # stage 1's features
    got, want = VideoLLM.from_pretrained(final).state_dict(), VideoLLM.from_pretrained(tmp_path / "ref" / "2-instruct" / "final").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


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
    from vlm.train.loop import lr_lambda

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


def test_a_recipe_edited_after_a_stage_finished_keeps_its_new_settings(data, tmp_path, caplog):
    """Rerunning a recipe reuses its finished stages; settings edited since (they change no weights) still reach the
    next stage's model instead of being silently replaced by the finished stage's."""
    raw = tiny_recipe(data, tmp_path / "run", max_steps=1)
    run_recipe(parse_recipe({**raw, "stages": raw["stages"][:1]}))
    raw["model"].update(max_length=200, system_prompt="Look closely.")
    with caplog.at_level("INFO", logger="vlm.train.engine"):
        saved = VideoLLM.from_pretrained(run_recipe(parse_recipe(raw)))
    assert "already trained" in caplog.text and "changes settings" in caplog.text
    assert saved.processor.max_length == 200 and saved.config.system_prompt == "Look closely."
    assert VideoLLM.from_pretrained(tmp_path / "run" / "1-align" / "final").processor.max_length != 200


def test_init_from_starts_the_first_stage_from_a_saved_model(data, tmp_path):
    """`init_from: FOLDER` (no `model` section): stage 1 starts from that model, as a later stage starts from the
    one before; its trained parts move on from the saved weights, the config is the saved one."""
    first = tiny_recipe(data, tmp_path / "first", max_steps=2)
    first["stages"] = first["stages"][:1]
    base = run_recipe(parse_recipe(first))
    second = tiny_recipe(data, tmp_path / "second", max_steps=2)
    del second["model"]
    second.update(init_from=str(base), stages=second["stages"][1:])
    recipe = parse_recipe(second)
    assert recipe.model_config().to_dict() == VideoLLM.from_pretrained(base).config.to_dict()
    final = run_recipe(recipe)
    stage = json.loads((Path(final).parent / "stage.json").read_text())
    assert stage["init_from"] == str(base)
    before = VideoLLM.from_pretrained(base).connector.state_dict()
    after = VideoLLM.from_pretrained(final).connector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained on from the saved connector
    assert all(torch.allclose(before[k], after[k], atol=0.1) for k in before)  # ... by 2 small steps, not anew
    with pytest.raises(RecipeError, match="may only change"):
        parse_recipe({**second, "model": first["model"]})
    # settings that change no weights may be changed on the saved model: they reach the trained model's config
    budget = {"max_tokens": 4, "policy": "pool"}
    third = {**second, "output_dir": str(tmp_path / "third"), "model": {"token_budget": budget, "max_length": 200}}
    assert parse_recipe(third).model_config().token_budget == budget
    saved = VideoLLM.from_pretrained(run_recipe(parse_recipe(third)))
    assert saved.config.token_budget == budget and saved.processor.max_length == 200
    assert saved.num_visual_tokens(saved.config.num_frames) <= 4
    with pytest.raises(RecipeError, match="init_from.*not a saved VideoLLM"):
        parse_recipe({**second, "init_from": str(tmp_path / "missing")})
