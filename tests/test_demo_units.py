"""The demo shell's parts in one process: telnet codec, console, portable namespaces."""

from __future__ import annotations

import pickle

import pytest

from takeover import UnpicklePolicy
from takeover._core import pickling as _serialize
from takeover.demo import portable
from takeover.demo.console import Console, Logout
from takeover.demo.telnet import (
    DO,
    DONT,
    ECHO,
    EOF,
    IAC,
    INTERRUPT,
    IP,
    LINE,
    SB,
    SE,
    WILL,
    WONT,
    TelnetCodec,
)

# -- telnet -----------------------------------------------------------------------


def test_lines_end_with_cr_lf_cr_nul_or_lf():
    codec = TelnetCodec()
    events, replies = codec.feed(b"one\r\ntwo\r\0three\nfour")
    assert events == [(LINE, b"one"), (LINE, b"two"), (LINE, b"three")]
    assert replies == b""
    events, _ = codec.feed(b"\r")
    assert events == [(LINE, b"four")]
    events, _ = codec.feed(b"\nfive\r\n")
    assert events == [(LINE, b"five")]


def test_iac_iac_is_a_literal_byte_and_subnegotiation_is_skipped():
    codec = TelnetCodec()
    data = (
        bytes([IAC, SB, 24, 0]) + b"xterm" + bytes([IAC, SE]) + b"a" + bytes([IAC, IAC]) + b"b\r\n"
    )
    events, _ = codec.feed(data)
    assert events == [(LINE, b"a\xffb")]


def test_commands_split_across_reads():
    codec = TelnetCodec()
    assert codec.feed(bytes([IAC])) == ([], b"")
    assert codec.feed(bytes([DO])) == ([], b"")
    assert codec.feed(bytes([31])) == ([], bytes([IAC, WONT, 31]))


def test_negotiation_refuses_other_options_and_acknowledges_nothing():
    codec = TelnetCodec()
    _, replies = codec.feed(bytes([IAC, WILL, 31, IAC, DO, 3, IAC, WONT, 5, IAC, DONT, 6]))
    assert replies == bytes([IAC, DONT, 31, IAC, WONT, 3])


def test_echo_for_the_password_without_loops():
    codec = TelnetCodec()
    assert codec.set_echo(True) == bytes([IAC, WILL, ECHO])
    assert codec.set_echo(True) == b""
    assert codec.feed(bytes([IAC, DO, ECHO])) == ([], b"")  # the client agrees
    assert codec.set_echo(False) == bytes([IAC, WONT, ECHO])
    assert codec.feed(bytes([IAC, DONT, ECHO])) == ([], b"")  # and acknowledges
    assert codec.feed(bytes([IAC, DO, ECHO])) == ([], bytes([IAC, WONT, ECHO]))


def test_interrupt_and_end_of_file():
    codec = TelnetCodec()
    events, _ = codec.feed(b"half" + bytes([IAC, IP]) + b"\x04")
    assert events == [(INTERRUPT, b""), (EOF, b"")]


def test_output_uses_cr_lf_and_doubles_iac():
    assert TelnetCodec.encode("a\nb\r\n") == b"a\r\nb\r\n"


# -- console ----------------------------------------------------------------------


def test_console_echoes_expressions_runs_blocks_and_prints_tracebacks():
    console = Console("t#1")
    assert console.push("1 + 1") == "2\n"
    assert console.push("_") == "2\n"
    assert console.push("for i in range(2):") == ""
    assert console.prompt == "... "
    assert console.push("    print(i)") == ""
    assert console.push("") == "0\n1\n"
    assert console.prompt == ">>> "
    error = console.push("1 / 0")
    assert error.startswith("Traceback (most recent call last):\n")
    assert 'File "<t#1:' in error and "ZeroDivisionError: division by zero" in error
    assert "console.py" not in error
    assert "SyntaxError" in console.push("1 +* 2")
    assert console.push("None") == ""


def test_console_interrupt_drops_the_block_and_exit_logs_out():
    console = Console("t#1")
    console.push("if True:")
    assert console.interrupt() == "KeyboardInterrupt\n"
    assert console.prompt == ">>> "
    with pytest.raises(Logout):
        console.push("exit()")


def roundtrip(console: Console) -> Console:
    dumped = _serialize.dumps(console)
    # The shell's graph carries code: a recipient must allow the demo's modules.
    restored = _serialize.loads(dumped.blob, [], policy=UnpicklePolicy(allow=("takeover.demo",)))
    assert isinstance(restored, Console)
    return restored


def test_a_console_moves_with_functions_classes_closures_and_its_half_typed_block():
    console = Console("t#1")
    for line in [
        "import sys, os",
        "x = 42",
        "class Base:",
        "    def hello(self):",
        "        return 'base'",
        "",
        "class Point(Base):",
        "    def __init__(self, x, y):",
        "        self.__x, self.y = x, y",
        "    def hello(self):",
        "        return 'point ' + super().hello() + ' ' + str(self.__x)",
        "    @property",
        "    def twice(self):",
        "        return 2 * self.__x",
        "",
        "def counter(start=10):",
        "    n = start",
        "    def step():",
        "        nonlocal n",
        "        n += 1",
        "        return n",
        "    return step",
        "",
        "tick = counter()",
        "tick()",
        "sq = lambda v: v * v",
        "p = Point(3, 4)",
        "from __future__ import annotations",
        "while False:",
    ]:
        console.push(line)
    restored = roundtrip(console)
    assert restored.buffer == ["while False:"] and restored.prompt == "... "
    assert restored.push("    pass") == ""
    assert restored.push("") == ""
    assert restored.push("x") == "42\n"
    assert restored.push("sys.modules['os'] is os") == "True\n"
    assert restored.push("tick()") == "12\n"
    assert restored.push("sq(7)") == "49\n"
    assert restored.push("p.hello(), p.twice, isinstance(p, Base)") == "('point base 3', 6, True)\n"
    assert restored.push("counter.__defaults__, counter.__qualname__") == "((10,), 'counter')\n"
    assert restored.push("def f(a: Undefined): pass") == ""
    assert restored.push("") == ""  # no NameError: the __future__ import moved too
    error = restored.push("p.missing")
    assert "AttributeError" in error


def test_what_cannot_move_is_named():
    console = Console("t#1")
    console.push("squares = (n * n for n in range(3))")
    console.push("ok = 1")
    console.push("made = eval('lambda: 1')")
    with pytest.raises(pickle.PicklingError) as caught:
        portable.dumps(console.namespace, console.sources, 4)
    message = str(caught.value)
    assert "squares (generator)" in message
    assert "made (function)" in message and "source is unknown" in message
    assert "ok" not in message.replace("cannot", "")


def test_input_is_refused_rather_than_reading_the_servers_stdin():
    output = Console("t#1").push("input('name? ')")
    assert "EOFError: input() is not available in this shell" in output
