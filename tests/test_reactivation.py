"""Dormant backdoors (bdcore.reactivation): BEC and the white-box, query and transfer re-activation
attacks on digits, then the same analyses as sweep cells whose columns land on the defense rows.

Measured on the session's badnet smallcnn (ACC 0.961 / ASR 0.966) fine-tuned on 20% clean data
(30 epochs, lr 0.05: ASR 0.084), white-box Linf 0.05 with the paper's loop cut to 2 outer steps (each
sweeps the 1,000 samples in 7 batches of 128, 5 steps per batch: 70 steps): ASR 0.907 on the defended
model, 0.115 on the clean model, 1.0 on the undefended one. BEC of that model: 0.58 (top 5%: 0.60,
top 20%: 0.45), TAC on 1,298 training pairs, CKA on the 321 poisoned test samples.
"""
from __future__ import annotations

import copy

import pytest
import torch

from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, build_defense
from bdcore.metrics import backdoor_metrics
from bdcore.reactivation import AnalysisContext, NotApplicable, PoisonedSamples, build_analysis
from bdcore.reactivation.query import ScoreOracle, square_uap

FT = dict(clean_fraction=0.2, epochs=30, batch_size=64, lr=0.05)
# Each outer step sweeps the 1,000 samples in 7 batches of 128 with 5 steps on each (the paper's loop):
# 2 outer steps are 70 steps; the paper's 50 (1,750 steps) would cost minutes per model on 2 cores.
WB_TEST = dict(outer_steps=2)


@pytest.fixture(scope="module")
def dormant(digits, badnet_cell, clean_digits_model):
    """(backdoored, fine-tuned, clean) models and the poisoned samples of the session's badnet cell."""
    attack, _, backdoor_test, backdoored, _ = badnet_cell
    defense = build_defense("ft", **FT)
    repaired = defense.repair(copy.deepcopy(backdoored), defender_subset(digits.train, 0.2, seed=0),
                              DefenseContext(digits.info, device="cpu")).model
    fit_set = attack.backdoor_test(digits.train)
    keep = torch.nonzero(digits.train.labels != attack.config.target).flatten()
    fit = PoisonedSamples(fit_set.images, fit_set.target_labels, digits.train.images[keep])
    return backdoored, repaired, clean_digits_model[0], fit, backdoor_test


def context(digits, dormant, defended=None, surrogates=()):
    backdoored, repaired, clean, fit, backdoor_test = dormant
    return AnalysisContext(info=digits.info, backdoored=copy.deepcopy(backdoored),
                           defended=copy.deepcopy(repaired if defended is None else defended), fit=fit,
                           evaluate=backdoor_test, clean_model=lambda: copy.deepcopy(clean),
                           surrogates=lambda: [copy.deepcopy(m) for m in surrogates], device=torch.device("cpu"))


def test_fine_tuning_hides_the_backdoor_and_whitebox_reactivation_wakes_it(digits, dormant):
    backdoored, repaired, clean, fit, backdoor_test = dormant
    assert backdoor_metrics(repaired, digits.test, backdoor_test, digits.info).asr < 0.2
    out = build_analysis("reactivate_wb", **WB_TEST).run(context(digits, dormant))
    assert out["asr_reactivated_wb"] >= 0.7, out
    # The same budget on a clean model of the same training: a plain adversarial perturbation does not do it.
    assert out["asr_reactivated_wb_clean"] <= 0.3, out
    assert out["asr_reactivated_wb"] - out["asr_reactivated_wb_clean"] >= 0.5, out
    assert out["asr_reactivated_wb_undefended"] >= 0.95, out
    assert out["budget"] == {"norm": "linf", "eps": 0.05, "steps": 2 * 7 * 5, "samples": 1000}


def test_bec_is_one_for_the_backdoored_model_zero_for_the_clean_one_and_between_after_a_defense(digits, dormant):
    backdoored, repaired, clean, *_ = dormant
    bec = build_analysis("bec")
    assert bec.run(context(digits, dormant, defended=backdoored))["bec"] == pytest.approx(1.0, abs=1e-6)
    assert bec.run(context(digits, dormant, defended=clean))["bec"] == pytest.approx(0.0, abs=1e-6)
    out = bec.run(context(digits, dormant))
    assert 0.05 < out["bec"] < 0.95, out
    assert 0 < out["bec_top5"] < 1 and 0 < out["bec_top20"] < 1, out
    # TAC on every non-target training pair (up to 2,200), CKA on up to 500 poisoned test samples.
    assert out["budget"] == {"tac_samples": len(dormant[3]), "cka_samples": min(500, len(dormant[4])), "layers": 3}


