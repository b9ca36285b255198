"""A real headless browser for the page tests: Debian's Chromium, driven over the DevTools
protocol with a small synchronous client (the `websockets` package), nothing downloaded.

What a test gets: open a URL and wait for the page, read its text (the DOM, as a person
would read it), evaluate an expression, fill a form, take a full-page screenshot, and
every console error, uncaught exception, failed load and every URL the page requested.
Host names other than loopback do not resolve in this browser (``--host-resolver-rules``),
so a page that reaches out to a CDN shows it as a failed request.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str | None:
    """The installed Chromium, or None."""
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Chromium's path; skip the test without it, or fail in CI (where .ci/run installs it)."""
    found = chromium_binary()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


class Browser:
    """One headless Chromium process with one tab; stop it with :meth:`close` (by pid)."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        from websockets.sync.client import connect

        binary = require_chromium()
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1",
             # Nothing but loopback resolves: a page that needs the internet fails visibly.
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        url = self._devtools_url(time.time() + 60)
        self._connection = connect(url, max_size=None, open_timeout=30)
        self.ws = self._connection.__enter__()
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def _devtools_url(self, deadline: float) -> str:
        lines = []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            lines.append(line)
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                return found.group(1)
        self.close()
        raise RuntimeError("chromium did not start its DevTools endpoint: " + "".join(lines[-20:]))

    # -- the protocol --------------------------------------------------------------------
    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 60) -> dict:
        """Send one command and wait for its answer (events meanwhile are kept)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.time() + timeout
        while True:
            reply = self._receive(deadline)
            if reply is None:
                raise TimeoutError(f"{method}: no answer in {timeout} s")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self, deadline: float) -> dict | None:
        while time.time() < deadline:
            try:
                raw = self.ws.recv(timeout=max(0.05, deadline - time.time()))
            except TimeoutError:
                return None
            message = json.loads(raw)
            if "method" in message:
                self.events.append(message)
                continue
            return message
        return None

    def _pump(self, seconds: float) -> None:
        """Take the events that arrive within ``seconds``."""
        deadline = time.time() + seconds
        while self._receive(deadline) is not None:
            pass

    def wait_event(self, method: str, since: int, timeout: float = 60) -> dict:
        """The first event ``method`` after index ``since`` of :attr:`events`."""
        deadline = time.time() + timeout
        while True:
            for event in self.events[since:]:
                if event["method"] == method:
                    return event
            if time.time() >= deadline:
                raise TimeoutError(f"no {method} in {timeout} s")
            self._receive(min(deadline, time.time() + 0.2))

    # -- what a test does ----------------------------------------------------------------
    def open(self, url: str, timeout: float = 60) -> None:
        """Go to ``url`` and wait until the page has loaded (images included)."""
        since = len(self.events)
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", since, timeout)

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        """Wait until ``expression`` is true in the page."""
        deadline = time.time() + timeout
        while not self.eval(f"!!({expression})"):
            if time.time() >= deadline:
                raise TimeoutError(f"{expression} not true in {timeout} s")
            self._pump(0.2)

    def text(self, selector: str = "body") -> str:
        """The text of the first element ``selector`` as the page shows it."""
        return self.eval(f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText")

    def table(self, test_id: str) -> list[list[str]]:
        """The rows (cells' text) of the table whose data-testid is ``test_id``, header first."""
        return self.eval(
            f"Array.from(document.querySelectorAll('[data-testid={json.dumps(test_id)}] tr'))"
            ".map(r => Array.from(r.children).map(c => c.innerText.trim()))")

    def submit(self, selector: str, value: str) -> None:
        """Type ``value`` into the field ``selector`` and submit its form; wait for the next page."""
        since = len(self.events)
        self.eval(f"(() => {{ const f = document.querySelector({json.dumps(selector)}); f.value = {json.dumps(value)};"
                  " f.form.submit(); })()")
        self.wait_event("Page.loadEventFired", since)

    def screenshot(self, path: Path) -> Path:
        """A full-page PNG of what the page shows now."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": max(1, size["width"]), "height": max(1, min(size["height"], 12000)),
                "scale": 1}
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def errors(self, since: int = 0) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen after event ``since``."""
        self._pump(0.3)
        out = []
        for event in self.events[since:]:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(f"exception: {params['exceptionDetails'].get('text')} "
                           f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                  for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                out.append(f"failed load: {params.get('errorText')} (request {params.get('requestId')})")
        return out

    def requested(self, since: int = 0) -> list[str]:
        """Every URL the page asked for after event ``since``."""
        return [e["params"]["request"]["url"] for e in self.events[since:]
                if e["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        """Stop the browser (its process group, by pid)."""
        try:
            self._connection.__exit__(None, None, None)
        except Exception:
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
