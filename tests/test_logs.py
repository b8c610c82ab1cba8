"""Logging: lines that fit the container runtimes' 16 KiB, carry no control characters, and
never stop the supervisor when stderr stalls (a log collector that stopped reading).

The line fitting and escaping are pure and checked at their boundaries here (mutation testing
runs these tests); the writer's behaviour under a stalled stderr is checked on a real process
whose stderr is a pipe the test stops reading, through the module's public face: `setup`,
loguru's `logger`, `flush`."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, clean_env, gpu_supervise_cmd
from fakenvml import dgx_a100
from gpu_supervise.logs import LINE_LIMIT, _fit_json, _fit_text
from gpu_supervise.text import printable
from procfs import status_mib

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


def written(line: str) -> int:
    """The bytes a text line takes on stderr, its newline included (as the writer encodes it)."""
    return len(line.encode("utf-8", "backslashreplace")) + 1


def cut(size: int) -> str:
    return f" [line truncated: {size} bytes]"


# -- escaping -----------------------------------------------------------------------------------


def test_printable_text_is_left_as_it_is():
    text = "GPU 0 GPU-a (NVIDIA A100 ✓ é): MIG 7x1g.5gb"
    assert printable(text) is text


def test_every_character_that_is_not_printable_is_written_as_its_escape():
    assert printable("a\x1b[2Jb\tc\nd\x7fe\u2028f\x00") == "a\\x1b[2Jb\\tc\\nd\\x7fe\\u2028f\\x00"
    assert printable("\x07") == "\\x07"
    assert printable("GPU \udcff") == "GPU \\udcff"  # a byte of a name that is not UTF-8


def test_printable_characters_next_to_an_escaped_one_stay_as_they_are():
    """Only what is not printable is escaped: a name in any script stays readable."""
    assert printable("NVIDIA ✓ é\x1b") == "NVIDIA ✓ é\\x1b"


# -- the 16 KiB limit: text ----------------------------------------------------------------------


def test_a_text_line_of_exactly_the_limit_is_kept_whole():
    line = "a" * (LINE_LIMIT - 1)
    assert written(line) == LINE_LIMIT
    assert _fit_text(line) == line


def test_a_text_line_one_byte_over_the_limit_is_cut_to_it():
    line = "a" * LINE_LIMIT
    fitted = _fit_text(line)
    assert fitted == "a" * (LINE_LIMIT - 1 - len(cut(LINE_LIMIT))) + cut(LINE_LIMIT)
    assert written(fitted) == LINE_LIMIT  # the whole allowance is used, and no more


@pytest.mark.parametrize("lead", [0, 1])
def test_a_text_line_is_never_cut_inside_a_character(lead: int):
    """Two-byte characters, the cut falling on a character's first byte or between two: the
    line stays valid UTF-8 and within the limit."""
    line = "a" * lead + "é" * (LINE_LIMIT // 2)
    size = len(line.encode())
    fitted = _fit_text(line)
    keep = LINE_LIMIT - 1 - len(cut(size))
    assert fitted == "a" * lead + "é" * ((keep - lead) // 2) + cut(size)
    assert written(fitted) <= LINE_LIMIT
    fitted.encode("utf-8")  # strict: no piece of a character left


def test_a_text_line_with_bytes_that_are_not_utf8_is_measured_as_written():
    """A surrogate (a byte of an argv that is not UTF-8) is written as `\\udcff`, six bytes:
    measured that way, both under the limit and over it."""
    assert _fit_text("agent \udcff") == "agent \udcff"
    line = "\udcff" * (LINE_LIMIT // 6 + 1)  # 16,386 bytes as written
    fitted = _fit_text(line)
    size = 6 * len(line)
    assert fitted == ("\\udcff" * len(line))[: LINE_LIMIT - 1 - len(cut(size))] + cut(size)
    assert written(fitted) == LINE_LIMIT


# -- the 16 KiB limit: JSON ----------------------------------------------------------------------

CORE = {"time": "2026-11-30T05:45:23.361+00:00", "level": "INFO", "message": "", "program":
        "gpu-supervise", "pid": 4242}  # fmt: skip


def document(size: int, **extra: object) -> dict[str, object]:
    """A log record whose JSON line is `size` bytes (newline not counted), by its message."""
    doc = {**CORE, **extra}
    doc["message"] = "m" * (size - len(json.dumps(doc, default=str)))
    assert len(json.dumps(doc, default=str)) == size
    return doc


def test_a_json_line_of_exactly_the_limit_is_kept_whole():
    doc = document(LINE_LIMIT - 1, event="baseline", uuids=["GPU-" + "u" * 2000])
    assert _fit_json(dict(doc)) == json.dumps(doc)


def test_a_json_line_one_byte_over_the_limit_drops_its_large_field():
    doc = document(LINE_LIMIT, event="baseline", uuids=["GPU-" + "u" * 2000])
    fitted = _fit_json(dict(doc))
    assert len(fitted) + 1 <= LINE_LIMIT
    expected = {k: v for k, v in doc.items() if k != "uuids"}
    assert json.loads(fitted) == {**expected, "truncated": ["uuids"]}


def test_a_json_line_one_byte_over_the_limit_without_a_large_field_cuts_its_message():
    doc = document(LINE_LIMIT, event="exit", uuids=["GPU-" + "u" * 900])
    fitted = _fit_json(dict(doc))
    message = str(doc["message"])
    assert json.loads(fitted) == {**doc, "message": message[: len(message) // 2] + " [truncated]"}
    assert len(fitted) + 1 <= LINE_LIMIT


def test_a_field_is_large_from_1025_bytes_of_json_on():
    """Up to 1 KiB a field stays (an event's name, a GPU's UUID list): the message is cut
    instead; from 1025 bytes it is what goes first."""
    kept = "k" * (1024 - 2)  # 1024 bytes of JSON with its quotes
    doc = document(LINE_LIMIT + 100, small=kept)
    fitted = json.loads(_fit_json(dict(doc)))
    assert fitted["small"] == kept and "truncated" not in fitted
    dropped = "d" * (1025 - 2)
    doc = document(LINE_LIMIT + 100, large=dropped)
    fitted = json.loads(_fit_json(dict(doc)))
    assert fitted == {**{k: v for k, v in doc.items() if k != "large"}, "truncated": ["large"]}


def test_the_largest_field_goes_first_and_only_as_many_as_needed():
    doc = document(LINE_LIMIT + 100, a_big="b" * 9000, z_small="s" * 3000)  # names reversed
    fitted = json.loads(_fit_json(dict(doc)))
    assert fitted["truncated"] == ["a_big"] and fitted["z_small"] == "s" * 3000
    assert fitted["message"] == doc["message"]
    doc = document(LINE_LIMIT + 9000, a_big="b" * 8000, z_small="s" * 2000, c_mid="c" * 7000)
    fitted = json.loads(_fit_json(dict(doc)))
    assert fitted["truncated"] == ["a_big", "c_mid"] and fitted["z_small"] == "s" * 2000
    assert fitted["message"] == doc["message"]


def test_core_fields_are_never_dropped():
    doc = document(LINE_LIMIT * 3, error="e" * 5000)  # the message alone is over the limit
    fitted = json.loads(_fit_json(dict(doc)))
    assert {"time", "level", "message", "program", "pid"} <= set(fitted)
    assert fitted["truncated"] == ["error"]
    message = str(doc["message"])  # halved, and halved again
    assert fitted["message"] == message[: len(message) // 2 // 2] + " [truncated]"


def test_fields_that_are_not_json_are_written_as_text():
    """A field loguru was given that JSON has no type for (a path, say) is written as its text:
    measured that way, and still written that way once another field or the message is cut."""
    small = Path("/dev/termination-log")
    doc = document(200, path=small)
    assert json.loads(_fit_json(dict(doc)))["path"] == str(small)
    doc = document(LINE_LIMIT + 10, path=Path("/" + "p" * 3000))
    assert json.loads(_fit_json(dict(doc)))["truncated"] == ["path"]
    doc = document(LINE_LIMIT + 10, path=small, uuids=["GPU-" + "u" * 3000])
    fitted = json.loads(_fit_json(dict(doc)))
    assert fitted["truncated"] == ["uuids"] and fitted["path"] == str(small)
    doc = document(LINE_LIMIT + 10, path=small)
    fitted = json.loads(_fit_json(dict(doc)))
    assert fitted["path"] == str(small) and fitted["message"].endswith(" [truncated]")


def test_a_json_line_of_many_small_fields_still_fits():
    """The fields besides the message are over the limit, none over 1 KiB: once the message is
    cut away, the core fields are left, with the names of those dropped (before the fix, the
    empty message was halved forever)."""
    doc = {**CORE, "message": "probe", **{f"field{i}": "x" * 1000 for i in range(20)}}

    def give_up(*_: object) -> None:
        raise TimeoutError("_fit_json did not return within 2 s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        line = _fit_json(doc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(line) + 1 <= LINE_LIMIT
    fitted = json.loads(line)
    assert {k: fitted[k] for k in ("time", "level", "program", "pid")} == {
        k: CORE[k] for k in ("time", "level", "program", "pid")
    }
    assert fitted["truncated"] == [f"field{i}" for i in range(20)]
    # a large field dropped first, then the small ones too: each named once, in that order
    doc = {**CORE, "message": "probe", "big": "y" * 2000,
           **{f"field{i}": "x" * 1000 for i in range(20)}}  # fmt: skip
    names = json.loads(_fit_json(doc))["truncated"]
    assert names == ["big", *(f"field{i}" for i in range(20))]
    many = {**CORE, "message": "probe", **{f"f{i}": "x" * 20 for i in range(2000)}}
    assert json.loads(_fit_json(many))["truncated"] == 2000  # too many names: their number


# -- a stalled stderr: a real process, stderr a pipe the test stops reading -----------------------

# Logs what the test tells it on stdin, one command a line, and answers each on stdout:
#   log N SIZE        N lines of a SIZE-character message, as fast as it can
#   paced N SIZE      N lines, each written out (flush) before the next is logged
#   decision N SIZE   N decision lines (logs.decision), as fast as it can
#   flush             wait until every queued line is written
#   unwritten T D     flush(T, D): answers what it could not get written, "LINES DECISIONS NOTE"
#   nonblock          make stderr non-blocking, as an agent sharing it can (libuv does)
#   fill              fill stderr's pipe with newlines to the last byte, the writer idle
#   exit              flush, and exit
DRIVER = r"""
import os
import sys
from loguru import logger
from gpu_supervise import logs

