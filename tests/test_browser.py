"""examples/ws_chat.py in a real browser (Debian's headless Chromium, driven by Selenium)
while the room moves ten times, once to another interpreter.

The page opens its own WebSocket; the test opens two more in the page, each
sending a numbered message every 20 ms. Neither fires ``close`` or ``error``,
and each receives every message of both, exactly once and in order, from
whichever process served the room at the time.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from typing import Any

from harness import browser
from harness.procs import PYTHON, ROOT, run_example, takeover
from harness.waiting import wait_until

# Made by `make twisted-interpreters` (a dependency of `make test`), with the ws extra.
PYTHON_313 = os.path.join(ROOT, ".venv-3.13", "bin", "python")
MOVES = 10
OTHER_INTERPRETER_AT = 5  # the 6th move goes to CPython 3.13, the 7th back here
PERIOD_MS = 20

# Two more WebSockets in the page: each sends "sN-K" every 20 ms and keeps, in
# order, every room message it receives, and every close or error event.
START = """
const period = arguments[0];
const t = { sockets: [], sent: [[], []], got: [[], []], numbers: [[], []], events: [],
            open: 0, timers: [] };
window.t = t;
for (const i of [0, 1]) {
  const ws = new WebSocket("ws://" + location.host + "/ws?name=sender" + i);
  t.sockets.push(ws);
  ws.onopen = () => {
    t.open++;
    let k = 0;
    t.timers.push(setInterval(() => {
      const text = "s" + i + "-" + (++k);
      ws.send(text);
      t.sent[i].push(text);
    }, period));
  };
  ws.onmessage = (event) => {
    const m = JSON.parse(event.data);
    if (m.type === "message") {
      t.got[i].push(m.from + ":" + m.text);
      t.numbers[i].push(m.n);
    }
  };
  ws.onclose = (event) => t.events.push("close " + i + " " + event.code);
  ws.onerror = () => t.events.push("error " + i);
}
"""
STOP = "window.t.timers.forEach(clearInterval); window.t.timers = [];"
STATE = (
    "return {sent: window.t.sent, got: window.t.got, numbers: window.t.numbers, "
    "events: window.t.events, open: window.t.open, page: {closed: window.chat.closed, "
    "errors: window.chat.errors, servers: window.chat.servers.map(s => s.pid + ' ' + s.python)}};"
)


def state(driver: Any) -> dict[str, Any]:
    return driver.execute_script(STATE)  # type: ignore[no-any-return]


def test_two_websockets_in_chromium_live_through_ten_moves(
    browser_available, control, free_port, procs, workdir
):
    assert os.access(PYTHON_313, os.X_OK), (
        f"{PYTHON_313} is missing: run `make twisted-interpreters` (part of `make test`)"
    )
    origin = run_example("ws_chat", free_port, control)
    procs.append(origin)
    pids = [origin.pid]
    with browser.chromium() as driver:
        driver.get(f"http://127.0.0.1:{free_port}/?name=watcher")
        wait_until(
            lambda: driver.execute_script("return window.chat && window.chat.servers.length"),
            what="the page's own WebSocket to be welcomed",
        )
        driver.execute_script(START, PERIOD_MS)
        wait_until(lambda: state(driver)["open"] == 2, what="both WebSockets to open")
        for move in range(MOVES):
            time.sleep(0.3)  # messages flow between moves
            python = PYTHON_313 if move == OTHER_INTERPRETER_AT else PYTHON
            recipient = takeover("take", control, python=python)
            procs.append(recipient)
            recipient.expect(r"^took ws_chat: \d+ connections")
            recipient.expect(r"^serving 1 service\(s\) at ")
            pids.append(recipient.pid)
        time.sleep(0.3)
        driver.execute_script(STOP)

        def delivered() -> bool:
            now = state(driver)
            total = len(now["sent"][0]) + len(now["sent"][1])
            return all(len(got) == total for got in now["got"])

        wait_until(delivered, what="every message sent to reach both WebSockets")
        final = state(driver)
        wait_until(
            lambda: len(state(driver)["page"]["servers"]) == MOVES + 1,
            what="the page to show every server",
        )
        shot = browser.screenshot(driver, os.path.join(workdir, "ws_chat.png"))
        wanted = os.environ.get("TAKEOVER_SCREENSHOT")  # refreshes docs/ws_chat.png
        if wanted:
            shutil.copyfile(shot, wanted)
        errors = browser.console_errors(driver)
        page = state(driver)["page"]

    assert final["events"] == [], final["events"]  # no close, no error
    assert page["closed"] is False and page["errors"] == 0
    assert errors == []
    sent = final["sent"]
    assert min(len(sent[0]), len(sent[1])) > 100, "too few messages to prove anything"
    for i in (0, 1):
        got = final["got"][i]
        # Exactly once and in order: each sender's messages, as sent, in this socket.
        for j in (0, 1):
            mine = [g.split(":", 1)[1] for g in got if g.startswith(f"sender{j}:")]
            assert mine == sent[j], f"socket {i} got sender{j}'s messages {mine[:5]}..."
        # The room numbers its messages: every one after this socket joined, no gap.
        numbers = final["numbers"][i]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    # The page saw each process that served it, one of them the other interpreter.
    servers = page["servers"]
    assert [int(s.split()[0]) for s in servers] == pids
    here = f"{platform.python_implementation()} {platform.python_version()}"
    other = OTHER_INTERPRETER_AT + 1
    assert all(s.endswith(here) for k, s in enumerate(servers) if k != other), servers
    assert "CPython 3.13." in servers[other], servers
    assert shot and os.path.getsize(shot) > 10_000
