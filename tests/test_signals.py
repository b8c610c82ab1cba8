"""What gpu-supervise does with signals as tini and dumb-init do it, each behaviour on its own,
with the installed gpu-supervise: its parent's death (tini -p), fault signals sent from outside
(forwarded, as dumb-init does; a fault of its own still kills it), and the dispositions the
caller hands over (tini's sigconf: the agent gets the caller's ignored signals and mask)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import AGENT, Proc, clean_env, gpu_supervise_cmd, missing_capability, pid_alive

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]
ROOT = Path(__file__).parent.parent


def sh_agent(pidfile: Path) -> list[str]:
    """An agent that writes its pid, then is `sleep` (no core file when a fault kills it)."""
    return ["sh", "-c", 'ulimit -c 0; echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 300',
            str(pidfile)]  # fmt: skip


def agent_pid(pidfile: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not pidfile.exists():
        assert time.monotonic() < deadline, f"no {pidfile} within {timeout} s"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
        assert time.monotonic() < deadline, f"pid {pid} never became sleep"
        time.sleep(0.05)  # the shell has yet to exec
    return pid


def started_pid(proc: Proc) -> int:
    """The agent's pid, from gpu-supervise's `started COMMAND as pid N`."""
    match = re.search(r"started .* as pid (\d+)", proc.wait_for(" as pid "))
    assert match is not None
    return int(match[1])


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# glibc's own (thread cancellation, setxid): its posix_spawn leaves them ignored in the child,
# and its libpthread takes them over whenever it needs them.
GLIBC_INTERNAL = {32, 33}


def signal_sets(pid: int) -> dict[str, set[int]]:
    """SigIgn and SigBlk of /proc/PID/status, as sets of signal numbers (less GLIBC_INTERNAL)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":\t")
        if name in ("SigIgn", "SigBlk"):
            bits = int(value, 16)
            out[name] = {n for n in range(1, 65) if bits & (1 << (n - 1))} - GLIBC_INTERNAL
    return out


# -- its parent's death --------------------------------------------------------------------------


def test_gpu_supervise_stops_the_agent_when_its_own_parent_dies(start_cmd: Start, tmp_path: Path):
    """gpu-supervise should get --parent-death-signal itself when its parent dies, as tini -p
    does, and stop the agent's tree as for any SIGTERM: under another supervisor that is killed,
    neither is left running."""
    pidfile = tmp_path / "pid"
    cmd = [*gpu_supervise_cmd(), *PLAIN, "--parent-death-signal", "SIGTERM", "--",
           *sh_agent(pidfile)]  # fmt: skip
    parent = start_cmd(["sh", "-c", f"{shlex.join(cmd)} & wait"], clean_env())
    agent = agent_pid(pidfile)
    parent.wait_for("started sh")
    parent.popen.kill()  # the supervisor above gpu-supervise dies
    parent.popen.wait()
    assert eventually(lambda: not pid_alive(agent)), f"the agent outlived it:\n{parent.log}"
    assert eventually(lambda: "exiting 143: stopped by SIGTERM" in parent.log), parent.log


# Kills gpu-supervise's parent once the entry point has noted it, before the rest is loaded (the
# prctl comes later): the kernel sends nothing for a parent that died before the request.
KILL_THE_PARENT_EARLY = """
import os, signal, sys, time
def _hook(event, args):
    if event == "import" and args[0] == "gpu_supervise.cli" and "GS_TEST_EARLY" in os.environ:
        del os.environ["GS_TEST_EARLY"]
        parent = os.getppid()
        os.kill(parent, signal.SIGKILL)
        while os.getppid() == parent:
            time.sleep(0.01)
sys.addaudithook(_hook)
"""


