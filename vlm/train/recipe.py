"""Recipes: YAML -> validated dataclasses. The machinery here (read, `--set` overrides, `${var}` interpolation,
dataclasses that reject unknown keys) parses every trainer's recipe; the VLM recipe (model parts + stages) lives
here too, VideoMAE's (`vlm.train.pretrain`) and classification's (`vlm.train.classify`) beside their trainers."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from vlm.connectors.base import CONNECTORS, REDUCERS
from vlm.data.dataset import SourceSpec
from vlm.data.hf import source_kind, source_problem
from vlm.llm.load import LLM_LOADERS
from vlm.objectives import STAGE_OBJECTIVES
from vlm.model import MODES, PARTS, SETTINGS, VideoLLMConfig, saved_config  # importing vlm.model registers the built-in towers and connectors
from vlm.towers.base import TOWERS
from vlm.train.loop import LoopSpec, ScheduleSpec
from vlm.video.sampling import POLICIES


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file, the field and the reason."""


@dataclass
class PartSpec:
    mode: str = "frozen"  # frozen | lora | full
    lr: float | None = None  # required unless frozen
    lora: dict[str, Any] | None = None  # LoRA settings (r, alpha, dropout, targets) when mode == lora
    weight_decay: float = 0.0


@dataclass
class DataSpec:
    mixture: list[SourceSpec] = field(default_factory=list)
    frames: int = 16
    sampling: str = "uniform"
    num_workers: int = 0
    max_samples: int | None = None  # cap the epoch (smoke runs): a seeded subset, each source keeps its share


@dataclass
class StageSpec(LoopSpec):
    """One stage: the loop's settings (batch_size, grad_accum, epochs, max_steps, precision, max_grad_norm,
    save_every, keep_last, log_every) and what the stage trains on and how."""

    name: str
    parts: dict[str, PartSpec]
    data: DataSpec
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    deepspeed: str | None = None  # path to a DeepSpeed JSON config (recipes/deepspeed/zero2.json, ...)
    gradient_checkpointing: bool = False
    group_by_length: bool = True  # LLaVA's modality-length grouping
    group_window: int = 1  # global batches sorted together by length (1: LLaVA's; 50: most padding gone, see BatchPlan)
    # objective lm: the LLM reads each batch's real positions packed into one row, without padding; the same batches
    # and loss (vlm.llm.packing)
    padding_free: bool = False
    feature_cache: bool = True  # when the tower is frozen: encode each clip once, train from the cache
    save: str = "model"  # model (a full VideoLLM folder) | connector (a connector-only save too)
    # lm: next-token loss on assistant tokens; words: align each clip's visual tokens with the LLM's input embeddings
    # of the words of its target text (no LLM forward; see vlm.objectives.word_alignment_loss); slots: train a
    # word_slots connector's heads on the per-frame annotations ('regions') of the records (no LLM forward)
    objective: str = "lm"


