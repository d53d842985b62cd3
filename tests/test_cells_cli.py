"""`bdsweep cell` end to end (short training), artifact reuse, and one-line errors with exit 2."""
import shutil

import pytest
import torch

import bdcore.cells as cells
from bdcore.cells import AttackCellSpec, load_attack_cell
from sweep.cli import main

FAST = ["--train", "epochs=3", "--defense-param", "epochs=2", "--defense-param", "clean_fraction=0.1", "--quiet"]
CELL = ["cell", "--dataset", "digits", "--model", "smallcnn", "--attack", "badnet", "--ratio", "0.1", "--defense", "ft"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return out


def test_cell_runs_then_reuses(finished, capsys, monkeypatch):
    assert main(CELL + FAST + ["--out", str(finished)]) == 0
    first = capsys.readouterr().out
    assert "none" in first and "ft" in first and "DER %" in first and "attack artifact:" in first
    attack_dirs = list((finished / "attacks").iterdir())
    assert len(attack_dirs) == 1
    # Second run: nothing is trained again.
    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(cells, "train_model", no_training)
    monkeypatch.setattr("bdcore.defenses.ft.train_model", no_training)
    assert main(CELL + FAST + ["--out", str(finished)]) == 0
    second = capsys.readouterr().out
    assert second.count("(reused)") == 2
    # The table rows are the same numbers.
    assert [l for l in first.splitlines() if l.startswith(("none", "ft"))] == \
           [l for l in second.splitlines() if l.startswith(("none", "ft"))]


def test_attack_artifact_rebuilds_trigger_and_model(finished, digits):
    folder = next((finished / "attacks").iterdir())
    cell = load_attack_cell(folder)
    assert cell.spec.attack == "badnet" and len(cell.poison_indices) == round(0.1 * len(digits.train))
    bd = cell.attack.backdoor_test(digits.test)
    assert (bd.images[:, :, -3:, -3:] == 255).all()
    from bdcore.metrics import backdoor_metrics

    again = backdoor_metrics(cell.model, digits.test, bd, cell.info)
    assert again.asr == pytest.approx(cell.metrics.asr) and again.acc == pytest.approx(cell.metrics.acc)


def test_corrupt_artifact_is_recomputed(finished, capsys):
    folder = next((finished / "attacks").iterdir())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.rmtree(finished / "defenses")
    assert main(CELL + FAST + ["--out", str(finished)]) == 0
    assert "(reused)" not in capsys.readouterr().out
    load_attack_cell(folder)  # whole again


@pytest.mark.parametrize("argv,message", [
    (["--attack", "badnot"], "unknown attack 'badnot'; known attacks: adap_blend, adap_patch, badnet"),
    (["--model", "resnet99"], "unknown model 'resnet99'; known models:"),
    (["--defense", "fq"], "unknown defense 'fq'; known defenses:"),
    (["--ratio", "1.5"], "--ratio 1.5: a poisoning ratio lies strictly between 0 and 1"),
    (["--attack-param", "patch_sise=4"], "patch_sise"),
    (["--defense-param", "epoks=4"], "epoks"),
    (["--train", "lr=-1"], "lr"),
    (["--attack-param", "novalue"], "expects key=value"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--attack", "badnet_clip"], "attack 'badnet_clip' is a CLIP attack and model 'smallcnn' is an image classifier"),
    (["--defense", "cleanclip"], "defense 'cleanclip' is a CLIP defense and model 'smallcnn' is an image classifier"),
    (["--model", "clip:tiny"], "attack 'badnet' is an image-classifier attack and model 'clip:tiny' is a CLIP model"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, argv, message):
    args = list(CELL)
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args + ["--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bdsweep: error:") and message in err
    assert not (tmp_path / "attacks").exists()  # nothing ran


def test_spec_key_ignores_device_but_not_training():
    a = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1)
    b = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1, train={"device": "cpu"})
    c = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1, train={"epochs": 3})
    d = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1, attack_params={"patch_size": 3})
    assert a.key() == b.key() == d.key()  # defaults filled in: explicit default = implicit default
    assert a.key() != c.key()