def test_a_parent_that_died_before_the_request_still_stops_the_agent(
    start_cmd: Start, tmp_path: Path
):
    """gpu-supervise should notice a parent that died before it asked for the parent-death
    signal (it was re-parented already) and act as if the signal came."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL_THE_PARENT_EARLY)
    pidfile = tmp_path / "pid"
    cmd = [*gpu_supervise_cmd(), *PLAIN, "--parent-death-signal", "SIGTERM", "--",
           *sh_agent(pidfile)]  # fmt: skip
    env = clean_env(PYTHONPATH=str(tmp_path / "site"), GS_TEST_EARLY="1")
    parent = start_cmd(["sh", "-c", f"{shlex.join(cmd)} & wait"], env)
    assert parent.popen.wait(60) == -signal.SIGKILL
    assert eventually(lambda: "exiting 143: stopped by SIGTERM" in parent.log), parent.log
    assert not pidfile.exists() or eventually(lambda: not pid_alive(int(pidfile.read_text())))


# -- fault signals ---------------------------------------------------------------------------------

FAULTS = ["SIGABRT", "SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGTRAP", "SIGSYS"]


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_signal_sent_from_outside_is_forwarded(start: Start, tmp_path: Path, name: str):
    """gpu-supervise should forward a fault signal another process sends it, as dumb-init does,
    and exit with the agent's code: never die of it and leave the agent unsupervised."""
    sig = getattr(signal, name)
    pidfile = tmp_path / "pid"
    proc = start([*PLAIN, "--", *sh_agent(pidfile)], clean_env(), cwd=tmp_path)
    agent = agent_pid(pidfile)
    proc.wait_for("started sh")
    proc.signal(sig)
    assert proc.wait() == 128 + sig, proc.log
    assert f"exiting {128 + sig}: the agent was killed by {name}" in proc.log
    assert not pid_alive(agent)


# Faults once gpu-supervise runs (the trigger file exists): in a thread that does not block
# faults, the worst case: only the kernel's default action can end a real one.
FAULT_OF_ITS_OWN = """
import ctypes, os, resource, threading, time
def _fault(trigger=os.environ.get("GS_TEST_FAULT")):
    while not os.path.exists(trigger):
        time.sleep(0.02)
    ctypes.string_at(0)
if "GS_TEST_FAULT" in os.environ:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    threading.Thread(target=_fault, daemon=True).start()
"""


def test_a_fault_of_its_own_still_kills_gpu_supervise(start: Start, tmp_path: Path):
    """gpu-supervise should die of a real fault in its own code (the kernel's SIGSEGV), never
    catch it: a handler returns to the faulting instruction, which faults again, forever."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAULT_OF_ITS_OWN)
    trigger = tmp_path / "trigger"
    env = clean_env(PYTHONPATH=str(tmp_path / "site"), GS_TEST_FAULT=str(trigger))
    proc = start([*PLAIN, "--", "sleep", "300"], env)
    proc.wait_for("started sleep")
    trigger.touch()
    assert proc.wait(30) == -signal.SIGSEGV


# -- what the caller hands over ----------------------------------------------------------------

# tini's sigconf test: the caller ignores SIGINT and SIGTTOU, and blocks SIGTTIN, SIGILL and
# SIGTERM; gpu-supervise is exec'd from there.
SIGCONF = """
import os, signal, sys
for sig in (signal.SIGINT, signal.SIGTTOU):
    signal.signal(sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTIN, signal.SIGILL, signal.SIGTERM})
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("option", [[], ["--parent-death-signal", "SIGKILL"]])
def test_the_agent_gets_the_callers_ignored_signals_and_mask(
    start_cmd: Start, tmp_path: Path, option: list[str]
):
    """gpu-supervise should hand the agent the dispositions it would have had without it: the
    signals the caller ignored stay ignored, the caller's mask stays the mask (posix_spawn,
    and the fork a parent-death signal needs). gpu-supervise itself still handles SIGTERM."""
    cmd = [*gpu_supervise_cmd(), *PLAIN, "--stop-timeout", "0.5", *option, "--", "sleep", "300"]
    proc = start_cmd([sys.executable, "-c", SIGCONF, *cmd], clean_env())
    sets = signal_sets(started_pid(proc))  # sleep itself: a shell would set its own mask
    assert sets["SigIgn"] == {signal.SIGINT, signal.SIGTTOU}
    assert sets["SigBlk"] == {signal.SIGTTIN, signal.SIGILL, signal.SIGTERM}
    proc.signal(signal.SIGTERM)  # blocked by the caller: still a stop (the agent blocks it)
    assert proc.wait() == 128 + signal.SIGKILL
    assert "exiting 137: stopped by SIGTERM" in proc.log


