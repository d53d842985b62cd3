"""Bad input battery (issue 11): each row is one bad input given to `bdsweep` in-process. Every one
must end with exit code 2 and exactly one error line on stderr saying what is wrong and where,
with nothing run and nothing lost: the output folder of an earlier, finished sweep that each case
starts from is byte for byte the same afterwards, and no file or folder appeared anywhere (no
cells/, tune/ or mlflow.db: Ray, MLflow and training never started)."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import save_file

from bdcore.data import DatasetError, DatasetInfo, load_dataset
from bdcore.models import build_model
from sweep.cli import main
from sweep.layout import SweepLayout
from sweep.results import compact, write_row
from tests.test_results import make_row

ERROR_PREFIX = "bdsweep: error: "
BASE_GRID = {
    "name": "t",
    "datasets": ["digits"],
    "models": ["smallcnn"],
    "attacks": ["badnet"],
    "ratios": [0.1],
    "defenses": ["ft"],
    "train": {"epochs": 1},
}
PLAN_AND_RUN = None  # argv of a grid case: `bdsweep plan` and `bdsweep run`, both must refuse
CELL = ["cell", "--dataset", "digits", "--model", "smallcnn", "--attack", "badnet", "--ratio", "0.1",
        "--defense", "ft", "--out", "{out}", "--quiet"]


def grid(**changes: Any) -> dict:
    return {**BASE_GRID, **changes}


def cell(**flags: str) -> list[str]:
    """The CELL command line with some flags changed or added (`data_root` -> --data-root)."""
    argv = list(CELL)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


# -- files the cases give: datasets in their real layouts, weights files -----------------------

RNG = np.random.default_rng(0)


def write_cifar10(folder: Path, side: int = 32) -> None:
    """The official CIFAR-10 python layout with two images per batch, of side x side pixels."""
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, size=(2, 3 * side * side), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2))
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))


def write_tiny(base: Path, side: int = 64) -> Path:
    """tiny-imagenet-200 with two classes of two side x side training images and one val image."""
    root = base / "tiny-imagenet-200"
    wnids = ["n01000000", "n02000000"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(2):
            image = RNG.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    Image.fromarray(RNG.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(root / "val" / "images" / "v.JPEG")
    (root / "val" / "val_annotations.txt").write_text(f"v.JPEG\t{wnids[0]}\t0\t0\t9\t9\n")
    return root


def write_imagefolder_with_a_corrupt_image(root: Path) -> None:
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "0.png").write_bytes(b"this is not a png")


def write_gtsrb_without_test(root: Path) -> None:
    (root / "Train" / "00000").mkdir(parents=True)
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    (root / "Train" / "00000" / "GT-00000.csv").write_text(header)


def use_empty_default_cifar_folder(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$BDCORE_DATA_ROOT/cifar-10-batches-py exists, empty: a default folder that is there is checked."""
    (tmp / "data" / "cifar-10-batches-py").mkdir(parents=True)
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT", raising=False)
    monkeypatch.setenv("BDCORE_DATA_ROOT", str(tmp / "data"))


