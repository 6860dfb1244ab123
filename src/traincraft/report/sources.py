"""Readers: a run as a logger left it (CSV, TensorBoard events, a W&B offline run) becomes one :class:`RunMetrics`.

Every reader keys a value by the trainer's ``global_step``: the ``step`` column of Lightning's ``CSVLogger``, the
event step of ``TensorBoardLogger``, and the ``trainer/global_step`` entry Lightning's ``WandbLogger`` adds to
each history row (W&B's own ``_step`` counts calls to ``log``, not training steps).
"""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np

from traincraft.report._data import RunMetrics, Series

_CSV_NAME = "metrics.csv"
_TB_GLOB = "events.out.tfevents*"
_WANDB_GLOB = "*.wandb"
#: Runs whose files were written within this many seconds of the newest one count as the same run (a fit writes
#: its CSV, events and W&B files together); among those, the fastest format to read wins.
_SAME_RUN_S = 300.0
_PREFERENCE = {"csv": 0, "tensorboard": 1, "wandb": 2}
_LOOKED_FOR = (f"a {_CSV_NAME} (CSVLogger), TensorBoard event files ({_TB_GLOB}) or a W&B run directory "
               f"(offline-run-*/run-* holding a run-*.wandb file)")


def read_run(source: str | Path) -> RunMetrics:
    """Read every scalar a run logged.

    Args:
        source: a run directory (searched below for the newest run; see :func:`find_run`), a ``metrics.csv``,
            a TensorBoard event file or folder, a W&B run directory or its ``run-*.wandb`` file.

    Raises:
        FileNotFoundError: ``source`` does not exist, or holds no run.
        ValueError: the file is empty or cannot be parsed.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = path.write_text("epoch,step,train/loss,val/acc\\n0,9,2.5,\\n0,9,,0.75\\n1,19,1.5,\\n")
        >>> run = read_run(path)
        >>> run.get("train/loss").steps.tolist(), run.get("train/loss").values.tolist(), run.max_step
        ([9, 19], [2.5, 1.5], 19)
    """
    kind, path = find_run(source)
    if kind == "csv":
        return read_csv(path)
    if kind == "tensorboard":
        return read_tensorboard(path)
    return read_wandb(path)


