"""report.html in a real browser: headless Chromium, driven over the DevTools protocol with the standard library.

The page must load from ``file://`` with no console error, no uncaught exception and no request other than the
file itself and ``data:`` URIs (the report is self-contained: it opens offline, with no server); every ``<img>``
must be decoded (``complete`` and ``naturalWidth > 0``), and a screenshot must show content, not a blank page.
The harness is first checked on hand-written pages: a clean one passes, and one with a console error, a thrown
exception, an external image, a broken image or nothing drawn fails with each fault named. Then a real report:
``build_report`` on the ``metrics.csv`` of a short ``Trainer`` fit with a ``CSVLogger`` and traincraft's monitors.

Chromium comes from Debian's package (``make browser`` installs it when missing, as root with apt-get); without
it these tests skip with a message saying so. The browser speaks the protocol on a pipe
(``--remote-debugging-pipe``: it reads NUL-separated JSON commands on fd 3 and writes replies and events on fd 4),
so no port is opened and nothing beyond Python's standard library is needed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_TIMEOUT = 60.0  # seconds for any one protocol reply or page load: generous for a busy 2-core machine
_MAX_HEIGHT = 20000  # CSS pixels of the full-page screenshot


def _chromium() -> str | None:
    explicit = os.environ.get("TRAINCRAFT_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in _CANDIDATES if (path := shutil.which(name))), None)


class _Browser:
    """One headless Chromium process and its DevTools pipe; :meth:`open` loads a page in a fresh tab."""

    def __init__(self, executable: str) -> None:
        self._profile = tempfile.mkdtemp(prefix="traincraft-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        args = ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-sync", "--disable-background-networking",
                "--disable-component-update", "--mute-audio", f"--user-data-dir={self._profile}", "--hide-scrollbars",
                "about:blank"]
        # Chromium expects the protocol pipes at fds 3 and 4. The pipes go in as stdin/stdout and the shell moves
        # them there (no preexec_fn, which is unsafe in a process with threads).
        self._process = subprocess.Popen(
            ["/bin/sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', executable, *args],
            stdin=to_child_r, stdout=from_child_w, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue[dict] = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_child, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                else:
                    self._events.put(message)
        with self._cond:  # the browser closed its end: wake any waiter
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + _TIMEOUT
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._process.poll() is not None:
                    raise TimeoutError(f"Chromium gave no reply to {method} within {_TIMEOUT:.0f} s "
                                       f"(exit code {self._process.poll()})")
                self._cond.wait(min(left, 1.0))
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, settle: float = 0.5) -> _Page:
        """Load ``url`` in a new tab and record what happened: console, exceptions, requests, images, screenshot."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 1600, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self._drain()  # events of about:blank are not the page's
        page = _Page(url)
        self.send("Page.navigate", {"url": url}, session=session)
        deadline, loaded_at = time.monotonic() + _TIMEOUT, None
        while loaded_at is None or time.monotonic() < loaded_at + settle:  # after the load, catch late events
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    break
                continue
            if event.get("sessionId") != session:
                continue
            page.record(event)
            if event["method"] == "Page.loadEventFired" and loaded_at is None:
                loaded_at = time.monotonic()
        page.loaded = loaded_at is not None
        images = self.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images, i => { const r = i.getBoundingClientRect(); "
                          "return {src: i.getAttribute('src') || '', complete: i.complete, width: i.naturalWidth, "
                          "box: [r.left + scrollX, r.top + scrollY, r.width, r.height]}; }))",
            "returnByValue": True}, session=session)
        page.images = json.loads(images["result"]["value"])
        page.text = self.send("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''",
                                                   "returnByValue": True}, session=session)["result"]["value"]
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], _MAX_HEIGHT), "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip},
                         session=session)  # the whole page, so every panel is in the picture
        page.screenshot = base64.b64decode(shot["data"])
        self.send("Target.closeTarget", {"targetId": target})
        return page

    def _drain(self) -> None:
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        try:
            os.close(self._to_child)  # Chromium exits when its command pipe closes
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its own session: the browser's helper processes go with it
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
        finally:
            os.close(self._from_child)
            shutil.rmtree(self._profile, ignore_errors=True)


@dataclass
class _Page:
    url: str
    loaded: bool = False
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    text: str = ""
    screenshot: bytes = b""

    def record(self, event: dict) -> None:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console_errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            self.failed.append(params.get("errorText", "failed"))

    def problems(self) -> list[str]:
        """Every way the page falls short of a self-contained, offline report; empty when it is fine."""
        found = []
        if not self.loaded:
            found.append(f"load event never fired for {self.url}")
        found += [f"console error: {text}" for text in self.console_errors]
        found += [f"uncaught exception: {text}" for text in self.exceptions]
        found += [f"network request: {url}" for url in self.requests
                  if url != self.url and not url.startswith("data:")]
        found += [f"image not decoded: {image['src'][:80]}" for image in self.images
                  if not image["complete"] or image["width"] <= 0]
        pixels = _decode_png(self.screenshot)
        spread = float(pixels.std())
        ink = float((np.abs(pixels - np.median(pixels.reshape(-1, pixels.shape[-1]), axis=0)).max(-1) > 16).mean())
        if spread < 2.0 or ink < 0.002:
            found.append(f"blank screenshot: pixel std {spread:.2f}, {ink:.2%} of pixels differ from the background")
        for image in self.images:  # each picture shows in the screenshot: its box holds more than one colour
            x, y, w, h = (round(v) for v in image["box"])
            crop = pixels[max(y, 0):y + h, max(x, 0):x + w]
            if w < 8 or h < 8 or crop.size == 0 or float(crop.std()) < 2.0:
                found.append(f"image not shown: {image['src'][:80]} at {x},{y} size {w}x{h}")
        return found


