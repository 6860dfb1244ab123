"""Data sets larger than one machine: image folders optimized into LitData chunks (:func:`optimize_image_folder`,
in ``optimize.py``) and streamed back with shuffling, DDP sharding and a resumable position
(:class:`StreamingImageDataModule`, in ``streaming_image_datamodule.py``). This module keeps the import path of
both; litdata is imported only when one of them is used."""

from traincraft.data._litdata import METADATA_FILE as METADATA_FILE
from traincraft.data.optimize import optimize_image_folder
from traincraft.data.streaming_image_datamodule import StreamingImageDataModule

__all__ = ["StreamingImageDataModule", "optimize_image_folder"]
