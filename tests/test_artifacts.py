import json
import os
import pickle

import pytest
import torch

from bdcore.artifacts import ArtifactError, load_artifact, save_artifact


def sample_state():
    return {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(2)}


def test_roundtrip_and_hashes(tmp_path):
    folder = save_artifact(tmp_path / "a", sample_state(), {"kind": "attack", "poison_indices": [1, 5]},
                           extra={"attack.mask": torch.ones(1, 2, 2, dtype=torch.bool)})
    art = load_artifact(folder)
    assert torch.equal(art.model_state["w"], sample_state()["w"])
    assert art.extra["attack.mask"].dtype == torch.bool
    meta = art.metadata
    assert meta["poison_indices"] == [1, 5] and meta["versions"]["torch"] == torch.__version__
    assert set(meta["files"]) == {"model.safetensors", "extra.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left behind


def test_overwrite_is_atomic_swap(tmp_path):
    save_artifact(tmp_path / "a", sample_state(), {"v": 1})
    save_artifact(tmp_path / "a", {"w": torch.zeros(1)}, {"v": 2})
    assert load_artifact(tmp_path / "a").metadata["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-7]), "corrupted"),
    (lambda f: (f / "model.safetensors").unlink(), "incomplete"),
    (lambda f: (f / "metadata.json").unlink(), "metadata.json is missing"),
    (lambda f: (f / "metadata.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "metadata.json").write_text(json.dumps({"format": "other"})), "not a bdcore artifact"),
])
def test_damaged_artifacts_are_refused(tmp_path, damage, message):
    folder = save_artifact(tmp_path / "a", sample_state(), {})
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


def test_planted_pickle_is_never_executed(tmp_path):
    """A pickle planted as the weights file (with a matching hash) is refused, and its code never runs."""
    folder = save_artifact(tmp_path / "a", sample_state(), {})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    (folder / "model.safetensors").write_bytes(payload)
    meta = json.loads((folder / "metadata.json").read_text())
    import hashlib

    meta["files"]["model.safetensors"] = hashlib.sha256(payload).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="cannot read"):
        load_artifact(folder)
    assert not marker.exists()
