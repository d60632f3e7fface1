"""An originator that dies mid-move does not take its service down with it."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from harness.echo import echo
from harness.procs import process_state, run_example, takeover
from harness.waiting import wait_until


@pytest.mark.parametrize("point", ["originator.fds-sent", "originator.quiesced"])
def test_recipient_serves_when_originator_dies(control, free_port, procs, point):
    """Killed with the graph sent, the originator's service goes on in the recipient;
    killed before it sent the graph, its service dies with it and the recipient says so."""
    origin = run_example("echo", free_port, control, env={"TAKEOVER_FAULTS": f"{point}=stop"})
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"before\n") == b"before\n"
        recipient = takeover("-v", "take", control)
        procs.append(recipient)
        wait_until(lambda: process_state(origin.pid) == "T", what="the originator to stop")
        # The service is paused: these bytes wait in the kernel for whoever serves next.
        client.sendall(b"sent while the originator is stopped\n")
        os.kill(origin.pid, signal.SIGKILL)
        origin.wait()
        if point == "originator.quiesced":
            assert recipient.wait() != 0
            assert re.search(r"went away|closed", recipient.output())
            return
        recipient.expect(r"^serving 1 service")
        assert client.recv(4096) == b"sent while the originator is stopped\n"
        assert echo(client, b"after\n") == b"after\n"
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as late:
        assert echo(late, b"new\n") == b"new\n"