def test_an_agent_under_nohup_keeps_ignoring_sighup(start_cmd: Start, tmp_path: Path):
    """gpu-supervise should leave SIGHUP ignored for an agent started with nohup: a SIGHUP is
    forwarded to it, as tini does, and it goes on running."""
    pidfile = tmp_path / "pid"
    proc = start_cmd(["nohup", *gpu_supervise_cmd(), *PLAIN, "--log-level", "DEBUG", "--",
                      *sh_agent(pidfile)], clean_env())  # fmt: skip
    agent = agent_pid(pidfile)
    proc.signal(signal.SIGHUP)
    proc.wait_for(f"received SIGHUP: forwarding it to pid {agent}")
    proc.signal(signal.SIGTERM)  # after the SIGHUP: the agent would be dead by now
    assert proc.wait() == 143, proc.log  # killed by SIGHUP, it would be 129


def test_a_sigchld_the_caller_ignored_still_reaps_the_agent(start_cmd: Start):
    """gpu-supervise should take SIGCHLD back: ignored, the kernel would reap the agent behind
    its back, and its exit would never be seen."""
    launcher = ("import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])")  # fmt: skip
    cmd = [*gpu_supervise_cmd(), *PLAIN, "--", "sh", "-c", "exit 3"]
    proc = start_cmd([sys.executable, "-c", launcher, *cmd], clean_env())
    assert proc.wait() == 3, proc.log
    assert "exiting 3: the agent exited with code 3" in proc.log


def test_an_agent_whose_caller_set_nothing_gets_nothing_of_ours(start: Start):
    """The plain case stays plain: nothing ignored, nothing blocked (SIGPIPE and SIGXFSZ, which
    CPython ignores in gpu-supervise, and the faults it blocks, at their default)."""
    proc = start([*PLAIN, "--", "sleep", "300"], clean_env())
    assert signal_sets(started_pid(proc)) == {"SigIgn": set(), "SigBlk": set()}
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


def test_a_sigint_the_caller_ignored_is_forwarded_not_a_stop(start_cmd: Start):
    """gpu-supervise should only forward a SIGINT its caller ignored (a script's background job
    gets the terminal's ^C), as tini does: the agent ignores it too, and nothing is stopped."""
    launcher = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])")  # fmt: skip
    cmd = [*gpu_supervise_cmd(), *PLAIN, "--log-level", "DEBUG", "--", "sleep", "300"]
    proc = start_cmd([sys.executable, "-c", launcher, *cmd], clean_env())
    agent = started_pid(proc)
    proc.signal(signal.SIGINT)
    proc.wait_for(f"received SIGINT: forwarding it to pid {agent}")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143, proc.log  # stopped by the SIGTERM, the agent alive until then


# -- every signal a process can catch reaches the agent --------------------------------------------


OUTSIDE_THE_OLD_SET = [
    "SIGALRM", "SIGPWR", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGURG", "SIGXCPU", "SIGSTKFLT",
    "SIGCONT", "SIGTSTP",
]  # fmt: skip


def test_every_catchable_signal_is_forwarded(start: Start):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    rt = [signal.SIGRTMIN, signal.SIGRTMIN + 5, signal.SIGRTMAX]
    for sig in [getattr(signal, name) for name in OUTSIDE_THE_OLD_SET] + rt:
        proc.signal(sig)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"SIGRTMIN+{sig - signal.SIGRTMIN}"
        proc.wait_for(f"got {name}")
    assert proc.popen.poll() is None  # none of them killed gpu-supervise
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


def test_terminal_job_control_signals_never_stop_gpu_supervise(start: Start):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        proc.signal(sig)
    time.sleep(0.3)
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state != "T"  # ignored, as tini ignores them: not stopped
    assert "got SIGTTIN" not in proc.output  # and not forwarded: they concern our terminal
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


# -- a signal the kernel refuses -------------------------------------------------------------------


SETUID_AGENT = r"""
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    if (setresuid(0, 0, 0) != 0) { perror("setresuid"); return 3; }  /* all ids root */
    signal(SIGTERM, SIG_IGN);
    printf("setuid agent %d ready\n", getpid());
    fflush(stdout);
    for (;;) pause();
}
"""


