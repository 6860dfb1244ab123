"""Readers on small files the tests write: IDX (raw/gzip), CIFAR binary records, PNG/JPEG trees; downloads with
checksums from a loopback HTTP server; bad files reported by name."""

import functools
import gzip
import hashlib
import http.server
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_trainer
from traincraft.data.cifar import CIFARDataModule
from traincraft.data.download import download
from traincraft.data.image_folder import ImageFolderDataModule
from traincraft.data.mnist import MNISTDataModule, read_idx
from traincraft.modules.classifier import ImageClassifier


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over tmp_path/served."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder, gz: bool, n_train=40, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        data[prefix] = (images, labels)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = folder / f"{prefix}-{kind}"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(_idx(array))
            else:
                name.write_bytes(_idx(array))
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    data = _write_mnist(tmp_path, gz)
    dm = MNISTDataModule(str(tmp_path), val_size=10)
    dm.setup("fit")
    train = torch.cat([dm.datasets["train"].images, dm.datasets["val"].images])[:, 0]
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["val"]) == 10
    # the split is a permutation of the file's images, labels attached to the right images
    order = [int(np.where((data["train"][0] == img.numpy()).all(axis=(1, 2)))[0][0]) for img in train]
    assert sorted(order) == list(range(40))
    labels = torch.cat([dm.datasets["train"].labels, dm.datasets["val"].labels])
    assert labels.tolist() == data["train"][1][order].tolist()
    assert torch.equal(dm.datasets["test"].images[:, 0], torch.from_numpy(data["t10k"][0]))


def test_mnist_reports_bad_files_by_name(tmp_path):
    _write_mnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(39, dtype=np.uint8)))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte holds \\(39,\\) labels but .*40 images"):
        MNISTDataModule(str(tmp_path), val_size=5).setup("fit")
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte is truncated"):
        read_idx(images)
    images.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(images)
    with pytest.raises(FileNotFoundError, match="set download=True"):
        MNISTDataModule(str(tmp_path / "empty")).setup("fit")


def test_mnist_downloads_with_checksums_from_a_loopback_server(tmp_path, server):
    served, url = server
    _write_mnist(served, gz=True)
    checksums = {p.name: "md5:" + hashlib.md5(p.read_bytes()).hexdigest() for p in served.glob("*.gz")}
    dm = MNISTDataModule(str(tmp_path / "mnist"), download=True, url=url, val_size=5, checksums=checksums)
    dm.setup("fit")
    assert len(dm.datasets["test"]) == 12 and len(list((tmp_path / "mnist").glob("*.gz"))) == 4


def test_download_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path, server):
    served, url = server
    (served / "a.bin").write_bytes(b"payload")
    good = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    with pytest.raises(ValueError, match="has sha256 .* expected 00"):
        download(url + "a.bin", tmp_path / "a.bin", "sha256:" + "0" * 64)
    assert not list(tmp_path.glob("a.bin*"))
    assert download(url + "a.bin", tmp_path / "a.bin", good).read_bytes() == b"payload"
    with pytest.raises(OSError, match="downloading .*missing.bin"):
        download(url + "missing.bin", tmp_path / "m.bin", good)
    with pytest.raises(ValueError, match="checksum must look like"):
        download(url + "a.bin", tmp_path / "b.bin", "crc:1")


def _cifar_records(n, label_bytes, classes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, (n, label_bytes), dtype=np.uint8)
    images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, images], axis=1), images.reshape(n, 3, 32, 32), labels[:, -1]


