"""The headless Chromium of harness/browser.py, on a page served from this process.

Later tests open takeover's examples in it; these check what they will rely
on: the page's JavaScript runs and Selenium reads back what it wrote, the
console is collected, a screenshot is a PNG of the window's size, and once
the ``with`` block is left no process of Chromium or chromedriver runs, no
descriptor is open and the temporary profile is gone, whether the block
ended normally or with an exception. Each test starts a browser of its own
(about half a second).
"""

from __future__ import annotations

import functools
import gc
import http.server
import os
import signal
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator

import pytest

from harness import browser
from harness.procs import list_fds
from harness.waiting import wait_until

PAGE = """\
<!doctype html>
<html>
<head>
<meta charset="utf-8">
<link rel="icon" href="data:,">
<title>not yet</title>
</head>
<body>
<p id="out">no script</p>
<script>
  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("out").textContent = "script ran: " + 6 * 7;
    document.title = "served on " + location.port;
  });
  console.log("hello from the page");
  console.error("an error on purpose");
</script>
</body>
</html>
"""


class _Server(http.server.ThreadingHTTPServer):
    # Join the request threads at server_close(): one left reading a
    # connection the browser opened would hold its socket past the test.
    daemon_threads = False


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site(workdir: str) -> Iterator[str]:
    """The URL of ``PAGE``, served by http.server on 127.0.0.1 from a thread."""
    with open(os.path.join(workdir, "index.html"), "w") as f:
        f.write(PAGE)
    server = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=workdir))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _stat(pid: int) -> tuple[str, bytes, int, int] | None:
    """The command name, state, parent and start time of ``pid``, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    comm, rest = data.split(b"(", 1)[1].rsplit(b")", 1)
    fields = rest.split()
    return comm.decode(), fields[0], int(fields[1]), int(fields[19])


def _browser_processes(profile: str) -> dict[int, tuple[str, int]]:
    """Descendants of this process, and processes naming ``profile``.

    Returns:
        pid to command name and start time.

    Chromium's crash handlers detach from the tree (their parent is PID 1);
    their command line names the profile (``HOME`` is in it).
    """
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            stats[int(name)] = stat
    found = {}
    for pid, (comm, _, _, start) in stats.items():
        ancestor = pid
        while ancestor in stats and ancestor not in (os.getpid(), 1, 0):
            ancestor = stats[ancestor][2]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                names_profile = profile.encode() in f.read()
        except OSError:
            names_profile = False
        if (ancestor == os.getpid() and pid != os.getpid()) or names_profile:
            found[pid] = (comm, start)
    return found


def _still_running(processes: dict[int, tuple[str, int]]) -> list[int]:
    """Those of ``processes`` (:func:`_browser_processes`) that run: not gone, not zombies."""
    running = []
    for pid, (_, start) in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[3] == start and stat[1] != b"Z":
            running.append(pid)
    return running


def _png_size(path: str) -> tuple[int, int]:
    """The width and height of the PNG file at ``path``, which must be one."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "no PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    header = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    assert zlib.crc32(kind + header) == crc, "IHDR checksum"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xae\x42\x60\x82", "no IEND chunk at the end"
    width, height = struct.unpack(">II", header[:8])
    return width, height


def test_missing_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, workdir: str) -> None:
    """missing() names an absent browser, then an absent driver."""
    absent = os.path.join(workdir, "absent")
    monkeypatch.setattr(browser, "CHROMIUM", absent)
    assert absent in (browser.missing() or "")
    monkeypatch.undo()
    monkeypatch.setattr(browser, "CHROMEDRIVER", absent)
    assert absent in (browser.missing() or "")


@pytest.mark.usefixtures("browser_available")
def test_page_script_runs(site: str) -> None:
    """The page's JavaScript runs; Selenium reads back the DOM and title it wrote."""
    with browser.chromium() as driver:
        driver.get(site)
        port = site.split(":")[2].split("/")[0]
        assert driver.title == f"served on {port}"
        assert driver.find_element("id", "out").text == "script ran: 42"
        assert driver.execute_script("return navigator.webdriver") is True


