"""CLIP cells (bdcore/clip/cells.py via bdcore.cells) and the CLIP defenses: a badnet_clip attack cell
fine-tuned from the clean tiny CLIP, ft_clip / cleanclip / roclip defense cells scored against it, and CLIP
cells in a grid and a sweep next to image-classifier cells."""
from __future__ import annotations

import pytest
import torch

from bdcore.cells import (
    AttackCellSpec,
    DefenseCellSpec,
    compatibility_problem,
    run_attack_cell,
    run_defense_cell,
)
from bdcore.clip import ZeroShotClassifier, build_clip, captions_from_classes
from bdcore.clip.attacks import build_clip_attack
from bdcore.clip.cells import load_clip_attack_cell
from bdcore.clip.data import augment_captions, defender_pairs
from bdcore.metrics import backdoor_metrics

# Measured (clean tiny CLIP fine-tuned on 10% poisoned digits pairs, lr 5e-4, 8 epochs): with the default
# random crop the 8 x 8 patch moves and is not learned (ASR 0.03); without it ASR 1.000 / ACC 0.930.
ATTACK_TRAIN = dict(epochs=8, batch_size=64, lr=5e-4, weight_decay=0.0, augment=False)
ATTACK_PARAMS = dict(patch_size=8, position="bottom_right")
# The defenses' clean fine-tuning: 20 epochs on 20% of the pairs (CleanCLIP's 100K of 500K), without the random
# crop (as the attack), at rates for a CLIP trained at 5e-4 (the papers' 1e-5 is for OpenAI's pre-trained CLIP).
# Measured on this cell (ACC 0.942 / ASR 1.000), seeds 0 / 1 (/ 2):
#   ft_clip lr 1.2e-3: 0.911 / 0.084, 0.939 / 0.255, 0.928 / 0.212;  at 1.5e-3 ACC falls 5-6 points,
#     at 1e-3 seed 1 keeps ASR 0.49; at 5e-4 (any length) ASR stays 0.55-0.62.
#   cleanclip lr 1.5e-3: 0.930 / 0.140, 0.950 / 0.106;  at 1.2e-3 0.950 / 0.386, 0.942 / 0.268.
FINETUNE = dict(epochs=20, weight_decay=0.0, clean_fraction=0.2, augment=False)
FINETUNE_LR = {"ft_clip": 1.2e-3, "cleanclip": 1.5e-3}


@pytest.fixture(scope="module")
def clip_attack_dir(tmp_path_factory, clean_tiny_clip, digits):
    out = tmp_path_factory.mktemp("clipcells")
    spec = AttackCellSpec(dataset="digits", model="clip:tiny", attack="badnet_clip", ratio=0.1,
                          attack_params=ATTACK_PARAMS, train=ATTACK_TRAIN, pretrained=str(clean_tiny_clip))
    result = run_attack_cell(spec, out, device="cpu", data=digits)
    return out, spec, result


def test_badnet_clip_cell_backdoors_the_clean_clip(clip_attack_dir, clean_tiny_clip, digits):
    out, spec, result = clip_attack_dir
    # The clean model with the same trigger: what the attack's training adds.
    attack = build_clip_attack("badnet_clip", digits.info, ratio=0.1, **ATTACK_PARAMS)
    clean = backdoor_metrics(ZeroShotClassifier(build_clip("clip:tiny", weights=clean_tiny_clip), digits.info),
                             digits.test, attack.backdoor_test(digits.test), digits.info, device="cpu")
    assert clean.asr < 0.3, clean
    assert result.metrics.asr >= 0.9 and result.metrics.acc >= 0.8, result.metrics
    assert len(result.history) == ATTACK_TRAIN["epochs"] and not result.reused
    again = run_attack_cell(spec, out, device="cpu", data=digits)
    assert again.reused and again.metrics == result.metrics
    cell = load_clip_attack_cell(result.path)
    assert cell.spec == spec and len(cell.poison_indices) == round(0.1 * len(digits.train))
    rebuilt = backdoor_metrics(ZeroShotClassifier(cell.bundle, digits.info), digits.test,
                               cell.attack.backdoor_test(digits.test), digits.info, device="cpu")
    assert rebuilt.asr == pytest.approx(result.metrics.asr) and rebuilt.acc == pytest.approx(result.metrics.acc)