logs.setup("INFO", sys.argv[1])
count = 0


def fill():
    blocking = os.get_blocking(2)
    os.set_blocking(2, False)
    for size in (4096, 1):
        try:
            while True:
                os.write(2, b"\n" * size)
        except BlockingIOError:
            pass
    os.set_blocking(2, blocking)


for command in sys.stdin:
    what, *args = command.split()
    answer = ""
    if what in ("exit", "flush"):
        logs.flush(60)
        if what == "exit":
            break
    elif what == "unwritten":
        left = logs.flush(*map(float, args))
        answer = f" {left.lines} {left.decisions} {left.note()}"
    elif what == "nonblock":
        os.set_blocking(2, False)
    elif what == "fill":
        fill()
    else:
        n, size = map(int, args)
        log = logs.decision(event="test") if what == "decision" else logger
        for _ in range(n):
            log.info(f"line {count} " + "x" * size)
            count += 1
            if what == "paced":
                logs.flush(60)
    print("done" + answer, flush=True)
"""


class Driver:
    """The driver process, its stderr a pipe nobody reads until `drain`."""

    def __init__(self, tmp_path: Path, fmt: str = "text") -> None:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        self._read, write = os.pipe()
        self.popen = subprocess.Popen(
            [sys.executable, str(script), fmt], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=write, env=clean_env(), cwd=tmp_path, text=True,
        )  # fmt: skip
        os.close(write)
        self.stderr = bytearray()
        self._reader: threading.Thread | None = None

    def do(self, command: str) -> str:
        """Run `command`; its answer (what follows "done")."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()
        if command == "exit":
            return ""
        answer = self.popen.stdout.readline()
        assert answer.startswith("done"), f"the driver died at {command!r}"
        return answer[len("done") :].strip()

    def stalled(self) -> None:
        """Wait until stderr's pipe is full (64 KiB): the writer thread is blocked from here on,
        so that lines are dropped only from now, in one stretch."""
        deadline = time.monotonic() + 60
        while struct.unpack("i", fcntl.ioctl(self._read, termios.FIONREAD, b"\0" * 4))[0] < 60000:
            assert time.monotonic() < deadline, "stderr's pipe never filled"
            time.sleep(0.01)

    def drain(self) -> None:
        """Start reading stderr: the stall ends."""

        def read() -> None:
            while chunk := os.read(self._read, 65536):
                self.stderr += chunk

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def finish(self) -> list[str]:
        """Exit the driver; every line it wrote to stderr."""
        if self._reader is None:
            self.drain()
        self.do("exit")
        assert self.popen.wait(120) == 0
        assert self._reader is not None
        self._reader.join(60)
        return self.stderr.decode().splitlines()

    def take(self, size: int) -> None:
        """Read `size` bytes of stderr, no more: room for that much in the pipe."""
        while size > 0:
            chunk = os.read(self._read, size)
            self.stderr += chunk
            size -= len(chunk)

    def reader_gone(self) -> None:
        """Close stderr's read end: every write gets EPIPE from here on."""
        os.close(self._read)
        self._read = -1

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait()
        if self._read >= 0:
            os.close(self._read)