@dataclass(kw_only=True)
class RecipeBase:
    """What every recipe has besides its own sections."""

    name: str
    output_dir: str = "runs/${name}"
    seed: int = 0
    vars: dict[str, Any] = field(default_factory=dict)  # values for ${var}
    source: str = "<recipe>"  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recipe(RecipeBase):
    stages: list[StageSpec]
    # VideoLLMConfig fields; with init_from, only the settings that change no weights (vlm.model.SETTINGS)
    model: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a saved VideoLLM folder the first stage starts from, instead of a new model

    def model_config(self) -> VideoLLMConfig:
        if self.init_from is not None:
            config = saved_config(self.init_from)[0]
            for key, value in self.model.items():  # a connector's settings change those keys of its saved config
                setattr(config, key, {**config.connector, **value} if key == "connector" else copy.deepcopy(value))
            return config
        return VideoLLMConfig.from_dict(self.model)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole and whole.group(1) in variables:  # "${frames}" keeps the variable's type (int, list, ...)
            return variables[whole.group(1)]

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in variables:
                return str(variables[name])
            if name in os.environ:
                return os.environ[name]
            raise RecipeError(f"{where}: unknown variable ${{{name}}} (define it under 'vars:' or in the environment)")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _substitute(v, variables, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def interpolate(raw: Any, source: str, default_name: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of the raw recipe with every ${var} replaced (from its `vars:`, `name`, then the environment),
    checked to be a mapping holding the `required` keys."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping")
    variables = dict(raw.get("vars") or {})
    variables.setdefault("name", raw.get("name", default_name))
    raw = _substitute(copy.deepcopy(raw), variables, source)
    for key in required:
        if key not in raw:
            raise RecipeError(f"{source}: missing '{key}'")
    return raw


class _Loader(yaml.SafeLoader):
    """YAML as recipes mean it: also `3e-3` is a number (YAML 1.1, and so PyYAML, reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9]*[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def apply_override(raw: dict[str, Any], assignment: str, stage: int | None = None) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw recipe dict. In a recipe with `stages`, keys that are
    not top-level recipe fields (data.frames=8) go to `stage`, or to every stage when `stage` is None;
    `stages.0.batch_size=4` addresses one stage (list index, from 0: the first stage); `model.*`, `vars.*`, `seed`, `output_dir` address the
    recipe. In other recipes every key addresses the recipe."""
    if "=" not in assignment:
        raise RecipeError(f"--set '{assignment}': expected key=value")
    key, text = assignment.split("=", 1)
    value = load_yaml(text)
    path = key.strip().split(".")
    targets = [raw]
    if "stages" in raw and path[0] not in {f.name for f in fields(Recipe)}:
        stages = raw.get("stages") or []
        if stage is not None and not 0 <= stage < len(stages):
            raise RecipeError(f"--stage {stage}: the recipe has {len(stages)} stages")
        targets = [stages[stage]] if stage is not None else list(stages)
    for target in targets:
        node = target
        for part in path[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"--set '{assignment}': '{part}' is not a mapping")
        if isinstance(node, list):
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value


def read_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), stage: int | None = None) -> dict[str, Any]:
    """A recipe file's raw mapping with the `key=value` overrides applied (see `apply_override`)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{at}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping")
    for assignment in overrides:
        apply_override(raw, assignment, stage)
    return raw


def build(cls: type, data: Any, where: str) -> Any:
    """Dataclass from a dict, rejecting unknown keys with the list of allowed ones."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    try:
        return cls(**data)
    except TypeError as e:  # a required key is missing
        raise RecipeError(f"{where}: {e}") from None


def check_loop(spec: LoopSpec, where: str) -> None:
    """Raise RecipeError for the first problem of a loop section."""
    for problem in spec.problems():
        raise RecipeError(f"{where}.{problem}")


def _stage(raw: dict[str, Any], i: int, where: str) -> StageSpec:
    where = f"{where}: stages[{i}]"
    raw = dict(raw)
    raw.setdefault("name", f"stage{i + 1}")
    parts_raw = raw.pop("parts", None) or {}
    unknown = set(parts_raw) - set(PARTS)
    if unknown:
        raise RecipeError(f"{where}.parts: unknown part(s) {sorted(unknown)}; parts are {list(PARTS)}")
    parts = {p: build(PartSpec, parts_raw.get(p) or {}, f"{where}.parts.{p}") for p in PARTS}
    data_raw = dict(raw.pop("data", None) or {})
    mixture = [build(SourceSpec, m, f"{where}.data.mixture[{j}]") for j, m in enumerate(data_raw.pop("mixture", []) or [])]
    data = build(DataSpec, {**data_raw, "mixture": mixture}, f"{where}.data")
    schedule = build(ScheduleSpec, raw.pop("schedule", None) or {}, f"{where}.schedule")
    return build(StageSpec, {**raw, "parts": parts, "data": data, "schedule": schedule}, where)


def parse_recipe(raw: dict[str, Any], source: str = "<recipe>", check_files: bool = True) -> Recipe:
    raw = interpolate(raw, source, "recipe", ("name", "stages") if raw.get("init_from") else ("name", "model", "stages"))
    if not isinstance(raw["stages"], list) or not raw["stages"]:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list")
    stages = [_stage(s, i, source) for i, s in enumerate(raw["stages"])]
    rest = {k: v for k, v in raw.items() if k != "stages"}
    recipe = build(Recipe, {**rest, "stages": stages, "source": source}, source)
    validate(recipe, check_files)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), stage: int | None = None,
                check_files: bool = True) -> Recipe:
    """Read, override (`key=value`), interpolate ${vars} and validate a recipe file (data and DeepSpeed files
    must exist unless check_files=False)."""
    return parse_recipe(read_recipe(path, overrides, stage), str(path), check_files)


