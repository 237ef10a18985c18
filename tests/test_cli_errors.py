"""Bad input at the command line: one line naming the file and the fault, a non-zero exit, no traceback; and the
benchmark manifest written as MVBench's own `data_list` mapping."""

from __future__ import annotations

import json

import pytest

from vlm.cli import main
from vlm.data.conversation import DataFormatError
from vlm.data.mvbench import OFFICIAL_TASKS, load_tasks


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_a_malformed_task_manifest_is_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys):
    bench = tmp_path / "bench"
    (bench / "json").mkdir(parents=True)
    (bench / "tasks.json").write_text('[{"task": "A", "json": "a.json"},')  # cut short
    line = one_line_error(capsys, ["eval", "mcq", "--model", str(tiny_model_dir), "--bench", str(bench),
                                   "--out", str(tmp_path / "out")])
    assert str(bench / "tasks.json") in line and "malformed JSON" in line


def test_a_bad_recipe_and_a_bad_model_folder_are_one_line_each(tmp_path, tiny_model_dir, capsys):
    line = one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert str(tmp_path / "nope.yaml") in line and "not found" in line
    (tmp_path / "r.yaml").write_text("name: x\nstages: [1, 2\n")
    assert "malformed YAML" in one_line_error(capsys, ["train", str(tmp_path / "r.yaml")])

    bench = tmp_path / "bench"
    (bench / "json").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(capsys, ["eval", "mcq", "--model", str(empty), "--bench", str(bench), "--out", str(tmp_path)])
    assert str(empty) in line and "config.json" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"saved_parts": []}))  # no "config"
    line = one_line_error(capsys, ["eval", "mcq", "--model", str(broken), "--bench", str(bench), "--out", str(tmp_path)])
    assert str(broken / "config.json") in line and "not a VideoLLM config" in line


def test_verbose_keeps_the_traceback(tmp_path):
    from vlm.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="not found"):
        main(["-v", "train", str(tmp_path / "nope.yaml")])


def test_the_manifest_may_be_mvbench_data_list_as_a_mapping(tmp_path):
    data_list = {"Action Sequence": ["action_sequence.json", "star/Charades_v1_480/", "video", True],
                 "Episodic Reasoning": ["episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True],
                 "Fine-grained Action": ["fine_grained_action.json", "Moments_in_Time_Raw/videos/"],
                 "Mine": ["mine.json", str(tmp_path / "elsewhere") + "/", "gif", False]}
    (tmp_path / "tasks.json").write_text(json.dumps(data_list))
    tasks = load_tasks(tmp_path)
    official = {t.name: t for t in OFFICIAL_TASKS}
    for t in tasks[:2]:  # the same table the official list gives (fps aside: data_list has no frame rate)
        ref = official[t.name]
        assert (t.json, t.prefix, t.data_type, t.bound) == (ref.json, ref.prefix, ref.data_type, ref.bound)
    assert (tasks[2].prefix, tasks[2].data_type, tasks[2].bound) == ("video/Moments_in_Time_Raw/videos/", "video", False)
    assert tasks[3].prefix == str(tmp_path / "elsewhere") + "/" and tasks[3].data_type == "gif"


@pytest.mark.parametrize("manifest, fault", [
    ({"A": ["a.json"]}, "expected \\[json file, video prefix"),
    ({"A": ["a.json", "v/", "mp4"]}, "data_type 'mp4'"),
    ({"A": ["a.json", "v/", "video", "yes"]}, "bound must be true or false"),
    ([{"task": "A"}], "'json' must be a non-empty string"),
    ([{"task": "A", "json": "a.json", "fps": 0}], "fps must be a positive number"),
    (["a.json"], "expected an object"),
    ("a.json", "expected a list of tasks or MVBench's data_list mapping"),
])
def test_a_bad_manifest_entry_names_the_entry_and_the_fault(tmp_path, manifest, fault):
    (tmp_path / "tasks.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match=fault) as e:
        load_tasks(tmp_path)
    assert str(tmp_path / "tasks.json") in str(e.value)
