#!/usr/bin/env python
"""What each defense costs relative to ft, on the same backdoored cell, so a user can budget a grid:
one attack cell is trained once, then every defense runs with its paper defaults (or `--param`) and is
timed (post-training defenses repair a copy of the model; detectors score the poisoned training set and
retrain without what they flag; training-time defenses train from the poisoned set, both with the
attack cell's training config); ft runs first and last, and each defense's time is
given as a ratio to ft's mean (the machines are noisy; ratios travel better than seconds). ACC / ASR
after each defense are printed too, measured on the test set, for orientation only.

    .venv/bin/python bench/defense_cost.py                              # every defense, digits + smallcnn
    .venv/bin/python bench/defense_cost.py --defenses fp nc anp --param anp.iterations=500 --json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_params(items: list[str]) -> dict[str, dict]:
    """`defense.key=value` (value read as JSON when it parses, else as text) -> {defense: {key: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        name_key, sep, raw = item.partition("=")
        name, dot, key = name_key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--param wants DEFENSE.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def main() -> None:
    import torch

    from bdcore.attacks import build_attack
    from bdcore.data import defender_subset, load_dataset
    from bdcore.defenses import DefenseContext, DefenseSkipped, build_defense, defense_names
    from bdcore.metrics import backdoor_metrics
    from bdcore.models import build_model
    from bdcore.train import default_train_config, seed_everything, train_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--attack", default="badnet")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--defenses", nargs="*", default=None, help="default: every registered defense")
    parser.add_argument("--param", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                        help="override a defense's config (repeatable); e.g. --param ft.epochs=20")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_params(args.param)

    data = load_dataset(args.dataset)
    attack = build_attack(args.attack, data.info, ratio=args.ratio)
    poisoned = attack.poison_train(data.train)
    backdoor_test = attack.backdoor_test(data.test)
    seed_everything(0)
    victim = build_model(args.model, data.info)
    started = time.perf_counter()
    train_config = default_train_config(args.dataset, device=args.device)
    train_model(victim, poisoned.data, data.info, train_config, seed=0)
    victim_s = time.perf_counter() - started
    undefended = backdoor_metrics(victim, data.test, backdoor_test, data.info, device=args.device)

    names = args.defenses or defense_names()
    names = [n for n in names if n != "ft"]

    def run(name: str) -> dict:
        defense = build_defense(name, **overrides.get(name, {}))
        clean = defender_subset(data.train, defense.config.clean_fraction, seed=0)
        with tempfile.TemporaryDirectory() as work:
            ctx = DefenseContext(data.info, device=args.device, work_dir=Path(work), poisoned_train=lambda: poisoned,
                                 model_factory=lambda: build_model(args.model, data.info), train_config=train_config)
            seed_everything(0)
            began = time.perf_counter()
            try:
                if defense.kind == "post_training":
                    outcome = defense.repair(copy.deepcopy(victim), clean, ctx)
                elif defense.kind == "detector":
                    outcome = defense.mitigate(copy.deepcopy(victim), poisoned, clean, ctx)
                else:
                    outcome = defense.train(poisoned, ctx)
            except DefenseSkipped as skipped:
                return {"defense": name, "seconds": time.perf_counter() - began, "skipped": str(skipped)}
            seconds = time.perf_counter() - began
        after = backdoor_metrics(outcome.model, data.test, backdoor_test, data.info, device=args.device)
        row = {"defense": name, "kind": defense.kind, "seconds": seconds, "acc": after.acc, "asr": after.asr,
               "params": defense.config.model_dump()}
        if "detection_auroc" in outcome.diagnostics:
            row["auroc"] = outcome.diagnostics["detection_auroc"]
        return row

    baseline = [run("ft")]
    rows = [run(name) for name in names]
    baseline.append(run("ft"))
    ft_s = sum(r["seconds"] for r in baseline) / len(baseline)
    for r in rows:
        r["ft_ratio"] = r["seconds"] / ft_s
    summary = {"dataset": args.dataset, "model": args.model, "attack": args.attack, "ratio": args.ratio,
               "victim_training_s": victim_s, "undefended": undefended.as_dict(),
               "ft_seconds": [r["seconds"] for r in baseline], "defenses": rows}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"{args.dataset} / {args.model} / {args.attack} {args.ratio:g}: victim trained in {victim_s:.1f} s, "
          f"ACC {undefended.acc:.3f} ASR {undefended.asr:.3f}")
    print(f"ft (the unit): {' and '.join(f'{s:.2f} s' for s in summary['ft_seconds'])} (first and last run)")
    print(f"{'defense':<10}{'seconds':>10}{'x ft':>8}{'ACC':>8}{'ASR':>8}{'AUROC':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['defense']:<10}{'':>10}{'':>8}  skipped: {r['skipped']}")
        else:
            auroc = f"{r['auroc']:>8.3f}" if "auroc" in r else ""
            print(f"{r['defense']:<10}{r['seconds']:>10.2f}{r['ft_ratio']:>8.2f}{r['acc']:>8.3f}{r['asr']:>8.3f}{auroc}")


if __name__ == "__main__":
    main()
