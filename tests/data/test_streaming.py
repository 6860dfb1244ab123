"""The streaming DataModule over LitData: an image folder optimized into chunks (tests write it with PIL), streamed
back from a local directory or a local directory used as a remote, compared with ImageFolderDataModule's reader."""

import collections
import importlib
import json
import shutil
import sys

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.data.test_readers import _image_tree
from tests.helpers import tiny_trainer
from traincraft.augment import RandomHorizontalFlip
from traincraft.data.image_folder import ImageFolderDataModule
from traincraft.data.streaming import METADATA_FILE, StreamingImageDataModule, optimize_image_folder
from traincraft.modules.classifier import ImageClassifier

pytest.importorskip("litdata")

SIZE = 12
CLASSES = ("cat", "dog", "fox")


def _optimize(root, out, **kwargs):
    kwargs = {"image_size": SIZE, "num_workers": 1, "chunk_bytes": "2KB", "start_method": "fork", "verbose": False,
              **kwargs}
    return optimize_image_folder(root, out, **kwargs)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """A 3-class folder (train: 3x9 images, val: 3x2; PNG, JPEG, one grayscale per class) and its chunks (~6
    images per 2 KB chunk, so shuffling and sharding have several chunks to work with)."""
    base = tmp_path_factory.mktemp("streaming")
    _image_tree(base / "images", classes=CLASSES, per_class=9)
    dirs = _optimize(base / "images", base / "optimized")
    return base / "images", dirs


def _reference(root, split="train"):
    """(image bytes -> label) of ImageFolderDataModule's reader: the pixels the stream must give back."""
    reader = ImageFolderDataModule(str(root), image_size=SIZE)
    dataset = reader.build_datasets()[split]
    items = [dataset[i] for i in range(len(dataset))]
    table = {image.numpy().tobytes(): label for image, label in items}
    assert len(table) == len(items)  # random images: the pixels identify the file
    return table


def _epoch(loader):
    """The (image bytes, label) pairs of one pass, in order, and the batch sizes."""
    pairs, sizes = [], []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape[1:] == (3, SIZE, SIZE)
        pairs += [(image.numpy().tobytes(), int(label)) for image, label in zip(images, labels, strict=True)]
        sizes.append(len(labels))
    return pairs, sizes


def test_round_trip_gives_every_image_once_per_epoch_in_a_seeded_order(optimized):
    root, dirs = optimized
    reference = _reference(root)
    dm = StreamingImageDataModule(dirs["train"], val_dir=dirs["val"], batch_size=4, drop_last=False, seed=5)
    assert (dm.classes, dm.num_classes, dm.in_channels, dm.image_size) == (list(CLASSES), 3, 3, SIZE)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [_epoch(loader)[0] for _ in range(3)]
    for pairs in epochs:  # exactly the reader's images, each with its label, each once
        assert collections.Counter(pairs) == collections.Counter(reference.items())
    orders = [[image for image, _ in pairs] for pairs in epochs]
    assert orders[0] != orders[1] != orders[2] != orders[0]  # a new order every epoch
    again = StreamingImageDataModule(dirs["train"], batch_size=4, drop_last=False, seed=5)
    again.setup("fit")
    assert [[image for image, _ in _epoch(again.train_dataloader())[0]] for _ in range(3)] == orders  # from the seed
    other = StreamingImageDataModule(dirs["train"], batch_size=4, drop_last=False, seed=6)
    other.setup("fit")
    assert [image for image, _ in _epoch(other.train_dataloader())[0]] != orders[0]
    # validation: in file order, all of it; the written order is random, so the classes are mixed in the chunks
    val_pairs, _ = _epoch(dm.val_dataloader())
    assert collections.Counter(val_pairs) == collections.Counter(_reference(root, "val").items())
    assert [label for _, label in val_pairs] != sorted(label for _, label in val_pairs)


