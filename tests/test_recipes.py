"""Every shipped recipe loads, validates and trains each of its stages for a step with tiny overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_LLM, TINY_TOWERS
from tests.train_helpers import make_tiny_data
from vlm.model import VideoLLM
from vlm.train.engine import run_recipe
from vlm.train.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["quickstart", "synth_long", "oracle_text", "llava_video_mlp", "videollama2_stc", "videollama1_qformer", "lora_connector"]
TINY_CONNECTOR = {  # same connector family as the recipe, tiny widths
    "qformer": {"name": "qformer", "num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "temporal_layers": 1},
    "stc": {"name": "stc", "downsample": [2, 2, 2], "depth": 1, "hidden_size": 32},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"), bad=False)


def test_all_recipes_are_tested():
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert shipped == sorted(RECIPES + ["video_vit_classify", "videomae_pretrain", "long_video", "long_slots"])


def test_pretraining_and_classification_recipes_parse_with_overrides():
    """The one recipe machinery (variables, --set) reads the VideoMAE and the classification recipe too; their
    runs are tested in tests/test_train.py and tests/test_videomae.py."""
    from vlm.train.classify import load_classify_recipe
    from vlm.train.pretrain import load_pretrain_recipe

    mae = load_pretrain_recipe(REPO / "recipes" / "videomae_pretrain.yaml", ["vars.data=/d", "train.max_steps=7"])
    assert mae.data.sources == ["/d/classification_train.jsonl"] and mae.train.max_steps == 7
    assert mae.train.betas == [0.9, 0.95] and mae.objective.mask_ratio == 0.9
    cls = load_classify_recipe(REPO / "recipes" / "video_vit_classify.yaml", ["vars.data=/d", "tower.attention=joint"])
    assert cls.data.train == "/d/classification_train.jsonl" and cls.tower["attention"] == "joint"
    assert cls.train.max_steps == 1200 and cls.output_dir == "runs/video_vit_classify"
    with pytest.raises(RecipeError, match="train.precision 'fp8': choose fp32, bf16 or fp16"):
        load_classify_recipe(REPO / "recipes" / "video_vit_classify.yaml", ["train.precision=fp8"])
    with pytest.raises(RecipeError, match=r"train: unknown key\(s\) \['lr_group'\]"):
        load_pretrain_recipe(REPO / "recipes" / "videomae_pretrain.yaml", ["train.lr_group=1"])


def test_long_recipe_header_gives_the_recipes_it_replaced():
    """The overrides in recipes/synth_long.yaml's header turn the shipped recipe back into the 16-frame one before
    repeats, swaps and ramps, and with the next six into the 8-frame one before that."""
    import re

    from vlm.connectors.events import settings
    from vlm.model import VideoLLM

    path = REPO / "recipes" / "synth_long.yaml"
    header = path.read_text().split("name: synth_long")[0]
    block = header.split("The recipe before repeats")[1].split("# What it scored")[0]
    overrides = re.findall(r"--set (\S+)", block)
    assert len(overrides) == 4 + 6
    shipped, before = load_recipe(path, check_files=False), load_recipe(path, overrides[:4], check_files=False)
    conn = shipped.model["connector"]
    assert (conn["repeats"], bool(conn["ramps"]), "swaps" in conn["counts"], "swaps" in conn["events"]) == \
        ("tracks", True, True, True)
    conn = before.model["connector"]
    assert (conn["repeats"], conn["ramps"], conn["counts"]["swaps"], conn["events"]["swaps"]) == ("frames", None, None, None)
    built = VideoLLM.from_config(before.model_config()).connector  # the nulls are valid settings: no such rule
    assert not built.ramps and len(built.counts) == len(conn["counts"]) - 1 and "swaps" not in built.event_extent
    eight = load_recipe(path, overrides, check_files=False)
    assert [s.data.frames for s in shipped.stages] == [16, 16] and [s.data.frames for s in eight.stages] == [8, 8]
    conn = eight.model["connector"]
    assert (conn["slots"], conn["switch_cost"], conn["centre_offsets"], eight.model["max_length"]) == (3, 2.0, False, 2048)
    assert "covered" in settings(shipped.model["connector"]["events"])[2]
    assert settings(conn["events"])[2] == {}  # covered: null, the story says nothing of hidden objects


def test_numbers_in_exponent_form_are_numbers():
    """PyYAML (YAML 1.1) reads 3e-3 as a string; recipes and --set read it as the number it means."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["stages.1.parts.llm.lr=3e-3", "output_dir=1e3x"],
                         check_files=False)
    assert recipe.stages[1].parts["llm"].lr == 0.003 and recipe.output_dir == "1e3x"