@pytest.fixture
def driver(tmp_path: Path):
    made: list[Driver] = []

    def _driver(fmt: str = "text") -> Driver:
        made.append(Driver(tmp_path, fmt))
        return made[-1]

    yield _driver
    for d in made:
        d.close()


DROPPED = " log line(s) dropped: stderr was not being read"


@pytest.mark.slow
def test_after_a_stall_the_dropped_note_comes_once(driver):
    """3500 lines while stderr is not read: the pipe and the queue take some, the rest are
    dropped and counted. Once stderr is read again, one note says how many, and the lines
    logged after it come without one."""
    d = driver()
    d.do("log 500 100")
    d.stalled()
    d.do("log 3000 100")
    d.drain()
    d.do("flush")  # what waited in the queue is written
    d.do("paced 20 100")
    lines = d.finish()
    notes = [i for i, line in enumerate(lines) if DROPPED in line]
    assert len(notes) == 1, "\n".join(lines[i] for i in notes[:5])
    note = lines[notes[0]]
    assert note.startswith("gpu-supervise: ") and note.endswith(DROPPED)
    dropped = int(note.split()[1])
    seen = [int(line.split(" line ")[1].split()[0]) for line in lines if " line " in line]
    assert dropped > 0 and len(seen) + dropped == 3520  # every line: written, or counted
    assert seen[-20:] == list(range(3500, 3520))  # the later lines, all of them
    assert notes[0] < lines.index(next(line for line in lines if " line 3500 " in line))