def find_run(source: str | Path) -> tuple[str, Path]:
    """``(kind, path)`` of the run ``source`` names: ``kind`` is ``"csv"``, ``"tensorboard"`` or ``"wandb"``.

    A directory is searched below; of several runs the newest (by modification time) is taken, and among files
    written within five minutes of it (one fit writing to several loggers) the CSV file, then TensorBoard, then W&B.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Run source {str(path)!r} does not exist. Pass a run directory or one of: "
                                f"{_LOOKED_FOR}.")
    if path.is_file():
        if path.suffix == ".csv":
            return "csv", path
        if path.name.startswith("events.out.tfevents"):
            return "tensorboard", path
        if path.suffix == ".wandb":
            return "wandb", path.parent
        raise ValueError(f"Cannot read {str(path)!r}: not a .csv file, a TensorBoard event file (events.out.tfevents*) "
                         "or a W&B run file (run-*.wandb). Pass the run's directory instead to let it be searched.")
    candidates: list[tuple[float, str, Path]] = []
    for csv_path in path.rglob(_CSV_NAME):
        candidates.append((csv_path.stat().st_mtime, "csv", csv_path))
    event_dirs: dict[Path, float] = {}
    for event in path.rglob(_TB_GLOB):
        event_dirs[event.parent] = max(event_dirs.get(event.parent, 0.0), event.stat().st_mtime)
    candidates += [(mtime, "tensorboard", folder) for folder, mtime in event_dirs.items()]
    for wandb_file in path.rglob(_WANDB_GLOB):
        if wandb_file.name.startswith("run-"):
            candidates.append((wandb_file.stat().st_mtime, "wandb", wandb_file.parent))
    if not candidates:
        raise FileNotFoundError(f"No run found under {str(path)!r}: looked for {_LOOKED_FOR}. Point at the directory "
                                "the trainer's loggers wrote to (e.g. runs/ of `traincraft fit`).")
    newest = max(mtime for mtime, _, _ in candidates)
    recent = [c for c in candidates if c[0] >= newest - _SAME_RUN_S]
    _, kind, found = min(recent, key=lambda c: (_PREFERENCE[c[1]], -c[0]))
    return kind, found


def _series(key: str, steps: np.ndarray, values: np.ndarray) -> Series:
    steps, values = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
    if len(steps) > 1 and (np.diff(steps) < 0).any():  # logged out of order (a resumed run): sort, stably
        order = np.argsort(steps, kind="stable")  # several values at one step keep their logged order
        steps, values = steps[order], values[order]
    return Series(key, np.ascontiguousarray(steps), np.ascontiguousarray(values))


def read_csv(path: str | Path) -> RunMetrics:
    """Read a Lightning ``CSVLogger`` ``metrics.csv``: sparse rows of ``epoch``, ``step``, then one column per key.

    The body is parsed in one call to numpy's C reader after empty cells become ``nan`` (a 100,000-row, 60-key
    file takes about a second), then each column keeps the rows where it has a value. ``epoch`` becomes a series
    like the others.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{str(path)!r} is empty: the run logged nothing. Log at least one metric (self.log) and "
                         "check trainer.log_every_n_steps against the number of steps.")
    first_end = data.find(b"\n")
    if first_end > 0 and data[first_end - 1:first_end] == b"\r":  # the csv module's "\r\n" line ends
        data = data.replace(b"\r\n", b"\n")
    head, _, body = data.partition(b"\n")
    header = next(csv.reader([head.decode("utf-8", errors="replace")]))  # keys may be quoted
    if "step" not in header:
        raise ValueError(f"{str(path)!r} is not a Lightning CSVLogger metrics file: its header "
                         f"{header[:6]}{'...' if len(header) > 6 else ''} has no 'step' column.")
    series: dict[str, Series] = {}
    if not body.strip():
        raise ValueError(f"{str(path)!r} has a header but no rows: the run logged nothing yet. Check "
                         "trainer.log_every_n_steps against the number of steps, or read the run after it logged.")
    body = b"\n" + body.strip(b"\n")
    while b"\n\n" in body:  # blank lines carry no row
        body = body.replace(b"\n\n", b"\n")
    # Which cells are empty (the key was not logged on that row), from the delimiter positions: a field is empty
    # when the delimiters around it are adjacent. A logged NaN is written "nan" and stays a value.
    raw = np.frombuffer(body, dtype=np.uint8)
    bounds = np.append(np.flatnonzero((raw == ord(",")) | (raw == ord("\n"))), len(raw))
    rows = int((raw == ord("\n")).sum())
    if len(bounds) - 1 != rows * len(header):
        raise ValueError(f"{str(path)!r} is garbled: {rows} rows hold {len(bounds) - 1} fields, not "
                         f"{len(header)} each as the header says. Was the file cut short or written by two runs "
                         "at once?")
    empty = (np.diff(bounds) == 1).reshape(rows, len(header))
    # Empty cells become "nan" so that numpy's C parser reads the body in one call. Two passes, because the first
    # leaves every second cell of a run of empty ones (",,," -> ",nan,,").
    body = body.replace(b",,", b",nan,").replace(b",,", b",nan,")
    body = body.replace(b",\n", b",nan\n").replace(b"\n,", b"\nnan,")
    if body.endswith(b","):
        body += b"nan"
    try:
        table = np.loadtxt(io.BytesIO(body), delimiter=",", dtype=np.float64, ndmin=2, encoding=None)
    except ValueError:
        table = _parse_slowly(path, data, len(header))  # the fast path's byte rewrites missed a layout: cell by cell
    step_col = table[:, header.index("step")]
    has_step = ~empty[:, header.index("step")] & np.isfinite(step_col)
    steps = step_col[has_step].astype(np.int64)
    table, present = table[has_step], ~empty[has_step]
    for column, key in enumerate(header):
        if key != "step" and present[:, column].any():
            series[key] = _series(key, steps[present[:, column]], table[present[:, column], column])
    return RunMetrics(series, "csv", path)


def _parse_slowly(path: Path, data: bytes, width: int) -> np.ndarray:
    """The body of a metrics file parsed with the csv module, cell by cell (an empty cell is NaN); slow but exact."""
    rows = [row for row in csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))) if row][1:]
    table = np.full((len(rows), width), np.nan)
    for index, row in enumerate(rows):
        for column, cell in enumerate(row):
            if cell:
                try:
                    table[index, column] = float(cell)
                except ValueError:
                    raise ValueError(f"{str(path)!r} is garbled: row {index + 1}, column {column + 1} holds {cell!r}, "
                                     "not a number. Lightning's CSVLogger writes a number or nothing in each cell; "
                                     "was the file edited or cut short?") from None
    return table


