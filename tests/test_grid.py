"""Grid files: loading, validation errors (one line, with the key path), expansion, ids, speed."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

import bdcore
from bdcore.attacks import attack_names
from bdcore.defenses import defense_names
from sweep.grid import (
    GridError,
    dataset_fingerprint,
    expand,
    format_plan,
    load_grid,
    parse_grid,
    plan_summary,
)
from sweep.layout import SweepLayout
from tests.test_data_loaders import make_cifar10

GRIDS = Path(__file__).resolve().parent.parent / "grids"


def base(**changes) -> dict:
    grid = {
        "name": "t",
        "datasets": ["digits"],
        "models": ["smallcnn"],
        "attacks": ["badnet", {"name": "blended", "params": {"alpha": 0.2}}],
        "ratios": [0.1, 0.05],
        "defenses": ["ft", {"name": "ft", "params": {"epochs": 30}, "label": "ft_short"}],
        "train": {"epochs": 10},
    }
    grid.update(changes)
    return grid


def plan_of(grid: dict):
    return expand(parse_grid(yaml.safe_dump(grid, sort_keys=False), "grid.yaml"))


def by_axes(plan) -> dict:
    return {(a.spec.attack, a.spec.ratio, a.spec.seed): a for a in plan.attacks}


# -- the shipped grids ----------------------------------------------------------------------

def test_quickstart_loads_and_expands():
    plan = expand(load_grid(GRIDS / "quickstart.yaml"))
    assert (len(plan.attacks), len(plan.defenses), plan.total_cells) == (4, 16, 20)  # 2 attacks x 2 ratios x 4 defenses
    assert {(a.spec.attack, a.spec.ratio) for a in plan.attacks} == {
        ("badnet", 0.1), ("badnet", 0.05), ("blended", 0.1), ("blended", 0.05)}
    ft = plan.defenses[0]
    assert ft.spec.params == {"clean_fraction": 0.2, "epochs": 30, "batch_size": 64, "lr": 0.05}
    assert ft.resources.cpu == 1 and ft.resources.gpu == 0 and ft.retries == 1
    assert all(len(plan.defenses_of(a.cell_id)) == 4 for a in plan.attacks)
    assert plan.warnings == []


def test_backdoorbench_cifar10_loads_and_plans(monkeypatch, tmp_path):
    monkeypatch.setenv("BDCORE_DATA_ROOT", str(tmp_path))  # no CIFAR-10 here: a warning, not an error
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT", raising=False)
    plan = expand(load_grid(GRIDS / "backdoorbench-cifar10.yaml"))
    attacks = {a.spec.attack for a in plan.attacks}
    assert attacks == set(attack_names())  # every registered attack is on the grid
    defenses = set(defense_names())
    assert {d.label for d in plan.defenses} == defenses  # every registered defense is on the grid
    assert len(plan.attacks) == len(attacks) * 4 * 5 and len(plan.defenses) == len(plan.attacks) * len(defenses)
    assert {a.spec.model for a in plan.attacks} == {"preactresnet18", "vgg19_bn", "convnext_tiny", "vit_b_16"}
    assert sorted({a.spec.ratio for a in plan.attacks}) == [0.001, 0.005, 0.01, 0.05, 0.1]
    assert plan.attacks[0].resources.gpu == 0.5 and plan.defenses[0].resources.gpu == 0.25
    assert any("cifar10" in w and str(tmp_path) in w for w in plan.warnings)
    trains = {a.spec.attack: a.spec.train for a in plan.attacks}  # BackdoorBench's per-attack training
    assert trains["lira"] == {"epochs": 300} and trains["badnet"] == {}
    assert all(trains[name] == {"schedule": "constant"} for name in ("wanet", "bpp", "inputaware"))
    # Lines still commented out (none today) may name only methods that do not exist yet.
    text = (GRIDS / "backdoorbench-cifar10.yaml").read_text()
    pending = re.findall(r"^  # - (\w+) +# not implemented yet", text, flags=re.M)
    assert not set(pending) & (set(attack_names()) | set(defense_names()))


def test_reactivation_grids_load_and_plan_analysis_cells(monkeypatch, tmp_path):
    monkeypatch.setenv("BDCORE_DATA_ROOT", str(tmp_path))
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT", raising=False)
    paper = expand(load_grid(GRIDS / "reactivation.yaml"))
    assert (len(paper.attacks), len(paper.defenses), len(paper.analyses)) == (7, 49, 196)
    assert {a.spec.analysis for a in paper.analyses} == {"bec", "reactivate_wb", "reactivate_query", "reactivate_transfer"}
    assert {d.label for d in paper.defenses} <= set(defense_names())
    assert paper.analyses[0].resources.gpu == 0.5
    laptop = expand(load_grid(GRIDS / "reactivation-digits.yaml"))
    assert (len(laptop.attacks), len(laptop.defenses), len(laptop.analyses), laptop.total_cells) == (2, 6, 24, 32)
    assert laptop.warnings == []


# -- semantics ------------------------------------------------------------------------------

def test_exclude_drops_attack_cells_or_only_defense_cells():
    plan = plan_of(base(exclude=[{"attack": "blended", "ratio": 0.05}, {"attack": "badnet", "defense": "ft_short"}]))
    cells = by_axes(plan)
    assert ("blended", 0.05, 0) not in cells and len(plan.attacks) == 3
    assert [d.label for d in plan.defenses_of(cells[("badnet", 0.1, 0)].cell_id)] == ["ft"]
    assert [d.label for d in plan.defenses_of(cells[("blended", 0.1, 0)].cell_id)] == ["ft", "ft_short"]
    assert len(plan.defenses) == 2 * 1 + 1 * 2


def test_include_adds_cells_and_inherits_dataset_root(tmp_path):
    cifar = tmp_path / "cifar-10-batches-py"
    make_cifar10(cifar)  # an explicit root must hold the dataset
    plan = plan_of(base(
        datasets=["digits", {"name": "cifar10", "root": str(cifar)}],
        exclude=[{"dataset": "cifar10"}],
        include=[{"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.01},
                 {"dataset": "cifar10", "model": "smallcnn", "attack": {"name": "blended", "params": {"alpha": 0.1}},
                  "ratio": 0.01, "seed": 3, "defenses": ["ft_short"]}]))
    extra = [a for a in plan.attacks if a.spec.ratio == 0.01]
    assert [(a.spec.dataset, a.spec.attack, a.spec.seed) for a in extra] == [("digits", "badnet", 0), ("cifar10", "blended", 3)]
    assert extra[1].spec.data_root == str(cifar) and extra[1].spec.attack_params == {"alpha": 0.1}
    assert [d.label for d in plan.defenses_of(extra[0].cell_id)] == ["ft", "ft_short"]
    assert [d.label for d in plan.defenses_of(extra[1].cell_id)] == ["ft_short"]
    assert len(plan.attacks) == 4 + 2


def test_overrides_apply_in_order_to_matching_cells():
    short = {"name": "ft", "params": {"epochs": 30, "batch_size": 64}, "label": "ft_short"}
    plan = plan_of(base(clean_fraction=0.2, defenses=["ft", short], overrides=[
        {"match": {"dataset": "digits", "attack": "badnet"}, "attack_params": {"patch_size": 4},
         "train": {"epochs": 5}, "defense_params": {"epochs": 3}},
        {"match": {"attack": "badnet", "ratio": 0.05}, "attack_params": {"patch_size": 5}},
        {"match": {"defense": "ft_short", "attack": "blended"}, "defense_params": {"lr": 0.02}},
    ]))
    cells = by_axes(plan)
    badnet, badnet5, blended = cells[("badnet", 0.1, 0)], cells[("badnet", 0.05, 0)], cells[("blended", 0.1, 0)]
    assert badnet.spec.attack_params == {"patch_size": 4} and badnet.spec.train == {"epochs": 5}
    assert badnet5.spec.attack_params == {"patch_size": 5}
    assert blended.spec.attack_params == {"alpha": 0.2} and blended.spec.train == {"epochs": 10}
    assert {d.label: d.spec.params for d in plan.defenses_of(badnet.cell_id)} == {
        "ft": {"clean_fraction": 0.2, "epochs": 3}, "ft_short": {"clean_fraction": 0.2, "epochs": 3, "batch_size": 64}}
    assert {d.label: d.spec.params for d in plan.defenses_of(blended.cell_id)} == {
        "ft": {"clean_fraction": 0.2}, "ft_short": {"clean_fraction": 0.2, "epochs": 30, "batch_size": 64, "lr": 0.02}}
    assert plan.warnings == []
    # without batch_size the override makes both ft variants the same cell: it runs once, with a warning
    same = plan_of(base(overrides=[{"match": {"attack": "badnet"}, "defense_params": {"epochs": 30}}]))
    assert [d.label for d in same.defenses_of(by_axes(same)[("badnet", 0.1, 0)].cell_id)] == ["ft"]
    assert same.warnings == ["defense 'ft_short' is the same cell as 'ft' for 2 attack cells: it runs once, as 'ft'"]


def test_rules_that_match_nothing_are_warnings():
    plan = plan_of(base(exclude=[{"ratio": 0.5}], overrides=[{"match": {"model": "vgg19_bn"}, "train": {"epochs": 1}}]))
    assert plan.warnings == ["overrides[0] matches no cell", "exclude[0] matches no cell"]


# -- ids ------------------------------------------------------------------------------------

def ids(plan) -> list[str]:
    return [a.cell_id for a in plan.attacks] + [d.cell_id for d in plan.defenses]


def test_ids_are_stable_and_change_with_params_and_version(monkeypatch):
    first, again = plan_of(base()), plan_of(base())
    assert ids(first) == ids(again) and len(set(ids(first))) == first.total_cells == 12
    changed = plan_of(base(attacks=["badnet", {"name": "blended", "params": {"alpha": 0.3}}]))
    old, new = by_axes(first), by_axes(changed)
    assert old[("badnet", 0.1, 0)].cell_id == new[("badnet", 0.1, 0)].cell_id
    assert old[("blended", 0.1, 0)].cell_id != new[("blended", 0.1, 0)].cell_id
    # a defense param changes only that defense's cells
    ft = plan_of(base(defenses=["ft", {"name": "ft", "params": {"epochs": 31}, "label": "ft_short"}]))
    assert set(ids(first)) - set(ids(ft)) == {d.cell_id for d in first.defenses if d.label == "ft_short"}
    # stating a default explicitly is the same cell
    assert ids(plan_of(base(defenses=[{"name": "ft", "params": {"epochs": 100}}, {"name": "ft", "params": {"epochs": 30},
                                                                              "label": "ft_short"}]))) == ids(first)
    monkeypatch.setattr(bdcore, "__version__", "99.0.0")
    assert not set(ids(plan_of(base()))) & set(ids(first))


def test_ids_change_with_the_dataset_files(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    # The default folder: absent, it is a warning (an explicit `root` must exist).
    monkeypatch.setenv("BDCORE_CIFAR10_ROOT", str(root))
    grid = base(datasets=["cifar10"])
    absent = plan_of(grid)
    assert dataset_fingerprint("cifar10", root) == "absent" and str(root) in absent.warnings[0]
    make_cifar10(root)
    (root / "sub").mkdir()
    (root / "sub" / "f").write_bytes(b"y")
    present = plan_of(grid)
    assert present.warnings == [] and not set(ids(present)) & set(ids(absent))
    assert ids(plan_of(grid)) == ids(present)
    assert ids(plan_of(base(datasets=[{"name": "cifar10", "root": str(root)}]))) == ids(present)  # same folder
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "deeper" / "g").write_bytes(b"z")  # two levels down is not read
    assert ids(plan_of(grid)) == ids(present)
    (root / "sub" / "f").write_bytes(b"yy")  # a size one level down changes it
    assert not set(ids(plan_of(grid))) & set(ids(present))
    assert dataset_fingerprint("digits") == dataset_fingerprint("digits", "/anywhere")


def test_a_dataset_folder_and_its_parent_give_one_fingerprint_and_the_same_ids(tmp_path, monkeypatch):
    """`root` may name CIFAR's batches folder or the folder holding it: one dataset, so one set of cell ids
    (and the same for $BDCORE_CIFAR10_ROOT)."""
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    assert dataset_fingerprint("cifar10", tmp_path) == dataset_fingerprint("cifar10", folder) != "absent"
    by_folder = ids(plan_of(base(datasets=[{"name": "cifar10", "root": str(folder)}])))
    assert ids(plan_of(base(datasets=[{"name": "cifar10", "root": str(tmp_path)}]))) == by_folder
    monkeypatch.setenv("BDCORE_CIFAR10_ROOT", str(tmp_path))
    assert ids(plan_of(base(datasets=["cifar10"]))) == by_folder


def test_identical_cells_appear_once():
    plan = plan_of(base(
        attacks=["badnet", "badnet", {"name": "blended", "params": {"alpha": 0.2}}, "blended"],  # 0.2 is the default
        ratios=[0.1, 0.05, 0.1],
        include=[{"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.1}]))
    assert len(plan.attacks) == 4 and len(plan.defenses) == 8
    assert len(set(ids(plan))) == plan.total_cells


def test_adding_a_ratio_keeps_the_old_ids():
    old, new = plan_of(base()), plan_of(base(ratios=[0.1, 0.05, 0.01]))
    assert set(ids(old)) < set(ids(new)) and new.total_cells == old.total_cells + 6


# -- invalid grids --------------------------------------------------------------------------

def error(text_or_grid) -> str:
    text = text_or_grid if isinstance(text_or_grid, str) else yaml.safe_dump(text_or_grid, sort_keys=False)
    with pytest.raises(GridError) as info:
        parse_grid(text, "grids/x.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("grids/x.yaml: ")
    return message


@pytest.mark.parametrize("grid, expected", [
    ("name: t\ndatasets: [digits\nmodels: [smallcnn]\n", "line 3: invalid YAML"),
    ("name: t\nname: u\n", "line 2: invalid YAML: duplicate key 'name'"),
    (base(ratio=[0.1]), "ratio: unknown key 'ratio' (accepted: name, datasets"),
    (base(attacks=["badnett"]), "attacks[0].name: unknown attack 'badnett' (known: adap_blend, adap_patch, badclip, badnet"),
    (base(defenses=["fpp"]), "defenses[0].name: unknown defense 'fpp' (known: "),
    (base(models=["resnet99"]), "models[0].name: unknown model 'resnet99' (known: "),
    (base(datasets=["cifar11"]), "datasets[0].name: unknown dataset 'cifar11' (known: cifar10, cifar100, digits"),
    (base(attacks=["badnet", {"name": "blended", "params": {"alpah": 0.2}}]),
     ("attacks[1].params: unknown parameter 'alpah' for attack 'blended' (accepted: alpha, pattern_image, pattern_seed); "
      "did you mean 'alpha'?")),
    (base(attacks=[{"name": "badnet", "params": {"ratio": 0.2}}]),
     "attacks[0].params: 'ratio' is a grid axis: set it with `ratios`"),
    (base(defenses=[{"name": "ft", "params": {"seed": 1}}]), "defenses[0].params: 'seed' is a grid axis"),
    (base(attacks=[{"name": "blended", "params": {"alpha": 2}}]), "attacks[0].params.alpha: Input should be less than"),
    (base(defenses=[{"name": "ft", "params": {"epochs": 0}}]), "defenses[0].params.epochs: Input should be greater"),
    (base(ratios=0.1), "ratios: Input should be a valid list (got 0.1)"),
    (base(seeds=["a"]), "seeds[0]: Input should be a valid integer (got 'a')"),
    (base(ratios=[0.1, 1.5]), "ratios[1]: a poisoning ratio lies strictly between 0 and 1, e.g. 0.1 for 10% of the "
                              "training set (got 1.5)"),
    (base(ratios=[0]), "ratios[0]: a poisoning ratio lies strictly between 0 and 1"),
    (base(models=[]), "models: List should have at least 1 item"),
    (base(defenses=["ft", {"name": "ft", "params": {"epochs": 3}}]), "defenses[1].label: duplicate defense label 'ft'"),
    (base(resources={"attack": {"cpu": 1, "gpu": -0.5}}), "resources.attack.gpu: Input should be greater than or equal to 0"),
    (base(resources={"defense": {"gpus": 1}}), "resources.defense.gpus: unknown key 'gpus' (accepted: cpu, gpu)"),
    (base(overrides=[{"match": {"atack": "badnet"}, "train": {"epochs": 1}}]),
     "overrides[0].match.atack: unknown key 'atack' (accepted: dataset, model, attack, ratio"),
    (base(overrides=[{"match": {"attack": "badnet"}, "attak_params": {}}]), "overrides[0].attak_params: unknown key"),
    (base(overrides=[{"match": {"ratio": 0.1}, "attack_params": {"patch_size": 4}}]),
     "overrides[0].attack_params: unknown parameter 'patch_size' for attack 'blended'"),
    (base(overrides=[{"match": {"defense": "ft"}, "train": {"epochs": 1}}]),
     "overrides[0]: a rule that matches a `defense` may only set defense_params"),
    (base(exclude=[{"defense": "nc"}]), "exclude[0].defense: 'nc' is none of the grid's defenses"),
    (base(exclude=[{}]), "exclude[0]: an exclude rule needs at least one key"),
    (base(train={"epochz": 5}), "train: unknown training setting 'epochz' (accepted: epochs,"),
    (base(train={"epochs": 0}), "train.epochs: Input should be greater than or equal to 1"),
    (base(include=[{"dataset": "digits", "model": "smallcnn", "attack": "badnet"}]), "include[0].ratio: required key missing"),
    (base(include=[{"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.1, "defenses": ["nad"]}]),
     "include[0].defenses[0]: 'nad' is not a label of the grid's defenses"),
    (base(name="my grid"), "name: the sweep name must be a plain name: letters, digits, '_', '.' and '-'"),
    (base(label_modes=["all2none"]), "label_modes[0]: Input should be 'all2one' or 'all2all'"),
    ("- just\n- a list\n", "a grid is a mapping"),
    (base(analysis=["bek"]), "analysis[0].name: unknown analysis 'bek' (known: bec, reactivate_query"),
    (base(analysis=[{"name": "reactivate_wb", "params": {"outer_step": 3}}]),
     "analysis[0].params: unknown parameter 'outer_step' for analysis 'reactivate_wb' (accepted: samples, norm, eps"),
    (base(analysis=[{"name": "reactivate_wb", "params": {"norm": "l1"}}]), "analysis[0].params.norm: Input should be"),
    (base(analysis=[{"name": "reactivate_query", "params": {"queries": 0}}]), "analysis[0].params.queries: Input should"),
    (base(analysis=[{"name": "bec", "params": {"seed": 1}}]), "analysis[0].params: 'seed' is a grid axis"),
    (base(analysis=["bec", "bec"]), "analysis[1].name: 'bec' is listed twice"),
])
def test_invalid_grids_raise_one_line_errors_with_the_key_path(grid, expected):
    assert expected in error(grid)


def test_load_grid_names_the_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(base(ratios=[2.0])))
    with pytest.raises(GridError, match=r"g\.yaml: ratios\[0\]"):
        load_grid(path)
    with pytest.raises(GridError, match="cannot read the grid file"):
        load_grid(tmp_path / "missing.yaml")


def test_scientific_ratios_and_fractional_gpus():
    plan = plan_of({**base(), "resources": {"attack": {"cpu": 0.5, "gpu": 0.25}}})
    assert plan.attacks[0].resources.cpu == 0.5 and plan.attacks[0].resources.gpu == 0.25
    grid = parse_grid("name: s\ndatasets: [digits]\nmodels: [smallcnn]\nattacks: [badnet]\nratios: [1e-3, 5.0e-3]\n")
    assert grid.ratios == [0.001, 0.005]
    assert "fractional GPUs are only possible below 1" in error(base(resources={"attack": {"gpu": 1.5}}))


# -- scale and summaries --------------------------------------------------------------------

def test_backdoorbench_scale_grid_plans_in_seconds():
    expand(load_grid(GRIDS / "quickstart.yaml"))  # one-time imports (torchvision via the model registry)
    grid = {
        "name": "scale",
        "datasets": ["digits"],
        "models": ["preactresnet18", "vgg19_bn", "convnext_tiny", "vit_b_16", "resnet18", "mobilenet_v3_large",
                   "efficientnet_b3", "smallcnn"],
        "attacks": [{"name": "badnet", "params": {"patch_size": s}} for s in (3, 4, 5)]
                   + [{"name": "blended", "params": {"alpha": a}} for a in (0.1, 0.2, 0.3)],
        "ratios": [0.1, 0.05, 0.01, 0.005, 0.001],
        "seeds": [0, 1, 2, 3],
        "defenses": [{"name": "ft", "params": {"epochs": e}, "label": f"ft{e}"} for e in range(10, 21)],
    }
    text = yaml.safe_dump(grid)
    started = time.perf_counter()
    plan = expand(parse_grid(text))
    seconds = time.perf_counter() - started
    print(f"\nplanned {plan.total_cells} cells ({len(plan.attacks)} attack + {len(plan.defenses)} defense) "
          f"in {seconds:.2f} s")
    assert plan.total_cells == 960 + 960 * 11 >= 11_492
    assert len(set(ids(plan))) == plan.total_cells
    assert seconds < 10


def test_plan_summary_counts_markers(tmp_path):
    plan = plan_of(base())
    layout = SweepLayout(tmp_path)
    cells = [plan.attacks[0], plan.attacks[1], plan.defenses[0], plan.defenses[1]]
    for cell, status in zip(cells, ["done", "done", "failed", "skipped"]):
        layout.write_marker(cell.cell_id, {"row": {"cell_id": cell.cell_id, "status": status, "code": cell.code}})
    layout.write_marker("0123456789abcdef", {"row": {"cell_id": "0123456789abcdef", "status": "done"}})  # not ours
    summary = plan_summary(plan, tmp_path)
    assert summary == {"name": "t", "attack_cells": 4, "defense_cells": 8, "analysis_cells": 0, "total_cells": 12,
                       "done": 2, "failed": 1, "skipped": 1, "pending": 8, "stale": 0, "stale_because": [],
                       "stale_dependents": 0, "warnings": []}
    # a marker with no code fingerprint (written before they existed) is stale, and so are its dependents
    stale = plan.attacks[1].cell_id
    layout.write_marker(stale, {"row": {"cell_id": stale, "status": "done"}})
    summary = plan_summary(plan, tmp_path)
    assert summary["stale"] == 1 and summary["stale_because"] == ["recorded before code fingerprints"]
    assert summary["stale_dependents"] == len(plan.defenses_of(stale)) == 2
    assert "stale" in format_plan(summary)
    assert plan_summary(plan, tmp_path / "nothing")["pending"] == 12
    text = format_plan(summary)
    assert "12 cells (4 attack + 8 defense)" in text and "pending" in text
