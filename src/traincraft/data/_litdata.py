"""What the streaming writer and reader share: the optional litdata import and the optimized folder's format."""

from __future__ import annotations

from typing import Any

METADATA_FILE = "traincraft.json"
FORMAT = "traincraft-image-folder"
_INSTALL = (
    "`pip install litdata` (where no torchvision build matches the installed torch, "
    "`pip install --no-deps litdata` and then its other requirements: "
    "`pip install boto3 filelock obstore requests tifffile urllib3`)"
)
_REMOTE_PREFIXES = ("local:", "s3://", "gs://", "r2://", "azure://", "hf://")


def require_litdata() -> Any:
    """The litdata module, imported on first use; a ``ModuleNotFoundError`` that says how to install it."""
    try:
        import litdata
    except ImportError as error:  # litdata is an optional dependency: `import traincraft.data` must work without it
        raise ModuleNotFoundError(f"streaming data sets need the litdata package; install it with {_INSTALL}.") from error
    return litdata


def is_remote(location: str) -> bool:
    return location.startswith(_REMOTE_PREFIXES)


def not_optimized(location: str, why: str) -> ValueError:
    return ValueError(
        f"{location} is not a data set written by optimize_image_folder: {why}. Create it with "
        "`traincraft.data.optimize_image_folder(root, output_dir)`, which writes output_dir/train (and val, test) "
        "holding litdata's index.json, the chunks and traincraft.json; then pass output_dir/train as train_dir."
    )
