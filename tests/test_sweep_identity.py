"""Results you can trust after a change (issue 23): a cell knows the code that computed it, a changed
method re-runs its cells (a changed comment does not), --rerun recomputes what it selects, an edited
grid leaves one current row per cell, and prune moves exactly the old cells aside.

The sweeps run on real Ray, MLflow (sqlite) and Parquet with the simulated executor (bdcore's
artifacts and crash behaviour without its compute); the method whose source changes is a plugin
module the test writes, registered from outside bdcore."""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from bdcore.attacks.registry import ATTACKS
from sweep.cli import main
from sweep.codeprint import CodeIndex, normalised_digest
from sweep.grid import expand, parse_grid, plan_summary
from sweep.layout import SweepLayout
from sweep.results import load_results

PLUGIN = '''
"""A lab's own attack, registered from outside bdcore."""
from bdcore.attacks.badnet import BadNet
from bdcore.attacks.registry import register_attack
{extra}

@register_attack("plug_badnet")
class PlugBadNet(BadNet):
    """BadNet under another name."""
'''
GRID = """
name: ident
datasets: [digits]
models: [smallcnn]
attacks: [plug_badnet, badnet]
ratios: [0.1]
defenses:
  - {{name: ft, params: {{epochs: {ft_epochs}}}}}
train: {{epochs: 1}}
resources: {{attack: {{cpu: 1}}, defense: {{cpu: 1}}}}
"""
SIMULATED = ["--executor", "sweep.execute:simulated_cell", "--executor-arg", "epochs=1",
             "--executor-arg", "epoch_seconds=0", "--quiet"]


# -- fingerprints, without a sweep ------------------------------------------------------------

def test_comments_docstrings_and_layout_do_not_count_code_does():
    base = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    assert normalised_digest(base) == normalised_digest('# a comment\ndef f(x):  # why\n\n    return (x + 1)\n')
    assert normalised_digest(base) != normalised_digest('def f(x):\n    return x + 2\n')
    assert normalised_digest(base) != normalised_digest('def f(y):\n    return y + 1\n')


def test_a_cells_code_covers_the_modules_its_method_imports_transitively():
    from bdcore.cells import AttackCellSpec, cell_modules

    spec = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1)
    index = CodeIndex()
    attack = set(index.modules_of(cell_modules(spec)))
    # the method, the model, the loader, the cell runner, and what they import (train loop, metrics, atomic writes)
    assert {"bdcore.attacks.badnet", "bdcore.models.zoo.smallcnn", "bdcore.data.loaders.digits", "bdcore.cells",
            "bdcore.train.loop", "bdcore.metrics", "bdcore.atomic", "bdcore.attacks.base"} <= attack
    assert "bdcore.attacks.blended" not in attack  # another method's module is not this cell's code
    ft = set(index.modules_of(cell_modules(spec, "ft")))
    assert "bdcore.defenses.ft" in ft and "bdcore.attacks.badnet" not in ft
    assert index.fingerprint(cell_modules(spec)) != index.fingerprint(cell_modules(spec, "ft"))


# -- a plugin whose source the test edits -------------------------------------------------------

@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """write(extra) rewrites the plugin module (a lab's attack outside bdcore) and (re)registers it."""
    package = tmp_path / "labplugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(extra: str = "") -> Path:
        path = package / "attack.py"
        path.write_text(textwrap.dedent(PLUGIN.format(extra=extra)))
        ATTACKS._entries.pop("plug_badnet", None)
        if "labplugins.attack" in sys.modules:
            importlib.reload(sys.modules["labplugins.attack"])
        else:
            importlib.import_module("labplugins.attack")
        return path

    yield write
    ATTACKS._entries.pop("plug_badnet", None)
    sys.modules.pop("labplugins.attack", None)
    sys.modules.pop("labplugins", None)


def run(grid: Path, out: Path, ray_address: str, *extra: str) -> int:
    return main(["run", str(grid), "--out", str(out), "--address", ray_address, *SIMULATED, *extra])


def computed(out: Path) -> dict[str, int]:
    """cell id -> how many times it was really computed."""
    counts: dict[str, int] = {}
    for (cell_id, _), n in SweepLayout(out).execution_counts().items():
        counts[cell_id] = counts.get(cell_id, 0) + n
    return counts


