"""The gallery: originals on top, augmented draws below; logged once to TensorBoard, written as PNG."""

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import tiny_trainer
from traincraft.augment.flip import RandomHorizontalFlip
from traincraft.augment.gallery import AugmentationGallery, gallery_grid
from traincraft.data.digits import DigitsDataModule
from traincraft.modules.classifier import ImageClassifier


def test_grid_holds_originals_then_draws():
    images = torch.randint(0, 256, (3, 3, 6, 5), dtype=torch.uint8)
    grid = gallery_grid(images, RandomHorizontalFlip(p=1.0), rows=2, pad=1)
    assert grid.shape == (3, 3 * 8, 3 * 7)
    def tile(r, i):
        return grid[:, r * 8 + 1 : r * 8 + 7, i * 7 + 1 : i * 7 + 6]

    for i in range(3):
        assert torch.equal(tile(0, i), images[i])
        assert torch.equal(tile(1, i), images[i].flip(-1)) and torch.equal(tile(2, i), images[i].flip(-1))
    state = torch.get_rng_state()
    assert torch.equal(gallery_grid(images, RandomHorizontalFlip(), seed=1), gallery_grid(images, RandomHorizontalFlip(), seed=1))
    assert torch.equal(state, torch.get_rng_state())  # the training stream is untouched


def test_gallery_is_logged_once_and_written_as_png(tmp_path):
    png = tmp_path / "g" / "gallery.png"
    callback = AugmentationGallery(num_images=4, rows=2, path=str(png))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    dm = DigitsDataModule(image_size=8, batch_size=32)
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, logger=logger, callbacks=[callback])
    trainer.fit(model, dm)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["augmentation/gallery"] and len(events.Images("augmentation/gallery")) == 1
    written = np.asarray(Image.open(png))
    expected = gallery_grid(dm.datasets["train"].images[:4], dm._augment_module, rows=2).permute(1, 2, 0).numpy()
    assert np.array_equal(written, expected)
    png.unlink()
    tiny_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(model, dm)
    assert not png.exists()  # once per run: the same callback (or a resumed one) does not log again
