"""Generated attack resources: cached by spec, rebuilt when damaged, built once under concurrency."""
import subprocess
import sys
import textwrap

import pytest
import torch

from bdcore.attacks.resources import ResourceStore, clean_surrogate, fingerprint


def _builder(calls: list, value: float = 1.0):
    def build():
        calls.append(1)
        return {"w": torch.full((3, 4), value)}, {"note": "built"}
    return build


def test_cached_by_spec_and_reused(tmp_path):
    store, calls = ResourceStore(tmp_path), []
    first = store.get_or_build("thing", {"a": 1}, _builder(calls))
    assert not first.reused and first.path.is_dir() and first.metadata == {"note": "built"}
    again = ResourceStore(tmp_path).get_or_build("thing", {"a": 1}, _builder(calls))
    assert again.reused and torch.equal(again.tensors["w"], first.tensors["w"]) and len(calls) == 1
    other = store.get_or_build("thing", {"a": 2}, _builder(calls, 2.0))
    assert not other.reused and other.path != first.path and len(calls) == 2


def test_damaged_resource_is_rebuilt(tmp_path):
    store, calls = ResourceStore(tmp_path), []
    path = store.get_or_build("thing", {"a": 1}, _builder(calls)).path
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[:-5] + b"xxxxx")
    rebuilt = store.get_or_build("thing", {"a": 1}, _builder(calls))
    assert not rebuilt.reused and len(calls) == 2
    assert store.get_or_build("thing", {"a": 1}, _builder(calls)).reused


def test_memory_store_and_bad_kind():
    store, calls = ResourceStore(None), []
    store.get_or_build("thing", {"a": 1}, _builder(calls))
    assert store.get_or_build("thing", {"a": 1}, _builder(calls)).reused and len(calls) == 1
    with pytest.raises(ValueError, match="alphanumeric"):
        store.get_or_build("../evil", {}, _builder(calls))


def test_concurrent_builders_build_once(tmp_path):
    """Two processes ask for the same resource at once: one builds, the other waits and reuses."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        from bdcore.attacks.resources import ResourceStore
        def build():
            with open({str(tmp_path / 'builds.log')!r}, 'a') as f:
                f.write('x')
            time.sleep(1.5)
            return {{'w': torch.arange(10.0)}}, {{}}
        r = ResourceStore({str(tmp_path / 'store')!r}).get_or_build('slow', {{'k': 1}}, build)
        assert torch.equal(r.tensors['w'], torch.arange(10.0))
        print('reused' if r.reused else 'built')
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outputs == ["built", "reused"]
    assert (tmp_path / "builds.log").read_text() == "x"
    leftovers = [p.name for p in (tmp_path / "store").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_clean_surrogate_is_shared(digits, resource_store):
    """The clean surrogate (the one lf, lc and trojannn share) is trained once per (data, model, budget,
    seed) and is a real model."""
    from bdcore.metrics import accuracy

    model = clean_surrogate(resource_store, digits.train, digits.info)
    assert accuracy(model, digits.test, digits.info, device="cpu") > 0.9
    spec_dirs = [p for p in resource_store.root.iterdir() if p.name.startswith("surrogate-")]
    again = clean_surrogate(resource_store, digits.train, digits.info)
    assert [p for p in resource_store.root.iterdir() if p.name.startswith("surrogate-")] == spec_dirs
    x = digits.test.images[:8].float() / 255
    from bdcore.attacks.resources import PixelSpaceModel
    assert torch.allclose(PixelSpaceModel(model, digits.info)(x), PixelSpaceModel(again, digits.info)(x))
    assert fingerprint(digits.train) != fingerprint(digits.test)


def test_show_trigger_writes_picture(tmp_path, capsys):
    from PIL import Image

    from sweep.cli import main

    out = tmp_path / "t.png"
    assert main(["show-trigger", "--attack", "blended", "--dataset", "digits", "--n", "4", "--out", str(out),
                 "--cache", str(tmp_path)]) == 0
    picture = Image.open(out)
    assert picture.size == (2 + 4 * 34, 2 + 3 * 34)  # 4 columns; clean / poisoned / difference rows
    assert "mean |change| per pixel" in capsys.readouterr().out
    assert main(["show-trigger", "--attack", "nope", "--dataset", "digits", "--out", str(out)]) == 2
    assert main(["show-trigger", "--attack", "blended", "--dataset", "digits", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must name a .png" in capsys.readouterr().err


def test_show_trigger_of_a_trained_attack_cell(tmp_path, capsys, digits):
    from PIL import Image

    from bdcore.cells import AttackCellSpec, run_attack_cell
    from sweep.cli import main

    spec = AttackCellSpec(dataset="digits", model="smallcnn", attack="badnet", ratio=0.1, target=2,
                          train={"epochs": 1})
    cell = run_attack_cell(spec, tmp_path, data=digits)
    out = tmp_path / "cell.png"
    assert main(["show-trigger", "--artifact", str(cell.path), "--n", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 + 3 * 34, 2 + 3 * 34)
    assert "badnet on digits" in capsys.readouterr().out
    assert main(["show-trigger", "--artifact", str(cell.path), "--attack", "blended", "--out", str(out)]) == 2
    assert "does not match the artifact's 'badnet'" in capsys.readouterr().err
    assert main(["show-trigger", "--artifact", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert main(["show-trigger", "--attack", "badnet", "--out", str(out)]) == 2
    assert "--artifact DIR" in capsys.readouterr().err