@pytest.mark.slow
def test_a_stalled_stderr_holds_a_bounded_number_of_lines(driver):
    """Memory does not grow with the lines logged while stderr is stalled: past the queue's
    bound (and the pipe's 64 KiB) a line is dropped, not kept."""
    d = driver()
    d.do("log 20 4000")
    d.stalled()
    d.do("log 2000 4000")  # the pipe is full and the queue too: lines are being dropped
    before = status_mib(d.popen.pid, "VmRSS")
    d.do("log 10000 4000")  # 40 MB of text, were it kept
    grown = status_mib(d.popen.pid, "VmRSS") - before
    assert grown < 10, f"RSS grew {grown:.1f} MiB over 10000 lines of 4 KB"
    d.drain()
    lines = d.finish()
    assert sum(DROPPED in line for line in lines) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_line_written_exceeds_the_limit_around_it(driver, fmt: str):
    """The real lines, the timestamp, level and pid included: messages from 300 bytes under
    the limit to 50 over, one byte apart. Some line is exactly at the limit (the boundary is
    reached), none is over it."""
    d = driver(fmt)
    d.drain()
    for size in range(LINE_LIMIT - 300, LINE_LIMIT + 50):
        d.do(f"paced 1 {size}")
    lines = d.finish()
    sizes = [len(line.encode()) + 1 for line in lines]
    assert len(sizes) == 350 and max(sizes) == LINE_LIMIT
    if fmt == "json":
        assert all(json.loads(line)["program"] == "gpu-supervise" for line in lines)