@pytest.mark.parametrize("defense", ["ft_clip", "cleanclip"])
def test_clean_finetuning_defenses_remove_the_backdoor(clip_attack_dir, digits, defense):
    out, spec, attacked = clip_attack_dir
    params = {**FINETUNE, "lr": FINETUNE_LR[defense]}
    result = run_defense_cell(attacked.path, DefenseCellSpec(defense=defense, params=params), out, device="cpu",
                              data=digits)
    before, after = attacked.metrics, result.metrics
    assert result.status == "done" and result.diagnostics["clean_pairs"] == round(0.2 * len(digits.train))
    assert after.asr <= before.asr / 2, (before, after)
    assert after.acc >= before.acc - 0.05, (before, after)
    assert result.scores["der"] > 0.7


def test_roclip_trains_without_the_backdoor(clip_attack_dir, digits):
    out, spec, attacked = clip_attack_dir
    # Training-time: the attack's own fine-tuning of the clean model on the same poisoned pairs, with RoCLIP's
    # matching every second epoch. EDA's edits are off: a digits caption's only informative word is the digit,
    # and deleting or moving it makes the caption another class's (with them: ACC 0.841 / ASR 0.165).
    # Measured: ACC 0.872 / ASR 0.143, against 0.942 / 1.000 undefended: RoCLIP trades accuracy for
    # robustness here, as its paper reports for strong attacks; the bar below allows 10 points.
    result = run_defense_cell(attacked.path, DefenseCellSpec(defense="roclip", params={"text_edit_p": 0.0}), out,
                              device="cpu", data=digits)
    before, after = attacked.metrics, result.metrics
    assert after.asr <= before.asr / 2, (before, after)
    assert after.acc >= before.acc - 0.10, (before, after)
    assert result.diagnostics["matched_pairs"] > 0


def test_incompatible_methods_are_refused(clip_attack_dir, digits):
    out, _, attacked = clip_attack_dir
    assert "image-classifier defense" in compatibility_problem("clip:tiny", "badnet_clip", "ft")
    assert "CLIP attack" in compatibility_problem("smallcnn", "badnet_clip")
    assert "CLIP defense" in compatibility_problem("smallcnn", "badnet", "cleanclip")
    assert compatibility_problem("clip:tiny", "badnet_clip", "roclip") is None
    with pytest.raises(ValueError, match="defense 'ft' is an image-classifier defense"):
        run_defense_cell(attacked.path, DefenseCellSpec(defense="ft"), out, device="cpu", data=digits)
    with pytest.raises(ValueError, match="attack 'badnet' is an image-classifier attack"):
        AttackCellSpec(dataset="digits", model="clip:tiny", attack="badnet", ratio=0.1).key()
    with pytest.raises(ValueError, match="label_mode must be 'all2one'"):
        AttackCellSpec(dataset="digits", model="clip:tiny", attack="badnet_clip", ratio=0.1,
                       label_mode="all2all").key()
    with pytest.raises(ValueError, match="captionz"):
        AttackCellSpec(dataset="digits", model="clip:tiny", attack="badnet_clip", ratio=0.1,
                       train={"captionz": "x.csv"}).key()


def test_defender_pairs_and_caption_edits(digits):
    pairs = captions_from_classes(digits.train, digits.info.class_names)
    clean = defender_pairs(pairs, 0.2, seed=0)
    assert len(clean) == round(0.2 * len(pairs))
    assert clean.captions == defender_pairs(pairs, 0.2, seed=0).captions  # reproducible
    generator = torch.Generator().manual_seed(0)
    edited = augment_captions(["a photo of a big red fox ."] * 200, generator, p=0.3)
    assert any(e != "a photo of a big red fox ." for e in edited)
    assert all(set(e.split()) <= set("a photo of a big red fox .".split()) for e in edited)
    assert all(e for e in edited)


MIXED = """
name: mixed
datasets: [digits]
models: [smallcnn, "clip:tiny"]
attacks: [badnet, {name: badnet_clip, params: {patch_size: 8}}]
ratios: [0.1]
defenses:
  - {name: ft, params: {epochs: 1, clean_fraction: 0.1}}
  - {name: ft_clip, params: {epochs: 1, lr: 5.0e-4}}
overrides:
  - {match: {model: smallcnn}, train: {epochs: 2}}
  - {match: {model: "clip:tiny"}, train: {epochs: 2, batch_size: 64, augment: false}}
"""
ATTACK_PAIRS = """
  - {model: smallcnn, attack: badnet_clip}
  - {model: "clip:tiny", attack: badnet}
"""
DEFENSE_PAIRS = """
  - {model: smallcnn, defense: ft_clip}
  - {model: "clip:tiny", defense: ft}
"""
EXCLUDES = "exclude:" + ATTACK_PAIRS + DEFENSE_PAIRS.lstrip("\n")