def read_tensorboard(path: str | Path) -> RunMetrics:
    """Read the scalars of TensorBoard event files (a folder: all its event files; or one file).

    Histograms, images and other non-scalar tags go to :attr:`RunMetrics.other`.

    Raises:
        ImportError: ``tensorboard`` is not installed (it is in traincraft's ``dev`` extra).
    """
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        raise ImportError(f"Reading the TensorBoard run {str(path)!r} needs the tensorboard package: "
                          "pip install tensorboard (or pip install traincraft[dev]).") from None
    path = Path(path)
    accumulator = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 1,
                                                                 ea.IMAGES: 1, ea.COMPRESSED_HISTOGRAMS: 1})
    try:
        accumulator.Reload()
    except Exception as error:  # corrupt records: the reader raises its own types (DataLossError, ...)
        raise ValueError(f"Cannot read the TensorBoard events {str(path)!r}: {error}") from error
    tags = accumulator.Tags()
    series: dict[str, Series] = {}
    for tag in tags.get(ea.SCALARS, []):
        events = accumulator.Scalars(tag)
        series[tag] = _series(tag, np.array([e.step for e in events], dtype=np.int64),
                              np.array([e.value for e in events], dtype=np.float64))
    for tag in tags.get(ea.TENSORS, []):  # summary-v2 scalars are 0-d tensors
        events = accumulator.Tensors(tag)
        try:
            values = [float(ea.tensor_util.make_ndarray(e.tensor_proto)) for e in events]
        except (TypeError, ValueError):
            continue
        series.setdefault(tag, _series(tag, np.array([e.step for e in events], dtype=np.int64),
                                       np.array(values, dtype=np.float64)))
    other = {tag: "histogram" for tag in tags.get(ea.HISTOGRAMS, [])}
    other.update({tag: "image" for tag in tags.get(ea.IMAGES, [])})
    if not series and not other and not any(path.glob(_TB_GLOB)) and not path.is_file():
        raise FileNotFoundError(f"No TensorBoard event files ({_TB_GLOB}) in {str(path)!r}.")
    return RunMetrics(series, "tensorboard", path, other)


def _wandb_records(run_file: Path):
    """The record payloads of a W&B ``.wandb`` file: a ``:W&B`` header, then LevelDB-log blocks of 32 KiB."""
    raw = run_file.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{str(run_file)!r} is not a W&B run file (it does not start with ':W&B').")
    block, pos, pieces = 32768, 7, []  # header: magic (4), version (2), magic byte (1)
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:  # no header fits in the rest of the block: it is zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero-filled tail of an unfinished block
            pos += room - 7
            continue
        pieces.append(raw[pos:pos + length])
        pos += length
        if kind in (1, 4):  # FULL, or LAST piece of FIRST/MIDDLE.../LAST
            yield b"".join(pieces)
            pieces = []


def read_wandb(path: str | Path) -> RunMetrics:
    """Read the history of a W&B offline run (``offline-run-*`` or ``run-*`` directory, or its ``.wandb`` file).

    The step of a row is Lightning's ``trainer/global_step`` entry (W&B's ``_step`` where a row lacks it);
    rows of W&B media (histograms, images, tables) go to :attr:`RunMetrics.other`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"No W&B run file (run-*.wandb) in {str(path)!r}.")
    columns: dict[str, tuple[list[int], list[float]]] = {}
    other: dict[str, str] = {}
    for payload in _wandb_records(files[-1]):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # a torn last record of a killed run
            continue
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        step = row.pop("trainer/global_step", row.get("_step"))
        if step is None:
            continue
        # W&B flattens media into nested keys ("grid/_type", "grid/count", ...): the prefix is the media key
        media = {key[: -len("/_type")]: value for key, value in row.items() if key.endswith("/_type")}
        for key, kind in media.items():
            other[key] = str(kind).replace("-file", "")
        for key, value in row.items():
            if key.startswith("_") or any(key.startswith(prefix + "/") for prefix in media):
                continue
            if isinstance(value, dict):  # media: {"_type": "histogram" | "image-file" | ...}
                other[key] = str(value.get("_type", "media")).replace("-file", "")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):  # json reads NaN/Infinity too
                steps, values = columns.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
    series = {key: _series(key, np.array(s, dtype=np.int64), np.array(v, dtype=np.float64))
              for key, (s, v) in columns.items()}
    return RunMetrics(series, "wandb", path, other)