def test_drop_last_keeps_full_training_batches(optimized):
    _, dirs = optimized
    dm = StreamingImageDataModule(dirs["train"], batch_size=4, seed=0)  # drop_last=True by default
    dm.setup("fit")
    pairs, sizes = _epoch(dm.train_dataloader())
    assert sizes == [4] * (27 // 4) and len(set(pairs)) == 24 and len(dm.train_dataloader()) == 6


def test_statistics_equal_the_image_folder_ones_and_are_cached_by_the_index(optimized, tmp_path):
    root, dirs = optimized
    reference = ImageFolderDataModule(str(root), image_size=SIZE)
    reference.setup("fit")
    dm = StreamingImageDataModule(dirs["train"], statistics_cache=str(tmp_path / "stats"))
    dm.setup("fit")
    torch.testing.assert_close(dm.mean, reference.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(dm.std, reference.std, rtol=1e-6, atol=0)
    assert dm.statistics["count"].item() == 27 and len(list((tmp_path / "stats").iterdir())) == 1
    cached = StreamingImageDataModule(dirs["train"], statistics_cache=str(tmp_path / "stats"))
    cached._train_images = None  # a second pass would fail: the cache keyed by index.json is used
    cached.setup("fit")
    assert torch.equal(cached.mean, dm.mean) and cached.data_fingerprint() == dm.data_fingerprint()


def test_a_local_directory_as_the_remote_is_copied_to_the_cache_and_read_from_there(optimized, tmp_path):
    root, dirs = optimized
    remote = tmp_path / "bucket" / "train"
    shutil.copytree(dirs["train"], remote)
    dm = StreamingImageDataModule(f"local:{remote}", cache_dir=str(tmp_path / "cache"), batch_size=5,
                                  drop_last=False, seed=1)
    assert dm.num_classes == 3  # traincraft.json comes through litdata's downloader
    dm.setup("fit")
    first, _ = _epoch(dm.train_dataloader())
    local = dm.datasets["train"].input_dir.path
    assert local.startswith(str(tmp_path / "cache"))
    chunks = sorted(p.name for p in remote.glob("*.bin"))
    assert len(chunks) > 3 and sorted(p.name for p in (tmp_path / "cache").rglob("*.bin")) == chunks
    for name in chunks:
        assert next((tmp_path / "cache").rglob(name)).read_bytes() == (remote / name).read_bytes()
    for name in chunks:  # the next epoch must come from the cache
        (remote / name).unlink()
    second, _ = _epoch(dm.train_dataloader())
    assert collections.Counter(first) == collections.Counter(second) == collections.Counter(_reference(root).items())


def test_trains_two_epochs_through_a_trainer_with_augmentation(optimized):
    _, dirs = optimized
    flip = RandomHorizontalFlip(p=0.5)
    calls = []
    flip.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    dm = StreamingImageDataModule(dirs["train"], val_dir=dirs["val"], batch_size=4, augment=flip)
    model = ImageClassifier("mlp", num_classes=dm.num_classes, in_channels=dm.in_channels, input_size=dm.model_input_size)
    trainer = tiny_trainer(max_epochs=2)
    trainer.fit(model, dm)
    # augmented on the device, training batches only (after the one-image probe of setup, which sizes eval_crop)
    assert trainer.global_step == 2 * 6 and calls == [1] + [4] * 12
    assert "val/loss" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_loader_position_resumes_mid_epoch_from_the_datamodule_state(optimized, num_workers):
    _, dirs = optimized
    options = {"batch_size": 3, "drop_last": False, "seed": 2, "num_workers": num_workers}
    dm = StreamingImageDataModule(dirs["train"], **options)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = [(x.clone(), y.clone()) for x, y in loader]
    seen, state = [], None
    for x, y in loader:  # the second epoch, interrupted after 4 batches
        seen.append((x, y))
        if len(seen) == 4:
            state = dm.state_dict()
            break
    assert {"mean", "std", "train_loader"} <= set(state)  # the statistics stay next to the loader's position
    uninterrupted = StreamingImageDataModule(dirs["train"], **options)
    uninterrupted.setup("fit")
    reference = uninterrupted.train_dataloader()
    epochs = [list(reference) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epochs[0], strict=True))
    resumed = StreamingImageDataModule(dirs["train"], **options)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.mean, dm.mean, rtol=0, atol=0)
    rest, following = list(resumed.train_dataloader()), list(resumed.train_dataloader())
    for got, expected in zip(rest + following, epochs[1][4:] + epochs[2], strict=True):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_trainer_resumed_from_a_mid_epoch_checkpoint_sees_the_same_batches(optimized, tmp_path):
    _, dirs = optimized

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        dm = StreamingImageDataModule(dirs["train"], batch_size=4, seed=3, augment=RandomHorizontalFlip(p=0.5))
        seen = []
        transfer = dm.on_before_batch_transfer
        dm.on_before_batch_transfer = lambda batch, idx: seen.append(batch[0].clone()) or transfer(batch, idx)
        model = ImageClassifier("mlp", num_classes=3, in_channels=3, input_size=SIZE)
        trainer = tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=list(callbacks),
                               enable_checkpointing=bool(callbacks))
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return seen, model

    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    full, model = run(callbacks=[checkpoints])
    assert len(full) == 12
    resumed, resumed_model = run(ckpt_path=tmp_path / "step=4.ckpt")  # two thirds into the first epoch
    assert len(resumed) == 8 and all(torch.equal(a, b) for a, b in zip(resumed, full[4:], strict=True))
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):  # the same training, step by step
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    resumed, _ = run(ckpt_path=tmp_path / "step=6.ckpt")  # after the last batch of the first epoch
    assert len(resumed) == 6 and all(torch.equal(a, b) for a, b in zip(resumed, full[6:], strict=True))