def _decode_png(data: bytes) -> np.ndarray:
    """A PNG screenshot as an (H, W, 3) array of 0-255 floats (matplotlib's reader)."""
    from matplotlib import image

    pixels = image.imread(io.BytesIO(data), format="png")[..., :3].astype(np.float64)
    return pixels * 255.0 if pixels.max() <= 1.0 else pixels


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium is not installed: run `make browser` (Debian: apt-get install chromium) "
                    "or set TRAINCRAFT_CHROMIUM to a Chromium/Chrome executable")
    chromium = _Browser(executable)
    try:
        chromium.send("Browser.getVersion")  # fails fast (TimeoutError) if the browser did not come up
        yield chromium
    finally:
        chromium.close()


def _png_data_uri(blank: bool = False) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2), dpi=80)
    if not blank:
        figure.add_subplot().plot(np.sin(np.linspace(0, 6, 50)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _page(tmp_path: Path, body: str, name: str = "page.html") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head>"
                    f"<body style='background:#fff'>{body}</body></html>", encoding="utf-8")
    return path, path.resolve().as_uri()


_GOOD = "<h1>Training health report</h1><p>loss and accuracy</p><img alt='panel' src='{uri}'>"


def test_a_clean_self_contained_page_passes(browser, tmp_path):
    _, url = _page(tmp_path, _GOOD.format(uri=_png_data_uri()))
    page = browser.open(url)
    assert page.loaded
    assert page.problems() == []
    assert page.images and page.images[0]["width"] == 240  # 3 in x 80 dpi: the data: URI image was decoded
    assert "Training health report" in page.text


@pytest.mark.parametrize("fault, body, named", [
    ("console error", "<script>console.error('panel failed')</script>", "console error: panel failed"),
    ("exception", "<script>undefinedFunction()</script>", "uncaught exception: ReferenceError"),
    # port 9 (discard) on the loopback: the request is made and refused at once, nothing leaves the machine
    ("external image", "<img src='http://127.0.0.1:9/panel.png'>", "network request: http://127.0.0.1:9/panel.png"),
    ("external script", "<script src='http://127.0.0.1:9/plotly.js'></script>", "network request: http://127.0.0"),
    ("broken image", "<img src='data:image/png;base64,AAAA'>", "image not decoded: data:image/png"),
    ("sibling file", "<img src='panels/loss.png'>", "network request: file://"),
    ("hidden image", "<img style='display:none' src='{blank}'>", "image not shown: data:image/png"),
    ("blank image", "<img src='{blank}'>", "image not shown: data:image/png"),
])
def test_each_fault_of_a_page_is_named(browser, tmp_path, fault, body, named):
    _, url = _page(tmp_path, _GOOD.format(uri=_png_data_uri()) + body.format(blank=_png_data_uri(blank=True)))
    problems = browser.open(url).problems()
    assert any(p.startswith(named) for p in problems), (fault, problems)


def test_a_blank_page_fails(browser, tmp_path):
    _, url = _page(tmp_path, "")
    problems = browser.open(url).problems()
    assert [p for p in problems if p.startswith("blank screenshot")], problems


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """The report of a real (short) fit: CSVLogger and traincraft's monitors on a small convnet over digits."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from traincraft.callbacks import (
        CovariateShiftMonitor,
        CurvatureMonitor,
        DataDriftMonitor,
        GradientClipping,
        LearningRateMonitor,
    )
    from traincraft.data import DigitsDataModule
    from traincraft.modules import ImageClassifier
    from traincraft.report import build_report

    root = tmp_path_factory.mktemp("real_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: a second thread on a busy machine only slows it
    try:
        pl.seed_everything(0)
        module = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8,
                                 model_kwargs={"channels": [8, 16], "norm": "batch"})
        callbacks = [GradientClipping(threshold=1.0, log_layer_norms=True, log_depth_profile=True),
                     LearningRateMonitor(log_update_ratio=True, log_oscillation=True),
                     CovariateShiftMonitor(), DataDriftMonitor(), CurvatureMonitor(every_n_steps=6)]
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=12,
                             limit_val_batches=2, log_every_n_steps=2, logger=CSVLogger(root, name="run"),
                             callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(module, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    finally:
        torch.set_num_threads(threads)
    report = build_report(root / "run", out_dir=root / "report")
    return report, root / "report" / "report.html"


def test_the_real_report_loads_offline_with_every_panel_shown(browser, real_report, tmp_path):
    report, page_path = real_report
    page = browser.open(page_path.resolve().as_uri())
    (tmp_path / "screenshot.png").write_bytes(page.screenshot)  # for a person to look at
    assert page.problems() == [], f"{page.problems()} (screenshot: {tmp_path / 'screenshot.png'})"
    names = {panel.name for panel in report.panels}
    # the monitors above log what these panels draw; each is an <img> on the page, decoded and shown
    assert {"loss_accuracy", "learning_rate", "gradients", "sharpness", "activations", "drift"} <= names, names
    assert len(page.images) == len(report.panels)
    for panel in report.panels:
        assert panel.title in page.text
    for line in report.left_out:
        assert line in page.text
    for diagnosis in report.diagnoses:
        assert diagnosis.title in page.text