def write_weights(path: Path, model: str = "smallcnn", num_classes: int = 10) -> None:
    info = DatasetInfo("x", num_classes, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    save_file(build_model(model, info).state_dict(), str(path))


def write_truncated_weights(path: Path) -> None:
    write_weights(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def clip_grid(**train: Any) -> dict:
    """A CLIP grid (clip:tiny needs no weights file) with some CLIP training settings."""
    return grid(models=["clip:tiny"], attacks=["badnet_clip"], defenses=["ft_clip"], train={"epochs": 1, **train})


def write_caption_table(tmp: Path, header: str = "image,caption") -> None:
    """{tmp}/pairs.csv, a real two-row CSV with `header`, and the images it names in {tmp}/images."""
    (tmp / "images").mkdir()
    for i in range(2):
        Image.fromarray(RNG.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    (tmp / "pairs.csv").write_text(f"{header}\n0.png,a photo of a 0.\n1.png,a photo of a 1.\n")


def use_empty_default_clip_weights_folder(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$BDCORE_WEIGHTS_ROOT/clip/RN50 exists and holds no weights file: a default folder that is there."""
    (tmp / "weights" / "clip" / "RN50").mkdir(parents=True)
    (tmp / "weights" / "clip" / "RN50" / "README.txt").write_text("put the weights here")
    monkeypatch.setenv("BDCORE_WEIGHTS_ROOT", str(tmp / "weights"))


def write_plain_folder(tmp: Path) -> None:
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("not a sweep")


# -- the battery ----------------------------------------------------------------------------

class Case(NamedTuple):
    id: str
    grid: str | dict | None  # grid.yaml's text or content (None: no grid file)
    argv: list[str] | None  # {grid}, {out}, {tmp} are replaced; PLAN_AND_RUN for grid cases
    expected: str  # in the error line ({tmp} replaced); grid cases also name grid.yaml
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None  # writes input files into {tmp}


CASES = [
    # malformed YAML
    Case("yaml-tab-indent", "name: t\ndatasets:\n\t- digits\n", PLAN_AND_RUN,
         "grid.yaml: line 3: invalid YAML: found character '\\t' that cannot start any token"),
    Case("yaml-unclosed-bracket", "name: t\ndatasets: [digits\nmodels: [smallcnn]\n", PLAN_AND_RUN,
         "grid.yaml: line 3: invalid YAML: expected ',' or ']'"),
    Case("yaml-top-level-list", "- digits\n- smallcnn\n", PLAN_AND_RUN,
         "grid.yaml: a grid is a mapping (name, datasets, models, ...), got a list"),
    Case("yaml-empty-file", "", PLAN_AND_RUN, "grid.yaml: a grid is a mapping (name, datasets, models, ...), "
         "got an empty file"),
    Case("yaml-duplicate-key", "name: t\nname: u\n", PLAN_AND_RUN,
         "grid.yaml: line 2: invalid YAML: duplicate key 'name'"),
    Case("grid-file-missing", None, ["run", "{tmp}/nowhere.yaml", "--out", "{out}"],
         "{tmp}/nowhere.yaml: cannot read the grid file (No such file or directory)"),
    Case("grid-file-is-a-folder", None, ["plan", "{tmp}", "--out", "{out}"],
         "cannot read the grid file (Is a directory)"),
    # unknown keys
    Case("unknown-top-level-key", grid(ratio=[0.1]), PLAN_AND_RUN,
         "grid.yaml: ratio: unknown key 'ratio' (accepted: name, datasets, models, attacks, ratios"),
    Case("unknown-nested-key", grid(attacks=[{"name": "badnet", "parms": {"patch_size": 3}}]), PLAN_AND_RUN,
         "grid.yaml: attacks[0].parms: unknown key 'parms' (accepted: name, params); did you mean 'params'?"),
    Case("unknown-resources-key", grid(resources={"attack": {"gpus": 1}}), PLAN_AND_RUN,
         "grid.yaml: resources.attack.gpus: unknown key 'gpus' (accepted: cpu, gpu); did you mean 'gpu'?"),
    # wrong types
    Case("ratios-a-string", grid(ratios="abc"), PLAN_AND_RUN,
         "grid.yaml: ratios: Input should be a valid list (got 'abc')"),
    Case("seeds-float", grid(seeds=[1.5]), PLAN_AND_RUN,
         "grid.yaml: seeds[0]: Input should be a valid integer (got 1.5)"),
    Case("epochs-a-word", grid(train={"epochs": "ten"}), PLAN_AND_RUN,
         "grid.yaml: train.epochs: Input should be a valid integer, unable to parse string as an integer (got 'ten')"),
    Case("negative-cpu", grid(resources={"attack": {"cpu": -1}}), PLAN_AND_RUN,
         "grid.yaml: resources.attack.cpu: Input should be greater than or equal to 0 (got -1)"),
    Case("ratio-a-bool", grid(ratios=[True]), PLAN_AND_RUN,
         "grid.yaml: ratios[0]: Input should be a valid number (got True)"),
    # ratios outside (0, 1)
    Case("ratio-0", grid(ratios=[0.1, 0]), PLAN_AND_RUN,
         "grid.yaml: ratios[1]: a poisoning ratio lies strictly between 0 and 1, e.g. 0.1 for 10% of the training "
         "set (got 0.0)"),
    Case("ratio-1", grid(ratios=[1]), PLAN_AND_RUN,
         "grid.yaml: ratios[0]: a poisoning ratio lies strictly between 0 and 1"),
    Case("ratio-negative", grid(ratios=[-0.1]), PLAN_AND_RUN,
         "ratios[0]: a poisoning ratio lies strictly between 0 and 1"),
    Case("ratio-above-1", grid(ratios=[1.5]), PLAN_AND_RUN,
         "ratios[0]: a poisoning ratio lies strictly between 0 and 1"),
    Case("include-ratio-1",
         grid(include=[{"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 1.0}]),
         PLAN_AND_RUN, "grid.yaml: include[0].ratio: a poisoning ratio lies strictly between 0 and 1, e.g. 0.1"),
    # empty axes
    Case("no-attacks", grid(attacks=[]), PLAN_AND_RUN, "grid.yaml: attacks: List should have at least 1 item"),
    Case("no-datasets", grid(datasets=[]), PLAN_AND_RUN, "grid.yaml: datasets: List should have at least 1 item"),
    Case("no-models", grid(models=[]), PLAN_AND_RUN, "grid.yaml: models: List should have at least 1 item"),
    Case("no-ratios", grid(ratios=[]), PLAN_AND_RUN, "grid.yaml: ratios: List should have at least 1 item"),
    # unknown names and parameters
    Case("unknown-attack", grid(attacks=["badnett"]), PLAN_AND_RUN,
         "grid.yaml: attacks[0].name: unknown attack 'badnett' (known: adap_blend, adap_patch"),
    Case("unknown-defense", grid(defenses=["fq"]), PLAN_AND_RUN,
         "grid.yaml: defenses[0].name: unknown defense 'fq' (known: "),
    Case("unknown-model", grid(models=["resnet99"]), PLAN_AND_RUN,
         "grid.yaml: models[0].name: unknown model 'resnet99' (known: "),
    Case("unknown-dataset", grid(datasets=["cifar11"]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].name: unknown dataset 'cifar11' (known: cifar10, cifar100, digits"),
    Case("unknown-attack-param", grid(attacks=[{"name": "badnet", "params": {"nonsense": 1}}]), PLAN_AND_RUN,
         "grid.yaml: attacks[0].params: unknown parameter 'nonsense' for attack 'badnet' (accepted: patch_size"),
    Case("unknown-defense-param", grid(defenses=[{"name": "ft", "params": {"epoks": 3}}]), PLAN_AND_RUN,
         "grid.yaml: defenses[0].params: unknown parameter 'epoks' for defense 'ft' (accepted: "),
    Case("bad-attack-param-value", grid(attacks=[{"name": "blended", "params": {"alpha": 2}}]), PLAN_AND_RUN,
         "grid.yaml: attacks[0].params.alpha: Input should be less than or equal to 1 (got 2)"),
    # names that become paths; writes that would leave their folder
    Case("sweep-name-escapes", grid(name="../escape"), PLAN_AND_RUN,
         "grid.yaml: name: the sweep name must be a plain name: letters, digits, '_', '.' and '-', not starting with "
         "'.' or '-', no '/'"),
    Case("sweep-name-dotdot", grid(name=".."), PLAN_AND_RUN, "grid.yaml: name: the sweep name must be a plain name"),
    Case("defense-label-with-slash", grid(defenses=[{"name": "ft", "label": "ft/short"}]), PLAN_AND_RUN,
         "grid.yaml: defenses[0].label: a defense label must be a plain name"),
    Case("run-out-is-a-file", grid(), ["run", "{grid}", "--out", "{out}/sweep.json"],
         "--out '{out}/sweep.json' is a file; the output folder must be a folder"),
    Case("report-out-is-the-output-folder", None, ["report", "{out}", "--out", "{out}"],
         "--out: report folder '{out}' is the output folder '{out}' or holds it: writing the report there would "
         "delete the sweep"),
    Case("report-out-escapes-to-the-parent", None, ["report", "{out}", "--out", "{out}/.."],
         "--out: report folder '{out}/..' is the output folder '{out}' or holds it"),
    Case("report-out-over-the-results", None, ["report", "{out}", "--out", "{out}/results"],
         "--out: report folder '{out}/results' holds other files, which the report would replace"),
    Case("query-writes-outside", None, ["query", "{out}", "COPY (SELECT * FROM results) TO '{out}/../x.csv'"],
         "file system operations are disabled"),
    # dataset folders
    Case("dataset-root-missing", grid(datasets=[{"name": "cifar10", "root": "{tmp}/no-cifar"}]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].root: cifar10: dataset not found or malformed at '{tmp}/no-cifar'. Expected layout: "
         "cifar-10-batches-py/ data_batch_1"),
    Case("dataset-root-missing-says-why", grid(datasets=[{"name": "gtsrb", "root": "{tmp}/no-gtsrb"}]), PLAN_AND_RUN,
         "An explicit `root` must exist where the grid is planned"),
    Case("dataset-root-empty", grid(datasets=[{"name": "cifar10", "root": "{tmp}/empty"}]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].root: cifar10: dataset not found or malformed at '{tmp}/empty/data_batch_1'",
         lambda tmp, mp: (tmp / "empty").mkdir()),
    Case("dataset-layout-incomplete", grid(datasets=[{"name": "gtsrb", "root": "{tmp}/gtsrb"}]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].root: gtsrb: dataset not found or malformed at '{tmp}/gtsrb'. Expected layout: "
         "gtsrb/ Train/000xx/GT-000xx.csv", lambda tmp, mp: write_gtsrb_without_test(tmp / "gtsrb")),
    Case("dataset-cifar-images-64px", grid(datasets=[{"name": "cifar10", "root": "{tmp}/cifar"}]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].root: {tmp}/cifar/test_batch: 'data' must be a uint8 N x 3072 array (32x32 RGB "
         "images), got uint8 (2, 12288), i.e. 64x64 images", lambda tmp, mp: write_cifar10(tmp / "cifar", side=64)),
    Case("dataset-tiny-images-32px", grid(datasets=[{"name": "tiny", "root": "{tmp}"}]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].root: {tmp}/tiny-imagenet-200/train/n01000000/images/n01000000_0.JPEG: image is "
         "32x32 pixels; every tiny image is 64x64", lambda tmp, mp: write_tiny(tmp, side=32)),
    Case("dataset-corrupt-image", grid(datasets=[{"name": "imagefolder", "root": "{tmp}/folder"}]), PLAN_AND_RUN,
         "grid.yaml: datasets[0].root: {tmp}/folder/train/cat/0.png: cannot read image",
         lambda tmp, mp: write_imagefolder_with_a_corrupt_image(tmp / "folder")),
    Case("default-dataset-folder-malformed", grid(datasets=["cifar10"]), PLAN_AND_RUN,
         "grid.yaml: datasets[0]: cifar10: dataset not found or malformed at "
         "'{tmp}/data/cifar-10-batches-py/data_batch_1'", lambda tmp, mp: use_empty_default_cifar_folder(tmp, mp)),
    Case("dataset-root-above-a-renamed-cifar-folder", grid(datasets=[{"name": "cifar10", "root": "{tmp}/dl"}]),
         PLAN_AND_RUN, "grid.yaml: datasets[0].root: cifar10: dataset not found or malformed at '{tmp}/dl/data_batch_1' "
         "(did you mean '{tmp}/dl/c10'?)", lambda tmp, mp: write_cifar10(tmp / "dl" / "c10")),
    Case("dataset-root-above-a-renamed-gtsrb-folder", grid(datasets=[{"name": "gtsrb", "root": "{tmp}"}]),
         PLAN_AND_RUN, "grid.yaml: datasets[0].root: gtsrb: dataset not found or malformed at '{tmp}' (did you mean "
         "'{tmp}/signs'?)", lambda tmp, mp: write_gtsrb_without_test(tmp / "signs")),
    # weights files
    Case("weights-of-another-architecture",
         grid(models=[{"name": "preactresnet18", "pretrained": "{tmp}/small.safetensors"}]),
         PLAN_AND_RUN, "grid.yaml: models[0].pretrained: weights file '{tmp}/small.safetensors' does not fit model "
         "'preactresnet18': 0 of 102 tensors match by name and shape; first mismatch: 'conv1.weight' is [64, 3, 3, 3] "
         "in the model, absent in the file", lambda tmp, mp: write_weights(tmp / "small.safetensors")),
    Case("weights-missing", grid(models=[{"name": "smallcnn", "pretrained": "{tmp}/none.safetensors"}]), PLAN_AND_RUN,
         "grid.yaml: models[0].pretrained: weights file '{tmp}/none.safetensors' does not exist"),
    Case("weights-truncated", grid(models=[{"name": "smallcnn", "pretrained": "{tmp}/cut.safetensors"}]), PLAN_AND_RUN,
         "grid.yaml: models[0].pretrained: cannot read weights file '{tmp}/cut.safetensors'",
         lambda tmp, mp: write_truncated_weights(tmp / "cut.safetensors")),
    Case("weights-garbage-pt", grid(models=[{"name": "smallcnn", "pretrained": "{tmp}/junk.pt"}]), PLAN_AND_RUN,
         "grid.yaml: models[0].pretrained: cannot read weights file '{tmp}/junk.pt': not a state dict of tensors "
         "(Unsupported operand",
         lambda tmp, mp: (tmp / "junk.pt").write_bytes(b"\x00\xffnot weights" * 9)),
    Case("include-weights-missing",
         grid(include=[{"dataset": "digits", "model": {"name": "smallcnn", "pretrained": "{tmp}/w.pt"},
                        "attack": "badnet", "ratio": 0.05}]),
         PLAN_AND_RUN, "grid.yaml: include[0].model.pretrained: weights file '{tmp}/w.pt' does not exist"),
    Case("clip-default-weights-folder-empty", grid(models=["clip:RN50"], attacks=["badnet_clip"],
                                                   defenses=["ft_clip"]), PLAN_AND_RUN,
         "grid.yaml: models[0]: no weights for clip:RN50: put the open_clip weights file",
         lambda tmp, mp: use_empty_default_clip_weights_folder(tmp, mp)),
    # CLIP caption tables
    Case("clip-caption-table-missing", clip_grid(captions="{tmp}/none.csv"), PLAN_AND_RUN,
         "grid.yaml: train.captions: caption table '{tmp}/none.csv' does not exist; expected a CSV or Parquet file "
         "(.csv, .tsv or .parquet) with an image path column (image/filepath/image_path/path) and a caption column"),
    Case("clip-caption-table-without-caption-column", clip_grid(captions="{tmp}/pairs.csv"), PLAN_AND_RUN,
         "grid.yaml: train.captions: caption table '{tmp}/pairs.csv' has columns ['image', 'label']; it needs one "
         "of ['image', 'filepath', 'image_path', 'path'] and one of ['caption', 'title', 'text']",
         lambda tmp, mp: write_caption_table(tmp, header="image,label")),
    Case("clip-caption-table-not-parquet", clip_grid(captions="{tmp}/pairs.parquet"), PLAN_AND_RUN,
         "grid.yaml: train.captions: cannot read caption table '{tmp}/pairs.parquet' as PARQUET: ",
         lambda tmp, mp: (tmp / "pairs.parquet").write_bytes(b"image,caption\n0.png,a cat\n")),
    Case("clip-image-root-missing", clip_grid(captions="{tmp}/pairs.csv", image_root="{tmp}/no-images"),
         PLAN_AND_RUN, "grid.yaml: train.image_root: image folder '{tmp}/no-images' does not exist; `image_root` is "
         "the existing folder the caption table's image paths are relative to", lambda tmp, mp: write_caption_table(tmp)),
    Case("clip-override-caption-table-missing",
         {**clip_grid(), "overrides": [{"match": {"attack": "badnet_clip"}, "train": {"captions": "{tmp}/o.tsv"}}]},
         PLAN_AND_RUN, "grid.yaml: overrides[0].train.captions: caption table '{tmp}/o.tsv' does not exist"),
    # other flags and commands
    Case("max-concurrent-0", grid(), ["run", "{grid}", "--out", "{out}", "--max-concurrent", "0"],
         "--max-concurrent must be >= 1, got 0"),
    Case("run-resources-unknown-stage", grid(), ["run", "{grid}", "--out", "{out}", "--resources", "attacks.gpu=0"],
         "--resources 'attacks.gpu=0': expected STAGE.KEY=VALUE with STAGE attack, defense, analysis, KEY cpu or "
         "gpu and VALUE a number >= 0, e.g. attack.gpu=0"),
    Case("run-resources-unknown-key", grid(), ["run", "{grid}", "--out", "{out}", "--resources", "defense.mem=2"],
         "--resources 'defense.mem=2': expected STAGE.KEY=VALUE with STAGE attack"),
    Case("run-resources-negative", grid(), ["run", "{grid}", "--out", "{out}", "--resources", "attack.cpu=-1"],
         "--resources 'attack.cpu=-1': '-1' is not a number >= 0; expected STAGE.KEY=VALUE"),
    Case("run-resources-fractional-gpus-above-1", grid(),
         ["run", "{grid}", "--out", "{out}", "--resources", "attack.gpu=1.5"],
         "--resources: attack: gpu 1.5: fractional GPUs are only possible below 1 (Ray's rule)"),
    Case("status-traceback-of-no-cell", None, ["status", "{out}", "--traceback", "0123456789abcdef"],
         "--traceback 0123456789abcdef: no such cell in {out} (no marker {out}/cells/0123456789abcdef.json)"),
    Case("cell-ratio-2", None, cell(ratio="2.0"), "--ratio 2: a poisoning ratio lies strictly between 0 and 1"),
    Case("cell-ratio-1", None, cell(ratio="1"), "--ratio 1: a poisoning ratio lies strictly between 0 and 1"),
    Case("cell-unknown-attack", None, cell(attack="badnot"), "unknown attack 'badnot'; known attacks: adap_blend"),
    Case("cell-data-root-missing", None, cell(dataset="cifar10", data_root="{tmp}/nothing"),
         "cifar10: dataset not found or malformed at '{tmp}/nothing'. Expected layout: cifar-10-batches-py/ "
         "data_batch_1"),
    Case("cell-tiny-images-32px", None, cell(dataset="tiny", data_root="{tmp}"),
         "image is 32x32 pixels; every tiny image is 64x64", lambda tmp, mp: write_tiny(tmp, side=32)),
    Case("cell-weights-of-another-architecture", None,
         cell(model="preactresnet18", pretrained="{tmp}/small.safetensors"),
         "weights file '{tmp}/small.safetensors' does not fit model 'preactresnet18'",
         lambda tmp, mp: write_weights(tmp / "small.safetensors")),
    Case("results-folder-missing", None, ["results", "{tmp}/no-sweep"], "{tmp}/no-sweep: no such output folder"),
    Case("results-bad-where", None, ["results", "{out}", "--where", "attack =="],
         "bad where expression 'attack ==': SyntaxError"),
    Case("results-pivot-unknown-column", None, ["results", "{out}", "--pivot", "attack", "defense", "asrr"],
         "pivot: unknown column(s) ['asrr']; columns: cell_id"),
    Case("query-folder-missing", None, ["query", "{tmp}/no-sweep", "SELECT 1"],
         "{tmp}/no-sweep: no such output folder"),
    Case("report-folder-missing", None, ["report", "{tmp}/no-sweep"], "{tmp}/no-sweep: no such output folder"),
    Case("status-folder-missing", None, ["status", "{tmp}/no-sweep"], "{tmp}/no-sweep: no such output folder"),
    # a folder that is there but is no sweep's output: a plain one, or the parent of the sweep ({tmp} holds out/)
    *[Case(f"{argv[0]}-{kind}-folder", None, [argv[0], folder, *argv[1:]], expected, setup)
      for argv in (["results"], ["status"], ["query", "SELECT 1"], ["report"])
      for kind, folder, expected, setup in (
          ("plain", "{tmp}/plain", "{tmp}/plain: not a sweep output folder (no sweep.json, cells/ or results/ in "
           "it); give the folder `bdsweep run --out` wrote", lambda tmp, mp: write_plain_folder(tmp)),
          ("parent", "{tmp}", "{tmp}: not a sweep output folder (no sweep.json, cells/ or results/ in it); sweep "
           "folders under it: {tmp}/out", None))],
]


# -- the checks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """The output folder of an earlier sweep: a marker, compacted results, sweep.json, a report."""
    out = tmp_path_factory.mktemp("finished") / "out"
    write_row(out, make_row("c0", sweep="t"))
    compact(out)
    SweepLayout(out).write_marker("c0", {"row": {"cell_id": "c0", "status": "done"}})
    (out / "sweep.json").write_text('{"name": "t"}')
    (out / "report").mkdir()
    (out / "report" / "report.html").write_text("<html>an older report</html>")
    return out


@pytest.fixture
def nothing_runs(monkeypatch):
    """Any sweep, training or cell reaching its start fails the case loudly."""
    import bdcore.cells
    import sweep.runner

    def started(*args, **kwargs):
        raise AssertionError("bad input reached the point where work starts")

    for module, name in ((sweep.runner, "run_sweep"), (bdcore.cells, "run_attack_cell"),
                         (bdcore.cells, "run_defense_cell")):
        monkeypatch.setattr(module, name, started)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def check_refused(case: Case, tmp_path: Path, finished_sweep: Path, capsys, monkeypatch) -> None:
    """Run `case`; assert exit 2, one error line holding `case.expected`, and no file changed or added."""
    out = tmp_path / "out"
    shutil.copytree(finished_sweep, out)
    grid_path = tmp_path / "grid.yaml"
    if case.grid is not None:
        text = case.grid if isinstance(case.grid, str) else yaml.safe_dump(case.grid, sort_keys=False)
        grid_path.write_text(text.replace("{tmp}", str(tmp_path)))
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)

    def fill(text: str) -> str:
        return text.replace("{grid}", str(grid_path)).replace("{out}", str(out)).replace("{tmp}", str(tmp_path))

    commands = [case.argv] if case.argv is not PLAN_AND_RUN else [
        ["plan", "{grid}", "--out", "{out}"], ["run", "{grid}", "--out", "{out}"]]
    before = snapshot(tmp_path)
    capsys.readouterr()
    for argv in commands:
        argv = [fill(a) for a in argv]
        rc = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert rc == 2, (argv, rc, captured)
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), (argv, captured.err)
        assert fill(case.expected) in lines[0], (argv, lines[0])
        if case.argv is PLAN_AND_RUN:
            assert f"{grid_path}: " in lines[0]  # where: the grid file, then the key path
        assert captured.out == "" and "Traceback" not in captured.err
        assert snapshot(tmp_path) == before, f"{argv} changed or added files"


def test_the_battery_has_30_cases_or_more():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_nothing_run_nothing_lost(case, tmp_path, finished_sweep, capsys,
                                                                     monkeypatch, nothing_runs):
    check_refused(case, tmp_path, finished_sweep, capsys, monkeypatch)


# -- the rules above, from the other side -------------------------------------------------------

def test_weights_with_another_class_count_are_accepted(tmp_path, capsys):
    """A file of the same architecture with another head fits: its head is re-initialised (fine-tuning)."""
    write_weights(tmp_path / "w43.safetensors", num_classes=43)
    grid_path = tmp_path / "grid.yaml"
    weights = str(tmp_path / "w43.safetensors")
    grid_path.write_text(yaml.safe_dump(grid(models=[{"name": "smallcnn", "pretrained": weights}])))
    assert main(["plan", str(grid_path), "--out", str(tmp_path / "out")]) == 0
    assert "2 cells" in capsys.readouterr().out


def test_a_missing_default_dataset_folder_is_only_a_warning(tmp_path, monkeypatch, capsys):
    """Without `root` the data may live on the cluster alone: planning warns and goes on."""
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT", raising=False)
    monkeypatch.setenv("BDCORE_DATA_ROOT", str(tmp_path / "data"))
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid(datasets=["cifar10"])))
    assert main(["plan", str(grid_path), "--out", str(tmp_path / "out")]) == 0
    assert "warning: dataset 'cifar10': no folder at" in capsys.readouterr().out


def test_good_dataset_folders_pass_the_plan_check(tmp_path, capsys):
    write_cifar10(tmp_path / "cifar")
    write_tiny(tmp_path)
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid(datasets=[{"name": "cifar10", "root": str(tmp_path / "cifar")},
                                                       {"name": "tiny", "root": str(tmp_path)}])))
    assert main(["plan", str(grid_path), "--out", str(tmp_path / "out")]) == 0
    assert "4 cells" in capsys.readouterr().out


def test_the_tiny_loader_refuses_an_image_of_another_size_past_the_first(tmp_path):
    """The plan looks at one image; the loader looks at all of them and names the odd one."""
    root = write_tiny(tmp_path)
    odd = root / "train" / "n02000000" / "images" / "n02000000_1.JPEG"
    Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(DatasetError, match=r"n02000000_1\.JPEG: image is 48x48 pixels; every tiny image is 64x64"):
        load_dataset("tiny", root=tmp_path)


def test_a_caption_table_and_its_image_folder_pass_the_plan_check(tmp_path, capsys):
    write_caption_table(tmp_path)
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(clip_grid(captions=str(tmp_path / "pairs.csv"),
                                                  image_root=str(tmp_path / "images"))))
    assert main(["plan", str(grid_path), "--out", str(tmp_path / "out")]) == 0
    assert "2 cells" in capsys.readouterr().out


def test_a_cifar_root_may_be_the_folder_holding_cifar_10_batches_py(tmp_path, capsys):
    """Both spellings of `root` read the same files and give the same cell ids."""
    from sweep.grid import dataset_fingerprint, expand, parse_grid

    write_cifar10(tmp_path / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", root=tmp_path).train) == 10
    grids = {root: grid(datasets=[{"name": "cifar10", "root": str(root)}])
             for root in (tmp_path, tmp_path / "cifar-10-batches-py")}
    for root, content in grids.items():
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(content))
        assert main(["plan", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out")]) == 0, root
        assert "2 cells" in capsys.readouterr().out
    assert dataset_fingerprint("cifar10", tmp_path) == dataset_fingerprint("cifar10", tmp_path / "cifar-10-batches-py")
    ids = [[c.cell_id for c in expand(parse_grid(yaml.safe_dump(g))).attacks] for g in grids.values()]
    assert ids[0] == ids[1]


def test_results_piped_into_head_end_quietly(tmp_path, finished_sweep):
    """`bdsweep results DIR --format csv | head -1`: no BrokenPipeError traceback, exit code 141
    (128 + SIGPIPE, what the shell reports for `cat` in the same pipe)."""
    import subprocess
    import sys

    out = tmp_path / "many"
    for i in range(300):  # some 100 KB of CSV: more than a pipe holds, so writing blocks until the reader left
        write_row(out, make_row(f"c{i:03d}", artifact="/runs/attacks/" + "x" * 300))
    compact(out)
    repo = Path(__file__).resolve().parent.parent
    for folder, lines_read in ((out, 1), (finished_sweep, 0)):  # 0: the reader is gone before anything is written
        proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "results", str(folder), "--format", "csv"],
                                cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = [proc.stdout.readline() for _ in range(lines_read)]
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, stderr
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
        assert all(line.startswith(b"cell_id,") for line in first)
