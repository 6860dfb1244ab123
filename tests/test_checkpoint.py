"""SafeCheckpointIO: sealed files, exact round trips on models we did not write, clear refusals, crash safety."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import signal
import tempfile
import time
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from tests.helpers import tiny_trainer
from traincraft.checkpoint import CheckpointError, SafeCheckpointIO, verify_checkpoint
from traincraft.cli import TraincraftCLI, main


def _digest_by_hand(path: Path) -> str:
    """The reference: zipfile's reading of the comment, and hashlib over every byte before the comment length."""
    data = path.read_bytes()
    comment = zipfile.ZipFile(path).comment
    assert comment.startswith(b"traincraft-checkpoint sha256=")
    assert hashlib.sha256(data[: len(data) - len(comment) - 2]).hexdigest() == comment.split(b"=")[1].decode()
    return comment.split(b"=")[1].decode()


class _GAN(pl.LightningModule):
    """Two optimizers, manual optimization: a generator and a discriminator on 2-d points."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        g_opt, d_opt = self.optimizers()
        real = batch[0]
        noise = torch.Generator().manual_seed(1000 * self.current_epoch + batch_idx)  # resumable without RNG state
        fake = self.generator(torch.randn(real.shape[0], 4, generator=noise))
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), torch.ones(len(real), 1)) + bce(
            self.discriminator(fake.detach()), torch.zeros(len(real), 1))
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = bce(self.discriminator(fake), torch.ones(len(real), 1))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3))

    def train_dataloader(self):
        points = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) + 3
        return DataLoader(torch.utils.data.TensorDataset(points), batch_size=8)


class _TinyLM(LightningTransformer):
    def __init__(self):
        super().__init__(vocab_size=16)
        self.model = Transformer(vocab_size=16, ninp=8, nhead=2, nhid=8, nlayers=1, dropout=0.0)

    def prepare_data(self):
        pass

    def train_dataloader(self):
        tokens = torch.randint(0, 16, (16, 2, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader([(t[0], t[1]) for t in tokens], batch_size=4)


MODELS = {"boring": BoringModel, "gan": _GAN, "transformer-lm": _TinyLM}


@pytest.mark.parametrize(
    ("model", "trainer_kwargs"),
    [
        ("boring", {}),
        ("boring", {"precision": "bf16-mixed", "accumulate_grad_batches": 2}),
        ("gan", {}),
        ("transformer-lm", {"accumulate_grad_batches": 2}),
    ],
)
def test_resume_through_sealed_checkpoints_equals_an_uninterrupted_run(tmp_path, model, trainer_kwargs):
    def fit(epochs, ckpt_path=None):
        pl.seed_everything(0)
        module = MODELS[model]()
        trainer = tiny_trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=0, plugins=[SafeCheckpointIO()],
                               enable_checkpointing=True, callbacks=[ModelCheckpoint(tmp_path / "ckpts", save_last=True)],
                               **trainer_kwargs)
        trainer.fit(module, ckpt_path=ckpt_path)
        return module

    straight = {k: v.clone() for k, v in fit(2).state_dict().items()}
    (tmp_path / "ckpts" / "last.ckpt").unlink()
    for stale in (tmp_path / "ckpts").glob("*.ckpt"):
        stale.unlink()
    fit(1)
    last = tmp_path / "ckpts" / "last.ckpt"
    assert verify_checkpoint(last) == _digest_by_hand(last)
    assert torch.load(last, weights_only=True)["epoch"] == 0  # still a plain torch.load input
    resumed = fit(2, ckpt_path=last).state_dict()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    assert not [p for p in (tmp_path / "ckpts").iterdir() if p.name.endswith(".tmp")]  # clean saves leave none


def _sealed(tmp_path: Path, name="last.ckpt") -> Path:
    path = tmp_path / "ckpts" / name
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4096.0)}, "epoch": 3}, path)
    return path


def test_two_hundred_flipped_bytes_are_refused_with_the_path_and_the_good_alternative(tmp_path):
    good = _sealed(tmp_path, "best-epoch02.ckpt")
    path = _sealed(tmp_path)
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for position in rng.sample(range(len(data) - 200), 200):  # the record itself left alone: data damage
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"Checkpoint {path} is damaged: the sha256 .* recorded when it was "
                                              rf"saved.*best-epoch02.ckpt \(sealed, intact"):
        SafeCheckpointIO().load_checkpoint(path)
    # through the Trainer: refused before any state is restored
    model = BoringModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=str(path)):
        tiny_trainer(max_epochs=1, plugins=[SafeCheckpointIO()]).fit(model, ckpt_path=path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert verify_checkpoint(good)  # the alternative named in the message does load


def test_a_single_flipped_bit_in_tensor_data_is_caught(tmp_path):
    path = _sealed(tmp_path)
    data = bytearray(path.read_bytes())
    offset = data.index(torch.arange(4096.0)[1000:1002].numpy().tobytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"][1000] != 1000.0  # plain torch.load: silent
    with pytest.raises(CheckpointError, match="is damaged"):
        verify_checkpoint(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", r"is empty \(0 bytes\)"),
        ("truncated", r"is truncated or damaged: a zip archive of \d+ bytes whose end record is missing"),
        ("random", r"is not a PyTorch checkpoint: it starts with unrecognized bytes"),
        ("missing", r"does not exist"),
        ("yaml", r"is a text file \(it starts with 'model:"),
        ("bare-state-dict", r"is a bare state_dict \(1 tensors, e.g. 'weight'\), not a Lightning checkpoint"),
    ],
)
def test_unusable_files_get_one_message_naming_the_file_and_what_to_do(tmp_path, damage, message):
    good = _sealed(tmp_path, "best.ckpt")
    path = tmp_path / "ckpts" / "last.ckpt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "random":
        path.write_bytes(b"\x17" + random.Random(1).randbytes(4095))
    elif damage == "yaml":
        path.write_text("model:\n  class_path: x\n")
    elif damage == "bare-state-dict":
        torch.save(torch.nn.Linear(2, 2, bias=False).state_dict(), path)
    with pytest.raises(CheckpointError) as raised:
        SafeCheckpointIO().load_checkpoint(path)
    text = str(raised.value)
    assert text.startswith(f"Checkpoint {path} ")
    assert re.search(message, text), text
    assert "best.ckpt (sealed, intact" in text and "ckpt_path=<file>" in text
    assert "\n" not in text  # one message


def test_a_lightning_checkpoint_without_record_loads_after_its_crc_check(tmp_path):
    path = tmp_path / "plain.ckpt"
    TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(8.0)}}, path)
    assert verify_checkpoint(path) is None
    assert torch.equal(SafeCheckpointIO().load_checkpoint(path)["state_dict"]["w"], torch.arange(8.0))
    with pytest.raises(CheckpointError, match="carries no integrity record"):
        SafeCheckpointIO(require_record=True).load_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[data.index(torch.arange(8.0)[3:5].numpy().tobytes())] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"record 'archive/data/0' fails the zip CRC32 check"):
        verify_checkpoint(path)


def test_an_exception_mid_write_leaves_the_previous_file_intact_and_no_temporary(tmp_path, monkeypatch):
    path = _sealed(tmp_path)
    before = path.read_bytes()
    real_fsync = os.fsync

    def failing_fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4096)}}, path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(KeyboardInterrupt):
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4096)}}, path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]
    assert SafeCheckpointIO().load_checkpoint(path)["epoch"] == 3


def test_the_next_save_removes_only_temporaries_of_dead_writers_of_this_host(tmp_path):
    from traincraft._atomic_write import _HOST

    folder = tmp_path / "ckpts"
    folder.mkdir()
    dead = os.fork()  # a reaped child: a pid of this host that is surely not running
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    names = {
        "dead writer": f".best.ckpt.{_HOST}-{dead}-0123abcd.tmp",
        "live writer": f".last.ckpt.{_HOST}-{os.getppid()}-0123abcd.tmp",
        "other host": f".last.ckpt.elsewhere-{dead}-0123abcd.tmp",
        "not ours": ".notes.tmp",
    }
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, folder / "last.ckpt")
    assert sorted(os.listdir(folder)) == sorted(["last.ckpt", names["live writer"], names["other host"], names["not ours"]])


def _other_filesystem_tmpdir(tmp_path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    return shm


@pytest.mark.parametrize("layout", ["same-filesystem", "tmpdir-on-tmpfs"])
def test_sigkill_during_saves_leaves_a_loadable_complete_checkpoint(tmp_path, layout):
    """A forked writer saves 16 MB checkpoints in a loop; it is SIGKILLed as soon as a temporary file appears."""
    tmp_root = tmp_path if layout == "same-filesystem" else _other_filesystem_tmpdir(tmp_path)
    if tmp_root is None:
        pytest.skip("no tmpfs on another filesystem")
    tmpdir = Path(tempfile.mkdtemp(dir=tmp_root))
    path = tmp_path / "run" / "last.ckpt"
    plugin = SafeCheckpointIO()
    # built before fork: the child runs no torch kernels (an OpenMP pool does not survive fork)
    generations = [{"state_dict": {"w": torch.full((4_000_000,), float(g))}, "generation": g} for g in range(3)]
    plugin.save_checkpoint(generations[0], path)
    mid_write = 0
    try:
        for _ in range(3):
            pid = os.fork()
            if pid == 0:  # the writer: never returns into pytest
                try:
                    os.environ["TMPDIR"] = str(tmpdir)
                    tempfile.tempdir = None
                    for i in range(200):
                        plugin.save_checkpoint(generations[1 + i % 2], path)
                finally:
                    os._exit(0)
            deadline = time.monotonic() + 20
            while not any(n.endswith(".tmp") for n in os.listdir(path.parent)) and time.monotonic() < deadline:
                pass
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            mid_write += any(n.endswith(".tmp") for n in os.listdir(path.parent))
            checkpoint = plugin.load_checkpoint(path)  # verified: whole, and one generation throughout
            w = checkpoint["state_dict"]["w"]
            assert torch.equal(w, torch.full_like(w, float(checkpoint["generation"])))
        assert mid_write >= 1  # at least one kill landed inside a write
        assert list(tmpdir.iterdir()) == []  # nothing staged in TMPDIR, whatever filesystem it is on
        plugin.save_checkpoint(generations[0], path)
        assert os.listdir(path.parent) == ["last.ckpt"]  # the killed saves' temporaries are cleaned
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_control_the_same_kill_empties_lightnings_stock_checkpoint_across_filesystems(tmp_path):
    """The harness sees the reported failure: stock TorchCheckpointIO, TMPDIR on tmpfs, killed during its copy."""
    tmp_root = _other_filesystem_tmpdir(tmp_path)
    if tmp_root is None:
        pytest.skip("no tmpfs on another filesystem")
    tmpdir = tempfile.mkdtemp(dir=tmp_root)
    path = tmp_path / "run" / "last.ckpt"
    stock = TorchCheckpointIO()
    generations = [{"state_dict": {"w": torch.full((4_000_000,), float(g))}} for g in range(2)]
    stock.save_checkpoint(generations[0], path)
    full = path.stat().st_size
    try:
        pid = os.fork()
        if pid == 0:
            try:
                tempfile.tempdir = tmpdir  # where fsspec stages the bytes
                for _ in range(200):
                    stock.save_checkpoint(generations[1], path)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 20
        while path.stat().st_size == full and time.monotonic() < deadline:  # the copy onto last.ckpt began
            pass
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.stat().st_size < full  # the previous good checkpoint is gone
        with pytest.raises(CheckpointError, match="is empty|is truncated"):
            verify_checkpoint(path)
        assert os.listdir(tmpdir)  # and the staged copy stays behind in TMPDIR
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_remote_urls_round_trip_and_are_verified():
    plugin = SafeCheckpointIO()
    url = "memory://traincraft-test/ckpts/last.ckpt"
    plugin.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}}, url)
    assert torch.equal(plugin.load_checkpoint(url)["state_dict"]["w"], torch.arange(3.0))
    import fsspec

    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat(url))
    data[100] ^= 0xFF
    fs.pipe(url, bytes(data))
    with pytest.raises(CheckpointError, match=rf"Checkpoint {url} is damaged"):
        plugin.load_checkpoint(url)
    fs.rm("/traincraft-test", recursive=True)


def test_traincraft_fit_uses_the_plugin_and_prints_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    cli = TraincraftCLI(args=["--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    bad = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(os.urandom(1000).replace(b"\x80", b"\x81").replace(b"PK", b"pk"))
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--trainer.logger=false", f"--ckpt_path={bad}"])
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"traincraft: error: Checkpoint {bad} is not a PyTorch checkpoint")
    assert "Traceback" not in "\n".join(err)


def test_save_refuses_storage_options():
    with pytest.raises(TypeError, match=r"takes no storage_options; received \{'a': 1\}"):
        SafeCheckpointIO().save_checkpoint({}, "x.ckpt", storage_options={"a": 1})


def test_the_record_is_in_the_zip_comment_of_an_unchanged_torch_archive(tmp_path):
    checkpoint = {"state_dict": {"w": torch.arange(5.0)}}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path = _sealed(tmp_path)
    SafeCheckpointIO().save_checkpoint(checkpoint, path)
    data = path.read_bytes()
    raw = buffer.getvalue()
    assert data[: len(raw) - 2] == raw[:-2]  # byte for byte torch.save's output, then the comment
    assert _digest_by_hand(path) == hashlib.sha256(raw[:-2]).hexdigest()


def test_load_from_checkpoint_verifies_the_file_first(tmp_path):
    from traincraft.data import DigitsDataModule
    from traincraft.modules import ImageClassifier

    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
    datamodule = DigitsDataModule(image_size=8, batch_size=32)
    trainer = tiny_trainer(max_steps=2, plugins=[SafeCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert DigitsDataModule.load_from_checkpoint(path).batch_size == 32
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of tensor data
    path.write_bytes(bytes(data))
    for cls in (ImageClassifier, DigitsDataModule):  # refused before anything is unpickled, naming the file
        with pytest.raises(CheckpointError, match=rf"Checkpoint {re.escape(str(path))} is damaged"):
            cls.load_from_checkpoint(path)
