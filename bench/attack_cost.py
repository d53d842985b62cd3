#!/usr/bin/env python
"""What each attack costs before the victim trains, and what the resource cache saves: per attack,
`prepare` on an empty cache (builds surrogates, encoders, optimised triggers) and again on the
filled cache (a second cell of the same sweep), plus poisoning the training set and building the
backdoor test set; every figure also as a ratio to one epoch of plain victim training on the same
data, measured in the same process (the machines are noisy; ratios travel better than seconds).

    .venv/bin/python bench/attack_cost.py                       # every registered data-poisoning attack on digits
    .venv/bin/python bench/attack_cost.py --attacks lf ssba --json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    import torch

    from bdcore.attacks import ATTACKS, attack_names, build_attack
    from bdcore.attacks.resources import ResourceStore, default_surrogate_model
    from bdcore.data import load_dataset
    from bdcore.models import build_model
    from bdcore.train import default_train_config, seed_everything, train_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--attacks", nargs="*", default=None, help="default: every attack with a poisoned "
                        "training set whose trigger exists before training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset)
    names = args.attacks or [n for n in attack_names() if not ATTACKS.get(n).trigger_learned_in_training]
    seed_everything(0)
    net = build_model(default_surrogate_model(args.dataset), data.info)
    epoch = timed(lambda: train_model(net, data.train, data.info,
                                      default_train_config(args.dataset, epochs=1, device="cpu"), seed=0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            params = {"target": 3} if ATTACKS.get(name).clean_label or name == "refool" else {}
            cold_store, warm_store = ResourceStore(Path(tmp) / name, "cpu"), ResourceStore(Path(tmp) / name, "cpu")
            attack = build_attack(name, data.info, **params)
            cold = timed(lambda: attack.prepare(data.train, cold_store))
            again = build_attack(name, data.info, **params)
            warm = timed(lambda: again.prepare(data.train, warm_store))
            poison = timed(lambda: again.poison_train(data.train))
            test = timed(lambda: again.backdoor_test(data.test))
            rows.append({"attack": name, "prepare_cold_s": cold, "prepare_cached_s": warm, "poison_train_s": poison,
                         "backdoor_test_s": test, "cold_epochs": cold / epoch, "cached_epochs": warm / epoch,
                         "built": [u["name"].rsplit("-", 1)[0] for u in cold_store.used if not u["reused"]]})
    if args.json:
        print(json.dumps({"epoch_s": epoch, "attacks": rows}, indent=2))
        return
    print(f"{args.dataset}: one epoch of {default_surrogate_model(args.dataset)} training = {epoch:.2f} s "
          f"(the unit of the 'epochs' columns)")
    print(f"{'attack':<12}{'prepare cold':>14}{'cached':>10}{'cold/epoch':>12}{'cached/epoch':>14}"
          f"{'poison':>9}{'test set':>10}  built")
    for r in rows:
        print(f"{r['attack']:<12}{r['prepare_cold_s']:>13.2f}s{r['prepare_cached_s']:>9.3f}s{r['cold_epochs']:>12.1f}"
              f"{r['cached_epochs']:>14.3f}{r['poison_train_s']:>8.3f}s{r['backdoor_test_s']:>9.3f}s  "
              f"{', '.join(r['built']) or '-'}")


if __name__ == "__main__":
    main()