def test_training_time_defense_gets_the_rebuilt_poisoned_set(finished):
    """A training-time defense receives the poisoned training set rebuilt from the artifact
    (indices checked against the saved ones) and a fresh model of the victim's architecture."""
    from bdcore.cells import DefenseCellSpec, run_defense_cell
    from bdcore.data import ImageSet
    from bdcore.defenses import DEFENSES, DefenseOutcome, TrainingTimeDefense
    from bdcore.train import train_model

    class OracleFilter(TrainingTimeDefense):
        """Drops the true poison indices and retrains: an upper bound, for this test only."""

        def train(self, poisoned, ctx):
            keep = torch.ones(len(poisoned.data), dtype=torch.bool)
            keep[poisoned.poison_indices] = False
            model = ctx.model_factory()
            data = ImageSet(poisoned.data.images[keep], poisoned.data.labels[keep])
            train_model(model, data, ctx.info, ctx.train_config, seed=0)
            return DefenseOutcome(model, {"dropped": int((~keep).sum())})

    OracleFilter.name = "oracle_filter_test"
    DEFENSES._entries["oracle_filter_test"] = OracleFilter
    try:
        attack_dir = next((finished / "attacks").iterdir())
        result = run_defense_cell(attack_dir, DefenseCellSpec(defense="oracle_filter_test"), finished)
    finally:
        del DEFENSES._entries["oracle_filter_test"]
    assert result.status == "done"
    assert result.diagnostics["dropped"] == len(load_attack_cell(attack_dir).poison_indices)
    assert result.metrics.asr < 0.2 < result.undefended.asr


def test_detector_cell_drops_flagged_samples_and_retrains(tmp_path, digits):
    """A detector as a defense cell: detection quality against the artifact's poison indices, then a
    fresh model retrained without the flagged samples. The attack cell trains the digits default (10
    epochs): at 3 epochs smallcnn sits on the knee of its curve (ACC 0.21 here, so AC's latent
    clusters say nothing). Measured here: AC flags 125 of 144 poisons (AUROC 0.886), and the model
    retrained without them: ACC 0.975, ASR 0.044 (undefended 0.963 / 0.963)."""
    from bdcore.cells import DefenseCellSpec, run_attack_cell, run_defense_cell

    spec = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1)
    attack_dir = run_attack_cell(spec, tmp_path, device="cpu", data=digits).path
    n_train = len(digits.train)
    result = run_defense_cell(attack_dir, DefenseCellSpec(defense="ac"), tmp_path, device="cpu", data=digits)
    assert result.status == "done", result.reason
    d = result.diagnostics
    assert d["n_samples"] == n_train and d["n_poison"] == len(load_attack_cell(attack_dir).poison_indices)
    assert d["retrained_on"] == n_train - d["n_flagged"] and d["retrain_epochs"] == 10
    assert d["detection_auroc"] >= 0.85 and d["detection_fpr"] <= 0.02, d
    assert result.metrics.asr <= result.undefended.asr / 2, (result.metrics, result.undefended, d)
    assert result.metrics.acc >= result.undefended.acc - 0.03, (result.metrics, result.undefended)


def test_input_filter_cell_reports_inference_screening(finished):
    """strip is also an inference-time filter: its cell reports the rejection of triggered and clean
    test inputs at the boundary set on the defender's clean subset."""
    from bdcore.cells import DefenseCellSpec, run_defense_cell

    attack_dir = next((finished / "attacks").iterdir())
    result = run_defense_cell(attack_dir, DefenseCellSpec(defense="strip", params={"n_superimpose": 5}), finished)
    assert result.status == "done", result.reason
    d = result.diagnostics
    for key in ("detection_auroc", "inference_tpr", "inference_frr", "inference_auroc"):
        assert 0.0 <= d[key] <= 1.0, (key, d)
    assert d["inference_frr_target"] == 0.1 and d["n_superimpose"] == 5


