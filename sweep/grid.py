"""Grid files: a declarative YAML sweep, validated up front and expanded into content-addressed cells.

A grid is the product datasets x models x attacks x ratios x label_modes x seeds x targets of
attack cells; every attack cell also gets the grid's defense cells (its own undefended row is the
implicit "none" defense), and every defense cell the grid's analysis cells. Then:

- `exclude` rules drop product cells: a rule without `defense` drops the attack cell with all its
  defense cells, a rule with `defense` only those defense cells;
- `include` adds attack cells outside the product; they are explicit, so no exclude applies to
  them. A bare dataset/model name there inherits the grid entry's `root` / `pretrained`;
- `overrides` rules, in file order, merge `attack_params` / `train` into matching attack cells and
  `defense_params` into matching defense cells. A rule whose match names a `defense` may only set
  `defense_params`: an attack cell cannot depend on the defenses that run after it.

Parameter precedence, lowest first: attack entry params < overrides; grid `train` < overrides;
grid `clean_fraction` < defense entry params < overrides. `defense` in a rule matches a defense's
name or its label.

Everything is checked before anything runs: names against bdcore's registries, every parameter
through bdcore's own pydantic configs (once per distinct combination, not per cell), and, when the
grid is expanded, the files it names (dataset folders, `pretrained` weights, CLIP caption tables;
see _check_input_files). Each problem is a one-line GridError naming the file and the key path.

Cell ids are content hashes, so editing a grid keeps the ids (and results) of unchanged cells:
  attack cell id  = sha256(spec.key(), bdcore version, dataset fingerprint)[:16]
  defense cell id = sha256(attack cell id, defense name, default-filled defense config)[:16]
  analysis cell id = sha256(defense cell id, analysis name, default-filled analysis config)[:16]

`analysis: [bec, reactivate_wb, ...]` (names, or {name, params}) adds one analysis cell per defense
cell and analysis (bdcore.reactivation); its columns land on the defense cell's row.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

import bdcore
from bdcore.cells import (
    AttackCellSpec,
    DefenseCellSpec,
    attack_config_class,
    attack_method_names,
    cell_modules,
    compatibility_problem,
    defense_config_class,
    defense_method_names,
    train_config_class,
)
from bdcore.clip.data import check_caption_table
from bdcore.clip.models import CLIP_PREFIX, TINY, clip_arch_names, find_weights, is_clip_model, weights_folder
from bdcore.data.base import DatasetError
from bdcore.data.registry import check_dataset_folder, dataset_names, dataset_root
from bdcore.models.registry import WeightsError, check_weights_file, model_names, read_weight_shapes
from bdcore.reactivation import analysis_config, analysis_names
from bdcore.reactivation.cells import AnalysisCellSpec
from bdcore.train.config import default_train_config
from sweep.codeprint import CodeIndex
from sweep.layout import SweepLayout

# A plain name: it becomes part of folder names (Tune's run folder under the output folder), MLflow
# names and result columns, so no '/', and no leading '.' ('..') or '-' (read as a flag).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
# Parameters a cell gets from the grid's axes; giving them in params would fork the axis silently.
ATTACK_AXIS_PARAMS = {"ratio": "ratios", "target": "targets", "label_mode": "label_modes", "seed": "seeds"}
DEFENSE_AXIS_PARAMS = {"seed": "seeds"}
# The folder each loader reads below $BDCORE_DATA_ROOT (bdcore's loaders own these; see bdcore.data.loaders).
FINGERPRINT_MAX_ENTRIES = 10_000
# digits ships inside scikit-learn (1,797 8x8 images); importing sklearn to re-read its shape costs
# more than a second per plan, and the data has not changed in a decade.
DIGITS_FINGERPRINT = "sklearn-digits-1797x8x8"


# -- errors ---------------------------------------------------------------------------------

class GridError(ValueError):
    """An invalid grid, as one line: `<file>: <key path>: <problem>`."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        shown = "; ".join(f"{path}: {msg}" if path else msg for path, msg in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(" ".join(f"{source}: {shown}{more}".split()))  # one line, whatever the messages hold

    @property
    def path(self) -> str:
        return self.problems[0][0]


class _Invalid(Exception):
    """A problem found while composing cells; becomes a GridError once the source is known."""

    def __init__(self, path: str = "", message: str = "", problems: list[tuple[str, str]] | None = None):
        self.problems = problems or [(path, message)]


def _suggest(word: object, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _registered(kind: str, names: Callable[[], list[str]]) -> AfterValidator:
    def check(name: str) -> str:
        known = names()
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r} (known: {', '.join(known)}){_suggest(name, known)}")
        return name

    return AfterValidator(check)


# -- the grid file format -------------------------------------------------------------------