def _text(message: str) -> str:
    """A console message without its source (``URL LINE:COLUMN ``)."""
    return message.split(" ", 2)[-1]


@pytest.mark.usefixtures("browser_available")
def test_console(site: str) -> None:
    """console() returns the page's console.log and console.error, each once."""
    expected = {("INFO", '"hello from the page"'), ("SEVERE", '"an error on purpose"')}
    with browser.chromium() as driver:
        driver.get(site)
        # The messages reach chromedriver as DevTools events: possibly after get().
        seen: set[tuple[str, str]] = set()

        def all_seen() -> bool:
            seen.update((e["level"], _text(e["message"])) for e in browser.console(driver))
            return expected <= seen

        wait_until(all_seen, what="the page's console.log and console.error")
        assert browser.console(driver) == []
        driver.execute_script("console.warn('a warning'); console.error('later')")
        errors: list[str] = []

        def an_error() -> list[str]:
            errors.extend(map(_text, browser.console_errors(driver)))
            return errors

        wait_until(an_error, what="console.error")
        assert errors == ['"later"']


@pytest.mark.usefixtures("browser_available")
def test_screenshot(site: str, workdir: str) -> None:
    """screenshot() writes a valid PNG of the page's size, as asked for."""
    path = os.path.join(workdir, "page.png")
    with browser.chromium(width=640, height=480) as driver:
        driver.get(site)
        assert driver.execute_script("return [innerWidth, innerHeight]") == [640, 480]
        assert browser.screenshot(driver, path) == path
    assert _png_size(path) == (640, 480)


@pytest.mark.usefixtures("browser_available")
def test_nothing_left() -> None:
    """After the block: no Chromium or chromedriver process, no descriptor, no profile."""
    # A data: URL: a page served from this process would hold sockets that its
    # threads close only once they see the browser gone.
    fds = list_fds(os.getpid())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with browser.chromium() as driver:
            driver.get("data:text/html,<script>document.title = 'up'</script>")
            assert driver.title == "up"
            profile = driver.capabilities["chrome"]["userDataDir"]
            processes = _browser_processes(profile)
        left = _still_running(processes)
        gc.collect()
    commands = {comm for comm, _ in processes.values()}
    assert {"chromedriver", "chromium"} <= commands, commands
    assert left == [], f"still running: {left} of {processes}"
    assert list_fds(os.getpid()) == fds
    assert [str(w.message) for w in caught] == []
    assert not os.path.exists(profile)


@pytest.mark.usefixtures("browser_available")
def test_nothing_left_after_error(site: str) -> None:
    """An exception in the block goes through, and the processes still end."""
    with pytest.raises(ZeroDivisionError), browser.chromium() as driver:
        driver.get(site)
        processes = _browser_processes(driver.capabilities["chrome"]["userDataDir"])
        1 / 0  # noqa: B018
    assert len(processes) > 2
    assert _still_running(processes) == []


@pytest.mark.usefixtures("browser_available")
def test_nothing_left_when_chromedriver_dies(site: str) -> None:
    """Chromium, orphaned by a chromedriver killed in the block, is killed at its end."""
    with browser.chromium() as driver:
        driver.get(site)
        processes = _browser_processes(driver.capabilities["chrome"]["userDataDir"])
        os.kill(driver.service.process.pid, signal.SIGKILL)
        driver.service.process.wait()
        orphans = _still_running(processes)
    assert len(orphans) > 2, "Chromium ended with chromedriver: nothing left to test"
    assert _still_running(processes) == []


@pytest.mark.usefixtures("browser_available")
def test_nothing_left_when_chromium_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A browser that cannot start: the error goes through; no process, no descriptor left."""
    from selenium.common.exceptions import WebDriverException

    monkeypatch.setattr(browser, "CHROMIUM", "/bin/false")
    fds = list_fds(os.getpid())
    with (
        pytest.raises(WebDriverException, match="session not created") as error,
        browser.chromium(),
    ):
        pass  # pragma: no cover
    # The error's traceback holds the half-made driver: its sockets must be closed.
    assert list_fds(os.getpid()) == fds
    del error
    assert _still_running(_browser_processes("/no profile/")) == []
