"""What ImageClassifier adds to its checkpoints: the global RNG states, and a clear refusal of another model's."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states, in plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]), float(np_state[4])),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def check_same_model(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], hparams: dict[str, Any]) -> None:
    """Refuse a checkpoint whose state dict has other keys or shapes than ``own``, naming the saved model."""
    own_shapes = {k: v.shape for k, v in own.items()}
    theirs = {k: v.shape for k, v in state_dict.items()}
    missing = sorted(set(own_shapes) - set(theirs))
    unexpected = sorted(set(theirs) - set(own_shapes))
    mismatched = [f"{k}: checkpoint {tuple(theirs[k])} vs model {tuple(own_shapes[k])}"
                  for k in own_shapes if k in theirs and theirs[k] != own_shapes[k]]
    if missing or unexpected or mismatched:
        described = {k: hparams[k] for k in ("model", "num_classes", "model_kwargs") if k in hparams}
        raise ValueError(
            "the checkpoint holds a different model than this ImageClassifier"
            + (f" (it was saved with {described})" if described else "")
            + f": {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:5]}. Build the same model (name, num_classes, "
            "model_kwargs) as the run that saved it."
        )