# -- what the agent does to the stderr it shares, and lines that cannot get out -----------------

NOTE = "log line(s), {} of them decision lines (the change, failure or exit line), could not be "


def logged(lines: Iterable[str]) -> dict[int, str]:
    """The driver's lines by number: each one whole (its message's x's all there, its number
    told once), so that nothing was cut short or glued to the next."""
    found: dict[int, str] = {}
    for line in lines:
        if not line:
            continue  # fill's newlines
        assert line.count(" line ") == 1, f"lines glued together: {line[:200]!r}"
        number, xs = line.split(" line ")[1].split()
        found[int(number)] = xs
    return found


@pytest.mark.slow
def test_lines_wait_for_a_stderr_the_agent_made_non_blocking(driver):
    """The agent shares gpu-supervise's stderr, its flags included, and sets O_NONBLOCK on it
    (libuv does, on a pipe). The collector stalls for a few seconds across the decision: its
    lines wait (they are counted as not yet written, meanwhile), and once it reads again all
    of them come, each whole."""
    d = driver()
    d.do("nonblock")
    d.do("fill")
    d.do("log 20 100")
    d.do("decision 70 300")  # a change line and its per-GPU lines
    time.sleep(3)  # the stall
    assert d.do("unwritten 0.2 0.2").split()[:2] == ["90", "70"]  # none taken for written
    d.drain()
    assert d.do("unwritten 60 60").split()[:2] == ["0", "0"]
    found = logged(d.finish())
    assert found == {i: "x" * (100 if i < 20 else 300) for i in range(90)}


@pytest.mark.slow
def test_a_line_cut_short_by_a_non_blocking_stderr_is_finished_not_glued(driver):
    """A 12 KB line meets a non-blocking pipe with 8 KiB of room: the write is short. The rest
    follows once there is room again, before the next line begins."""
    d = driver()
    d.do("nonblock")
    d.do("fill")
    d.take(8192)
    d.do("log 1 12000")
    d.do("log 3 100")
    time.sleep(1)
    d.drain()
    found = logged(d.finish())
    assert found == {0: "x" * 12000, 1: "x" * 100, 2: "x" * 100, 3: "x" * 100}


@pytest.mark.slow
def test_lines_the_stalled_pipe_holds_back_are_counted_by_kind(driver):
    """The pipe full to the last byte, the writer idle: each line logged after it waits. What
    flush gives up on is said with its numbers: 7 lines, 2 of them decision lines."""
    d = driver()
    d.do("fill")
    d.do("log 3 10")
    d.do("decision 2 10")
    d.do("log 2 10")
    lines, decisions, note = d.do("unwritten 0.2 0.5").split(" ", 2)
    assert (lines, decisions) == ("7", "2")
    assert note == "7 " + NOTE.format(2) + "written: stderr was not being read"
    d.drain()
    assert d.do("unwritten 60 60").split()[:2] == ["0", "0"]
    assert logged(d.finish()) == {i: "x" * 10 for i in range(7)}


@pytest.mark.slow
def test_lines_whose_reader_is_gone_are_counted_as_unwritten(driver):
    """stderr's reader is gone (EPIPE): the lines are lost at once, and counted, the decision
    lines apart, not taken for written."""
    d = driver()
    d.reader_gone()
    d.do("log 4 10")
    d.do("decision 3 10")
    assert d.do("unwritten 5 5").split(" ", 2)[:2] == ["7", "3"]
    d.do("exit")
    assert d.popen.wait(60) == 0


@pytest.mark.slow
def test_a_decision_line_is_never_dropped_for_1000_other_lines(driver):
    """The pipe full and 1000 other lines waiting (500 more dropped): decision lines logged
    then are queued still, counted while they wait, and written once stderr is read again,
    after one note for the 500."""
    d = driver()
    d.do("fill")
    d.do("log 1500 10")
    d.do("decision 3 10")
    # waiting: the 1000 lines and 3 decision lines; never to be written: the 500 dropped
    assert d.do("unwritten 0.2 0.5").split()[:2] == ["1503", "3"]
    d.drain()
    lines = d.finish()
    assert [line for line in lines if DROPPED in line] == [f"gpu-supervise: 500{DROPPED}"]
    found = logged(line for line in lines if DROPPED not in line)
    assert sorted(found) == [*range(1000), 1500, 1501, 1502]


