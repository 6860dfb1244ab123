"""Normalization: the statistics as buffers (device moves, its own state_dict), and ImageDataModule states written
before the statistics became a module (tests/data/fixtures, saved by the code of commit 387c70a) still loading and
giving the same normalized batches."""

from pathlib import Path

import pytest
import torch

from traincraft.data import DigitsDataModule, Normalization

FIXTURE = Path(__file__).with_name("fixtures") / "datamodule_state_before_issue17.pt"


def _fitted(whitening=None, scope="image") -> Normalization:
    dm = DigitsDataModule(image_size=8, whitening=whitening, whitening_scope=scope)
    dm.setup("fit")
    return dm.normalization


@pytest.mark.parametrize("case", ["zca_image", "pca_channel", "plain"])
def test_a_state_saved_before_the_module_loads_and_normalizes_as_before(case):
    saved = torch.load(FIXTURE, weights_only=True)[case]
    dm = DigitsDataModule(image_size=8, **saved["options"])
    dm.load_state_dict(saved["state"])  # before setup, as Lightning restores a checkpoint for validate/test
    torch.testing.assert_close(dm.normalize_batch(saved["input"]), saved["output"], rtol=0, atol=0)
    # ... and the DataModule still writes that format: the same keys in the same order, lists and CPU tensors
    state = dm.state_dict()
    assert list(state) == list(saved["state"])
    for key, value in saved["state"].items():
        assert type(state[key]) is type(value), key
        assert state[key] == value if isinstance(value, list) else torch.equal(state[key], value), key


def test_a_fresh_setup_writes_the_state_of_before():
    saved = torch.load(FIXTURE, weights_only=True)["zca_image"]
    dm = DigitsDataModule(image_size=8, **saved["options"])
    dm.setup("fit")
    state = dm.state_dict()
    assert list(state) == list(saved["state"]) and state["mean"] == saved["state"]["mean"]
    torch.testing.assert_close(state["whitening_matrix"], saved["state"]["whitening_matrix"], rtol=0, atol=0)


@pytest.mark.parametrize(("whitening", "scope"), [(None, "image"), ("zca", "image"), ("pca", "channel")])
def test_its_own_state_dict_loads_into_a_module_without_statistics(whitening, scope):
    fitted = _fitted(whitening, scope)
    state = fitted.state_dict()
    assert "weight" not in state and "bias" not in state  # derived when loaded, not stored
    fresh = Normalization(whitening, scope)
    assert not fresh.fitted and fresh.state_dict() == {}
    fresh.load_state_dict(state)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(fresh(x), fitted(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Normalization().load_state_dict({**state, "other": torch.zeros(1)})


def test_buffers_move_with_the_module():
    norm = _fitted("zca")
    norm.to("meta")  # every buffer, derived ones included, without a second device
    assert {buffer.device.type for buffer in norm.buffers()} == {"meta"} and len(list(norm.buffers())) == 9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_datamodule_moves_the_statistics_to_the_batch_and_saves_them_on_the_cpu():
    dm = DigitsDataModule(image_size=8, whitening="zca")
    dm.setup("fit")
    x = torch.rand(2, 1, 8, 8)
    expected = dm.normalize_batch(x)
    torch.testing.assert_close(dm.normalize_batch(x.cuda()).cpu(), expected)
    assert dm.mean.device.type == "cuda"
    assert all(isinstance(value, list) or value.device.type == "cpu" for value in dm.state_dict().values())
    assert dm.normalize_batch(x).device.type == "cpu"


def test_unfitted_and_mismatched_statistics_are_refused():
    with pytest.raises(RuntimeError, match="no statistics yet"):
        Normalization()(torch.rand(1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="setup\\(\\) must run before"):
        DigitsDataModule(image_size=8).normalize_batch(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="scope must be 'channel' or 'image'"):
        Normalization(scope="pixel")
    norm = _fitted()
    with pytest.raises(ValueError, match="3 channels but this data has 1"):
        norm.load_checkpoint_state({"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="has no whitening statistics"):
        Normalization("zca").load_checkpoint_state(norm.checkpoint_state(), "DigitsDataModule")