def test_grids_mix_clip_and_classifier_cells_and_refuse_incompatible_pairs():
    from sweep.grid import GridError, expand, parse_grid

    with pytest.raises(GridError, match=r"defenses\[1\]: defense 'ft_clip' is a CLIP defense.*exclude"):
        expand(parse_grid(MIXED))
    with pytest.raises(GridError, match=r"attacks\[1\]: attack 'badnet_clip' is a CLIP attack.*exclude"):
        expand(parse_grid(MIXED + "exclude:" + DEFENSE_PAIRS))
    plan = expand(parse_grid(MIXED + EXCLUDES))
    assert sorted((c.spec.model, c.spec.attack) for c in plan.attacks) == [("clip:tiny", "badnet_clip"),
                                                                            ("smallcnn", "badnet")]
    by_attack = {c.cell_id: c.spec.model for c in plan.attacks}
    assert sorted((by_attack[d.attack_cell_id], d.spec.defense) for d in plan.defenses) == [
        ("clip:tiny", "ft_clip"), ("smallcnn", "ft")]
    with pytest.raises(GridError, match="unknown CLIP training setting 'epochz'"):
        expand(parse_grid(MIXED.replace("augment: false", "epochz: 3") + EXCLUDES))
    with pytest.raises(GridError, match="unknown CLIP architecture 'RN51'"):
        parse_grid(MIXED.replace('"clip:tiny"]', '"clip:RN51"]'))


def test_a_sweep_runs_clip_and_classifier_cells_side_by_side(tmp_path, ray_address, clean_tiny_clip):
    from sweep.grid import expand, parse_grid
    from sweep.results import load_results
    from sweep.runner import RunOptions, run_sweep

    grid = MIXED.replace('"clip:tiny"]', f'{{name: "clip:tiny", pretrained: "{clean_tiny_clip}"}}]')
    plan = expand(parse_grid(grid + EXCLUDES))
    outcome = run_sweep(plan, RunOptions(out=tmp_path / "out", progress=False, device="cpu"))
    assert outcome.statuses == {"done": 4}, outcome.statuses
    rows = load_results(tmp_path / "out").set_index(["model", "defense"])
    assert set(rows.index) == {("smallcnn", "none"), ("smallcnn", "ft"), ("clip:tiny", "none"),
                               ("clip:tiny", "ft_clip")}
    assert rows[["acc", "asr", "ra"]].notna().all().all()
    assert rows.loc[("clip:tiny", "ft_clip"), "der"] == rows.loc[("clip:tiny", "ft_clip"), "der"]  # not NaN
    assert rows.loc[("clip:tiny", "none"), "acc"] > 0.7  # zero-shot, fine-tuned from the clean tiny CLIP


def test_the_badclip_grid_lists_every_clip_method(tmp_path, monkeypatch):
    """The shipped grid plans once its pinned caption table is here (elsewhere it is refused: an explicit
    path must exist); the RN50 weights and CIFAR-10 on their default folders may be absent (warnings)."""
    from pathlib import Path

    from bdcore.clip.attacks import clip_attack_names
    from bdcore.clip.defenses import clip_defense_names
    from sweep.grid import GridError, expand, load_grid, parse_grid

    monkeypatch.setenv("BDCORE_WEIGHTS_ROOT", str(tmp_path / "weights"))
    monkeypatch.setenv("BDCORE_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT", raising=False)
    shipped = Path(__file__).resolve().parent.parent / "grids" / "clip.yaml"
    if not Path("/data/cc3m/train_500k.csv").is_file():
        with pytest.raises(GridError, match=r"train\.captions: caption table '/data/cc3m/train_500k.csv' does not"):
            expand(load_grid(shipped))
    (tmp_path / "images").mkdir()
    (tmp_path / "pairs.csv").write_text("image,caption\n0.png,a photo of a cat.\n")
    text = shipped.read_text().replace("/data/cc3m/train_500k.csv", str(tmp_path / "pairs.csv"))
    plan = expand(parse_grid(text.replace("/data/cc3m/images", str(tmp_path / "images")), "clip.yaml"))
    assert any("'clip:RN50': no weights folder at" in w for w in plan.warnings), plan.warnings
    assert {c.spec.attack for c in plan.attacks} == set(clip_attack_names())
    assert {d.spec.defense for d in plan.defenses} == set(clip_defense_names())
    assert {c.spec.model for c in plan.attacks} == {"clip:RN50"} and {c.spec.ratio for c in plan.attacks} == {0.003}
    assert all(c.spec.train["lr"] == 1e-6 and c.spec.train["image_size"] == 224 for c in plan.attacks)