def test_the_query_attack_reads_only_scores_and_never_exceeds_its_budget(digits, dormant):
    backdoored, repaired, _, fit, _ = dormant
    calls = []

    class Counted(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            calls.append(len(x))
            return self.model(x)

    oracle = ScoreOracle(Counted(copy.deepcopy(repaired)), fit.head(64), digits.info, torch.device("cpu"), budget=37)
    delta = square_uap(oracle, (3, 32, 32), 0.05, 0.1, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert oracle.used == len(calls) == 37 and delta.abs().max() <= 0.05 + 1e-7
    with pytest.raises(RuntimeError, match="query budget of 37 spent"):
        oracle.loss(delta)
    out = build_analysis("reactivate_query", queries=60, samples=100).run(context(digits, dormant))
    assert out["queries_used"] == 60 and out["budget"]["queries"] == 60 and out["budget"]["samples"] == 100
    assert 0 <= out["asr_reactivated_query"] <= 1


def test_transfer_crafts_on_surrogates_only_and_needs_one(digits, dormant):
    backdoored, repaired, *_ = dormant
    with pytest.raises(NotApplicable, match="needs at least one other finished defense"):
        build_analysis("reactivate_transfer", **WB_TEST).run(context(digits, dormant))
    # A perturbation crafted on the undefended model alone transfers to the fine-tuned one.
    out = build_analysis("reactivate_transfer", **WB_TEST, combine="momentum").run(
        context(digits, dormant, surrogates=[backdoored]))
    assert out["budget"]["surrogates"] == 1 and out["budget"]["combine"] == "momentum"
    assert out["asr_reactivated_transfer"] >= 0.5, out
    assert out["asr_reactivated_transfer_clean"] <= 0.3, out


# -- as sweep cells ------------------------------------------------------------------------------

# The behaviour is tested above; the sweep test checks the plumbing on a short schedule.
SWEEP_GRID = """
name: dormant
datasets: [digits]
models: [smallcnn]
attacks: [badnet]
ratios: [0.1]
train: {epochs: 4}
defenses:
  - {name: ft, params: {clean_fraction: 0.2, epochs: 3, batch_size: 64, lr: 0.05}}
  - {name: ft, label: ft_short, params: {clean_fraction: 0.2, epochs: 2, batch_size: 64, lr: 0.05}}
analysis:
  - {name: bec, params: {samples: 200}}
  - {name: reactivate_wb, params: {outer_steps: 1, batch_size: 64, samples: 300}}
  - {name: reactivate_query, params: {queries: 20, samples: 50}}
  - {name: reactivate_transfer, params: {outer_steps: 1, batch_size: 64, samples: 300}}
"""


def test_a_sweep_adds_analysis_columns_to_each_defense_row(tmp_path, ray_address):
    import json

    from test_sweep_run import mlflow_cell_runs

    from sweep.grid import expand, parse_grid
    from sweep.layout import SweepLayout
    from sweep.results import load_results
    from sweep.runner import RunOptions, run_sweep

    out = tmp_path / "out"
    plan = expand(parse_grid(SWEEP_GRID))
    assert (len(plan.attacks), len(plan.defenses), len(plan.analyses), plan.total_cells) == (1, 2, 8, 11)
    outcome = run_sweep(plan, RunOptions(out=out, progress=False, device="cpu"))
    assert outcome.statuses == {"done": 11}, load_results(out, analyses="rows")[["stage", "analysis", "error"]]

    rows = load_results(out, analyses="rows")
    assert len(rows) == 11 and (rows["stage"] == "analysis").sum() == 8
    merged = load_results(out).set_index("defense")
    assert list(merged.index) == ["none", "ft", "ft_short"]
    ft = merged.loc["ft"]
    for column in ("bec", "bec_top5", "bec_top20", "asr_reactivated_wb", "asr_reactivated_wb_clean",
                   "asr_reactivated_wb_undefended", "asr_reactivated_query", "asr_reactivated_query_clean",
                   "asr_reactivated_query_undefended", "asr_reactivated_transfer", "asr_reactivated_transfer_clean",
                   "asr_reactivated_transfer_undefended"):
        assert 0 <= ft[column] <= 1 or column.startswith("bec"), (column, ft[column])
    assert ft["asr_reactivated_wb"] >= ft["asr"] and ft["queries_used"] == 20
    budgets = json.loads(ft["analysis_budget"])
    assert sorted(budgets) == ["bec", "reactivate_query", "reactivate_transfer", "reactivate_wb"]
    assert budgets["reactivate_transfer"]["surrogates"] == 1 and budgets["reactivate_query"]["queries"] == 20
    assert budgets["reactivate_wb"]["clean_reference"].startswith(str(out / "clean"))
    assert merged.loc["none", ["bec", "asr_reactivated_wb"]].isna().all()

    # One MLflow run per cell, the clean reference trained once, and a re-run repeats nothing.
    runs = mlflow_cell_runs(out, "dormant")
    assert all(runs.get(cell_id) == 1 for cell_id in rows["cell_id"]), runs
    assert len(list((out / "clean").iterdir())) == 2  # the artifact folder and its lock file
    before = SweepLayout(out).execution_counts()
    assert sum(n for (_, event), n in before.items() if event == "analysis_ran") == 8
    again = run_sweep(plan, RunOptions(out=out, progress=False, device="cpu"))
    assert again.ran == 0 and SweepLayout(out).execution_counts() == before

    # The report of this finished sweep shows the analysis columns on the defense rows.
    from sweep.report import build_report

    report = build_report(out)
    md = report.markdown.read_text()
    assert "| attack | defense | ACC | ASR | RA | DER | bec | asr_reactivated_wb |" in md
    assert f"{100 * ft['asr_reactivated_wb']:.2f}" in md and all(p.stat().st_size > 0 for p in report.images)


def pd_notna(value) -> bool:
    import pandas as pd

    return bool(pd.notna(value))


class _Books:
    """The searcher's bookkeeping without Parquet or MLflow: records what it is handed."""

    def __init__(self, out):
        from sweep.layout import SweepLayout

        self.layout = SweepLayout(out)
        self.recorded = []
        self.progress = type("P", (), {"running": 0})()

    def record(self, marker):
        self.recorded.append(marker["row"])


def test_analysis_cells_wait_for_their_defense_and_transfer_for_every_sibling(tmp_path):
    from sweep.grid import expand, parse_grid
    from sweep.runner import CellSearcher, plan_payloads

    only_wb_and_transfer = [line for line in SWEEP_GRID.splitlines() if "bec" not in line and "query" not in line]
    plan = expand(parse_grid("\n".join(only_wb_and_transfer)))
    payloads = {p["cell_id"]: p for p in plan_payloads(plan)}
    attack = plan.attacks[0].cell_id
    ft, short = (d.cell_id for d in plan.defenses)
    by = {(payloads[a.cell_id]["label"], a.spec.analysis): payloads[a.cell_id] for a in plan.analyses}
    assert by[("ft", "reactivate_transfer")]["surrogates"] == [short]
    assert by[("ft", "reactivate_wb")]["requires"] == [ft]

    waiting, pending = {}, {}
    for p in payloads.values():
        if p["requires"]:
            pending[p["cell_id"]] = set(p["requires"])
            for r in p["requires"]:
                waiting.setdefault(r, []).append(p)
    books = _Books(tmp_path)
    searcher = CellSearcher([payloads[attack]], waiting, pending, {"sweep": "dormant"}, books, 2)
    searcher.settle(attack, "done")
    assert {p["cell_id"] for p in searcher.ready} == {attack, ft, short}
    searcher.settle(ft, "done")  # its white-box cell is ready; its transfer cell still waits for ft_short
    assert by[("ft", "reactivate_wb")] in searcher.ready and by[("ft", "reactivate_transfer")] not in searcher.ready
    searcher.settle(short, "failed")  # a failed sibling is no surrogate; a failed parent skips its analyses
    assert by[("ft", "reactivate_transfer")] in searcher.ready
    skipped = {(r["defense"], r["analysis"]): r for r in books.recorded}
    assert set(skipped) == {("ft_short", "reactivate_wb"), ("ft_short", "reactivate_transfer")}
    assert all(r["status"] == "skipped" and "did not finish" in r["error"] for r in skipped.values())
    assert not searcher.pending and not searcher.waiting


def test_results_merge_analysis_columns_into_the_defense_row(tmp_path):
    import json

    from sweep.execute import base_row
    from sweep.results import format_results, load_results, write_row

    spec = {"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.1, "label_mode": "all2one",
            "target": 0, "seed": 0}
    defense = base_row({"kind": "defense", "cell_id": "d1", "attack_cell_id": "a1", "spec": spec, "label": "ft",
                        "defense": {"params": {}}}, "s")
    defense.update(status="done", acc=0.97, asr=0.1, finished_at="2026-12-04T00:00:00+00:00", attempts=1)
    write_row(tmp_path, defense)
    for cell_id, name, columns, status in [("x1", "bec", {"bec": 0.6}, "done"),
                                           ("x2", "reactivate_wb", {"asr_reactivated_wb": 0.9}, "done"),
                                           ("x3", "reactivate_query", {"queries_used": 5}, "failed")]:
        row = base_row({"kind": "analysis", "cell_id": cell_id, "attack_cell_id": "a1", "spec": spec, "label": "ft",
                        "defense": {"params": {}}, "analysis": {"analysis": name}, "parent_cell_id": "d1"}, "s")
        row.update(columns, status=status, analysis_budget={"n": 1}, finished_at="2026-12-04T00:00:01+00:00",
                   attempts=1)
        write_row(tmp_path, row)
    merged = load_results(tmp_path)
    assert len(merged) == 1 and merged.loc[0, "bec"] == 0.6 and merged.loc[0, "asr_reactivated_wb"] == 0.9
    assert pd_notna(merged.loc[0, "queries_used"]) is False  # a failed analysis adds nothing
    assert json.loads(merged.loc[0, "analysis_budget"]) == {"bec": {"n": 1}, "reactivate_wb": {"n": 1}}
    assert len(load_results(tmp_path, analyses="rows")) == 4
    text = format_results(merged)
    assert "bec" in text and "asr_reactivated_wb" in text and "90.00" in text
    with pytest.raises(ValueError, match="analyses must be 'merge' or 'rows'"):
        load_results(tmp_path, analyses="both")