def test_skipped_files_are_counted_and_listed(tmp_path):
    _image_tree(tmp_path / "images", per_class=4)
    bad = tmp_path / "images" / "train" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match=r"cannot decode image .*dog/3.png.*on_error='skip'"):
        _optimize(tmp_path / "images", tmp_path / "strict")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of the 'train' split: .*dog/3.png"):
        dirs = _optimize(tmp_path / "images", tmp_path / "lenient", on_error="skip")
    metadata = json.loads((tmp_path / "lenient" / "train" / METADATA_FILE).read_text())
    assert metadata["skipped"] == 1 and metadata["skipped_files"] == [str(bad)] and metadata["num_images"] == 7
    dm = StreamingImageDataModule(dirs["train"], val_dir=dirs["val"], batch_size=2, drop_last=False)
    dm.setup("fit")
    assert dm.skipped_files == 1 and len(_epoch(dm.train_dataloader())[0]) == 7


def test_bad_input_is_refused_with_a_fix(optimized, tmp_path):
    root, dirs = optimized
    with pytest.raises(ValueError, match=r"train is not a data set written by optimize_image_folder: it has no "
                                         r"litdata index.json. Create it with `traincraft.data.optimize_image_folder"):
        StreamingImageDataModule(str(root / "train")).setup("fit")  # the raw image folder
    with pytest.raises(ValueError, match="nowhere is not a data set .*: no such directory"):
        StreamingImageDataModule(str(tmp_path / "nowhere")).metadata()
    with pytest.raises(ValueError, match=r"local:.*nowhere is not a data set .*cannot read traincraft.json"):
        StreamingImageDataModule(f"local:{tmp_path / 'nowhere'}", cache_dir=str(tmp_path / "c")).metadata()
    plain = tmp_path / "plain"
    shutil.copytree(dirs["train"], plain)
    (plain / METADATA_FILE).unlink()
    with pytest.raises(ValueError, match="a litdata data set without traincraft.json"):
        StreamingImageDataModule(str(plain)).setup("fit")
    other = tmp_path / "other"
    shutil.copytree(dirs["val"], other)
    metadata = json.loads((other / METADATA_FILE).read_text())
    (other / METADATA_FILE).write_text(json.dumps({**metadata, "classes": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match=r"the 'val' split .* has classes=\['a', 'b', 'c'\] but the training split"):
        StreamingImageDataModule(dirs["train"], val_dir=str(other)).setup("fit")
    with pytest.raises(ValueError, match="has no 'test' split: set test_dir"):
        dm = StreamingImageDataModule(dirs["train"], normalize=False)
        dm.setup("test")
        dm.test_dataloader()
    dm.set_train_sampler(None)
    with pytest.raises(ValueError, match=r"cannot draw batches with a sampler \(SequentialSampler\)"):
        dm.set_train_sampler(torch.utils.data.SequentialSampler(range(3)))  # e.g. HardExampleMining's
    # optimizing
    (root / "train" / "emu").mkdir()
    try:
        with pytest.raises(ValueError, match="class folder .*train/emu holds no images"):
            _optimize(root, tmp_path / "out")
    finally:
        (root / "train" / "emu").rmdir()
    with pytest.raises(FileExistsError, match="already hold optimized data; set overwrite=True"):
        _optimize(root, dirs["train"].rsplit("/", 1)[0])
    with pytest.raises(ValueError, match=r"output_dir .* would write .*images/val over the images in .*images/val; choose"):
        _optimize(root, root, overwrite=True)
    with pytest.raises(ValueError, match="output_dir must be a local directory; got 's3://b/x'"):
        _optimize(root, "s3://b/x")


def test_reoptimizing_with_overwrite_changes_the_fingerprint(optimized, tmp_path):
    root, _ = optimized
    dirs = _optimize(root, tmp_path / "out")
    dm = StreamingImageDataModule(dirs["train"], normalize=False)
    dm.setup("fit")
    before = dm.data_fingerprint()
    dirs = _optimize(root, tmp_path / "out", image_size=SIZE - 2, overwrite=True)
    again = StreamingImageDataModule(dirs["train"], normalize=False)
    again.setup("fit")
    assert again.image_size == SIZE - 2 and again.data_fingerprint() != before


def test_without_litdata_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "litdata", None)  # `import litdata` now raises ImportError
    with pytest.raises(ModuleNotFoundError, match="need the litdata package; install it with `pip install litdata`"):
        StreamingImageDataModule(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps litdata"):
        optimize_image_folder(tmp_path, tmp_path / "out")
    # and `import traincraft.data` still works: litdata is imported only where it is used
    saved = {name: module for name, module in sys.modules.items() if name.startswith("traincraft.data")}
    try:
        for name in saved:
            del sys.modules[name]
        data = importlib.import_module("traincraft.data")
        assert "StreamingImageDataModule" in data.__all__ and "optimize_image_folder" in data.__all__
    finally:  # the modules every other test imported, also as the package's attribute
        sys.modules.update(saved)
        sys.modules["traincraft"].data = saved["traincraft.data"]


def test_traincraft_fit_and_test_from_yaml(optimized, tmp_path):
    from traincraft.cli import TraincraftCLI

    _, dirs = optimized
    config = tmp_path / "streaming.yaml"
    config.write_text(f"""
model:
  class_path: traincraft.modules.ImageClassifier
  init_args:
    model: mlp
data:
  class_path: traincraft.data.StreamingImageDataModule
  init_args:
    train_dir: {dirs["train"]}
    val_dir: {dirs["val"]}
    test_dir: local:{dirs["val"]}
    cache_dir: {tmp_path / "cache"}
    batch_size: 8
    augment: none
trainer:
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
""")
    cli = TraincraftCLI(args=["fit", f"--config={config}"])
    assert cli.model.hparams.num_classes == 3 and cli.model.hparams.input_size == SIZE  # linked from traincraft.json
    assert cli.trainer.global_step == 2 * (27 // 8)
    checkpoint = torch.load("runs/checkpoints/last.ckpt", weights_only=True)
    assert {"mean", "train_loader"} <= set(checkpoint["StreamingImageDataModule"])
    cli = TraincraftCLI(args=["test", f"--config={config}", "--ckpt_path=runs/checkpoints/last.ckpt"])
    assert "test/acc" in cli.trainer.callback_metrics
