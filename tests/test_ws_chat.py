"""examples/ws_chat.py with WebSocket clients in Python: the room's protocol across moves.

(tests/test_browser.py runs the same room in a real browser.)
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from harness.procs import ROOT, Proc, run_example, takeover
from wsclient import WsClient


def frames(client: WsClient, count: int) -> list[dict[str, Any]]:
    return [json.loads(client.message()) for _ in range(count)]


def test_the_page_is_self_contained(control, free_port, procs):
    procs.append(run_example("ws_chat", free_port, control))
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        page = b""
        while data := sock.recv(65536):
            page += data
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/html" in head
    html = body.decode()
    assert "<script>" in html and "new WebSocket(" in html
    # Nothing fetched from elsewhere: no src or href attributes, no URL but the page's own host.
    assert not re.search(r"\b(src|href)\s*=", html)
    assert not re.search(r"https?://", html)


def test_members_talk_and_see_the_server_change(control, free_port, procs):
    origin = run_example("ws_chat", free_port, control)
    procs.append(origin)
    with WsClient(free_port, "/ws?name=ann") as ann, WsClient(free_port, "/ws?name=ann") as ann2:
        welcome, members = frames(ann, 2)
        assert welcome["type"] == "welcome" and welcome["name"] == "ann"
        assert [s["pid"] for s in welcome["servers"]] == [origin.pid]
        assert members == {"type": "members", "names": ["ann"]}
        welcome2, members2 = frames(ann2, 2)
        assert welcome2["name"] == "ann-2"  # names are unique in the room
        assert frames(ann, 1)[0]["names"] == members2["names"] == ["ann", "ann-2"]

        ann.say("hello <b>everyone</b> \u00e9\u20ac")
        for client in (ann, ann2):  # the sender included
            (message,) = frames(client, 1)
            assert message == {
                "type": "message",
                "from": "ann",
                "text": "hello <b>everyone</b> \u00e9\u20ac",
                "n": 1,
                "pid": origin.pid,
            }

        recipient = takeover("take", control)
        procs.append(recipient)
        recipient.expect(r"^took ws_chat: 2 connections")
        for client in (ann, ann2):
            (server,) = frames(client, 1)
            assert server["type"] == "server" and server["pid"] == recipient.pid
            assert re.fullmatch(r"(CPython|PyPy) 3\.\d+\.\d+", server["python"])
        ann2.say("after the move")
        for client in (ann, ann2):
            (message,) = frames(client, 1)
            assert (message["text"], message["n"], message["pid"]) == (
                "after the move",
                2,
                recipient.pid,
            )
        ann2.close()
        assert frames(ann, 1)[0] == {"type": "members", "names": ["ann"]}
    assert origin.wait(10) == 0


def test_make_demo_web_prints_what_moves_it(control, free_port, procs):
    """`make demo-web` starts the room and prints its URL and the commands that move it;
    the first of them, run as printed, moves the room (and make then ends, status 0)."""
    make = Proc(
        ["make", "-s", "-C", ROOT, "demo-web", f"WEB_PORT={free_port}", f"WEB_CONTROL={control}"]
    )
    procs.append(make)
    make.expect(rf"^open http://127\.0\.0\.1:{free_port}/ in a browser", timeout=120)
    command = make.expect(r"^  (/\S+/takeover take \S+)$").group(1).split()
    assert command[-1] == control
    make.expect(r"^ws_chat on ")
    with WsClient(free_port, "/ws?name=zoe") as zoe:
        assert frames(zoe, 2)[1] == {"type": "members", "names": ["zoe"]}
        recipient = Proc(command)
        procs.append(recipient)
        recipient.expect(r"^took ws_chat: 1 connections")
        assert frames(zoe, 1)[0]["pid"] == recipient.pid
        assert make.wait(10) == 0
