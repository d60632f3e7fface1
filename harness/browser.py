"""A real browser for the tests: Debian's headless Chromium, driven by Selenium.

:func:`chromium` starts ``/usr/bin/chromedriver`` (Debian's ``chromium-driver``)
and, through it, ``/usr/bin/chromium``, and yields the Selenium
``webdriver.Chrome``. Both paths are explicit, so Selenium Manager (which
would look for, and download, a browser and a driver) never runs; ``make
browser`` installs the packages. :func:`missing` says what this machine lacks
(tests/conftest.py's ``browser_available`` skips on a developer's machine and
fails in CI).

Chromium is kept off the network and off the user's home: every background
service that would call Google (component updates, sync, variations, QUIC
probes) is disabled, because this machine's closed network refuses those
hosts; the profile (``--user-data-dir``) and ``HOME``/``XDG_*`` (Debian's
launcher keeps crash reports in ``~/.config/chromium``) are a fresh temporary
directory, removed afterwards.

Nothing survives the ``with`` block. ``driver.quit()`` ends the browser and
chromedriver, but not the whole tree: Chromium's zygotes outlive the browser
for a moment, orphaned, and its crash handlers (``chrome_crashpad_handler``)
detach into sessions of their own. chromedriver is therefore started as the
leader of a new session, so that Chromium's processes share its process
group; afterwards every process of that group, or whose command line names
the temporary directory, is waited for and then killed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

FLAGS = (
    "--headless=new",
    # Root in a container: Chromium's sandbox needs user namespaces it may not get.
    "--no-sandbox",
    "--disable-gpu",
    # /dev/shm is small in containers; Chromium then crashes on shared memory.
    "--disable-dev-shm-usage",
    # No calls to Google: QUIC probes, first-run tasks, component updates, sync,
    # variations and the default apps and extensions (Debian's launcher turns
    # background networking back on when /etc/chromium.d enables remote extensions).
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)

# After a quit() that worked, how long the rest of Chromium's processes get to
# exit by themselves before they are killed (they are zombies within a few
# milliseconds); and how long they get to die after SIGKILL.
GRACE = 2.0
KILLED = 10.0


def missing() -> str | None:
    """What this machine lacks to run :func:`chromium`, or None if nothing."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no {CHROMIUM} (Debian's chromium; run `make browser`)"
    if not os.access(CHROMEDRIVER, os.X_OK):
        return f"no {CHROMEDRIVER} (Debian's chromium-driver; run `make browser`)"
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is not installed (the test extra: `make venv`)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1100, height: int = 800) -> Iterator[WebDriver]:
    """Headless Chromium showing pages in ``width`` by ``height`` pixels.

    The page's viewport (``window.innerWidth`` and ``innerHeight``), and so a
    :func:`screenshot`, has that size; the window is larger by its toolbar.

    Yields:
        The Selenium driver. Its console messages are kept
        (:func:`console`).

    Raises:
        RuntimeError: a process of Chromium's survived ``SIGKILL``.
    """
    from selenium import webdriver

    # Selenium Manager is not run (the driver's path is given); should it ever
    # be, it must not download anything or report statistics.
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="tkchromium-")
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        home = {
            "HOME": profile,
            "XDG_CONFIG_HOME": os.path.join(profile, ".config"),
            "XDG_CACHE_HOME": os.path.join(profile, ".cache"),
        }
        service = webdriver.ChromeService(
            executable_path=CHROMEDRIVER,
            env={**os.environ, **home},
            popen_kw={"start_new_session": True},
        )
        driver: WebDriver | None = None
        try:
            driver = _chrome_class()(options=options, service=service)
            _fit(driver, width, height)
            yield driver
        finally:
            # What quit() cannot end (chromedriver is gone) is killed at once.
            working = driver is not None and service.process.poll() is None
            try:
                if driver is not None:
                    driver.quit()  # also closes its connections to chromedriver
            except Exception:
                working = False
            finally:
                _end(service, profile, GRACE if working else 0.0)
                if driver is not None:
                    with contextlib.suppress(Exception):
                        driver.command_executor.close()
                driver = None  # (what the collection below must free)
                if platform.python_implementation() != "CPython":
                    # PyPy closes the sockets Selenium dropped only when they are
                    # collected: later, when their numbers may belong to others.
                    # (Twice: PyPy runs the finalizers a collection found after it.)
                    gc.collect()
                    gc.collect()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@functools.cache
def _chrome_class() -> type[WebDriver]:
    """``webdriver.Chrome``, whose ``quit()`` always closes its connections to chromedriver.

    When the browser fails to start, ``webdriver.Chrome()`` calls ``quit()``
    on the half-made driver; selenium 4.51's stops at an attribute that
    ``__init__`` had not set yet, before closing the connection it had just
    used (a socket left to the garbage collector, and a ``ResourceWarning``).
    """
    from selenium import webdriver

    class Chrome(webdriver.Chrome):
        def quit(self) -> None:
            try:
                super().quit()
            finally:
                executor = getattr(self, "command_executor", None)
                if executor is not None:
                    executor.close()

    return Chrome


def _fit(driver: WebDriver, width: int, height: int) -> None:
    """Resize the window so that the page (and a screenshot) is ``width`` by ``height``.

    ``--window-size`` sizes the whole window, and headless Chromium keeps
    room for a toolbar in it: the page gets about 140 pixels less height.
    """
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    if inner != [width, height]:
        size = driver.get_window_size()
        driver.set_window_size(size["width"] + width - inner[0], size["height"] + height - inner[1])


def console(driver: WebDriver) -> list[dict[str, Any]]:
    """The page's console messages since the last call (each read once).

    Each is a dict with ``level`` (``SEVERE`` for ``console.error`` and for
    failed loads, such as a missing favicon: give the page ``<link rel="icon"
    href="data:,">``), ``message``, ``source`` and ``timestamp``.
    """
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


def console_errors(driver: WebDriver) -> list[str]:
    """The messages of the ``SEVERE`` entries among :func:`console`'s (which it reads)."""
    return [entry["message"] for entry in console(driver) if entry["level"] == "SEVERE"]


def screenshot(driver: WebDriver, path: str) -> str:
    """Save what the page's viewport shows as a PNG file at ``path``; return ``path``."""
    png = driver.get_screenshot_as_png()
    with open(path, "wb") as f:
        f.write(png)
    return path


# -- ending every process ---------------------------------------------------------


def _end(service: Service, profile: str, grace: float) -> None:
    """Stop chromedriver; wait ``grace`` s for whatever is left of Chromium, then kill it."""
    process = getattr(service, "process", None)  # unset if chromedriver never started
    leader = None
    if process is not None:
        leader = process.pid
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdin is not None:
            process.stdin.close()
    left = _wait_gone(leader, profile, grace)
    if not left:
        return
    if leader is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    left = _wait_gone(leader, profile, KILLED)
    if left:
        raise RuntimeError(f"Chromium's processes {left} survived SIGKILL")


def _wait_gone(leader: int | None, profile: str, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for :func:`_processes` to be none; what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = _processes(leader, profile)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def _processes(leader: int | None, profile: str) -> list[int]:
    """The live (not zombie) processes in ``leader``'s group or naming ``profile``.

    Orphans are reparented to PID 1, which may take its time to reap them:
    a zombie has ended, and holds nothing but its process id.
    """
    found = []
    marks = (f"{profile}\0".encode(), f"{profile}/".encode())
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # it has just exited
        state, pgrp = fields[0], int(fields[2])
        if state == b"Z":
            continue
        if pgrp == leader or any(mark in cmdline for mark in marks):
            found.append(int(name))
    return found
