"""A WebSocket chat room for the browser that moves to another process while people talk.

    python examples/ws_chat.py --port 8080 --control /tmp/ws_chat.sock
    # open http://127.0.0.1:8080/ in a browser (or two), and talk
    takeover take /tmp/ws_chat.sock     # another process takes the room; nobody notices

``/`` serves the page (HTML, CSS and JavaScript inline: nothing is fetched
from elsewhere). ``/ws?name=NAME`` is the chat: each text frame a member
sends is broadcast to every member, the sender included, as a JSON text
frame ``{"type": "message", "from": NAME, "text": TEXT, "n": N, "pid": PID}``
(``n`` numbers the room's messages). The room also sends ``members`` (who is
in it) and ``server`` (the pid and interpreter serving it): the recipient of a
move sends ``server`` once it has the room, so the page shows the change
while the conversation goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
from typing import Any
from urllib.parse import parse_qs, urlsplit

import takeover.asyncio as takeover
from takeover.websocket import Request, Response, WebSocketProtocol

MAX_NAME = 32
MAX_TEXT = 4096


def server_facts() -> dict[str, Any]:
    """Which process serves the room: its pid and interpreter."""
    return {
        "type": "server",
        "pid": os.getpid(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


class Room:
    """The members (their protocols, in join order) and how many messages were said."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.said = 0
        self.servers: list[dict[str, Any]] = [server_facts()]  # every process that served it

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def unique(self, wanted: str) -> str:
        name = "".join(c for c in wanted if c.isprintable() and not c.isspace())[:MAX_NAME]
        name = name or "guest"
        taken, base, n = set(self.names()), name, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        return name

    def join(self, member: Member) -> None:
        self.members.append(member)
        member.send({"type": "welcome", "name": member.name, "servers": self.servers})
        self.broadcast({"type": "members", "names": self.names()})

    def leave(self, member: Member) -> None:
        if member in self.members:
            self.members.remove(member)
            self.broadcast({"type": "members", "names": self.names()})

    def say(self, member: Member, text: str) -> None:
        self.said += 1
        message = {"type": "message", "from": member.name, "text": text, "n": self.said}
        self.broadcast({**message, "pid": os.getpid()})

    def broadcast(self, message: dict[str, Any]) -> None:
        frame = json.dumps(message, ensure_ascii=False)
        for member in self.members:
            member.send_text(frame)

    def adopted(self) -> None:
        """A new process serves the room: tell everyone which (takeover calls the
        hook when a service starts, the first time included)."""
        facts = server_facts()
        if self.servers[-1] == facts:
            return
        self.servers.append(facts)
        del self.servers[:-20]
        self.broadcast(facts)


class Member(WebSocketProtocol):
    """One browser tab: an HTTP connection for the page, or a member of the room."""

    websocket_paths = ("/ws",)
    max_message = MAX_TEXT

    def __init__(self, room: Room) -> None:
        super().__init__()
        self.room = room
        self.name = ""

    def http_request(self, request: Request) -> Response:
        if request.path == "/":
            return Response(200, PAGE.encode(), "text/html; charset=utf-8")
        if request.path == "/favicon.ico":
            return Response(200, ICON, "image/svg+xml")
        if request.path == "/server":
            return Response(200, json.dumps(server_facts()).encode(), "application/json")
        return Response(404, b"not found\n")

    def websocket_open(self) -> None:
        assert self.request is not None
        query = parse_qs(urlsplit(self.request.target).query)
        self.name = self.room.unique(query.get("name", ["guest"])[0])
        self.room.join(self)

    def text_received(self, text: str) -> None:
        self.room.say(self, text)

    def websocket_closed(self, code: int, reason: str) -> None:
        self.room.leave(self)

    def send(self, message: dict[str, Any]) -> None:
        self.send_text(json.dumps(message, ensure_ascii=False))


class RoomFactory:
    """Seats every new connection in the room; tells the room when a move brought it here."""

    def __init__(self, room: Room) -> None:
        self.room = room

    def __call__(self) -> Member:
        return Member(self.room)

    def takeover_adopted(self) -> None:
        self.room.adopted()


# The browser asks for one (an SVG is fine): a 404 would be an error in its console.
ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="7" fill="#2e8b57"/></svg>'
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>takeover chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 10px 16px; display: flex; gap: 16px;
         align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0; }