DatasetName = Annotated[str, _registered("dataset", dataset_names)]
def _check_model(name: str) -> str:
    if is_clip_model(name):
        arches = clip_arch_names()  # open_clip is imported only for grids that name a CLIP model
        arch = name[len(CLIP_PREFIX):]
        if arch not in arches:
            raise ValueError(f"unknown CLIP architecture {arch!r} in {name!r} (known: {', '.join(arches[:12])}, ...)"
                             f"{_suggest(arch, arches)}")
        return name
    known = model_names()
    if name not in known:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(known)}, or {CLIP_PREFIX}<arch> for a CLIP "
                         f"model){_suggest(name, known)}")
    return name


ModelName = Annotated[str, AfterValidator(_check_model)]
AttackName = Annotated[str, _registered("attack", attack_method_names)]
DefenseName = Annotated[str, _registered("defense", defense_method_names)]
AnalysisName = Annotated[str, _registered("analysis", analysis_names)]


def _plain_name(what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"{what} must be a plain name: letters, digits, '_', '.' and '-', not starting with "
                             f"'.' or '-', no '/' (it names folders, MLflow runs and result columns); got {value!r}")
        return value

    return AfterValidator(check)


def _check_ratio(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"a poisoning ratio lies strictly between 0 and 1, e.g. 0.1 for 10% of the training set "
                         f"(got {value!r})")
    return value


Label = Annotated[str, _plain_name("a defense label")]
SweepName = Annotated[str, _plain_name("the sweep name")]
Ratio = Annotated[float, AfterValidator(_check_ratio)]
Target = Annotated[int, Field(ge=0)]
LabelMode = Literal["all2one", "all2all"]


class _Model(BaseModel):
    # strict: YAML already types its values, so "seeds: ['1']" or "ratios: [true]" is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Named(_Model):
    """An entry written as a bare name or as a mapping with `name`."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, dict):
            raise ValueError(f"expected a name or a mapping with `name`, got {value!r}")  # noqa: TRY004 (pydantic reports ValueErrors)
        return value


class DatasetEntry(_Named):
    name: DatasetName
    root: str | None = None  # default: bdcore's ($BDCORE_<NAME>_ROOT, $BDCORE_DATA_ROOT/<folder>)


class ModelEntry(_Named):
    name: ModelName
    pretrained: str | None = None  # local weights file the model starts from


class AttackEntry(_Named):
    name: AttackName
    params: dict[str, Any] = Field(default_factory=dict)


class DefenseEntry(_Named):
    name: DefenseName
    params: dict[str, Any] = Field(default_factory=dict)
    label: Label | None = None  # the defense column of the results; the name unless given (never None)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        value = _Named._from_name(value)
        if value.get("label") is None and isinstance(value.get("name"), str):
            value = {**value, "label": value["name"]}
        return value


class AnalysisEntry(_Named):
    """A dormant-backdoor analysis run on every defense cell (bdcore.reactivation)."""

    name: AnalysisName
    params: dict[str, Any] = Field(default_factory=dict)


class Match(_Model):
    """Selects cells: every key given must equal the cell's value."""

    dataset: DatasetName | None = None
    model: ModelName | None = None
    attack: AttackName | None = None
    ratio: float | None = None
    label_mode: LabelMode | None = None
    seed: int | None = None
    target: int | None = None
    defense: str | None = None  # a defense's name or label

    def axes(self) -> dict[str, Any]:
        return {k: v for k, v in self if v is not None and k != "defense"}


class ExcludeRule(Match):
    @model_validator(mode="after")
    def _not_empty(self) -> ExcludeRule:
        if all(v is None for _, v in self):
            raise ValueError("an exclude rule needs at least one key (an empty one drops every cell)")
        return self


class Override(_Model):
    match: Match = Field(default_factory=Match)  # empty: every cell
    attack_params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    defense_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _defense_only(self) -> Override:
        if self.match.defense is not None and (self.attack_params or self.train):
            raise ValueError("a rule that matches a `defense` may only set defense_params "
                             "(an attack cell does not depend on its defenses)")
        return self


class Include(_Model):
    dataset: DatasetEntry
    model: ModelEntry
    attack: AttackEntry
    ratio: Ratio
    label_mode: LabelMode = "all2one"
    seed: int = 0
    target: Target = 0
    defenses: list[str] | None = None  # labels of the grid's defenses; default: all of them


class ResourceSpec(_Model):
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> ResourceSpec:
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ValueError(f"gpu {self.gpu:g}: fractional GPUs are only possible below 1 (Ray's rule)")
        return self


class StageResources(_Model):
    attack: ResourceSpec = Field(default_factory=ResourceSpec)
    defense: ResourceSpec = Field(default_factory=ResourceSpec)
    analysis: ResourceSpec = Field(default_factory=ResourceSpec)