def test_an_attack_cell_trains_on_a_caption_table(tmp_path, digits, clean_tiny_clip):
    """A CC3M-style table (PNG files + a Parquet of path and caption) as the cell's training pairs; zero-shot
    scoring on the cell dataset at `image_size`."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(96):
        Image.fromarray(digits.train.images[i].permute(1, 2, 0).numpy()).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a photo of a {digits.info.class_names[int(digits.train.labels[i])]}."})
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    spec = AttackCellSpec(dataset="digits", model="clip:tiny", attack="badnet_clip", ratio=0.1,
                          attack_params={"patch_size": 8}, pretrained=str(clean_tiny_clip),
                          train={"captions": str(tmp_path / "pairs.parquet"), "image_root": str(tmp_path / "img"),
                                 "image_size": 32, "epochs": 1, "batch_size": 32})
    result = run_attack_cell(spec, tmp_path / "out", device="cpu", data=digits)
    cell = load_clip_attack_cell(result.path)
    assert len(cell.poison_indices) == round(0.1 * 96) and 0 <= result.metrics.asr <= 1
    assert np.isfinite([result.metrics.acc, result.metrics.asr, result.metrics.ra]).all()
    missing = spec.model_copy(update={"train": {**spec.train, "captions": str(tmp_path / "nope.csv")}})
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        run_attack_cell(missing, tmp_path / "out", device="cpu", data=digits)


# Measured on this cell after ft_clip (ACC 0.911 / ASR 0.084), white-box 10 x 5 steps: at the paper's Linf 0.05
# every model reaches ASR 1.0, the clean CLIP too (clip:tiny is not robust: at that budget any target is a plain
# adversarial perturbation away, which is what the control is for); at 0.01 defended 0.265 / clean 0.031 /
# undefended 1.0; at 0.02 0.586 / 0.361 / 1.0; at 0.005 0.146 / 0.006 / 1.0. BEC 0.25 (top 5% 0.29).
CLIP_WB = dict(outer_steps=2, batch_size=128, eps=0.01)  # each outer step sweeps every batch


def test_reactivation_analyses_run_on_a_clip_cell_through_its_zero_shot_classifier(clip_attack_dir, digits):
    """bdcore.reactivation on CLIP: the white-box perturbation and BEC act on the zero-shot classifier
    (image encoder + class-name text embeddings), with a clean CLIP of the same fine-tuning as the control."""
    from bdcore.reactivation.cells import AnalysisCellSpec, clean_reference_dir, run_analysis_cell

    out, spec, attacked = clip_attack_dir
    defended = run_defense_cell(attacked.path, DefenseCellSpec(defense="ft_clip", params={**FINETUNE, "lr": 1.2e-3}),
                                out, device="cpu", data=digits)
    assert defended.metrics.asr < 0.2, defended.metrics
    wb = run_analysis_cell(attacked.path, defended.path, AnalysisCellSpec(analysis="reactivate_wb", params=CLIP_WB),
                           out, device="cpu", data=digits).columns
    # The dormant backdoor answers a budget that neither wakes a clean CLIP nor is needed by the undefended one.
    assert wb["asr_reactivated_wb"] >= 2 * defended.metrics.asr, wb
    assert wb["asr_reactivated_wb"] - wb["asr_reactivated_wb_clean"] >= 0.1, wb
    assert wb["asr_reactivated_wb_undefended"] >= 0.95, wb
    assert (clean_reference_dir(out, spec) / "metadata.json").is_file()
    bec = run_analysis_cell(attacked.path, defended.path, AnalysisCellSpec(analysis="bec"), out, device="cpu",
                            data=digits).columns
    assert 0 < bec["bec"] < 1, bec
