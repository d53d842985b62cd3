#!/usr/bin/env python
"""What CLIP cells cost, as ratios to a baseline run in the same process (the machines are noisy; ratios
travel better than seconds): a clean tiny CLIP is trained once on digits captions; then
- each CLIP attack cell (fine-tuning that clean model on 10-15% poisoned pairs, the test schedules) is timed
  against the same fine-tuning on clean pairs ("clean ft"), which runs first and last;
- each CLIP defense on the badnet_clip cell is timed against ft_clip, which runs first and last.
ACC / ASR of each cell are printed for orientation (zero-shot on the digits test set).

    .venv/bin/python bench/clip_cost.py [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTACKS = {  # the behaviour tests' schedules (tests/test_clip_cells.py, test_clip_attack_triggers.py, test_clip_badclip.py)
    "badnet_clip": ({"patch_size": 8, "position": "bottom_right"}, 0.1,
                    {"epochs": 8, "batch_size": 64, "lr": 5e-4, "weight_decay": 0.0, "augment": False}),
    "blended_clip": ({}, 0.15, {"epochs": 4, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.0, "augment": False}),
    "sig_clip": ({}, 0.15, {"epochs": 4, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.0, "augment": False}),
    "wanet_clip": ({}, 0.15, {"epochs": 4, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.0, "augment": False}),
    "badclip": ({"patch_size": 8, "epochs": 4, "max_images": 512, "lr": 0.05}, 0.1,
                {"epochs": 2, "batch_size": 64, "lr": 5e-5, "weight_decay": 0.0}),
}
FINETUNE = {"epochs": 20, "weight_decay": 0.0, "clean_fraction": 0.2, "augment": False}
DEFENSES = {"ft_clip": {**FINETUNE, "lr": 1.2e-3}, "cleanclip": {**FINETUNE, "lr": 1.5e-3},
            "roclip": {"text_edit_p": 0.0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    from bdcore.cells import AttackCellSpec, DefenseCellSpec, run_attack_cell, run_defense_cell
    from bdcore.clip import ClipTrainConfig, build_clip, captions_from_classes, train_clip
    from bdcore.data import load_dataset

    torch.set_num_threads(2)
    data = load_dataset("digits")
    pairs = captions_from_classes(data.train, data.info.class_names)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        torch.manual_seed(0)
        clean = build_clip("clip:tiny")
        started = time.perf_counter()
        train_clip(clean, pairs, ClipTrainConfig(epochs=15, batch_size=64, lr=5e-4, weight_decay=0.0, device="cpu"))
        print(f"clean tiny CLIP (15 epochs): {time.perf_counter() - started:.2f} s", flush=True)
        weights = out / "clean.safetensors"
        save_file({k: v.contiguous() for k, v in clean.model.state_dict().items()}, str(weights))

        def clean_ft(train: dict) -> float:
            bundle = build_clip("clip:tiny", weights=weights)
            started = time.perf_counter()
            train_clip(bundle, pairs, ClipTrainConfig(**train, device="cpu"))
            return time.perf_counter() - started

        baseline = ATTACKS["badnet_clip"][2]
        first = clean_ft(baseline)
        cells = {}
        for name, (params, ratio, train) in ATTACKS.items():
            spec = AttackCellSpec(dataset="digits", model="clip:tiny", attack=name, ratio=ratio, attack_params=params,
                                  train=train, pretrained=str(weights))
            started = time.perf_counter()
            result = run_attack_cell(spec, out, device="cpu", data=data)
            seconds = time.perf_counter() - started
            cells[name] = result
            rows.append({"kind": "attack", "name": name, "seconds": seconds, "epochs": train["epochs"],
                         "acc": result.metrics.acc, "asr": result.metrics.asr})
            print(f"{name}: {seconds:.2f} s", flush=True)
        last = clean_ft(baseline)
        per_epoch = (first + last) / 2 / baseline["epochs"]
        for row in rows:
            row["x_clean_ft_per_epoch"] = row["seconds"] / row["epochs"] / per_epoch

        attacked = cells["badnet_clip"].path
        timings: dict[str, list[float]] = {}
        order = ["ft_clip", *[d for d in DEFENSES if d != "ft_clip"], "ft_clip"]
        defended = {}
        for i, name in enumerate(order):
            started = time.perf_counter()
            result = run_defense_cell(attacked, DefenseCellSpec(defense=name, params=DEFENSES[name]), out / f"d{i}",
                                      device="cpu", data=data)
            timings.setdefault(name, []).append(time.perf_counter() - started)
            defended[name] = result
            print(f"{name}: {timings[name][-1]:.2f} s", flush=True)
        ft = sum(timings["ft_clip"]) / len(timings["ft_clip"])
        for name, seconds in timings.items():
            m = defended[name].metrics
            rows.append({"kind": "defense", "name": name, "seconds": sum(seconds) / len(seconds),
                         "x_ft_clip": sum(seconds) / len(seconds) / ft, "acc": m.acc, "asr": m.asr})

    if args.json:
        print(json.dumps({"clean_ft_first_s": first, "clean_ft_last_s": last, "rows": rows}, indent=2))
        return 0
    print(f"\nclean fine-tuning ({baseline['epochs']} epochs): {first:.2f} s first, {last:.2f} s last")
    print("| cell | seconds | x baseline | ACC | ASR |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = row.get("x_clean_ft_per_epoch", row.get("x_ft_clip"))
        label = "per epoch x clean ft" if row["kind"] == "attack" else "x ft_clip"
        print(f"| {row['name']} | {row['seconds']:.2f} | {ratio:.2f} ({label}) | {row['acc']:.3f} | {row['asr']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