@pytest.fixture
def unprivileged() -> Iterator[tuple[list[str], Path]]:
    """gpu-supervise as user nobody (Debian's python3 with this package on its path: the
    interpreter tests run under may live where nobody cannot read), and a setuid-root agent."""
    python = Path("/usr/bin/python3")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        missing_capability("needs root, setpriv (util-linux) and /usr/bin/python3")
    version = "import sys; print('%d.%d' % sys.version_info[:2])"
    theirs = subprocess.run([str(python), "-c", version], capture_output=True, text=True).stdout
    if theirs.strip() != "%d.%d" % sys.version_info[:2]:  # noqa: UP031
        missing_capability("/usr/bin/python3 is another Python than the tests' (psutil)")
    folder = Path(tempfile.mkdtemp(prefix="gs-setuid-", dir="/tmp"))
    folder.chmod(0o755)
    source = folder / "agent.c"
    source.write_text(SETUID_AGENT)
    agent = folder / "agent"
    subprocess.run(["gcc", "-o", str(agent), str(source)], check=True)
    agent.chmod(0o4755)  # setuid root
    site = sysconfig.get_paths()["purelib"]
    boot = (
        f"import sys; sys.path[:0] = [{str(ROOT / 'supervisor')!r}, {site!r}]; "
        "sys.argv[0] = 'gpu-supervise'; from gpu_supervise.cli import run; run()"
    )
    cmd = [
        setpriv,
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        str(python),
        "-c",
        boot,
    ]
    try:
        yield cmd, agent
    finally:
        shutil.rmtree(folder)


def test_a_refused_signal_never_ends_supervision(start_cmd, unprivileged):
    cmd, agent = unprivileged
    proc = start_cmd([*cmd, *PLAIN, "--stop-timeout", "0.5", "--", str(agent)], clean_env())
    out = proc.wait_for("setuid agent")
    agent_pid = int(out.split("setuid agent ")[1].split()[0])
    proc.signal(signal.SIGHUP)
    proc.wait_for(f"could not forward SIGHUP to pid {agent_pid}: Operation not permitted")
    assert proc.popen.poll() is None and "Traceback" not in proc.output
    # nor can it stop the agent: the stop still ends, and says who is left
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 137
    assert f"pid {agent_pid} survived SIGKILL" in proc.output
    assert "exiting 137: stopped by SIGTERM; the agent survived SIGKILL" in proc.output
    os.kill(agent_pid, signal.SIGKILL)  # as root, the test can


# -- gpu-supervise itself killed -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "survives"), [([], True), (["--parent-death-signal", "TERM"], False)]
)
def test_the_parent_death_signal(start: Start, tmp_path: Path, option: list[str], survives: bool):
    pidfile = tmp_path / "pid"
    proc = start(
        [*PLAIN, *option, "--", *AGENT, "--no-nvml", "--pidfile", str(pidfile)], clean_env()
    )
    proc.wait_for("ready")
    agent_pid = int(pidfile.read_text())
    os.kill(proc.pid, signal.SIGKILL)  # gpu-supervise dies; nobody stops the agent for it
    proc.popen.wait()
    deadline = time.monotonic() + (2 if survives else 30)
    while pid_alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_alive(agent_pid) is survives
    if not survives:
        assert "got SIGTERM" in proc.output


# -- signals before gpu-supervise is loaded --------------------------------------------------------


def test_signals_are_held_from_the_entry_point_on(tmp_path: Path):
    """The entry point holds the signals gpu-supervise handles before it loads anything else: a
    SIGINT or SIGTSTP in the tens of milliseconds of loading neither kills it with a traceback
    nor stops it. Shown with the rest of the program replaced by a slow stand-in."""
    fake = tmp_path / "fake"
    (fake / "gpu_supervise").mkdir(parents=True)
    package = ROOT / "supervisor" / "gpu_supervise"
    for name in ("__init__.py", "entry.py", "signals.py"):
        shutil.copy2(package / name, fake / "gpu_supervise" / name)
    (fake / "gpu_supervise" / "cli.py").write_text(
        "import os, signal, sys, time\n"
        "def run():\n"
        "    print('loading', flush=True)\n"
        "    time.sleep(2)  # the imports, slowed down\n"
        "    pending = signal.sigpending()\n"
        "    print('pending', sorted(int(s) for s in pending), flush=True)\n"
        "    os._exit(0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gpu_supervise.entry import run; run()"],
        env=clean_env(PYTHONPATH=str(fake)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "loading\n"
    for sig in (signal.SIGINT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTERM):
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err  # neither killed nor stopped
    held = [int(x) for x in out.split("[")[1].split("]")[0].split(",")]
    assert sorted(held) == sorted([signal.SIGINT, signal.SIGTERM, signal.SIGTSTP])
