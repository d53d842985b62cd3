"""CLIP foundation (bdcore/clip): local-only open_clip models, image-text data, training, zero-shot."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bdcore.clip import (
    ClipTrainConfig,
    ZeroShotClassifier,
    build_clip,
    captions_from_classes,
    load_caption_table,
    train_clip,
)
from bdcore.metrics import accuracy
from bdcore.models import build_model
from bdcore.models.registry import WeightsError


def test_names_and_missing_weights_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a CLIP model name"):
        build_clip("RN50")
    with pytest.raises(ValueError, match="unknown CLIP architecture 'RN5O'.*known: tiny"):
        build_clip("clip:RN5O")
    monkeypatch.setenv("BDCORE_WEIGHTS_ROOT", str(tmp_path))
    with pytest.raises(WeightsError, match=f"{tmp_path}/clip/RN50/.*nothing is downloaded"):
        build_clip("clip:RN50")


def test_tiny_weights_round_trip_and_foreign_files_are_refused(tmp_path, digits):
    first = build_clip("clip:tiny")
    file = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in first.model.state_dict().items()}, str(file))
    again = build_clip("clip:tiny", weights=file)
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    foreign = tmp_path / "smallcnn.safetensors"
    save_file(build_model("smallcnn", digits.info).state_dict(), str(foreign))
    with pytest.raises(WeightsError, match="another architecture"):
        build_clip("clip:tiny", weights=foreign)


def test_captions_from_classes_and_caption_tables(tmp_path, digits):
    data = captions_from_classes(digits.train, digits.info.class_names, ["a photo of a {}.", "a {} digit."], seed=0)
    assert len(data) == len(digits.train) and data.labels is not None
    assert all(c in (f"a photo of a {digits.info.class_names[int(y)]}.", f"a {digits.info.class_names[int(y)]} digit.")
               for c, y in zip(data.captions, data.labels))
    assert {c.startswith("a photo") for c in data.captions} == {True, False}  # both templates used
    with pytest.raises(ValueError, match="needs a '\\{\\}'"):
        captions_from_classes(digits.train, digits.info.class_names, ["no slot"])

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"filepath": f"images/{i}.png", "title": f"caption {i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "captions.parquet")
    for name in ("captions.csv", "captions.parquet"):
        table = load_caption_table(tmp_path / name, image_size=16)
        assert table.images.shape == (3, 3, 16, 16) and table.captions == ["caption 0", "caption 1", "caption 2"]
        assert int(table.images[2].float().mean()) == 80
    pd.DataFrame([{"filepath": "../outside.png", "title": "x"}]).to_csv(tmp_path / "escape.csv", index=False)
    with pytest.raises(ValueError, match="leaves the image folder"):
        load_caption_table(tmp_path / "escape.csv")
    pd.DataFrame([{"file": "a.png", "words": "x"}]).to_csv(tmp_path / "columns.csv", index=False)
    with pytest.raises(ValueError, match="needs one of"):
        load_caption_table(tmp_path / "columns.csv")
    with pytest.raises(FileNotFoundError, match="CSV or Parquet"):
        load_caption_table(tmp_path / "missing.csv")


def test_training_resumes_from_its_checkpoint(tmp_path, digits):
    data = captions_from_classes(digits.train.subset(torch.arange(128)), digits.info.class_names)
    config = ClipTrainConfig(epochs=2, batch_size=32, device="cpu")
    seen: list[int] = []
    first = build_clip("clip:tiny")
    history = train_clip(first, data, config, checkpoint_dir=tmp_path, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1, 2] and len(history) == 2
    again = build_clip("clip:tiny")
    assert train_clip(again, data, config, checkpoint_dir=tmp_path, on_epoch_end=lambda e, r: seen.append(e)) == history
    assert seen == [1, 2]
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_clip_learns_zero_shot_digits(digits, clean_tiny_clip):
    """Trained on captions "a photo of a {digit}." (the session's clean_tiny_clip, TINY_CLIP_SCHEDULE in
    conftest.py) the tiny CLIP classifies test digits zero-shot."""
    torch.manual_seed(0)  # the fixture's initialisation
    untrained = accuracy(ZeroShotClassifier(build_clip("clip:tiny"), digits.info), digits.test, digits.info, device="cpu")
    assert untrained < 0.3  # chance is 0.1: the bar below is earned by training
    trained = build_clip("clip:tiny", weights=clean_tiny_clip)
    acc = accuracy(ZeroShotClassifier(trained, digits.info), digits.test, digits.info, device="cpu")
    assert acc >= 0.8, acc