def tiny_overrides(name: str, data: dict, tmp_path: Path, per_stage: bool = True) -> list[str]:
    """Overrides that shrink a shipped recipe to tiny parts, the tiny data and one step of batch 2 per stage;
    `per_stage=False` leaves each stage's precision and DataLoader workers as the recipe sets them."""
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", check_files=False)  # the file as shipped
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.llm={json.dumps(TINY_LLM)}", "model.num_frames=4",
                 f"vars.data={data['captions'].parent}", f"vars.captions={data['captions']}",
                 f"vars.instructions={data['instruct']}", f"vars.media={data['captions'].parent}", "vars.frames=4"]
    tower = recipe.model["tower"]["name"]
    if tower != "efficientnet_lite0":  # hub towers -> the same family, tiny and random
        overrides.append(f"model.tower={json.dumps(TINY_TOWERS[tower])}")
    conn = recipe.model["connector"]
    if conn["name"] in TINY_CONNECTOR:
        overrides.append(f"model.connector={json.dumps(TINY_CONNECTOR[conn['name']] | {'reduce': conn.get('reduce', [])})}")
    for i in range(len(recipe.stages)):
        if name in ("quickstart", "synth_long", "oracle_text"):  # their data comes from `vlm data synth`; use the tiny files
            tiny_file = (data["instruct"] if i == len(recipe.stages) - 1
                         else data["regions"] if recipe.stages[i].objective == "slots" else data["captions"])
            overrides.append(f"stages.{i}.data.mixture={json.dumps([{'path': str(tiny_file)}])}")
        overrides += [f"stages.{i}.max_steps=1", f"stages.{i}.batch_size=2", f"stages.{i}.deepspeed=null"]
        if per_stage:
            overrides += [f"stages.{i}.precision=fp32", f"stages.{i}.data.num_workers=0"]
    return overrides


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_with_tiny_overrides(name, data, tmp_path):
    path = REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path, check_files=False)  # the file as shipped (its data is not here)
    tiny = load_recipe(path, tiny_overrides(name, data, tmp_path))
    assert [s.name for s in tiny.stages] == [s.name for s in recipe.stages]
    for shipped, small in zip(recipe.stages, tiny.stages):  # what the recipe says per part is kept
        assert {p: s.mode for p, s in shipped.parts.items()} == {p: s.mode for p, s in small.parts.items()}
        assert {p: s.lr for p, s in shipped.parts.items()} == {p: s.lr for p, s in small.parts.items()}
    final = run_recipe(tiny)
    model = VideoLLM.from_pretrained(final)
    assert model.modes == {p: s.mode for p, s in tiny.stages[-1].parts.items()}
    for i, stage in enumerate(tiny.stages):
        stage_json = json.loads((tmp_path / "run" / f"{i + 1}-{stage.name}" / "stage.json").read_text())
        assert stage_json["total_steps"] == 1
        if stage.save == "connector":
            assert (tmp_path / "run" / f"{i + 1}-{stage.name}" / "connector" / "connector.json").is_file()


@pytest.mark.slow
def test_long_recipe_gpu_command_trains_in_bf16_with_workers(data, tmp_path):
    """The GPU command in recipes/synth_long.yaml's header (`--set vars.precision=bf16 --set vars.workers=N`)
    reaches every stage, and its settings train on the CPU too: autocast in bf16, batches from DataLoader workers."""
    overrides = tiny_overrides("synth_long", data, tmp_path, per_stage=False) + ["vars.precision=bf16", "vars.workers=2"]
    recipe = load_recipe(REPO / "recipes" / "synth_long.yaml", overrides)
    assert [(s.precision, s.data.num_workers) for s in recipe.stages] == [("bf16", 2), ("bf16", 2)]
    model = VideoLLM.from_pretrained(run_recipe(recipe))
    assert model.modes["connector"] == "frozen" and model.modes["llm"] == "lora"
    for i, stage in enumerate(recipe.stages):
        assert json.loads((tmp_path / "run" / f"{i + 1}-{stage.name}" / "stage.json").read_text())["total_steps"] == 1


def test_long_video_recipe_continues_a_saved_model_under_a_token_budget(data, tiny_model_dir, tmp_path):
    """recipes/long_video.yaml starts from a saved model (here a tiny one), applies its token budget and prompt
    length to it, trains its adapters on, and saves a model whose prompt holds at most the budget's tokens."""
    overrides = [f"vars.base={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "vars.frames=8",
                 f"stages.0.data.mixture={json.dumps([{'path': str(data['instruct'])}])}", "stages.0.max_steps=1",
                 "stages.0.batch_size=2", "stages.0.data.num_workers=0", "model.token_budget.max_tokens=8"]
    recipe = load_recipe(REPO / "recipes" / "long_video.yaml", overrides)
    assert recipe.init_from == str(tiny_model_dir) and recipe.stages[0].parts["llm"].mode == "lora"
    model = VideoLLM.from_pretrained(run_recipe(recipe))
    base = VideoLLM.from_pretrained(tiny_model_dir)
    assert model.config.token_budget == {"max_tokens": 8, "policy": "pool"} and model.config.max_length == 512
    assert model.num_visual_tokens(8) <= 8 < base.num_visual_tokens(8)
    assert model.config.tower == base.config.tower and "llm" in model.config.lora


def test_long_slots_recipe_switches_saved_word_slots_to_a_fixed_tracks_slot(data, tmp_path):
    """recipes/long_slots.yaml starts from a saved word-slot model, switches it to the tracks layout in a fixed text
    slot (the LLM's sequence is as long for 8 frames as for 64) and trains LoRA on its top blocks."""
    from tests.test_word_slots import tiny_slots_model

    base = tmp_path / "base"
    tiny_slots_model().save_pretrained(base)
    overrides = [f"vars.base={base}", f"output_dir={tmp_path / 'run'}", "vars.frames=8", "model.connector.text_tokens=12",
                 f"stages.0.data.mixture={json.dumps([{'path': str(data['instruct'])}])}", "stages.0.max_steps=1",
                 "stages.0.batch_size=2", "stages.0.data.num_workers=0", "stages.0.parts.llm.lora.layers=[-1]"]
    with pytest.raises(RecipeError, match=r"model.connector may only change the word_slots connector's settings"):
        load_recipe(REPO / "recipes" / "long_slots.yaml", overrides + ["model.connector.hidden=64"])  # the heads' width
    recipe = load_recipe(REPO / "recipes" / "long_slots.yaml", overrides)
    model = VideoLLM.from_pretrained(run_recipe(recipe))
    assert model.config.connector["layout"] == "tracks" and model.connector.text_tokens == 12
    assert model.num_visual_tokens(8) == model.num_visual_tokens(64) == 12
    assert model.config.lora["llm"]["layers"] == [-1] and model.modes["connector"] == "frozen"
