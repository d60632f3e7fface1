"""`takeover run` under a real supervisord (docs/deploy.md's program section).

supervisord watches one process per program; `supervisorctl signal HUP`
reaches the anchor, which moves the service to a successor while the
program stays RUNNING with the same PID, and clients streaming through it
notice nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from harness.procs import EXAMPLES, PYTHON, Proc
from harness.waiting import wait_until
from streaming import streaming

BIN = os.path.dirname(PYTHON)
SUPERVISORD = os.path.join(BIN, "supervisord")
SUPERVISORCTL = os.path.join(BIN, "supervisorctl")
MOVES = 3

CONFIG = """\
[unix_http_server]
file={work}/supervisor.sock

[supervisord]
logfile={work}/supervisord.log
pidfile={work}/supervisord.pid
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{work}/supervisor.sock

[program:echo]
command={python} -m takeover run --control {control} -- {server}
autorestart=unexpected
startsecs=1
stopsignal=TERM
redirect_stderr=true
stdout_logfile={work}/echo.log
"""


def ctl(work: str, *args: str) -> str:
    done = subprocess.run(
        [SUPERVISORCTL, "-c", os.path.join(work, "supervisord.conf"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout


def status(work: str) -> tuple[str, int | None]:
    """The program's state and pid, as `supervisorctl status` says."""
    found = re.search(r"^echo\s+(\w+)\s+(?:pid (\d+))?", ctl(work, "status", "echo"), re.M)
    assert found, ctl(work, "status")
    return found[1], int(found[2]) if found[2] else None


def log(work: str) -> str:
    try:
        with open(os.path.join(work, "echo.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@pytest.mark.slow
def test_supervisorctl_signal_hup_moves_the_service(workdir, control, free_port, procs):
    """HUP three times: three moves, RUNNING with the same pid, no stream notices."""
    assert os.path.exists(SUPERVISORD), "the test extra installs supervisor"
    echo = os.path.join(EXAMPLES, "echo.py")
    config = CONFIG.format(
        work=workdir,
        python=PYTHON,
        control=control,
        server=f"{PYTHON} {echo} --port {free_port} --control {control}",
    )
    with open(os.path.join(workdir, "supervisord.conf"), "w") as f:
        f.write(config)
    supervisord = Proc([SUPERVISORD, "-c", os.path.join(workdir, "supervisord.conf")])
    procs.append(supervisord)
    wait_until(lambda: "serves" in log(workdir), what="the server")
    wait_until(lambda: status(workdir)[0] == "RUNNING", what="RUNNING (startsecs)")
    anchor = status(workdir)[1]
    assert anchor is not None
    with streaming(free_port, 10) as clients:
        clients.wait_all_echoing()
        for move in range(1, MOVES + 1):
            ctl(workdir, "signal", "HUP", "echo")
            wait_until(lambda move=move: f"(move {move})" in log(workdir), what=f"move {move}")
            clients.wait_progress()
            assert status(workdir) == ("RUNNING", anchor)
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    servers = [int(pid) for pid in re.findall(r"moved to pid (\d+)", log(workdir))]
    assert len(set(servers)) == MOVES and anchor not in servers
    assert "stopped" in ctl(workdir, "stop", "echo")
    assert status(workdir)[0] == "STOPPED"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in [anchor, *servers])
    supervisord.signal(signal.SIGTERM)
    assert supervisord.wait() == 0
