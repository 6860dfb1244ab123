"""Bad files for the readers, written by the tests: every error names the file and what to do, and with
``on_error="skip"`` every per-file failure of an image folder is skipped and counted."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from traincraft.data.cifar import CIFARDataModule, read_cifar_binary
from traincraft.data.download import download
from traincraft.data.image_folder import ImageFolderDataModule
from traincraft.data.mnist import MNISTDataModule, read_idx


# ---------------------------------------------------------------- image folders: one bad file among good ones
def _png(size=(12, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _big_png(pixels: int) -> bytes:  # a small file whose header promises `pixels` pixels
    buffer = io.BytesIO()
    Image.new("L", (pixels // 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_IMAGES = {
    # name: (file name, bytes or None for a broken link, expected message)
    "zero-byte png": ("bad.png", lambda: b"", r"cannot decode image .*bad\.png: UnidentifiedImageError"),
    "zero-byte jpeg": ("bad.jpg", lambda: b"", r"cannot decode image .*bad\.jpg"),
    "png cut in the header": ("bad.png", lambda: _png()[:20], r"cannot decode image .*bad\.png"),
    "png cut in the pixels": ("bad.png", lambda: _png()[:-30], r"cannot decode image .*bad\.png: .*(truncated|EOF)"),
    "jpeg cut in half": ("bad.jpg", lambda: _jpeg()[: len(_jpeg()) // 2], r"cannot decode image .*bad\.jpg"),
    "jpeg without its header": ("bad.jpg", lambda: _jpeg()[200:], r"cannot decode image .*bad\.jpg"),
    "png with a damaged IHDR": ("bad.png", lambda: _flip(_png(), 17), r"cannot decode image .*bad\.png"),
    "png with a damaged IDAT": ("bad.png", lambda: _flip(_png(), 60), r"cannot decode image .*bad\.png"),
    "random bytes as png": ("bad.png", lambda: np.random.default_rng(2).bytes(500), r"cannot decode image .*bad\.png"),
    "text as jpeg": ("bad.jpg", lambda: b"not an image at all\n", r"cannot decode image .*bad\.jpg"),
    "webp of zeros": ("bad.webp", lambda: bytes(64), r"cannot decode image .*bad\.webp"),
    "bmp with a bad header": ("bad.bmp", lambda: b"BM" + bytes(60), r"cannot decode image .*bad\.bmp"),
    "decompression bomb (error)": ("bad.png", lambda: _big_png(50_000),
                                   r"bad\.png is larger than PIL\.Image\.MAX_IMAGE_PIXELS=10000 pixels.*raise "
                                   r"PIL\.Image\.MAX_IMAGE_PIXELS"),
    "decompression bomb (warning)": ("bad.png", lambda: _big_png(15_000),
                                     r"bad\.png is larger than PIL\.Image\.MAX_IMAGE_PIXELS=10000 pixels"),
    "broken symbolic link": ("bad.png", None, r"bad\.png does not exist \(a broken link"),
}


def _tree(tmp_path, name: str, content) -> str:
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "good.png").write_bytes(_png())
    bad = tmp_path / "train" / "dog" / name
    if content is None:
        os.symlink(tmp_path / "nowhere.png", bad)
    else:
        bad.write_bytes(content())
    return str(bad)


def _module(tmp_path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=8, augment="none", normalize=False,
                                 drop_last=False, **kwargs)


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_a_bad_image_is_named_or_skipped_and_counted(tmp_path, monkeypatch, case):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    name, content, message = BAD_IMAGES[case]
    path = _tree(tmp_path, name, content)
    strict = _module(tmp_path)
    strict.setup("fit")
    with pytest.raises(ValueError, match=message + r".*or set on_error='skip'") as raised:
        list(strict.train_dataloader())
    assert path in str(raised.value)
    lenient = _module(tmp_path, on_error="skip")
    lenient.setup("fit")
    with pytest.warns(UserWarning) as caught:
        batches = [lenient.on_before_batch_transfer(batch, 0) for batch in lenient.train_dataloader()]
    assert lenient.skipped_files == 1
    assert sum(len(labels) for _, labels in batches) == 2  # the two good files
    texts = [str(w.message) for w in caught]
    assert any(path in t and t.startswith("skipping unreadable image") for t in texts), texts
    assert any("has skipped 1 unreadable image file(s)" in t for t in texts), texts


def test_the_statistics_pass_names_or_skips_the_bad_file_too(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = _tree(tmp_path, "bad.png", lambda: _big_png(50_000))
    with pytest.raises(ValueError, match=re.escape(path) + " is larger than PIL.Image.MAX_IMAGE_PIXELS"):
        ImageFolderDataModule(str(tmp_path), image_size=8).setup("fit")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        dm = ImageFolderDataModule(str(tmp_path), image_size=8, on_error="skip")
        dm.setup("fit")
    assert dm.datasets["train"].fingerprint()  # the cache key of the statistics


def test_a_broken_link_is_named_when_the_cache_key_is_computed(tmp_path):
    path = _tree(tmp_path, "bad.png", None)
    with pytest.raises(ValueError, match=re.escape(path) + r" does not exist .*on_error='skip'"):
        ImageFolderDataModule(str(tmp_path), image_size=8).setup("fit")


def test_a_folder_named_like_an_image_is_not_an_image(tmp_path):
    _tree(tmp_path, "album.jpg", None)
    os.unlink(tmp_path / "train" / "dog" / "album.jpg")
    (tmp_path / "train" / "dog" / "album.jpg").mkdir()
    dm = _module(tmp_path)
    dm.setup("fit")
    assert [os.path.basename(p) for p, _ in dm.datasets["train"].samples] == ["good.png", "good.png"]


FOLDERS = {
    # name: (build the tree, the path the message must name, the message)
    "no train folder": (lambda root: (root / "val" / "cat").mkdir(parents=True), "train",
                        r"is not a directory; expected one sub-folder of images per class"),
    "train is a file": (lambda root: (root.mkdir(exist_ok=True), (root / "train").write_text("x")), "train",
                        r"is not a directory"),
    "no class folders": (lambda root: (root / "train").mkdir(parents=True), "train",
                         r"has no class sub-folders; expected .*train/<class>/<image>\.jpg"),
    "empty class folder": (lambda root: _classes(root, {"cat": 1, "dog": 0}), "train/dog",
                           r"class folder .*train/dog holds no images .*remove it or add images"),
    "class folder without images": (lambda root: (_classes(root, {"cat": 1, "dog": 0}),
                                                  (root / "train" / "dog" / "notes.txt").write_text("x")),
                                    "train/dog", r"holds no images \(\.jpg, \.jpeg, \.png, \.bmp, \.webp\)"),
    "val class unknown to train": (lambda root: (_classes(root, {"cat": 1}), (root / "val" / "cow").mkdir(parents=True)),
                                   "val", r"has class folders \['cow'\] that the training split does not have"),
    "empty val class folder": (lambda root: (_classes(root, {"cat": 1}), (root / "val" / "cat").mkdir(parents=True)),
                               "val/cat", r"holds no images"),
}


def _classes(root, counts):
    for label, count in counts.items():
        folder = root / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (folder / f"{i}.png").write_bytes(_png())


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_a_bad_folder_layout_is_named(tmp_path, case):
    build, named, message = FOLDERS[case]
    root = tmp_path / "images"
    build(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as raised:
        _module(root, on_error="skip").setup("fit")
    assert str(root / named) in str(raised.value)


# ---------------------------------------------------------------- IDX (MNIST)
def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


IMAGES = np.zeros((4, 28, 28), dtype=np.uint8)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


IDX_FILES = {
    # name: (file name, bytes, message)
    "empty": ("x-idx3-ubyte", lambda: b"", r"is not an IDX file: it starts with nothing \(0 bytes\)"),
    "header cut after the magic": ("x-idx3-ubyte", lambda: _idx(IMAGES)[:6],
                                   r"is truncated: its header declares rank 3 \(16 header bytes\) but the file holds 6"),
    "body cut": ("x-idx3-ubyte", lambda: _idx(IMAGES)[:-100], r"is truncated or padded: its header promises shape"),
    "body padded": ("x-idx3-ubyte", lambda: _idx(IMAGES) + b"\0", r"is truncated or padded"),
    "wrong magic": ("x-idx3-ubyte", lambda: b"\x1f\x8b\x08\x00" + bytes(40),
                    r"is not an IDX file: it starts with 1f8b0800"),
    "unknown type code": ("x-idx3-ubyte", lambda: b"\0\0\x07\x01" + bytes(8), r"is not an IDX file: it starts with 00000701"),
    "not gzip": ("x-idx3-ubyte.gz", lambda: _idx(IMAGES), r"cannot read IDX file .*\(a damaged or truncated gzip file\)"),
    "gzip cut": ("x-idx3-ubyte.gz", lambda: _gz(_idx(IMAGES))[:-20], r"\(a damaged or truncated gzip file\): EOFError"),
    "gzip with damaged data": ("x-idx3-ubyte.gz", lambda: _flip(_gz(_idx(IMAGES)), 30),
                               r"\(a damaged or truncated gzip file\)"),
}


@pytest.mark.parametrize("case", sorted(IDX_FILES))
def test_a_bad_idx_file_is_named(tmp_path, case):
    name, content, message = IDX_FILES[case]
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(ValueError, match=message) as raised:
        read_idx(path)
    assert str(path) in str(raised.value) and ("again" in str(raised.value))


def test_a_directory_in_place_of_an_idx_file_is_named(tmp_path):
    (tmp_path / "x-idx3-ubyte").mkdir()
    with pytest.raises(ValueError, match=r"cannot read IDX file .*x-idx3-ubyte \(unreadable\): IsADirectoryError"):
        read_idx(tmp_path / "x-idx3-ubyte")


MNIST_SETS = {
    # name: (images, labels, the file the message names, message)
    "labels out of range": (_idx(IMAGES), _idx(np.array([0, 1, 12, 3], np.uint8)), "train-labels-idx1-ubyte",
                            r"has labels in \[0, 12\]; MNIST labels are 0-9"),
    "images and labels swapped": (_idx(np.zeros(4, np.uint8)), _idx(IMAGES), "train-images-idx3-ubyte",
                                  r"must hold uint8 images \(N, 28, 28\); got uint8 \(4,\)"),
    "32x32 images": (_idx(np.zeros((4, 32, 32), np.uint8)), _idx(np.zeros(4, np.uint8)), "train-images-idx3-ubyte",
                     r"got uint8 \(4, 32, 32\)"),
    "float images": (_idx(IMAGES.astype(">f4"), 0x0D), _idx(np.zeros(4, np.uint8)), "train-images-idx3-ubyte",
                     r"must hold uint8 images .*got >f4"),
    "float labels": (_idx(IMAGES), _idx(np.zeros(4, ">f4"), 0x0D), "train-labels-idx1-ubyte",
                     r"must hold integer labels \(N,\); got >f4"),
    "fewer labels than images": (_idx(IMAGES), _idx(np.zeros(3, np.uint8)), "train-labels-idx1-ubyte",
                                 r"holds \(3,\) labels but .*holds 4 images"),
}


@pytest.mark.parametrize("case", sorted(MNIST_SETS))
def test_mnist_files_that_do_not_fit_together_are_named(tmp_path, case):
    images, labels, named, message = MNIST_SETS[case]
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=message) as raised:
        MNISTDataModule(str(tmp_path), val_size=1).setup("fit")
    assert str(tmp_path / named) in str(raised.value)


# ---------------------------------------------------------------- CIFAR binary version
RECORD = bytes([3]) + bytes(3072)

CIFAR_FILES = {
    "empty": (lambda: b"", r"has 0 bytes, not a whole number of 3073-byte records"),
    "cut record": (lambda: RECORD * 2 + RECORD[:100], r"has 6246 bytes, not a whole number of 3073-byte records"),
    "label out of range": (lambda: RECORD + bytes([12]) + bytes(3072), r"has label 12, outside CIFAR-10's 10 classes"),
    "a pickle (python version)": (lambda: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]},
                                                       protocol=2),
                                  r"is a Python pickle \(the CIFAR 'python version'\).*Download the binary version"),
    "a pickle missing its keys": (lambda: pickle.dumps({"batch_label": "x"}, protocol=4), r"is a Python pickle"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_FILES))
def test_a_bad_cifar_file_is_named(tmp_path, case):
    content, message = CIFAR_FILES[case]
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(content())
    with pytest.raises(ValueError, match=message) as raised:
        read_cifar_binary(path, 1, 10)
    assert str(path) in str(raised.value)


def test_a_directory_in_place_of_a_cifar_file_is_named(tmp_path):
    (tmp_path / "data_batch_1.bin").mkdir()
    with pytest.raises(ValueError, match=r"cannot read CIFAR file .*data_batch_1\.bin: IsADirectoryError"):
        read_cifar_binary(tmp_path / "data_batch_1.bin", 1, 10)


def test_a_cifar_folder_with_a_missing_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in (1, 2, 4, 5):
        (folder / f"data_batch_{i}.bin").write_bytes(RECORD)
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "data_batch_3.bin")) + " is missing"):
        CIFARDataModule(str(tmp_path)).setup("fit")


def test_only_the_python_pickle_version_of_cifar_is_refused_with_the_fix(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py holds the Python-pickle version.*Unpack "
                                                r"cifar-10-binary\.tar\.gz"):
        CIFARDataModule(str(tmp_path)).setup("fit")


def test_a_corrupt_cifar_archive_is_named(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(_gz(b"not a tar file" * 100))
    md5 = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=r"(?s)" + re.escape(str(archive)) + r"\W.*Delete it and download it again"):
        CIFARDataModule(str(tmp_path), download=True, url="http://127.0.0.1:9/", checksum=md5).setup("fit")


def test_a_download_target_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "a.bin").mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path / "a.bin")) + " is a directory"):
        download("http://127.0.0.1:9/a.bin", tmp_path / "a.bin", "md5:" + "0" * 32)


def test_no_warning_is_left_over_for_good_files(tmp_path):
    _classes(tmp_path, {"cat": 2, "dog": 2})
    dm = _module(tmp_path, on_error="skip")
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    assert dm.skipped_files == 0