# The agent makes the stderr it shares non-blocking and writes to it until it would block: the
# pipe is full, and gpu-supervise's writes meet EAGAIN from then on.
NON_BLOCKING_AGENT = """
import os, sys, time
os.set_blocking(2, False)
try:
    while True:
        os.write(2, b"agent " * 100 + b"\\n")
except BlockingIOError:
    pass
print("up", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_the_decision_lines_get_out_when_the_agent_made_stderr_non_blocking(
    fake_node: FakeNode, tmp_path: Path
):
    """End to end: the collector stalls for a few seconds across a MIG change while the agent's
    O_NONBLOCK is on the stderr gpu-supervise shares with it. Once it reads again, the change
    line, its per-GPU line and the exit line are there, and the termination message says
    nothing of lines lost."""
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    out, message = tmp_path / "out", tmp_path / "termination-log"
    message.write_text("")
    fast = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
    agent = [sys.executable, "-c", NON_BLOCKING_AGENT]
    cmd = [*gpu_supervise_cmd(), *fast, "--termination-log", str(message), "--", *agent]
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(cmd, env=fake_node.env, stdout=stdout, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while b"up" not in out.read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1)  # the baseline, queued behind the agent's lines
        node.gpu(1).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        while not message.read_text():  # the decision is taken
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        time.sleep(3)  # the collector is still stalled
        assert proc.stderr is not None
        log = proc.stderr.read().decode(errors="replace")  # it reads again, to the end
        assert proc.wait(60) == 1
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert "[GPU-Watcher] baseline" in log
    assert "[GPU-Watcher] MIG configuration change detected (Old UUIDs: [" in log
    assert f"[GPU-Watcher]   GPU 1 {node.gpu(1).uuid}" in log
    assert "INFO    exiting 1: restart me (GPU topology changed)" in log
    ours = [line for line in log.splitlines() if not line.startswith("agent ")]
    assert all(line.count(" gpu-supervise[") == 1 for line in ours), "lines glued together"
    assert "could not be written" not in message.read_text()


# -- no line over 16 KiB on a 16x7 node ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_line_fits_the_runtimes_16_kib_on_a_16x7_node(
    start: Start, fake_node: FakeNode, fmt: str
):
    node = dgx_a100(*[["1g.5gb"] * 7] * 16, count=16)
    fake_node.write(node)
    proc = start([*FAST, "--log-format", fmt, "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("baseline")
    new = node.copy()
    for gpu in new.gpus:
        gpu.set_layout(["1g.5gb"] * 7, salt="again")  # every MIG UUID new
    fake_node.write(new)
    assert proc.wait(60) == 1
    lines = proc.log_path.read_bytes().splitlines()
    assert max(len(line) + 1 for line in lines) <= LINE_LIMIT
    old_list, new_list = ", ".join(node.uuids()), ", ".join(new.uuids())
    prd = (
        f"[GPU-Watcher] MIG configuration change detected (Old UUIDs: [{old_list}], "
        f"New UUIDs: [{new_list}]). Initiating self-restart."
    )
    assert prd in proc.output
    if fmt == "json":
        docs = [json.loads(line) for line in lines if line.startswith(b"{")]
        assert not any("truncated" in doc for doc in docs)  # it fits by design, not by cutting
        per_gpu = [doc for doc in docs if doc.get("event") == "gpu_changed"]
        assert [doc["new_uuids"] for doc in per_gpu] == [
            [gpu.uuid, *gpu.mig_uuids] for gpu in new.gpus
        ]


def test_a_json_line_of_wide_characters_still_fits():
    doc = {"time": "t", "level": "INFO", "message": "\u2603" * 20000, "program": "p", "pid": 1,
           "gpu": "GPU-a", "note": "\u2603" * 20000}  # fmt: skip
    line = _fit_json(doc)
    assert len(line.encode()) < LINE_LIMIT
    parsed = json.loads(line)
    assert parsed["truncated"] == ["note"] and parsed["message"].endswith(" [truncated]")