def test_changed_method_code_reruns_its_cells_and_a_comment_does_not(tmp_path, plugin, ray_address, capsys):
    plugin()
    grid, out = tmp_path / "grid.yaml", tmp_path / "out"
    grid.write_text(GRID.format(ft_epochs=2))
    assert run(grid, out, ray_address) == 0
    plan = expand(parse_grid(grid.read_text()))
    plug = [c for c in plan.attacks if c.spec.attack == "plug_badnet"][0]
    plug_cells = {plug.cell_id} | {d.cell_id for d in plan.defenses_of(plug.cell_id)}
    first = computed(out)
    assert set(first) == {c.cell_id for c in [*plan.attacks, *plan.defenses]} and set(first.values()) == {1}
    rows = load_results(out)
    assert rows["code"].notna().all() and len(set(rows["code"])) >= 3  # rows carry the fingerprint

    plugin(extra="# a comment only")  # no behaviour changed: nothing is stale, nothing reruns
    assert plan_summary(expand(parse_grid(grid.read_text())), out)["stale"] == 0
    assert run(grid, out, ray_address) == 0 and computed(out) == first

    path = plugin(extra="UNUSED_CONSTANT = 1")
    summary = plan_summary(expand(parse_grid(grid.read_text())), out)
    assert summary["stale"] == 1 and summary["stale_dependents"] == 1, summary  # the plug attack, then its ft
    assert any(str(path.name) in f for f in summary["stale_because"]), summary
    capsys.readouterr()
    assert main(["plan", str(grid), "--out", str(out)]) == 0
    assert "stale" in capsys.readouterr().out

    # --keep-stale keeps them knowingly: nothing computed, the old rows stay current
    assert run(grid, out, ray_address, "--keep-stale") == 0 and computed(out) == first
    assert len(load_results(out)) == 4

    assert run(grid, out, ray_address) == 0
    after = computed(out)
    assert {cid for cid in after if after[cid] != first[cid]} == plug_cells  # the plug attack and its ft, once more
    assert all(after[cid] == 2 for cid in plug_cells)
    assert list((out / "superseded").glob("*/simulated/*"))  # old artifacts moved aside, not reused
    rows = load_results(out).set_index("cell_id")
    assert len(rows) == 4 and rows.loc[plug.cell_id, "code"] == expand(parse_grid(grid.read_text())).attacks[0].code


def test_rerun_recomputes_the_selected_cells_and_their_dependents(tmp_path, plugin, ray_address, capsys):
    plugin()
    grid, out = tmp_path / "grid.yaml", tmp_path / "out"
    grid.write_text(GRID.format(ft_epochs=2))
    assert run(grid, out, ray_address) == 0
    first = computed(out)
    plan = expand(parse_grid(grid.read_text()))
    badnet = [c for c in plan.attacks if c.spec.attack == "badnet"][0]
    ft = plan.defenses_of(badnet.cell_id)[0]

    assert run(grid, out, ray_address, "--rerun", "attack == 'badnet' and defense == 'ft'") == 0
    after = computed(out)
    assert {cid for cid in after if after[cid] != first[cid]} == {ft.cell_id}

    assert run(grid, out, ray_address, "--rerun", "attack == 'badnet' and stage == 'attack'") == 0
    again = computed(out)
    assert {cid for cid in again if again[cid] != after[cid]} == {badnet.cell_id, ft.cell_id}  # with its defense

    capsys.readouterr()
    assert run(grid, out, ray_address, "--rerun", "asr > 50") == 2  # checked before anything runs
    assert "metrics are fractions" in capsys.readouterr().err and computed(out) == again


def test_edited_params_leave_one_current_row_and_prune_moves_the_old_cells(tmp_path, plugin, ray_address, capsys):
    plugin()
    grid, out = tmp_path / "grid.yaml", tmp_path / "out"
    grid.write_text(GRID.format(ft_epochs=2))
    assert run(grid, out, ray_address) == 0
    old_ft = {d.cell_id for d in expand(parse_grid(grid.read_text())).defenses}
    grid.write_text(GRID.format(ft_epochs=3))
    assert run(grid, out, ray_address) == 0
    new_ft = {d.cell_id for d in expand(parse_grid(grid.read_text())).defenses}
    assert not old_ft & new_ft

    rows = load_results(out)
    assert len(rows) == 4 and set(rows[rows["defense"] == "ft"]["cell_id"]) == new_ft  # one ft row per attack cell
    everything = load_results(out, scope="all")
    assert len(everything) == 6 and set(everything[~everything["current"]]["cell_id"]) == old_ft
    capsys.readouterr()
    assert main(["results", str(out), "--all", "--format", "csv"]) == 0
    assert "current" in capsys.readouterr().out.splitlines()[0]

    before = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["prune", str(out), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(cid in listed for cid in old_ft) and "dry run" in listed
    assert {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    old_artifacts = [Path(SweepLayout(out).read_marker(cid)["row"]["artifact"]) for cid in old_ft]
    assert main(["prune", str(out)]) == 0
    capsys.readouterr()
    layout = SweepLayout(out)
    assert all(layout.read_marker(cid) is None for cid in old_ft) and all(layout.read_marker(c) for c in new_ft)
    assert not any(p.exists() for p in old_artifacts)
    moved = list((out / "pruned").glob("*/"))
    assert len(moved) == 1 and len(list(moved[0].glob("cells/*.json"))) == 2
    assert len(list(moved[0].glob("simulated/*"))) == 2 and (moved[0] / "results.parquet").is_file()
    assert len(load_results(out, scope="all")) == 4  # only the current cells are left
    assert main(["prune", str(out)]) == 0 and "nothing to prune" in capsys.readouterr().out
    assert run(grid, out, ray_address) == 0  # the pruned folder still resumes: nothing reruns
    assert sum(computed(out).values()) == 6 and set(computed(out).values()) == {1}  # 2 attacks, 2 old ft, 2 new ft