class Grid(_Model):
    """A grid file, validated (see the module docstring for the semantics)."""

    name: SweepName
    datasets: list[DatasetEntry] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    attacks: list[AttackEntry] = Field(min_length=1)
    ratios: list[Ratio] = Field(min_length=1)
    label_modes: list[LabelMode] = Field(default_factory=lambda: ["all2one"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    targets: list[Target] = Field(default_factory=lambda: [0], min_length=1)
    defenses: list[DefenseEntry] = Field(default_factory=list)
    analysis: list[AnalysisEntry] = Field(default_factory=list)  # run on every defense cell
    train: dict[str, Any] = Field(default_factory=dict)  # TrainConfig overrides for every attack cell
    overrides: list[Override] = Field(default_factory=list)
    exclude: list[ExcludeRule] = Field(default_factory=list)
    include: list[Include] = Field(default_factory=list)
    resources: StageResources = Field(default_factory=StageResources)
    retries: int = Field(1, ge=0)
    clean_fraction: float | None = Field(None, gt=0, le=1)  # defender's clean share, for every defense

    _source: str = PrivateAttr("<grid>")  # file name for error messages


# -- reading --------------------------------------------------------------------------------

class _GridLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads "1e-3" as a string (it wants "1.0e-3"); ratios like 1e-3 are natural here.
_GridLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_GridLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise GridError(source, [(f"line {mark.line + 1}" if mark else "", f"invalid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise GridError(source, [("", f"a grid is a mapping (name, datasets, models, ...), got {got}")])
    return data


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"\w+", part):  # skips pydantic's union-member tags such as "tuple[int, int]"
            out += f".{part}" if out else part
    return out


def _grouped(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One problem per key path: a value that fits no member of a union fails once per member."""
    by_path: dict[str, list[str]] = {}
    for path, message in problems:
        by_path.setdefault(path, []).append(message)
    return [(path, " or ".join(messages)) for path, messages in by_path.items()]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The grid model class that holds the last key of `loc`."""
    model: type[BaseModel] | None = Grid
    for part in loc[:-1]:
        if not isinstance(part, int):
            info = model.model_fields.get(part) if model else None
            model = _model_in(info.annotation) if info else None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m), None)


def _message(err: dict, grid_level: bool = False) -> str:
    kind = err["type"]
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        model = _model_at(err["loc"]) if grid_level else None
        if model is not None:
            accepted = list(model.model_fields)
            key = err["loc"][-1]
            return f"unknown key {key!r} (accepted: {', '.join(accepted)}){_suggest(key, accepted)}"
        return "unknown key"
    if kind == "missing":
        return "required key missing"
    value = err.get("input")
    return err["msg"] if isinstance(value, (dict, list)) else f"{err['msg']} (got {value!r})"


def _problems(exc: ValidationError, where: dict[str, str], fallback: str) -> list[tuple[str, str]]:
    """bdcore's validation errors, each at the grid key that set the offending parameter."""
    out = []
    for err in exc.errors():
        loc = err["loc"]
        base = where.get(loc[0], fallback) if loc else fallback
        out.append((f"{base}.{_path(loc)}" if loc else base, _message(err)))
    return _grouped(out)


def parse_grid(text: str, source: str = "<grid>") -> Grid:
    """Parse and fully validate a grid (every cell's parameters included)."""
    data = _read_yaml(text, source)
    try:
        grid = Grid.model_validate(data)
    except ValidationError as exc:
        raise GridError(source, _grouped([(_path(e["loc"]), _message(e, grid_level=True)) for e in exc.errors()])) from None
    grid._source = source
    try:
        _Composer(grid).compose()  # nothing may run on a grid whose cells do not validate
    except _Invalid as exc:
        raise GridError(source, exc.problems) from None
    return grid


def load_grid(path: str | os.PathLike) -> Grid:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(str(path), [("", f"cannot read the grid file ({getattr(exc, 'strerror', None) or exc})")]) from None
    return parse_grid(text, str(path))


# -- composing cells ------------------------------------------------------------------------

def _frozen(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _merge(layers: list[tuple[str, dict]]) -> tuple[dict, dict[str, str]]:
    """Merge parameter layers (later wins), remembering which grid key set each parameter."""
    merged: dict = {}
    where: dict[str, str] = {}
    for path, params in layers:
        for key, value in params.items():
            merged[key] = value
            where[key] = path
    return merged, where


def _check_keys(params: dict, where: dict[str, str], accepted: list[str], axis_owned: dict[str, str],
                unknown: str) -> None:
    for key in params:
        if key in axis_owned:
            raise _Invalid(where[key], f"{key!r} is a grid axis: set it with `{axis_owned[key]}`, not in params")
        if key not in accepted:
            raise _Invalid(where[key], f"unknown {unknown.format(key=repr(key))} "
                                         f"(accepted: {', '.join(accepted) or 'none'}){_suggest(key, accepted)}")


@dataclass
class _Draft:
    """An attack cell's spec and its defense cells (label, spec, default-filled config dump)."""

    spec: AttackCellSpec
    defenses: list[tuple[str, DefenseCellSpec, dict]]


class _Composer:
    """Builds every cell's specs, validating each distinct parameter combination once."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.rules = [(rule, rule.match.axes()) for rule in grid.overrides]
        self.excludes = [(rule, rule.axes()) for rule in grid.exclude]
        self.rule_hits = [0] * len(self.rules)
        self.exclude_hits = [0] * len(self.excludes)
        self._attacks_ok: set = set()
        self._trains_ok: set = set()
        self._defense_dumps: dict = {}

    def compose(self) -> tuple[list[_Draft], list[str]]:
        self._check_references()
        self._check_analyses()
        drafts = list(self._drafts())
        warnings = [f"overrides[{k}] matches no cell" for k, n in enumerate(self.rule_hits) if not n]
        warnings += [f"exclude[{k}] matches no cell" for k, n in enumerate(self.exclude_hits) if not n]
        return drafts, warnings

    def _check_references(self) -> None:
        grid = self.grid
        labels: dict[str, int] = {}
        for j, d in enumerate(grid.defenses):
            if d.label == "none":
                raise _Invalid(f"defenses[{j}].label", "'none' is reserved for the undefended row")
            if d.label in labels:
                raise _Invalid(f"defenses[{j}].label", f"duplicate defense label {d.label!r} (also "
                                 f"defenses[{labels[d.label]}]); give one of them a distinct `label`")
            labels[d.label] = j
        known = sorted(set(labels) | {d.name for d in grid.defenses})
        rules = [(f"overrides[{k}].match", r.match) for k, r in enumerate(grid.overrides)]
        rules += [(f"exclude[{k}]", r) for k, r in enumerate(grid.exclude)]
        for path, rule in rules:
            if rule.defense is not None and rule.defense not in known:
                raise _Invalid(f"{path}.defense", f"{rule.defense!r} is none of the grid's defenses "
                                 f"(names and labels: {', '.join(known) or 'none'})")
        for i, inc in enumerate(grid.include):
            for k, label in enumerate(inc.defenses or []):
                if label not in labels:
                    raise _Invalid(f"include[{i}].defenses[{k}]", f"{label!r} is not a label of the grid's "
                                     f"defenses (labels: {', '.join(labels) or 'none'})")

    def _check_analyses(self) -> None:
        seen: dict[str, int] = {}
        for k, entry in enumerate(self.grid.analysis):
            path = f"analysis[{k}]"
            if entry.name in seen:
                raise _Invalid(f"{path}.name", f"{entry.name!r} is listed twice (also analysis[{seen[entry.name]}]): "
                                               "its columns would collide")
            seen[entry.name] = k
            accepted = [f for f in type(analysis_config(entry.name)).model_fields if f not in DEFENSE_AXIS_PARAMS]
            where = {key: f"{path}.params" for key in entry.params}
            _check_keys(entry.params, where, accepted, DEFENSE_AXIS_PARAMS, f"parameter {{key}} for analysis {entry.name!r}")
            try:
                analysis_config(entry.name, **entry.params)
            except ValidationError as exc:
                raise _Invalid(problems=_problems(exc, where, f"{path}.params")) from None

    def _drafts(self) -> Iterator[_Draft]:
        grid = self.grid
        product = itertools.product(grid.datasets, grid.models, enumerate(grid.attacks), grid.ratios,
                                    grid.label_modes, grid.seeds, grid.targets)
        for dataset, model, (i, attack), ratio, label_mode, seed, target in product:
            axes = {"dataset": dataset.name, "model": model.name, "attack": attack.name, "ratio": ratio,
                    "label_mode": label_mode, "seed": seed, "target": target}
            if self._excluded(axes, None):
                continue
            defenses = [(j, d) for j, d in enumerate(grid.defenses) if not self._excluded(axes, d)]
            yield self._draft(axes, dataset, model, attack, f"attacks[{i}]", defenses)

        by_label = {d.label: (j, d) for j, d in enumerate(grid.defenses)}
        for i, inc in enumerate(grid.include):
            dataset, model = inc.dataset, inc.model
            if dataset.root is None:  # a bare name means the grid's dataset of that name
                dataset = next((d for d in grid.datasets if d.name == dataset.name), dataset)
            if model.pretrained is None:
                model = next((m for m in grid.models if m.name == model.name), model)
            axes = {"dataset": dataset.name, "model": model.name, "attack": inc.attack.name, "ratio": inc.ratio,
                    "label_mode": inc.label_mode, "seed": inc.seed, "target": inc.target}
            defenses = (list(enumerate(grid.defenses)) if inc.defenses is None
                        else [by_label[label] for label in inc.defenses])
            yield self._draft(axes, dataset, model, inc.attack, f"include[{i}].attack", defenses)

    def _excluded(self, axes: dict, defense: DefenseEntry | None) -> bool:
        excluded = False
        for k, (rule, rule_axes) in enumerate(self.excludes):
            if (rule.defense is None) != (defense is None):
                continue  # defense rules drop defense cells only, the others attack cells only
            if all(axes[key] == v for key, v in rule_axes.items()) and (
                    defense is None or rule.defense in (defense.name, defense.label)):
                self.exclude_hits[k] += 1
                excluded = True
        return excluded

    def _draft(self, axes: dict, dataset: DatasetEntry, model: ModelEntry, attack: AttackEntry, path: str,
               defenses: list[tuple[int, DefenseEntry]]) -> _Draft:
        rules = [(k, rule) for k, (rule, rule_axes) in enumerate(self.rules)
                 if all(axes[key] == v for key, v in rule_axes.items())]
        attack_rules = [(k, rule) for k, rule in rules if rule.match.defense is None]
        for k, _ in attack_rules:
            self.rule_hits[k] += 1
        params, where = _merge([(f"{path}.params", attack.params)]
                               + [(f"overrides[{k}].attack_params", r.attack_params) for k, r in attack_rules])
        train, train_where = _merge([("train", self.grid.train)]
                                    + [(f"overrides[{k}].train", r.train) for k, r in attack_rules])
        problem = compatibility_problem(axes["model"], axes["attack"])
        if problem:
            raise _Invalid(path, f"{problem}; drop the pair with `exclude: [{{model: {axes['model']}, attack: "
                                 f"{axes['attack']}}}]` or list such cells under `include`")
        self._check_attack(axes, params, where, path)
        self._check_train(axes["model"], axes["dataset"], train, train_where)
        spec = AttackCellSpec(dataset=axes["dataset"], model=axes["model"], attack=axes["attack"], ratio=axes["ratio"],
                              label_mode=axes["label_mode"], target=axes["target"], seed=axes["seed"],
                              attack_params=params, train=train, data_root=dataset.root, pretrained=model.pretrained)

        cells = []
        base = [("clean_fraction", {"clean_fraction": self.grid.clean_fraction})] \
            if self.grid.clean_fraction is not None else []
        for j, defense in defenses:
            problem = compatibility_problem(axes["model"], axes["attack"], defense.name)
            if problem:
                raise _Invalid(f"defenses[{j}]", f"{problem}; drop the pair with `exclude: [{{model: "
                                                 f"{axes['model']}, defense: {defense.label}}}]`")
            layers = base + [(f"defenses[{j}].params", defense.params)]
            for k, rule in rules:
                if rule.match.defense is not None and rule.match.defense not in (defense.name, defense.label):
                    continue
                if rule.match.defense is not None:
                    self.rule_hits[k] += 1
                layers.append((f"overrides[{k}].defense_params", rule.defense_params))
            dparams, dwhere = _merge(layers)
            dump = self._defense_config(defense.name, dparams, dwhere, axes["seed"], f"defenses[{j}]")
            cells.append((defense.label, DefenseCellSpec(defense=defense.name, params=dparams), dump))
        return _Draft(spec, cells)

    def _check_attack(self, axes: dict, params: dict, where: dict, path: str) -> None:
        name = axes["attack"]
        key = (name, axes["ratio"], axes["target"], axes["label_mode"], axes["seed"], _frozen(params))
        if key in self._attacks_ok:
            return
        accepted = [f for f in attack_config_class(name).model_fields if f not in ATTACK_AXIS_PARAMS]
        _check_keys(params, where, accepted, ATTACK_AXIS_PARAMS, f"parameter {{key}} for attack {name!r}")
        try:
            AttackCellSpec(dataset=axes["dataset"], model=axes["model"], attack=name, ratio=axes["ratio"],
                           label_mode=axes["label_mode"], target=axes["target"], seed=axes["seed"],
                           attack_params=params).attack_config()
        except ValidationError as exc:
            raise _Invalid(problems=_problems(exc, where, path)) from None
        except ValueError as exc:  # a setting the attack's family cannot take (all2all for a CLIP attack)
            raise _Invalid(path, str(exc)) from None
        self._attacks_ok.add(key)

    def _check_train(self, model: str, dataset: str, train: dict, where: dict) -> None:
        config_class = train_config_class(model)
        key = (config_class, dataset, _frozen(train))
        if key in self._trains_ok:
            return
        kind = "CLIP training setting" if is_clip_model(model) else "training setting"
        _check_keys(train, where, list(config_class.model_fields), {}, kind + " {key}")
        try:
            if is_clip_model(model):
                config_class(**train)
            else:
                default_train_config(dataset, **train)
        except ValidationError as exc:
            raise _Invalid(problems=_problems(exc, where, "train")) from None
        self._trains_ok.add(key)

    def _defense_config(self, name: str, params: dict, where: dict, seed: int, path: str) -> dict:
        key = (name, seed, _frozen(params))
        if key not in self._defense_dumps:
            accepted = [f for f in defense_config_class(name).model_fields if f not in DEFENSE_AXIS_PARAMS]
            _check_keys(params, where, accepted, DEFENSE_AXIS_PARAMS, f"parameter {{key}} for defense {name!r}")
            try:
                config = DefenseCellSpec(defense=name, params=params).config(seed)
            except ValidationError as exc:
                raise _Invalid(problems=_problems(exc, where, path)) from None
            self._defense_dumps[key] = config.model_dump()
        return self._defense_dumps[key]


# -- dataset fingerprints -------------------------------------------------------------------

def dataset_folder(name: str, root: str | os.PathLike | None) -> Path:
    """Where bdcore's loader of `name` reads from."""
    return dataset_root(name, root)


def dataset_fingerprint(name: str, root: str | os.PathLike | None = None) -> str:
    """What identifies a dataset's files without reading them: relative paths and sizes of the files
    in its folder and one level below (at most 10,000), hashed; "absent" without the folder. digits
    ships with scikit-learn: its fingerprint is its shape."""
    if name == "digits":
        return DIGITS_FINGERPRINT
    folder = dataset_folder(name, root)
    if not folder.is_dir():
        return "absent"
    entries: list[tuple[str, int]] = []

    def add(directory: str, prefix: str, depth: int) -> None:
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:  # unreadable: its files are unknown here, like those further down
            return
        for child in children:
            if len(entries) >= FINGERPRINT_MAX_ENTRIES:
                return
            if child.is_file():
                entries.append((prefix + child.name, child.stat().st_size))
            elif depth == 0 and child.is_dir():
                add(child.path, f"{prefix}{child.name}/", 1)

    add(str(folder), "", 0)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# -- input files ----------------------------------------------------------------------------

def _check_input_files(grid: Grid) -> list[str]:
    """The files a grid names, checked before anything runs (cheaply: a dataset's layout and one
    sample file, a weights file's tensor names and shapes, a caption table's header); returns the
    warnings about default locations that are not here:

    - a dataset with an explicit `root` must be there, in its standard layout: a folder given by
      name is a promise that the data is here;
    - a dataset on its default folder ($BDCORE_<NAME>_ROOT, $BDCORE_DATA_ROOT/<folder>) is checked
      when that folder exists; when it does not, expand() only warns (the data may live on the
      cluster's storage alone);
    - a `pretrained` weights file must exist and fit the model (not another architecture); a CLIP
      model's default weights folder is treated like a dataset's default folder;
    - a CLIP training's `captions` table and `image_root` folder must be there, the table with an
      image and a caption column."""
    datasets = [(f"datasets[{i}]", d) for i, d in enumerate(grid.datasets)]
    named = {d.name for d in grid.datasets}
    datasets += [(f"include[{k}].dataset", inc.dataset) for k, inc in enumerate(grid.include)
                 if inc.dataset.root is not None or inc.dataset.name not in named]  # a bare name is the grid's
    seen: set[tuple] = set()
    for path, entry in datasets:
        if (entry.name, entry.root) in seen:
            continue
        seen.add((entry.name, entry.root))
        if entry.root is None and not dataset_folder(entry.name, None).exists():
            continue  # expand() warns
        try:
            check_dataset_folder(entry.name, entry.root)
        except (DatasetError, OSError, ValueError) as exc:  # unreadable or undecodable files included
            message = str(exc)
            if entry.root is not None and not Path(entry.root).exists():
                message += (" (An explicit `root` must exist where the grid is planned; without `root`, a missing "
                            "default folder is only a warning: the data may live on the cluster.)")
            raise _Invalid(f"{path}.root" if entry.root is not None else path, message) from None
    models = [(f"models[{i}].pretrained", m) for i, m in enumerate(grid.models)]
    models += [(f"include[{k}].model.pretrained", inc.model) for k, inc in enumerate(grid.include)]
    seen = set()
    for path, entry in models:
        if entry.pretrained is None or (entry.name, entry.pretrained) in seen:
            continue
        seen.add((entry.name, entry.pretrained))
        try:
            if is_clip_model(entry.name):
                read_weight_shapes(entry.pretrained)  # build_clip checks the fit when the cell runs
            else:
                check_weights_file(entry.pretrained, entry.name)
        except WeightsError as exc:
            raise _Invalid(path, str(exc)) from None
    _check_caption_tables(grid)
    return _check_default_clip_weights(grid)


def _check_caption_tables(grid: Grid) -> None:
    """A CLIP training's `captions` table and `image_root` folder, in the grid's `train` or an
    override's: paths given by name, so, like a dataset's explicit `root`, they must be here. The table
    is checked from its header only (bdcore's check_caption_table), with the columns its loader needs."""
    layers = [("train", grid.train)] + [(f"overrides[{k}].train", rule.train) for k, rule in enumerate(grid.overrides)]
    for path, train in layers:
        captions, image_root = train.get("captions"), train.get("image_root")
        if captions is not None:
            try:
                check_caption_table(str(captions))
            except (OSError, ValueError) as exc:
                where = (" (a caption table named in a grid must exist where the grid is planned)"
                         if isinstance(exc, FileNotFoundError) else "")
                raise _Invalid(f"{path}.captions", f"{exc}{where}") from None
        if image_root is not None and not Path(str(image_root)).is_dir():
            what = "is not a folder" if Path(str(image_root)).exists() else "does not exist"
            raise _Invalid(f"{path}.image_root", f"image folder {str(image_root)!r} {what}; `image_root` is the "
                                                 "existing folder the caption table's image paths are relative to "
                                                 "(default: the table's folder)")


def _check_default_clip_weights(grid: Grid) -> list[str]:
    """A `clip:<arch>` model without `pretrained` reads the first weights file of
    $BDCORE_WEIGHTS_ROOT/clip/<arch>/ when its cell runs. As for a dataset's default folder: when that
    folder is here it must hold a readable file; when it is not, a warning (the weights may live on
    the cluster alone). clip:tiny needs none (it trains from scratch)."""
    named = {m.name for m in grid.models}
    models = [(f"models[{i}]", m) for i, m in enumerate(grid.models)]
    models += [(f"include[{k}].model", inc.model) for k, inc in enumerate(grid.include)
               if inc.model.name not in named]  # a bare name is the grid's entry of that name
    warnings: list[str] = []
    seen: set[str] = set()
    for path, entry in models:
        arch = entry.name[len(CLIP_PREFIX):]
        if not is_clip_model(entry.name) or entry.pretrained is not None or arch == TINY or arch in seen:
            continue
        seen.add(arch)
        folder = weights_folder(arch)
        if not folder.exists():
            warnings.append(f"model {entry.name!r}: no weights folder at {str(folder)!r} here (fine if the weights "
                            "live on the cluster; or pin the file with `pretrained`)")
            continue
        try:
            read_weight_shapes(find_weights(arch))
        except WeightsError as exc:
            raise _Invalid(path, str(exc)) from None
    return warnings


# -- plans ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    cpu: float
    gpu: float


@dataclass(frozen=True)
class AttackCell:
    cell_id: str
    spec: AttackCellSpec
    resources: Resources
    retries: int
    code: str = ""  # fingerprint of the code that computes it (sweep.codeprint)


@dataclass(frozen=True)
class DefenseCell:
    cell_id: str
    attack_cell_id: str
    label: str
    spec: DefenseCellSpec
    resources: Resources
    retries: int
    code: str = ""


@dataclass(frozen=True)
class AnalysisCell:
    cell_id: str
    defense_cell_id: str  # the defense cell it analyses (its row gets this cell's columns)
    attack_cell_id: str
    spec: AnalysisCellSpec
    resources: Resources
    retries: int
    code: str = ""


@dataclass
class Plan:
    """Every cell of a grid: unique attack cells (each also yields its "none" row), their defenses,
    and the analyses of each defense cell."""

    name: str
    attacks: list[AttackCell]
    defenses: list[DefenseCell]
    warnings: list[str] = field(default_factory=list)
    analyses: list[AnalysisCell] = field(default_factory=list)
    code_records: dict[str, dict] = field(default_factory=dict)  # fingerprint -> CodeIndex.record()
    _index: dict[str, list[DefenseCell]] | None = field(default=None, init=False, repr=False, compare=False)
    _indexed: int = field(default=-1, init=False, repr=False, compare=False)

    def defenses_of(self, attack_cell_id: str) -> list[DefenseCell]:
        if self._index is None or self._indexed != len(self.defenses):
            self._index = {}
            for cell in self.defenses:
                self._index.setdefault(cell.attack_cell_id, []).append(cell)
            self._indexed = len(self.defenses)
        return list(self._index.get(attack_cell_id, []))

    @property
    def total_cells(self) -> int:
        return len(self.attacks) + len(self.defenses) + len(self.analyses)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand(grid: Grid) -> Plan:
    """All cells of `grid` in a deterministic order (datasets, models, attacks, ratios, label modes,
    seeds, targets; then includes), each once, with content-addressed ids."""
    try:
        drafts, warnings = _Composer(grid).compose()
        warnings += _check_input_files(grid)
    except _Invalid as exc:
        raise GridError(grid._source, exc.problems) from None
    version = bdcore.__version__
    code = _CodePrints()
    attack_res = Resources(grid.resources.attack.cpu, grid.resources.attack.gpu)
    defense_res = Resources(grid.resources.defense.cpu, grid.resources.defense.gpu)
    analysis_res = Resources(grid.resources.analysis.cpu, grid.resources.analysis.gpu)
    fingerprints: dict[tuple, str] = {}
    attacks: dict[str, AttackCell] = {}
    defenses: dict[str, DefenseCell] = {}
    merged: dict[tuple[str, str], int] = {}  # (label, kept label) -> attack cells where two labels are one cell
    for draft in drafts:
        spec = draft.spec
        data = (spec.dataset, spec.data_root)
        if data not in fingerprints:
            fingerprints[data] = dataset_fingerprint(*data)
            if fingerprints[data] == "absent":
                warnings.append(f"dataset {spec.dataset!r}: no folder at {str(dataset_folder(*data))!r} here (fine "
                                "if the data lives on the cluster; its cell ids change once the folder is visible)")
        attack_id = _digest({"spec": spec.key(), "bdcore": version, "data": fingerprints[data]})
        attacks.setdefault(attack_id, AttackCell(attack_id, spec, attack_res, grid.retries, code(spec)))
        for label, dspec, dump in draft.defenses:
            defense_id = _digest({"attack_cell": attack_id, "defense": dspec.defense, "config": dump})
            kept = defenses.setdefault(defense_id, DefenseCell(defense_id, attack_id, label, dspec, defense_res,
                                                                grid.retries, code(spec, dspec.defense)))
            if kept.label != label:
                merged[(label, kept.label)] = merged.get((label, kept.label), 0) + 1
    warnings += [f"defense {label!r} is the same cell as {same!r} for {n} attack cell{'s' * (n > 1)}: it runs once, "
                 f"as {same!r}" for (label, same), n in merged.items()]
    analyses = []
    for defense in defenses.values():
        spec = attacks[defense.attack_cell_id].spec
        seed = spec.seed
        for entry in grid.analysis:
            aspec = AnalysisCellSpec(analysis=entry.name, params=entry.params)
            analysis_id = _digest({"defense_cell": defense.cell_id, "analysis": entry.name,
                                   "config": aspec.config(seed).model_dump()})
            analyses.append(AnalysisCell(analysis_id, defense.cell_id, defense.attack_cell_id, aspec, analysis_res,
                                         grid.retries, code(spec, defense.spec.defense, entry.name)))
    return Plan(grid.name, list(attacks.values()), list(defenses.values()), warnings, analyses, code.records)


class _CodePrints:
    """Cells' code fingerprints, each distinct set of modules hashed once per plan."""

    def __init__(self) -> None:
        self.index = CodeIndex()
        self.records: dict[str, dict] = {}
        self._by_method: dict[tuple, str] = {}

    def __call__(self, spec: AttackCellSpec, defense: str | None = None, analysis: str | None = None) -> str:
        key = (spec.model, spec.dataset, spec.attack if defense is None else None, defense, analysis)
        if key not in self._by_method:
            roots = cell_modules(spec, defense, analysis)
            fingerprint = self.index.fingerprint(roots)
            self.records.setdefault(fingerprint, self.index.record(roots))
            self._by_method[key] = fingerprint
        return self._by_method[key]


def plan_summary(plan: Plan, out_dir: str | os.PathLike | None = None) -> dict:
    """Cell counts of `plan`, how many of them the markers in `out_dir` show finished, and how many
    of those are stale (their code changed since; `bdsweep run` recomputes them) and why."""
    from sweep.freshness import changed_files, dependents_in_plan, planned_codes, stale_cells

    layout = SweepLayout(out_dir) if out_dir is not None else None
    planned = planned_codes(plan)
    markers = {m["row"]["cell_id"]: m for m in layout.markers()} if layout is not None else {}
    markers = {cid: m for cid, m in markers.items() if cid in planned}
    counts = {"done": 0, "failed": 0, "skipped": 0}
    for marker in markers.values():
        status = marker["row"].get("status")
        if status in counts:
            counts[status] += 1
    stale = stale_cells(planned, markers)
    return {"name": plan.name, "attack_cells": len(plan.attacks), "defense_cells": len(plan.defenses),
            "analysis_cells": len(plan.analyses),
            "total_cells": plan.total_cells, **counts, "pending": plan.total_cells - sum(counts.values()),
            "stale": len(stale), "stale_because": changed_files(layout, plan, stale) if stale else [],
            "stale_dependents": len(dependents_in_plan(plan, set(stale))) if stale else 0,
            "warnings": list(plan.warnings)}


def format_plan(summary: dict) -> str:
    lines = [(f"grid {summary['name']!r}: {summary['total_cells']} cells "
              f"({summary['attack_cells']} attack + {summary['defense_cells']} defense"
              + (f" + {summary['analysis_cells']} analysis" if summary.get("analysis_cells") else "") + ")")]
    lines += [f"  {status:<8}{summary[status]:>8}" for status in ("done", "failed", "skipped", "pending")]
    if summary.get("stale"):
        lines.append(f"  {'stale':<8}{summary['stale']:>8}   finished with code that has changed since: "
                     f"{', '.join(summary['stale_because'])}; `bdsweep run` recomputes them and the "
                     f"{summary['stale_dependents']} cell(s) that depend on them, --keep-stale keeps them")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)