def validate(recipe: Recipe, check_files: bool = True) -> None:
    """Every check that can fail before training starts: registry keys, modes, rates, files, numbers."""
    src = recipe.source
    if recipe.init_from is not None and set(recipe.model) - set(SETTINGS):
        raise RecipeError(f"{src}: with init_from, 'model' may only change {list(SETTINGS)} (they change no weights), "
                          f"not {sorted(set(recipe.model) - set(SETTINGS))}")
    try:
        cfg = recipe.model_config()
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(f"{src}: {'init_from' if recipe.init_from else 'model'}: {e}") from None
    registries = (("tower", TOWERS, "name"), ("connector", CONNECTORS, "name"), ("llm", LLM_LOADERS, "loader"))
    for part, registry, key in registries:
        spec = getattr(cfg, part)
        if key not in spec:
            raise RecipeError(f"{src}: model.{part} needs '{key}'")
        if spec[key] not in registry:
            raise RecipeError(f"{src}: model.{part}.{key} '{spec[key]}' is not registered; choose from {registry.names()}")
    changed = set(recipe.model.get("connector", {})) if recipe.init_from is not None else set()
    allowed = CONNECTORS.get(cfg.connector["name"]).settings
    if changed - set(allowed):
        raise RecipeError(f"{src}: with init_from, model.connector may only change the {cfg.connector['name']} "
                          f"connector's settings {list(allowed)}, not {sorted(changed - set(allowed))}")
    for j, r in enumerate(cfg.connector.get("reduce", []) or []):
        if r.get("name") not in REDUCERS:
            raise RecipeError(f"{src}: model.connector.reduce[{j}] '{r.get('name')}' is not registered; choose from {REDUCERS.names()}")
    for i, st in enumerate(recipe.stages):
        where = f"{src}: stages[{i}] ({st.name})"
        for part, ps in st.parts.items():
            if ps.mode not in MODES:
                raise RecipeError(f"{where}.parts.{part}.mode '{ps.mode}': choose from {list(MODES)}")
            if ps.mode != "frozen" and (ps.lr is None or not ps.lr > 0):
                raise RecipeError(f"{where}.parts.{part}: mode '{ps.mode}' needs a positive lr")
            if ps.lora is not None and ps.mode != "lora":
                raise RecipeError(f"{where}.parts.{part}: 'lora' settings given but mode is '{ps.mode}'")
        if all(ps.mode == "frozen" for ps in st.parts.values()):
            raise RecipeError(f"{where}: every part is frozen; nothing would train")
        check_loop(st, where)
        if st.objective not in STAGE_OBJECTIVES:
            raise RecipeError(f"{where}.objective '{st.objective}': choose from {STAGE_OBJECTIVES.names()}")
        if st.objective != "lm" and any(ps.mode != "frozen" for p, ps in st.parts.items() if p != "connector"):
            raise RecipeError(f"{where}: objective '{st.objective}' trains the connector only; freeze the other parts")
        if st.padding_free and st.objective != "lm":
            raise RecipeError(f"{where}.padding_free: objective '{st.objective}' runs no LLM; only 'lm' packs batches")
        if st.save not in ("model", "connector"):
            raise RecipeError(f"{where}.save '{st.save}': choose model or connector")
        if st.data.sampling not in POLICIES:
            raise RecipeError(f"{where}.data.sampling '{st.data.sampling}': choose from {sorted(POLICIES)}")
        if st.data.frames < 1:
            raise RecipeError(f"{where}.data.frames must be >= 1")
        if st.group_window < 1:
            raise RecipeError(f"{where}.group_window must be >= 1 global batch")
        if not st.data.mixture:
            raise RecipeError(f"{where}.data.mixture is empty")
        for j, m in enumerate(st.data.mixture):
            if not m.weight > 0:
                raise RecipeError(f"{where}.data.mixture[{j}].weight must be > 0")
            problem = source_problem(m.path) if check_files else None
            if problem:
                raise RecipeError(f"{where}.data.mixture[{j}].path: {problem}")
            if m.streaming and source_kind(m.path) != "parquet":
                raise RecipeError(f"{where}.data.mixture[{j}].streaming: streaming reads Parquet; {m.path} is not")
        if any(m.streaming for m in st.data.mixture) and st.data.max_samples:
            raise RecipeError(f"{where}.data.max_samples: not available with a streamed mixture (set max_steps)")
        if check_files and st.deepspeed and not Path(st.deepspeed).is_file():
            raise RecipeError(f"{where}.deepspeed: {st.deepspeed} not found")