#server { font-family: ui-monospace, monospace; background: #2f3a52; padding: 2px 8px;
          border-radius: 4px; transition: background 0.6s; }
#server.changed { background: #2e8b57; }
#state { margin-left: auto; font-size: 13px; }
main { display: grid; grid-template-columns: 1fr 230px; gap: 12px; padding: 12px 16px; }
#log { background: #fff; border-radius: 6px; padding: 8px 12px; height: 440px; overflow-y: auto;
       box-shadow: 0 1px 2px #0002; }
.msg { margin: 2px 0; } .msg b { color: #2f5aa8; } .msg small { color: #8a93a6; }
.note { margin: 4px 0; color: #2e8b57; font-style: italic; }
aside { display: flex; flex-direction: column; gap: 12px; }
aside section { background: #fff; border-radius: 6px; padding: 8px 12px;
                box-shadow: 0 1px 2px #0002; }
aside h2 { font-size: 13px; text-transform: uppercase; color: #5b6478; margin: 0 0 6px; }
aside ul { margin: 0; padding-left: 18px; }
#servers li { font-family: ui-monospace, monospace; font-size: 12px; }
form { display: flex; gap: 8px; padding: 0 16px 16px; }
#text { flex: 1; font: inherit; padding: 8px; border: 1px solid #c5cad6; border-radius: 6px; }
button { font: inherit; padding: 8px 16px; border: 0; border-radius: 6px; background: #2f5aa8;
         color: #fff; }
</style></head>
<body>
<header><h1>takeover chat</h1>
<span>served by <span id="server">?</span></span>
<span id="state">connecting</span></header>
<main><div id="log"></div>
<aside><section><h2>In the room</h2><ul id="members"></ul></section>
<section><h2>Servers so far</h2><ul id="servers"></ul></section></aside></main>
<form id="form"><input id="text" autocomplete="off" placeholder="Say something">
<button>Send</button></form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const name = params.get("name") || "guest-" + Math.floor(Math.random() * 1000);
const chat = { name, received: 0, servers: [], closed: false, errors: 0 };
window.chat = chat;
const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
  "/ws?name=" + encodeURIComponent(name);
const ws = new WebSocket(url);
chat.socket = ws;

function line(cls, html) {
  const log = $("log"), div = document.createElement("div");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  div.className = cls; div.innerHTML = html; log.appendChild(div);
  while (log.childElementCount > 500) log.removeChild(log.firstChild);
  if (atEnd) log.scrollTop = log.scrollHeight;
}
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;",
  ">": "&gt;", '"': "&quot;"}[c]));
const label = (s) => "pid " + s.pid + " \\u00b7 " + s.python;

function showServer(s, changed) {
  chat.servers.push(s);
  $("server").textContent = label(s);
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + label(s);
  $("servers").appendChild(li);
  if (changed) {
    $("server").classList.add("changed");
    setTimeout(() => $("server").classList.remove("changed"), 1500);
    line("note", "the room moved to " + esc(label(s)) + "; nobody was disconnected");
  }
}

ws.onopen = () => { $("state").textContent = "connected as " + name; };
ws.onmessage = (event) => {
  const m = JSON.parse(event.data);
  chat.received++;
  if (m.type === "welcome") {
    $("state").textContent = "connected as " + m.name;
    m.servers.forEach((s) => showServer(s, false));
  } else if (m.type === "server") {
    showServer(m, true);
  } else if (m.type === "members") {
    $("members").innerHTML = m.names.map((n) => "<li>" + esc(n) + "</li>").join("");
  } else if (m.type === "message") {
    line("msg", "<small>#" + m.n + " pid " + m.pid + "</small> <b>" + esc(m.from) +
      "</b> " + esc(m.text));
  }
};
ws.onerror = () => { chat.errors++; $("state").textContent = "error"; };
ws.onclose = (event) => {
  chat.closed = true;
  $("state").textContent = "disconnected (" + event.code + ")";
};
$("form").onsubmit = (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (text && ws.readyState === WebSocket.OPEN) ws.send(text);
  $("text").value = "";
};
</script></body></html>
"""


async def main(args: argparse.Namespace) -> None:
    server = await takeover.start_server(RoomFactory(Room()), args.host, args.port, name="ws_chat")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(
            f"ws_chat on http://{args.host}:{args.port}/ (pid {os.getpid()}), control {m.path}",
            flush=True,
        ),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
