"""Bad checkpoint files and bad SafeCheckpointIO arguments: one message naming the file (or value) and what to do."""

from __future__ import annotations

import io
import json
import random
import re
import zipfile

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from tests.helpers import tiny_trainer
from traincraft.checkpoint import CheckpointError, SafeCheckpointIO, seal, verify_checkpoint
from traincraft.cli import main

GOOD = {"state_dict": {"w": torch.arange(2048.0)}, "epoch": 1}
ALTERNATIVE = r"Resume from another checkpoint in .* with ckpt_path=<file>, the best or the newest listed: good\.ckpt"


def _sealed_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(GOOD, buffer)
    return b"".join(bytes(p) for p in seal(buffer.getvalue()))


def _flip(data: bytes, positions) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p] ^= 0xFF
    return bytes(out)


def _zip_of(**files: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _tensor_offset(data: bytes) -> int:
    return data.index(torch.arange(2048.0)[1000:1002].numpy().tobytes())


SEALED = _sealed_bytes()
FILES = {
    "empty": (lambda: b"", r"is empty \(0 bytes\): a save or copy of it was cut off"),
    "one byte": (lambda: SEALED[:1], r"is truncated or damaged: a zip archive of 1 bytes"),
    "half": (lambda: SEALED[: len(SEALED) // 2], r"is truncated or damaged: a zip archive of \d+ bytes whose end"),
    "record cut off": (lambda: SEALED[:-40], r"is damaged: its integrity record \(the zip comment\) is cut"),
    "central directory cut": (lambda: SEALED[:-200], r"is truncated or damaged"),
    "one bit in a tensor": (lambda: _flip(SEALED, [_tensor_offset(SEALED)]), r"is damaged: the sha256 of its"),
    "200 flipped bytes": (lambda: _flip(SEALED, random.Random(0).sample(range(len(SEALED) - 100), 200)),
                          r"is damaged: the sha256"),
    "flipped zip header": (lambda: _flip(SEALED, [10]), r"is damaged: the sha256"),
    "altered digest": (lambda: SEALED[:-1] + (b"0" if SEALED[-1:] != b"0" else b"1"), r"is damaged: the sha256"),
    "altered record magic": (lambda: SEALED.replace(b"traincraft-checkpoint", b"traincraft-chekpoints"),
                             r"its integrity record \(the zip comment\) is cut or altered"),
    "random bytes": (lambda: b"\x17" + random.Random(1).randbytes(3000), r"is not a PyTorch checkpoint: it starts"),
    "zeros": (lambda: bytes(4096), r"is not a PyTorch checkpoint: it starts with unrecognized bytes 00 00"),
    "yaml": (lambda: b"trainer:\n  max_epochs: 3\n", r"is a text file \(it starts with 'trainer:"),
    "json": (lambda: json.dumps({"epoch": 1}).encode(), r"is a text file \(it starts with '\{\"epoch\""),
    "hdf5": (lambda: b"\x89HDF\r\n\x1a\n" + bytes(100), r"is an HDF5 file \(Keras/h5py\)"),
    "npy": (lambda: b"\x93NUMPY\x01\x00" + bytes(100), r"is a NumPy \.npy array"),
    "safetensors": (lambda: (20).to_bytes(8, "little") + b'{"w":{"dtype":"F32"}}', r"is a safetensors file"),
    "gguf": (lambda: b"GGUF\x03\x00\x00\x00" + bytes(64), r"is a GGUF model file"),
    "zip of other files": (lambda: _zip_of(**{"readme.txt": "hi"}), r"is a zip archive but not a PyTorch checkpoint"),
    "bare state_dict": (lambda: _torch_bytes(torch.nn.Linear(2, 2).state_dict()),
                        r"is a bare state_dict \(2 tensors, e.g. 'weight'\), not a Lightning checkpoint"),
    "a tensor": (lambda: _torch_bytes(torch.ones(3)), r"holds a Tensor, not a checkpoint dictionary"),
    "a whole nn.Module": (lambda: _torch_bytes(torch.nn.Linear(2, 2)),
                          r"could not be unpickled \(UnpicklingError: .*Unsupported global.*weights_only=True refuses"),
    "legacy format, damaged": (lambda: _torch_bytes(GOOD, _use_new_zipfile_serialization=False)[:60],
                               r"could not be unpickled"),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_unusable_checkpoint_files(tmp_path, kind):
    make, message = FILES[kind]
    (tmp_path / "good.ckpt").write_bytes(SEALED)
    path = tmp_path / "last.ckpt"
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as raised:
        SafeCheckpointIO().load_checkpoint(path)
    text = str(raised.value)
    assert text.startswith(f"Checkpoint {path} ") and re.search(message, text), text
    assert re.search(ALTERNATIVE + r" \(sealed, intact", text), text


def test_crc_damage_in_a_checkpoint_saved_without_the_plugin(tmp_path):
    path = tmp_path / "last.ckpt"
    raw = _torch_bytes(GOOD)
    path.write_bytes(_flip(raw, [_tensor_offset(raw)]))
    with pytest.raises(CheckpointError, match=r"record '.*data/0' fails the zip CRC32 check\. No usable checkpoint "
                                              r"was found in .*: train again without ckpt_path"):
        verify_checkpoint(path)


def test_unsealed_checkpoint_when_a_record_is_required(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(_torch_bytes(GOOD))
    with pytest.raises(CheckpointError, match=r"last.ckpt carries no integrity record \(it was not saved by "
                                              r"SafeCheckpointIO\) and require_record=True"):
        SafeCheckpointIO(require_record=True).load_checkpoint(path)


def test_missing_file_and_missing_directory(tmp_path):
    (tmp_path / "good.ckpt").write_bytes(SEALED)
    with pytest.raises(CheckpointError, match=rf"Checkpoint {tmp_path / 'lost.ckpt'} does not exist\. {ALTERNATIVE}"):
        verify_checkpoint(tmp_path / "lost.ckpt")
    with pytest.raises(CheckpointError, match=r"does not exist\. The directory .*nowhere does not exist either: check "
                                              r"the path, or train without ckpt_path"):
        verify_checkpoint(tmp_path / "nowhere" / "last.ckpt")


def test_a_directory_instead_of_a_file(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"last.ckpt is a directory, not a checkpoint file \(a sharded "
                                              r"checkpoint needs its strategy\)"):
        verify_checkpoint(tmp_path / "last.ckpt")


def test_trainer_fit_with_a_missing_checkpoint_gets_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"^Checkpoint .*missing.ckpt does not exist\. No usable checkpoint"):
        tiny_trainer(plugins=[SafeCheckpointIO()]).fit(BoringModel(), ckpt_path=tmp_path / "missing.ckpt")


def test_cli_validate_with_an_empty_checkpoint_exits_2_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as raised:
        main(["validate", "--trainer.logger=false", f"--ckpt_path={tmp_path / 'empty.ckpt'}"])
    assert raised.value.code == 2
    assert f"traincraft: error: Checkpoint {tmp_path / 'empty.ckpt'} is empty (0 bytes)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: SafeCheckpointIO(require_record="yes"), TypeError, r"require_record must be True or False; received 'yes'"),
        (lambda: SafeCheckpointIO().save_checkpoint(GOOD, "x.ckpt", storage_options={"retries": 3}), TypeError,
         r"takes no storage_options; received \{'retries': 3\}\. Drop the argument"),
        (lambda: seal(b"not a zip archive at all......"), ValueError,
         r"seal\(\) expects the bytes of torch.save's zip format .* received 30 bytes"),
        (lambda: seal(SEALED), ValueError, r"an archive with no comment.*Save with torch.save\(obj, buffer\)"),
    ],
    ids=["require_record not a bool", "storage_options", "seal non-zip", "seal twice"],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()