def test_cifar10_reads_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train_images, train_labels = [], []
    for i in range(1, 6):
        records, images, labels = _cifar_records(8, 1, 10, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(records.tobytes())
        train_images.append(images)
        train_labels.append(labels)
    records, test_images, test_labels = _cifar_records(6, 1, 10, seed=9)
    (folder / "test_batch.bin").write_bytes(records.tobytes())
    dm = CIFARDataModule(str(tmp_path), val_size=4, augment="none")
    dm.setup("fit")
    assert torch.equal(dm.datasets["test"].images, torch.from_numpy(test_images))
    assert dm.datasets["test"].labels.tolist() == test_labels.tolist()
    everything = torch.cat([dm.datasets["train"].images, dm.datasets["val"].images])
    assert sorted(map(bytes, everything.flatten(1).numpy())) == sorted(map(bytes, np.concatenate(train_images)))
    (folder / "data_batch_3.bin").write_bytes(records.tobytes()[:-5])
    with pytest.raises(ValueError, match="data_batch_3.bin has .* not a whole number of 3073-byte records"):
        CIFARDataModule(str(tmp_path)).setup("fit")


def test_cifar100_uses_fine_labels_and_downloads_the_archive(tmp_path, server):
    served, url = server
    build = tmp_path / "build" / "cifar-100-binary"
    build.mkdir(parents=True)
    records, _, fine = _cifar_records(20, 2, 100, seed=1)
    (build / "train.bin").write_bytes(records.tobytes())
    test_records, _, test_fine = _cifar_records(5, 2, 100, seed=2)
    (build / "test.bin").write_bytes(test_records.tobytes())
    with tarfile.open(served / "cifar-100-binary.tar.gz", "w:gz") as tar:
        tar.add(build, arcname="cifar-100-binary")
    md5 = hashlib.md5((served / "cifar-100-binary.tar.gz").read_bytes()).hexdigest()
    dm = CIFARDataModule(str(tmp_path / "data"), num_classes=100, download=True, url=url, val_size=5,
                         checksum=f"md5:{md5}")
    dm.setup("fit")
    assert dm.datasets["test"].labels.tolist() == test_fine.tolist()
    assert sorted(torch.cat([dm.datasets["train"].labels, dm.datasets["val"].labels]).tolist()) == sorted(fine.tolist())
    with pytest.raises(ValueError, match="has label .* outside CIFAR-10's 10 classes"):
        cifar10 = tmp_path / "c10" / "cifar-10-batches-bin"
        cifar10.mkdir(parents=True)
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            (cifar10 / name).write_bytes(_cifar_records(4, 1, 100, seed=3)[0].tobytes())
        CIFARDataModule(str(tmp_path / "c10"), val_size=2).setup("fit")


def _image_tree(root, classes=("cat", "dog"), per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in (("train", per_class), ("val", 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(20, 40, 2)
                array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                if i == 0:  # a grayscale file in an RGB tree
                    image, path = Image.fromarray(array[:, :, 0], "L"), folder / f"{i}.png"
                elif i % 2:
                    image, path = Image.fromarray(array), folder / f"{i}.png"
                else:
                    image, path = Image.fromarray(array), folder / f"{i}.jpg"
                image.save(path)
                written[str(path)] = image
    return written


def _reference_decode(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BILINEAR)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def test_image_folder_decodes_png_and_jpeg_with_labels_from_folders(tmp_path):
    _image_tree(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4, augment="none")
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    train = dm.datasets["train"]
    assert len(train) == 10 and len(dm.datasets["val"]) == 4
    for index in range(len(train)):
        path, label = train.samples[index]
        image, got_label = train[index]
        assert got_label == label == ("dog" in path)
        reference = _reference_decode(Image.open(path), 16)  # JPEGs: compare with the decoded file itself
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert np.array_equal(image.numpy(), reference), path
    x, y, skipped = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and skipped == 0


def test_image_folder_reports_or_skips_corrupt_files(tmp_path):
    _image_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    strict = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=10, augment="none", normalize=False)
    strict.setup("fit")
    with pytest.raises(ValueError, match=r"cannot decode image .*dog/3.png.*on_error='skip'"):
        list(strict.train_dataloader())
    with pytest.raises(ValueError, match=r"cannot decode image .*dog/3.png"):  # the statistics pass reads it too
        ImageFolderDataModule(str(tmp_path), image_size=16).setup("fit")
    lenient = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=10, augment="none", on_error="skip",
                                    drop_last=False)
    model = ImageClassifier("mlp", num_classes=2, in_channels=3, input_size=16)
    with pytest.warns(UserWarning, match=r"skipping unreadable image: cannot decode image .*dog/3.png"):
        tiny_trainer(max_epochs=1, limit_val_batches=0).fit(model, lenient)
    assert lenient.skipped_files == 1


def test_image_folder_rejects_empty_and_mismatched_class_folders(tmp_path):
    _image_tree(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(ValueError, match="class folder .*train/bird holds no images"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "train" / "bird").rmdir()
    (tmp_path / "val" / "fish").mkdir()
    with pytest.raises(ValueError, match=r"has class folders \['fish'\] that the training split does not have"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolderDataModule(str(tmp_path / "nowhere")).setup("fit")
    with pytest.raises(ValueError, match="on_error must be"):
        ImageFolderDataModule(str(tmp_path), on_error="ignore")


def test_a_batch_of_unreadable_files_only_is_skipped_by_the_classifier(tmp_path):
    _image_tree(tmp_path, per_class=2)
    (tmp_path / "train" / "dog" / "empty.png").write_bytes(b"")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=1, augment="none", normalize=False,
                               on_error="skip", drop_last=False)
    model = ImageClassifier("convnet", num_classes=2, in_channels=3, input_size=8)
    trainer = tiny_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"skipping unreadable image: cannot decode image .*dog/empty\.png"):
        trainer.fit(model, dm)  # the empty batch (shape (0, 3, 8, 8)) is skipped, not fed to the model
    # Lightning still counts the skipped batch's (gradient-free, so empty) optimizer step
    assert dm.skipped_files == 1 and trainer.global_step == 5
