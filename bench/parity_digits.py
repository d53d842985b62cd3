"""Parity cell: our engine on the cell BackdoorBench's own scripts were run on (docs/methods.md).

digits (1,438 train / 359 test, 32x32), preactresnet18, badnet 10% all2one target 0, BackdoorBench's
training recipe (SGD lr 0.01, momentum 0.9, wd 5e-4, batch 128, cosine) for 30 epochs, seed 0; then
each named post-training defense with its defaults (5% clean data = 72 images). Prints ACC / ASR / RA
in percent and the seconds each took. Cells are cached under --out, so re-running one defense after
a change reuses the attack.

    .venv/bin/python bench/parity_digits.py --out /tmp/parity [--defenses ft fp nad ...]
"""
from __future__ import annotations

import argparse
import json
import time

from bdcore.cells import AttackCellSpec, DefenseCellSpec, run_attack_cell, run_defense_cell
from bdcore.data import load_dataset

DEFENSES = ["ft", "fp", "nad", "anp", "clp", "i_bau", "rnp", "bnp", "ep"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--defenses", nargs="*", default=DEFENSES)
    parser.add_argument("--params", default="{}", help='JSON {defense: {param: value}} overrides')
    args = parser.parse_args()
    overrides = json.loads(args.params)
    data = load_dataset("digits")
    spec = AttackCellSpec(dataset="digits", model="preactresnet18", attack="badnet", ratio=0.1,
                          train={"epochs": args.epochs, "batch_size": 128, "lr": 0.01, "schedule": "cosine"})
    started = time.perf_counter()
    attack = run_attack_cell(spec, args.out, device="cpu", data=data)
    m = attack.metrics
    print(f"none     ACC {100 * m.acc:6.2f}  ASR {100 * m.asr:6.2f}  RA {100 * m.ra:6.2f}  "
          f"{time.perf_counter() - started:7.1f} s", flush=True)
    for name in args.defenses:
        started = time.perf_counter()
        result = run_defense_cell(attack.path, DefenseCellSpec(defense=name, params=overrides.get(name, {})),
                                  args.out, device="cpu", data=data)
        if result.status != "done":
            print(f"{name:8s} {result.status}: {result.reason}", flush=True)
            continue
        m = result.metrics
        print(f"{name:8s} ACC {100 * m.acc:6.2f}  ASR {100 * m.asr:6.2f}  RA {100 * m.ra:6.2f}  "
              f"{time.perf_counter() - started:7.1f} s  {json.dumps(_brief(result.diagnostics))}", flush=True)


def _brief(diagnostics: dict) -> dict:
    """The scalar diagnostics (curves and per-layer tables left out)."""
    return {k: v for k, v in diagnostics.items() if isinstance(v, (int, float, str)) or v is None}


if __name__ == "__main__":
    main()
