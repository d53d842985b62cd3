#!/usr/bin/env python
"""What the dormant-backdoor analyses cost, as ratios to a baseline run in the same process (the machines
are noisy; ratios travel better than seconds): a badnet smallcnn cell on digits and its ft defense cell
are built once, the clean reference model once; then each analysis (bdcore.reactivation) is timed on the
ft cell, from scratch each time (its shared controls included), against the ft defense cell itself (the
cost a sweep already pays per defense row), which is timed first and last. The ASRs are printed for
orientation.

    .venv/bin/python bench/reactivation_cost.py [--json] [--paper]

--paper adds the paper's full budgets (white-box 50 x 5 steps, 10,000 queries of 500 images): on a CPU the
query analysis alone takes about an hour (three models).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FT = {"clean_fraction": 0.2, "epochs": 30, "batch_size": 64, "lr": 0.05}
ANALYSES = [  # the digits grid's schedules (grids/reactivation-digits.yaml)
    ("bec", {}),
    ("reactivate_wb", {"outer_steps": 10, "batch_size": 128}),
    ("reactivate_query", {"queries": 1000, "samples": 200}),
    ("reactivate_transfer", {"outer_steps": 10, "batch_size": 128}),
]
PAPER = [("reactivate_wb", {}), ("reactivate_query", {})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--paper", action="store_true", help="also the paper's full budgets (slow on a CPU)")
    args = parser.parse_args()

    import torch

    from bdcore.cells import AttackCellSpec, DefenseCellSpec, run_attack_cell, run_defense_cell
    from bdcore.reactivation.cells import AnalysisCellSpec, run_analysis_cell, run_clean_reference

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        spec = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1)
        attack = run_attack_cell(spec, out, device="cpu")
        run_clean_reference(spec, out, device="cpu")
        surrogate = out / "surrogate"  # the transfer analysis' one surrogate: ft with a shorter schedule
        shutil.copytree(run_defense_cell(attack.path, DefenseCellSpec(defense="ft", params={**FT, "epochs": 20}),
                                         out, device="cpu").path, surrogate)

        def defense_cell() -> tuple[float, Path]:
            shutil.rmtree(out / "defenses", ignore_errors=True)
            started = time.perf_counter()
            result = run_defense_cell(attack.path, DefenseCellSpec(defense="ft", params=FT), out, device="cpu")
            return time.perf_counter() - started, result.path

        first, defended = defense_cell()
        runs = ANALYSES + (PAPER if args.paper else [])
        timed = []
        for name, params in runs:
            shutil.rmtree(out / "analyses", ignore_errors=True)  # no reuse: the shared controls are recomputed too
            started = time.perf_counter()
            result = run_analysis_cell(attack.path, defended, AnalysisCellSpec(analysis=name, params=params), out,
                                       device="cpu", surrogate_dirs=[surrogate])
            timed.append((name, params, time.perf_counter() - started, result.columns))
        last, _ = defense_cell()
        baseline = (first + last) / 2
        print(f"ft defense cell: {first:.2f} s first / {last:.2f} s last", flush=True)
        for name, params, seconds, columns in timed:
            shown = {k: round(v, 3) for k, v in columns.items() if isinstance(v, float)}
            rows.append({"analysis": name, "params": params, "seconds": round(seconds, 2),
                         "ratio_to_ft": round(seconds / baseline, 2), "columns": shown})
            print(f"{name:20s} {json.dumps(params):45s} {seconds:7.2f} s  x{seconds / baseline:5.2f}  {shown}",
                  flush=True)
    if args.json:
        print(json.dumps({"ft_seconds": [first, last], "analyses": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