def test_killed_attack_cell_resumes_at_its_epoch(tmp_path, digits):
    from bdcore.artifacts import read_metadata
    from bdcore.cells import run_attack_cell

    spec = AttackCellSpec(dataset="digits", model="smallcnn", attack="blended", ratio=0.1, train={"epochs": 3})

    class Killed(Exception):
        pass

    def die_at_two(epoch, record):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_attack_cell(spec, tmp_path, data=digits, on_epoch_end=die_at_two)
    assert not (tmp_path / "attacks").exists() or not any((tmp_path / "attacks").iterdir())
    seen = []
    result = run_attack_cell(spec, tmp_path, data=digits, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [3]
    assert read_metadata(result.path)["resumed_from_epoch"] == 2
    assert not (tmp_path / "work" / "attacks" / spec.name()).exists()  # checkpoint cleaned up once saved


def test_attack_cells_share_generated_resources_and_artifacts_stand_alone(tmp_path, digits):
    """A trojannn cell builds the clean surrogate and the trigger under <out>/resources; a second
    cell with another ratio reuses the trigger (no surrogate needed); the artifact alone, with the
    cache deleted, reproduces the backdoor test set."""
    from bdcore.artifacts import read_metadata
    from bdcore.cells import run_attack_cell

    first = AttackCellSpec(dataset="digits", model="smallcnn", attack="trojannn", ratio=0.1, train={"epochs": 1})
    second = first.model_copy(update={"ratio": 0.05})
    a = run_attack_cell(first, tmp_path, data=digits)
    b = run_attack_cell(second, tmp_path, data=digits)
    used_a, used_b = read_metadata(a.path)["resources"], read_metadata(b.path)["resources"]
    assert [(u["name"].split("-")[0], u["reused"]) for u in used_a] == [("surrogate", False),
                                                                       ("trojannn_trigger", False)]
    assert used_b == [{"name": used_a[1]["name"], "reused": True}]
    assert sorted(p.name for p in (tmp_path / "resources").iterdir() if not p.name.startswith(".")) == sorted(
        u["name"] for u in used_a)

    expected = load_attack_cell(a.path).attack.backdoor_test(digits.test).images
    shutil.rmtree(tmp_path / "resources")
    assert torch.equal(load_attack_cell(a.path).attack.backdoor_test(digits.test).images, expected)


@pytest.mark.parametrize("name, fits_on_all", [("ft", True), ("fp", False)])
def test_defender_subset_held_out_only_by_selecting_defenses(finished, name, fits_on_all):
    """A defense that selects nothing (ft) fits on the whole 5% clean subset, as BackdoorBench's;
    one that selects (fp's pruning level) holds 20% of it out for that choice."""
    from bdcore.cells import DefenseCellSpec, run_defense_cell
    from bdcore.data import load_dataset
    from bdcore.defenses import build_defense

    selecting = {"anp", "rnp", "fp", "mcr"}
    nothing = {"ft", "nad", "nc", "i_bau", "sau", "ft_sam", "npd", "bnp", "ep", "clp"}
    assert {n for n in selecting | nothing if build_defense(n).holdout_fraction == 0} == nothing
    attack_dir = next((finished / "attacks").iterdir())
    digits = load_dataset("digits")
    subset = round(len(digits.train) * 0.05)  # 72 of 1,438
    result = run_defense_cell(attack_dir, DefenseCellSpec(defense=name, params={"epochs": 1}), finished,
                              device="cpu", data=digits)
    assert result.status == "done", result.reason
    if name == "ft":
        assert result.diagnostics["clean_train_size"] == subset
    else:
        # fp measures its pruning curve on the held-out part and fine-tunes on the rest
        assert result.diagnostics["clean_train_size"] == subset - round(subset * 0.2)
