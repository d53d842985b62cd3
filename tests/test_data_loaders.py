"""Dataset loaders: each test writes a few files in the real on-disk format, then loads them."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bdcore.data import DatasetError, load_dataset
from bdcore.data.safe_pickle import SafeUnpickler

RNG = np.random.default_rng(0)


def random_image(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def as_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------- CIFAR


def dump_py2_pickle(obj, path, legacy_numpy: bool = False) -> None:
    """Protocol 2 with bytes keys, like the official (Python 2) CIFAR files; `legacy_numpy`
    names numpy.core.multiarray, as files written by numpy 1.x / Python 2 do."""
    data = pickle.dumps(obj, protocol=2)
    if legacy_numpy:
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


def write_cifar_batch(path, n: int, label_key: bytes, num_classes: int, legacy_numpy=False):
    images = RNG.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = [int(x) for x in RNG.integers(0, num_classes, size=n)]
    batch = {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": images.reshape(n, 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [0] * n
    dump_py2_pickle(batch, path, legacy_numpy)
    return images, labels


def make_cifar10(folder, n_per_batch=3, num_names=10):
    folder.mkdir(parents=True)
    written = [write_cifar_batch(folder / f"data_batch_{i}", n_per_batch, b"labels", 10) for i in range(1, 6)]
    test = write_cifar_batch(folder / "test_batch", 4, b"labels", 10)
    names = [f"class{i}".encode() for i in range(num_names)]
    dump_py2_pickle({b"num_cases_per_batch": n_per_batch, b"label_names": names, b"num_vis": 3072},
                    folder / "batches.meta")
    return written, test


def test_cifar10_loads_official_python_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written, (test_images, test_labels) = make_cifar10(folder)
    splits = load_dataset("cifar10", root=folder)

    assert splits.train.images.shape == (15, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.dtype == torch.int64
    assert torch.equal(splits.train.images, torch.from_numpy(np.concatenate([w[0] for w in written])))
    assert splits.train.labels.tolist() == [label for w in written for label in w[1]]
    assert torch.equal(splits.test.images, torch.from_numpy(test_images))
    assert splits.test.labels.tolist() == test_labels
    info = splits.info
    assert (info.name, info.num_classes, info.image_shape) == ("cifar10", 10, (3, 32, 32))
    assert info.hflip is True and info.normalize is True
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.247, 0.243, 0.261)
    assert info.class_names == tuple(f"class{i}" for i in range(10))


def test_cifar100_loads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_images, train_labels = write_cifar_batch(folder / "train", 5, b"fine_labels", 100, legacy_numpy=True)
    test_images, test_labels = write_cifar_batch(folder / "test", 2, b"fine_labels", 100, legacy_numpy=True)
    names = [f"fine{i}".encode() for i in range(100)]
    dump_py2_pickle({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, folder / "meta", True)
    assert b"numpy.core.multiarray" in (folder / "train").read_bytes()  # the Python 2 era name

    splits = load_dataset("cifar100", root=folder)
    assert torch.equal(splits.train.images, torch.from_numpy(train_images))
    assert splits.train.labels.tolist() == train_labels and splits.test.labels.tolist() == test_labels
    assert torch.equal(splits.test.images[1], torch.from_numpy(test_images[1]))
    assert splits.info.num_classes == 100 and splits.info.hflip is False
    assert splits.info.mean == (0.5071, 0.4865, 0.4409) and splits.info.std == (0.2673, 0.2564, 0.2762)
    assert splits.info.class_names[7] == "fine7"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo hacked > {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    marker = tmp_path / "hacked.txt"
    dump_py2_pickle({b"data": Evil(marker), b"labels": [0]}, folder / "data_batch_1")

    with pytest.raises(DatasetError) as excinfo:
        load_dataset("cifar10", root=folder)
    message = str(excinfo.value)
    assert "refusing to unpickle" in message and "system" in message
    assert str(folder / "data_batch_1") in message
    assert not marker.exists()


# What Python 2's cPickle wrote for {"data": np.array([[7, 9]], np.uint8), "labels": [3]}: str as
# SHORT_BINSTRING (read back as bytes), the array via numpy.core.multiarray._reconstruct.
PY2_PICKLE = (
    b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00"
    b"\x85U\x01b\x87Rq\x04(K\x01K\x01K\x02\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNN"
    b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x02\x07\ttbU\x06labels]q\x05K\x03au."
)


def test_safe_unpickler_allows_arrays_and_refuses_other_globals():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    loaded = SafeUnpickler(io.BytesIO(pickle.dumps({b"a": array}, protocol=2))).load()
    assert np.array_equal(loaded[b"a"], array)
    py2 = SafeUnpickler(io.BytesIO(PY2_PICKLE)).load()
    assert py2[b"labels"] == [3] and py2[b"data"].dtype == np.uint8 and py2[b"data"].tolist() == [[7, 9]]
    for payload in (
        pickle.dumps(eval, protocol=2),
        b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.",
    ):
        with pytest.raises(DatasetError):
            SafeUnpickler(io.BytesIO(payload)).load()


def test_cifar_meta_with_wrong_class_count_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder, num_names=9)
    with pytest.raises(DatasetError, match="batches.meta.*expected 10 class names"):
        load_dataset("cifar10", root=folder)


def test_cifar_env_var_routes(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    monkeypatch.setenv("BDCORE_CIFAR10_ROOT", str(folder))
    assert len(load_dataset("cifar10").train) == 15
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT")
    monkeypatch.setenv("BDCORE_DATA_ROOT", str(tmp_path))  # default subdir under the data root
    assert len(load_dataset("cifar10").test) == 4


def test_a_cifar_root_may_be_the_folder_holding_the_batches_folder(tmp_path, monkeypatch):
    """root / $BDCORE_CIFAR10_ROOT: the batches folder or its parent (where the archive was unpacked)."""
    from bdcore.data import check_dataset_folder, dataset_root

    folder = tmp_path / "cifar-10-batches-py"
    written, _ = make_cifar10(folder)
    by_parent = load_dataset("cifar10", root=tmp_path)
    assert torch.equal(by_parent.train.images, load_dataset("cifar10", root=folder).train.images)
    assert dataset_root("cifar10", tmp_path) == folder == check_dataset_folder("cifar10", tmp_path)
    monkeypatch.setenv("BDCORE_CIFAR10_ROOT", str(tmp_path))
    assert len(load_dataset("cifar10").train) == 15
    monkeypatch.delenv("BDCORE_CIFAR10_ROOT")
    monkeypatch.chdir(tmp_path)  # a relative root; the folder it names is absolute
    assert dataset_root("cifar10", ".") == folder
    (tmp_path / "c100" / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"malformed at '{tmp_path}/c100/cifar-100-python/train'"):
        load_dataset("cifar100", root="c100")  # the inner folder, named absolutely


def test_a_root_one_level_above_a_renamed_dataset_folder_says_which_folder(tmp_path):
    make_cifar10(tmp_path / "downloads" / "cifar10")
    with pytest.raises(DatasetError, match=rf"'{tmp_path}/downloads/data_batch_1' \(did you mean "
                                           rf"'{tmp_path}/downloads/cifar10'\?\)"):
        load_dataset("cifar10", root=tmp_path / "downloads")


# ----------------------------------------------------------------------------------------- GTSRB

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def write_gtsrb_csv(path, rows, header=GT_HEADER):
    lines = [header] + [f"{name};{w};{h};0;0;{w - 1};{h - 1};{cls}" for name, w, h, cls in rows]
    path.write_text("\n".join(lines) + "\n")


def make_gtsrb(root, sizes=((32, 32), (40, 36))):
    """Classes 0, 1 and 5 with two .ppm images each; a test folder with three images."""
    written = {}
    for cls in (0, 1, 5):
        folder = root / "Train" / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = []
        for j, (w, h) in enumerate(sizes):
            name = f"{cls:05d}_{j:05d}.ppm"
            written[("train", cls, j)] = image = random_image(h, w)
            Image.fromarray(image).save(folder / name)
            rows.append((name, w, h, cls))
        write_gtsrb_csv(folder / f"GT-{cls:05d}.csv", rows)
    test = root / "Test"
    test.mkdir()
    rows = []
    for j, cls in enumerate((5, 0, 1)):
        name = f"{j:05d}.ppm"
        written[("test", j)] = image = random_image(32, 32)
        Image.fromarray(image).save(test / name)
        rows.append((name, 32, 32, cls))
    write_gtsrb_csv(test / "GT-final_test.csv", rows)
    return written


def test_gtsrb_root_may_be_the_folder_holding_gtsrb(tmp_path):
    make_gtsrb(tmp_path / "gtsrb")
    assert torch.equal(load_dataset("gtsrb", root=tmp_path).test.images,
                       load_dataset("gtsrb", root=tmp_path / "gtsrb").test.images)


def test_gtsrb_loads_official_layout_and_resizes(tmp_path):
    root = tmp_path / "gtsrb"
    written = make_gtsrb(root)
    splits = load_dataset("gtsrb", root=root)

    assert splits.train.images.shape == (6, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 5, 5]
    assert splits.test.labels.tolist() == [5, 0, 1] and splits.test.labels.dtype == torch.int64
    # A 32x32 image is kept as written; a 40x36 one is resized with PIL's bilinear filter.
    assert torch.equal(splits.train.images[2], as_chw(written[("train", 1, 0)]))
    resized = np.array(Image.fromarray(written[("train", 5, 1)]).resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(splits.train.images[5], as_chw(resized))
    assert torch.equal(splits.test.images[0], as_chw(written[("test", 0)]))
    info = splits.info
    assert (info.num_classes, info.normalize, info.hflip) == (43, False, False)
    assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)


def test_gtsrb_csv_without_classid_names_the_file(tmp_path):
    root = tmp_path / "gtsrb"
    make_gtsrb(root)
    csv_path = root / "Test" / "GT-final_test.csv"
    write_gtsrb_csv(csv_path, [], header="Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2")
    with pytest.raises(DatasetError, match="ClassId") as excinfo:
        load_dataset("gtsrb", root=root)
    assert str(csv_path) in str(excinfo.value)


# ------------------------------------------------------------------------------------------ Tiny


def make_tiny(base, with_words=True):
    root = base / "tiny-imagenet-200"
    wnids = ["n03000000", "n01000000", "n02000000"]  # file order, not sorted, defines labels
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    if with_words:
        words = "n01000000\tgoldfish, Carassius auratus\nn03000000\tcat\nn09999999\tother\n"
        (root / "words.txt").write_text(words)
    for wnid in wnids:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(random_image(64, 64)).save(images / f"{wnid}_{i}.JPEG", quality=90)
    (root / "val" / "images").mkdir(parents=True)
    Image.fromarray(random_image(64, 64)).save(root / "val" / "images" / "val_0.JPEG")
    Image.fromarray(random_image(64, 64)[:, :, 0]).save(root / "val" / "images" / "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02000000\t0\t0\t63\t63\nval_1.JPEG\tn03000000\t1\t2\t30\t40\n"
    )
    return root, wnids


def test_tiny_loads_layout_and_names(tmp_path):
    root, wnids = make_tiny(tmp_path)
    splits = load_dataset("tiny", root=tmp_path)  # the folder containing tiny-imagenet-200
    assert splits.train.images.shape == (6, 3, 64, 64) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.test.labels.tolist() == [2, 0]
    decoded = np.array(Image.open(root / "train" / wnids[1] / "images" / f"{wnids[1]}_1.JPEG").convert("RGB"))
    assert torch.equal(splits.train.images[3], as_chw(decoded))
    gray = np.array(Image.open(root / "val" / "images" / "val_1.JPEG"))
    assert torch.equal(splits.test.images[1], torch.from_numpy(gray).expand(3, 64, 64))  # grayscale -> RGB
    info = splits.info
    assert (info.name, info.num_classes, info.image_shape, info.hflip) == ("tiny", 3, (3, 64, 64), False)
    assert info.mean == (0.4802, 0.4481, 0.3975) and info.std == (0.2302, 0.2265, 0.2262)
    assert info.class_names == ("cat", "goldfish, Carassius auratus", "n02000000")

    (root / "words.txt").unlink()
    direct = load_dataset("tiny", root=root)  # the tiny-imagenet-200 folder itself
    assert direct.info.class_names == tuple(wnids) and torch.equal(direct.test.images, splits.test.images)


def test_tiny_val_annotation_with_unknown_wnid(tmp_path):
    root, _ = make_tiny(tmp_path, with_words=False)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn04000000\t0\t0\t63\t63\n")
    with pytest.raises(DatasetError) as excinfo:
        load_dataset("tiny", root=root)
    assert str(annotations) in str(excinfo.value)


# ----------------------------------------------------------------------------------- imagefolder


def make_imagefolder(root, test_split="test", size=8):
    written = {}
    for split, count in (("train", 2), (test_split, 1)):
        for cls in ("cat", "ant", "bee"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                written[(split, cls, i)] = image = random_image(size, size)
                Image.fromarray(image).save(folder / f"{i}.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored
    return written


def test_imagefolder_loads_class_folders(tmp_path):
    written = make_imagefolder(tmp_path)
    splits = load_dataset("imagefolder", root=tmp_path, size=8)
    assert splits.train.images.shape == (6, 3, 8, 8) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and splits.train.labels.dtype == torch.int64
    assert splits.test.labels.tolist() == [0, 1, 2]
    assert torch.equal(splits.train.images[3], as_chw(written[("train", "bee", 1)]))
    assert torch.equal(splits.test.images[2], as_chw(written[("test", "cat", 0)]))
    info = splits.info
    assert (info.name, info.num_classes, info.class_names, info.hflip) == (
        "imagefolder", 3, ("ant", "bee", "cat"), False
    )
    pixels = splits.train.images.double() / 255
    assert np.allclose(info.mean, pixels.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(info.std, pixels.std(dim=(0, 2, 3)).tolist())

    assert load_dataset("imagefolder", root=tmp_path).train.images.shape == (6, 3, 32, 32)  # default size


def test_imagefolder_val_split_and_errors(tmp_path):
    make_imagefolder(tmp_path, test_split="val")
    assert len(load_dataset("imagefolder", root=tmp_path).test) == 3

    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "val" / "dog").rmdir()

    broken = tmp_path / "train" / "cat" / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(DatasetError) as excinfo:
        load_dataset("imagefolder", root=tmp_path)
    assert str(broken) in str(excinfo.value)


# ---------------------------------------------------------------------------------------- common


@pytest.mark.parametrize(
    "name, layout_text",
    [
        ("cifar10", "data_batch_1"),
        ("cifar100", "fine_labels"),
        ("gtsrb", "GT-final_test.csv"),
        ("tiny", "wnids.txt"),
        ("imagefolder", "train/<class>"),
    ],
)
def test_missing_folder_names_path_and_layout(tmp_path, name, layout_text):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(name, root=missing)
    message = str(excinfo.value)
    assert str(missing) in message and layout_text in message and "Expected layout" in message


def test_digits_sizes():
    splits = load_dataset("digits")
    # 1,797 images; digits.py holds out int(round(0.2 * 1797)) = 359 for test.
    assert (len(splits.train), len(splits.test)) == (1438, 359)
    assert splits.train.images.shape[1:] == (3, 32, 32) and splits.test.images.shape[1:] == (3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
