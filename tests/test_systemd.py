"""The bare-metal DGX path under a real systemd: PID 1 of a podman (runc) container
(tests/systemd_container.py), with the shipped packaging/systemd/gpu-agent.service installed as
it is and changed only by a drop-in: ExecStart with real paths, the fake NVML's environment and
fast watch settings. Every assertion reads systemd's own state (`systemctl show`, `journalctl`).

gpu-supervise runs both as the installed package (the virtual environment, bind-mounted) and as
the one-folder PyInstaller binary, in front of tests/agents/agent.py or a shell agent.

The second path: an agent package's own unit wrapped by packaging/systemd/wrap-agent.conf, a
drop-in installed as shipped but for its ExecStart= line, over a stand-in vendor unit whose
settings would each break supervision were the drop-in not to override them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import missing_capability
from containers import PODMAN_FLAGS
from fakenvml import Node, dgx_a100
from systemd_container import CannotRun, Container, Unit, booted

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
TESTS = ROOT / "tests"
UNIT_FILE = ROOT / "packaging/systemd/gpu-agent.service"
UNIT = "gpu-agent.service"
DROP_IN = f"/etc/systemd/system/{UNIT}.d/test.conf"
SHARE = "/srv/gpu-supervise"  # a folder shared with the host: NVML, node file, scripts, pids
BINARY = "/opt/gpu-supervise/gpu-supervise"
FAST = {
    "GPU_SUPERVISE_WATCH_INTERVAL": "0.2",
    "GPU_SUPERVISE_WATCH_COOLDOWN": "0",
    "GPU_SUPERVISE_WATCH_SETTLE": "0.2",
}
AGENT_UUIDS = re.compile(r"^agent (\d+): UUIDs (.*)$")
SLOW_START = 1.5  # seconds the ExecStart wrapper sleeps before exec'ing gpu-supervise

# An agent with no Python: reads the UUIDs once through the shipped binary, as a real agent
# caches its NVML handles, then idles and logs SIGHUP.
SHELL_AGENT = f"""#!/bin/sh
trap 'echo "agent $$: got SIGHUP"' HUP
uuids=$({BINARY} snapshot | grep -oE '(GPU|MIG)-[0-9a-f-]{{36}}' | tr '\\n' ' ')
echo "agent $$: UUIDs $uuids"
echo "agent $$: ready"
while :; do sleep 1; done
"""

# What systemd does to the unit's processes, as the agent sees it: one "probe:" line a fact.
PROBE_AGENT = """#!/bin/sh
for d in /etc /usr /root /proc/sys /sys/fs/cgroup /var/lib /srv/gpu-supervise; do
  if touch "$d/.gs-probe" 2>/dev/null; then rm -f "$d/.gs-probe"; echo "probe: $d writable"
  else echo "probe: $d read-only"; fi
done
[ -e /tmp/host-marker ] && echo "probe: /tmp shared" || echo "probe: /tmp private"
if [ -c /dev/nvidiactl ] && : </dev/nvidiactl; then echo "probe: /dev/nvidiactl opens"
else echo "probe: /dev/nvidiactl missing"; fi
[ -r /proc/stat ] && echo "probe: /proc/stat readable" || echo "probe: /proc/stat hidden"
echo "probe: NoNewPrivs $(awk '/^NoNewPrivs/ {print $2}' /proc/self/status)"
chrt -f 1 true 2>/dev/null && echo "probe: realtime allowed" || echo "probe: realtime denied"
setarch linux32 true 2>/dev/null && echo "probe: personality free" \
  || echo "probe: personality locked"
f=/var/tmp/.gs-suid; : > $f
chmod u+s $f 2>/dev/null && echo "probe: setuid allowed" || echo "probe: setuid denied"; rm -f $f
echo "probe: done"
exec sleep 3600
"""

# Type=notify must wait for gpu-supervise's READY=1, not for the process to exist.
SLOW_START_WRAPPER = f"""#!/bin/sh
sleep {SLOW_START}
exec "$@"
"""

# Says who sent each SIGTERM it gets (sigwaitinfo's si_pid), takes LINGER seconds to shut down,
# longer than the stand-in vendor unit's TimeoutStopSec=, then dies of SIGTERM as an agent
# without a handler does (gpu-supervise then exits 143).
LINGER = 2.0
TERM_AGENT = """import os, signal, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print(f"agent {os.getpid()}: ready", flush=True)
info = signal.sigwaitinfo({signal.SIGTERM})
print(f"agent {os.getpid()}: SIGTERM from pid {info.si_pid}", flush=True)
deadline = time.monotonic() + LINGER
while (left := deadline - time.monotonic()) > 0:
    info = signal.sigtimedwait({signal.SIGTERM}, left)
    if info is not None:
        print(f"agent {os.getpid()}: SIGTERM from pid {info.si_pid}", flush=True)
print(f"agent {os.getpid()}: stopping", flush=True)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
os.kill(os.getpid(), signal.SIGTERM)
""".replace("LINGER", str(LINGER))


@dataclass
class Form:
    """gpu-supervise as installed: where it is in the container, and the agent put behind it."""

    name: str
    exe: str
    agent: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Box:
    container: Container
    share: Path  # the host side of SHARE
    opt: Path  # the host side of /opt (read-only inside)

    @property
    def unit(self) -> Unit:
        return self.container.unit(UNIT)


# The package as an operator installs it outside /tmp (which the unit's PrivateTmp hides, and
# where a clone may well be): the source and its runtime dependencies copied into SITE, run by
# the interpreter the tests run with, and the test agent beside them.
PYTHON = str(Path(sys.executable).resolve())
SITE = f"{SHARE}/py"
PACKAGE = Form(
    "package", f"{PYTHON} -m gpu_supervise", [PYTHON, f"{SHARE}/agent.py"], {"PYTHONPATH": SITE}
)
RUNTIME = ("gpu_supervise", "loguru", "pynvml")


def _install_package(site: Path) -> None:
    for name in RUNTIME:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(origin.parent, site / name, ignore=skip)
        else:
            shutil.copy2(origin, site / origin.name)


# -- the container -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def box(
    tmp_path_factory: pytest.TempPathFactory, fake_lib_dir: Path, podman_runroot: Path
) -> Iterator[Box]:
    work = tmp_path_factory.mktemp("systemd")
    share, opt = work / "share", work / "opt"
    (share / "nvml").mkdir(parents=True)
    opt.mkdir()
    shutil.copy2(fake_lib_dir / "libnvidia-ml.so.1", share / "nvml")
    scripts = {"agent.sh": SHELL_AGENT, "probe.sh": PROBE_AGENT,
               "slow-start.sh": SLOW_START_WRAPPER, "term-agent.py": TERM_AGENT}  # fmt: skip
    for name, text in scripts.items():
        (share / name).write_text(text)
        (share / name).chmod(0o755)
    _install_package(share / "py")
    shutil.copy2(TESTS / "agents" / "agent.py", share / "agent.py")
    python_dirs = [Path(sys.base_prefix), Path(PYTHON).parent]
    with contextlib.ExitStack() as stack:
        try:
            container = stack.enter_context(
                booted(
                    work,
                    podman_runroot / "systemd",
                    flags=PODMAN_FLAGS,
                    read_only=python_dirs,
                    binds={share: SHARE, opt: "/opt:ro"},
                    devices={"/dev/null": "/dev/nvidiactl"},  # stands in for the GPU's node
                )
            )
        except CannotRun as exc:
            missing_capability(str(exc))
        config = (ROOT / "examples/config.toml").read_text()
        container.write("/etc/gpu-supervise/config.toml", config)
        yield Box(container, share, opt)


@pytest.fixture(scope="module")
def binary_form(box: Box, binary_build: tuple[Path, str]) -> Form:
    """The folder packaging/build-binary.sh makes, copied to /opt/gpu-supervise as an operator
    would."""
    dist = binary_build[0].parent.parent
    shutil.copytree(dist / "gpu-supervise", box.opt / "gpu-supervise", symlinks=True)
    return Form("binary", BINARY, [f"{SHARE}/agent.sh"])


Install = Callable[..., Unit]


@pytest.fixture
def gpu_agent(box: Box) -> Iterator[Install]:
    """Installs the unit with a drop-in and returns it, stopped; stops and resets it after."""
    _reset(box)
    dgx_a100(["1g.5gb"] * 7).write(box.share / "node.txt")
    (box.share / "pids").unlink(missing_ok=True)

    def install(
        form: Form = PACKAGE,
        agent: list[str] | None = None,
        env: dict[str, str] | None = None,
        extra: list[str] | tuple[str, ...] = (),
        wrapper: str | None = None,
    ) -> Unit:
        box.container.write(f"/etc/systemd/system/{UNIT}", UNIT_FILE.read_text())
        box.container.write(DROP_IN, drop_in(form, agent, env, extra, wrapper))
        box.container.systemctl("daemon-reload")
        return box.unit

    yield install
    _reset(box)


def _reset(box: Box, unit: str = UNIT) -> None:
    box.container.systemctl("stop", unit, check=False)
    box.container.systemctl("reset-failed", check=False)  # also resets the start rate limit


def drop_in(
    form: Form,
    agent: list[str] | None = None,
    env: dict[str, str] | None = None,
    extra: list[str] | tuple[str, ...] = (),
    wrapper: str | None = None,
) -> str:
    """The shipped ExecStart with its two placeholders made real, the fake NVML's environment,
    fast watch settings, and whatever a test adds."""
    (line,) = [x for x in UNIT_FILE.read_text().splitlines() if x.startswith("ExecStart=")]
    shipped = line.removeprefix("ExecStart=")
    assert "/opt/gpu-supervise/gpu-supervise" in shipped and "/usr/bin/gpu-agent" in shipped
    command = shipped.replace("/opt/gpu-supervise/gpu-supervise", form.exe).replace(
        "/usr/bin/gpu-agent", " ".join(agent or form.agent)
    )
    if wrapper:
        command = f"{wrapper} {command}"
    variables = {"LD_LIBRARY_PATH": f"{SHARE}/nvml", "FAKE_NVML_NODE": f"{SHARE}/node.txt"}
    variables |= FAST | form.env | (env or {})
    lines = ["[Service]", "ExecStart=", f"ExecStart={command}"]
    lines += [f'Environment="{k}={v}"' for k, v in variables.items()]
    return "\n".join([*lines, *extra, ""])


def agent_lines(unit: Unit, after: str, count: int = 1, timeout: float = 30.0) -> list[tuple]:
    """(pid, UUIDs, journal entry) of each agent that has printed what it sees."""
    found = unit.wait_journal(AGENT_UUIDS, after, count, timeout)
    out = []
    for entry in found:
        match = AGENT_UUIDS.search(entry.message)
        assert match
        out.append((int(match[1]), match[2].split(), entry))
    return out


def _no_systemd_sigkill(unit: Unit, after: str) -> None:
    """KillMode=mixed: systemd SIGKILLs what is left once gpu-supervise exits. Nothing may be."""
    killed = [e.message for e in unit.journal(after) if "with signal SIGKILL" in e.message]
    assert not killed, f"gpu-supervise left processes for systemd to kill: {killed}"


def _active_only_after_ready(box: Box, unit: Unit, name: str) -> tuple[dict[str, str], str]:
    """Starts NAME, whose ExecStart wrapper sleeps SLOW_START s before exec'ing gpu-supervise,
    and checks it went active only after that (on READY=1, not on the fork) with the wrapper's
    pid as gpu-supervise's. Returns the unit's properties and the journal cursor before."""
    after = box.container.cursor()
    box.container.systemctl("start", "--no-block", name)
    unit.wait(ActiveState="activating", SubState="start", timeout=SLOW_START)
    state = unit.wait(ActiveState="active", SubState="running")
    times = unit.show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
                      "ExecMainPID", "Type", "NotifyAccess")  # fmt: skip
    waited = (int(times["ActiveEnterTimestampMonotonic"]) -
              int(times["ExecMainStartTimestampMonotonic"])) / 1e6  # fmt: skip
    assert waited >= SLOW_START, f"active {waited:.3f} s after the fork: before READY=1"
    assert state["MainPID"] == times["ExecMainPID"]  # the wrapper became gpu-supervise
    return {**state, **times}, after


# -- the tests -----------------------------------------------------------------------------------


def test_active_only_after_ready(box: Box, gpu_agent: Install):
    """Type=notify: the unit is `activating` until gpu-supervise's READY=1 arrives. The wrapper
    sleeps before exec'ing gpu-supervise (same pid), so a unit that went active on the fork
    (Type=simple) or on anything but READY=1 from the main process fails here, and one that
    never gets READY=1 stays activating and fails the wait."""
    unit = gpu_agent(wrapper=f"{SHARE}/slow-start.sh")
    state, after = _active_only_after_ready(box, unit, UNIT)
    assert state["Type"] == "notify" and state["NotifyAccess"] == "main"
    unit.wait_journal(re.compile(r"gpu-supervise\[\d+\] INFO +started "), after)
    agent_lines(unit, after)
    rejected = [e.message for e in unit.journal(after) if "reception only permitted" in e.message]
    assert not rejected


@pytest.mark.parametrize("form_name", ["package", "binary"])
def test_mig_change_restarts_the_agent(
    box: Box, gpu_agent: Install, request: pytest.FixtureRequest, capsys, form_name: str
):
    """A MIG reconfiguration under the shipped RestartSec: the [GPU-Watcher] line in the
    journal, exit 1, systemd's restart, a new agent that sees the new UUIDs. Prints the time
    from the node file's rewrite to the new agent's first line."""
    form = PACKAGE if form_name == "package" else request.getfixturevalue("binary_form")
    unit = gpu_agent(form)
    old, new, first_pid, after = _running_then_reconfigured(box, unit, UNIT)
    changed_at = time.time()

    (line,) = unit.wait_journal("[GPU-Watcher] MIG configuration change detected", after)
    # RestartSec (5 s) leaves time to see the exit as systemd recorded it
    exited = unit.wait(SubState="auto-restart", ExecMainStatus=1, ExecMainCode=1)
    assert exited["ActiveState"] == "activating" and exited["Result"] == "exit-code"
    assert exited["NRestarts"] == "0"
    agents = agent_lines(unit, after, count=2)
    unit.wait(ActiveState="active", SubState="running", NRestarts=1)
    second_pid, second, second_entry = agents[1]
    assert second_pid != first_pid
    assert second == new.uuids()
    assert not set(second) & (set(old.uuids()) - set(new.uuids()))
    unit.wait_journal("Scheduled restart job, restart counter is at 1", after)
    _no_systemd_sigkill(unit, after)

    exit_entry = unit.wait_journal("Main process exited, code=exited, status=1", after)[0]
    latency = second_entry.realtime - changed_at
    with capsys.disabled():
        print(
            f"\n[systemd, {form.name}] node file rewritten -> new agent's first line: "
            f"{latency:.2f} s (detected {line.realtime - changed_at:.2f} s, exited "
            f"{exit_entry.realtime - changed_at:.2f} s; RestartSec=5, interval 0.2 s, "
            f"settle 0.2 s)"
        )
    assert latency < 5 + 10  # RestartSec plus a generous bound for the rest


def _running_then_reconfigured(box: Box, unit: Unit, name: str) -> tuple[Node, Node, str, str]:
    """Start the unit on a 7x1g.5gb A100 node, see its agent and baseline, then reconfigure
    GPU 0 to 3g.20gb x2: (old node, new node, the first agent's pid, the journal cursor)."""
    old = dgx_a100(["1g.5gb"] * 7)
    old.write(box.share / "node.txt")
    after = box.container.cursor()
    box.container.systemctl("start", name)
    unit.wait(ActiveState="active", SubState="running", NRestarts=0)
    [(first_pid, first, _)] = agent_lines(unit, after)
    assert first == old.uuids()
    unit.wait_journal("[GPU-Watcher] baseline", after)
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    new.write(box.share / "node.txt")
    return old, new, first_pid, after


def test_stop_is_clean_and_takes_the_whole_tree(box: Box, gpu_agent: Install):
    """`systemctl stop`: SIGTERM to gpu-supervise only (KillMode=mixed), which stops the agent
    and a setsid grandchild that ignores SIGTERM; the unit ends inactive, not failed (143 is a
    success), and systemd finds nothing left to kill."""
    unit = gpu_agent(
        agent=[*PACKAGE.agent, "--grandchild", "--pidfile", f"{SHARE}/pids"],
        env={"GPU_SUPERVISE_CHILD_STOP_TIMEOUT": "1"},
    )
    after = box.container.cursor()
    box.container.systemctl("start", UNIT)
    unit.wait(ActiveState="active", SubState="running")
    [(agent_pid, _, _)] = agent_lines(unit, after)
    pids = [int(p) for p in (box.share / "pids").read_text().split()]
    assert pids[0] == agent_pid and len(pids) == 2

    box.container.systemctl("stop", UNIT)
    state = unit.show()
    # an inactive unit is unloaded at once, its exit status with it: the journal keeps it
    assert (state["ActiveState"], state["SubState"]) == ("inactive", "dead"), unit.tail()
    unit.wait_journal(f"agent {agent_pid}: got SIGTERM", after)
    unit.wait_journal(f"{UNIT}: Deactivated successfully", after)
    messages = [e.message for e in unit.journal(after)]
    assert not any("Failed with result" in m or "Main process exited" in m for m in messages)
    _no_systemd_sigkill(unit, after)
    for pid in pids:
        assert box.container.exec("test", "-e", f"/proc/{pid}", check=False).returncode != 0


def test_reload_and_kill_forward_sighup_to_the_agent(box: Box, gpu_agent: Install):
    """`systemctl reload` (ExecReload=kill -HUP $MAINPID) reaches the agent once, through
    gpu-supervise; so does `systemctl kill --kill-whom=main -s HUP`. Plain `systemctl kill`
    signals every process of the unit (KillMode= does not apply to it): the agent is signalled
    directly and through gpu-supervise."""
    unit = gpu_agent()
    after = box.container.cursor()
    box.container.systemctl("start", UNIT)
    before = unit.wait(ActiveState="active", SubState="running")
    [(agent_pid, _, _)] = agent_lines(unit, after)
    got = f"agent {agent_pid}: got SIGHUP"

    box.container.systemctl("reload", UNIT)
    unit.wait_journal(got, after, count=1)
    unit.wait_journal(f"Reloaded {UNIT}", after)
    box.container.systemctl("kill", "--kill-whom=main", "-s", "HUP", UNIT)
    unit.wait_journal(got, after, count=2)
    time.sleep(0.3)
    assert len([e for e in unit.journal(after) if got in e.message]) == 2
    # --kill-whom=all (the default): systemd signals the agent itself as well as gpu-supervise,
    # which forwards it; two SIGHUPs that arrive together may merge into one delivery
    box.container.systemctl("kill", "-s", "HUP", UNIT)
    unit.wait_journal(f"Sending signal SIGHUP to process {agent_pid} ", after)
    unit.wait_journal(got, after, count=3)
    state = unit.show()
    assert (state["ActiveState"], state["MainPID"], state["NRestarts"]) == (
        "active", before["MainPID"], "0"
    )  # fmt: skip


def test_reload_restarts_an_agent_without_a_sighup_handler(box: Box, gpu_agent: Install):
    """SIGHUP's default action ends an agent that does not handle it: gpu-supervise exits 129
    and Restart=on-failure brings the agent back, so a reload is never a silent outage."""
    unit = gpu_agent(agent=["/bin/sleep", "3600"])
    box.container.systemctl("start", UNIT)
    before = unit.wait(ActiveState="active", SubState="running", NRestarts=0)
    # `systemctl reload` itself may report "the control process exited with error code" (seen
    # once in ten runs): the main process can exit while ExecReload's kill is still in flight
    box.container.systemctl("reload", UNIT, check=False)
    exited = unit.wait(SubState="auto-restart")
    assert exited["ExecMainStatus"] == "129" and exited["Result"] == "exit-code"
    after = unit.wait(ActiveState="active", SubState="running", NRestarts=1)
    assert after["MainPID"] != before["MainPID"]


FAILURES = {
    "configuration error": ({"env": {"GPU_SUPERVISE_WATCH_INTERVAL": "oops"}}, 2, "oops"),
    "agent not found": ({"agent": ["/usr/bin/no-such-gpu-agent"]}, 127, "no-such-gpu-agent"),
    "agent not executable": ({"agent": [f"{SHARE}/node.txt"]}, 126, "node.txt"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_fails_without_a_restart_loop(box: Box, gpu_agent: Install, case: str):
    """Exit 2, 126 and 127 cannot fix themselves: RestartPreventExitStatus= makes the unit fail
    at once, with gpu-supervise's one line in the journal, instead of restarting forever."""
    kwargs, code, hint = FAILURES[case]
    _fails_at_once(box, gpu_agent(**kwargs), UNIT, code, hint)


def _fails_at_once(box: Box, unit: Unit, name: str, code: int, hint: str) -> None:
    """Start the unit: it must fail with `code` and no restart, gpu-supervise's one line (with
    `hint`) in the journal."""
    after = box.container.cursor()
    box.container.systemctl("start", "--no-block", name)
    state = unit.wait(
        ActiveState="failed", fail_if=lambda s: s["SubState"] == "auto-restart", timeout=20
    )
    assert (state["Result"], state["ExecMainStatus"], state["NRestarts"]) == (
        "exit-code", str(code), "0"
    )  # fmt: skip
    lines = [e.message for e in unit.journal(after)]
    assert any(m.startswith("gpu-supervise: ") and hint in m for m in lines), lines
    assert not any("Scheduled restart job" in m for m in lines)


def _probe(box: Box, unit: Unit, after: str) -> dict[str, str]:
    box.container.systemctl("start", "--no-block", UNIT)
    unit.wait_journal("probe: done", after)
    facts = {}
    for entry in unit.journal(after):
        if entry.message.startswith("probe: ") and entry.message != "probe: done":
            subject, _, verdict = entry.message.removeprefix("probe: ").rpartition(" ")
            facts[subject] = verdict
    return facts


SANDBOX = {
    "/etc": "read-only", "/usr": "read-only",  # ProtectSystem=full
    "/root": "read-only",  # ProtectHome=read-only
    "/proc/sys": "read-only",  # ProtectKernelTunables=yes
    "/sys/fs/cgroup": "read-only",  # ProtectControlGroups=yes
    "/tmp": "private",  # PrivateTmp=yes
    "NoNewPrivs": "1",  # NoNewPrivileges=yes
    "realtime": "denied",  # RestrictRealtime=yes
    "personality": "locked",  # LockPersonality=yes
    "setuid": "denied",  # RestrictSUIDSGID=yes
    # what must stay: the GPU's device node, agent state under /var, the kernel's /proc files
    "/dev/nvidiactl": "opens", "/var/lib": "writable", "/srv/gpu-supervise": "writable",
    "/proc/stat": "readable",
}  # fmt: skip


def test_hardening_is_in_force(box: Box, gpu_agent: Install):
    """The shipped sandbox really applies (systemd skips namespacing it cannot set up, without a
    word), and leaves the agent what it needs. gpu-supervise working under it is every other
    test in this file."""
    box.container.exec("touch", "/tmp/host-marker")
    unit = gpu_agent(agent=[f"{SHARE}/probe.sh"])
    facts = _probe(box, unit, box.container.cursor())
    assert facts == SANDBOX
    state = unit.wait(ActiveState="active", SubState="running")
    assert state["NRestarts"] == "0"


REJECTED = {
    "PrivateDevices=yes": {"/dev/nvidiactl": "missing"},
    "ProcSubset=pid": {"/proc/stat": "hidden"},
}


@pytest.mark.parametrize("setting", REJECTED)
def test_rejected_hardening_takes_what_gpus_need(box: Box, gpu_agent: Install, setting: str):
    """Why the unit leaves these out: the GPU's device nodes vanish (PrivateDevices), or the
    /proc files NVML reads (ProcSubset=pid)."""
    unit = gpu_agent(agent=[f"{SHARE}/probe.sh"], extra=[setting])
    facts = _probe(box, unit, box.container.cursor())
    assert facts == SANDBOX | REJECTED[setting]


def test_protect_home_yes_would_hide_a_python_under_home(box: Box, gpu_agent: Install):
    """ProtectHome=read-only, not yes: a venv or pyenv under /root or /home stays runnable."""
    homes = (Path("/root"), Path("/home"))
    if not any(h in Path(sys.base_prefix).resolve().parents for h in homes):
        pytest.skip(f"this Python ({sys.base_prefix}) does not live under /root or /home")
    unit = gpu_agent(extra=["ProtectHome=yes"])
    box.container.systemctl("start", "--no-block", UNIT)
    state = unit.wait(ActiveState="failed", fail_if=lambda s: s["SubState"] == "auto-restart")
    assert state["Result"] == "exit-code" and state["ExecMainStatus"] == "203"  # EXEC


def test_status_says_what_a_hold_waits_for(box: Box, gpu_agent: Install):
    """While a MIG mode change waits for a GPU reset, the agent is stopped and the unit stays
    active: `systemctl status` shows why, through StatusText."""
    node = dgx_a100(count=1)
    node.write(box.share / "node.txt")
    unit = gpu_agent(agent=[*PACKAGE.agent, "--hold-nvml"])
    after = box.container.cursor()
    box.container.systemctl("start", UNIT)
    running = unit.wait(ActiveState="active", SubState="running")
    assert running["StatusText"].startswith("running ")
    unit.wait_journal("[GPU-Watcher] baseline", after)
    node.gpu(0).request_mig(True)
    node.write(box.share / "node.txt")
    held = unit.wait(StatusText=lambda text: text.startswith("holding: MIG mode change pending"))
    assert f"GPU 0 ({node.gpu(0).uuid}: MIG on)" in held["StatusText"]
    assert (held["ActiveState"], held["SubState"], held["MainPID"]) == (
        "active", "running", running["MainPID"]
    )  # fmt: skip
    unit.wait_journal("got SIGTERM", after)
    node.gpu(0).reset()  # the operator's reset goes through: nothing holds the GPU now
    node.write(box.share / "node.txt")
    unit.wait(SubState="auto-restart", ExecMainStatus=1)
    again = unit.wait(ActiveState="active", SubState="running", NRestarts=1)
    assert again["StatusText"].startswith("running ")


# -- an agent's own unit, wrapped by the shipped drop-in -----------------------------------------

WRAP_FILE = ROOT / "packaging/systemd/wrap-agent.conf"
VENDOR = "vendor-gpu-agent.service"
VENDOR_DIR = f"/etc/systemd/system/{VENDOR}.d"
VENDOR_STOP_TIMEOUT = 1  # seconds: shorter than the agent takes to stop (LINGER)
VENDOR_WATCHDOG = 1  # seconds: for the agent's pings, which cannot reach systemd any more

# What the stand-in vendor unit sets against supervision, each overridden by the drop-in. Its
# Restart= is left out, as in many vendor units: systemd's default, Restart=no.
VENDOR_UNIT = f"""[Unit]
Description=A GPU monitoring agent, as its package ships it

[Service]
Type=simple
User=nobody
NotifyAccess=all
KillMode=control-group
TimeoutStopSec={VENDOR_STOP_TIMEOUT}
WatchdogSec={VENDOR_WATCHDOG}
ExecStartPre=/bin/echo "vendor: pre-start"
ExecStart=AGENT
ExecReload=/bin/kill -HUP $MAINPID

[Install]
WantedBy=multi-user.target
"""


def wrap_drop_in(vendor: str, wrapper: str | None = None) -> str:
    """The shipped drop-in as the recipe says to fill it in: gpu-supervise's path (here the
    package, run by the tests' Python), and after `--` the vendor unit's ExecStart= command
    line as it is. Every other line stays as shipped."""
    (command,) = [x.removeprefix("ExecStart=") for x in vendor.splitlines()
                  if x.startswith("ExecStart=")]  # fmt: skip
    lines = WRAP_FILE.read_text().splitlines()
    (at,) = [i for i, x in enumerate(lines) if x.startswith("ExecStart=/opt/gpu-supervise/")]
    assert lines[at].endswith(" -- /usr/bin/gpu-agent")
    exe = f"{wrapper} {PACKAGE.exe}" if wrapper else PACKAGE.exe
    lines[at] = (
        lines[at]
        .replace("/opt/gpu-supervise/gpu-supervise", exe)
        .replace("/usr/bin/gpu-agent", command)
    )
    return "\n".join([*lines, ""])


@pytest.fixture
def wrapped_agent(box: Box) -> Iterator[Install]:
    """Installs the stand-in vendor unit running `agent`, the shipped drop-in over it, and a
    second drop-in with the fake NVML's environment and fast watch settings; returns the unit,
    stopped; stops and resets it after."""
    _reset(box, VENDOR)
    dgx_a100(["1g.5gb"] * 7).write(box.share / "node.txt")

    def install(
        agent: list[str] | None = None,
        env: dict[str, str] | None = None,
        wrapper: str | None = None,
    ) -> Unit:
        vendor = VENDOR_UNIT.replace(
            "ExecStart=AGENT", f"ExecStart={' '.join(agent or PACKAGE.agent)}"
        )
        variables = {"LD_LIBRARY_PATH": f"{SHARE}/nvml", "FAKE_NVML_NODE": f"{SHARE}/node.txt"}
        variables |= FAST | PACKAGE.env | (env or {})
        test = ["[Service]", *[f'Environment="{k}={v}"' for k, v in variables.items()], ""]
        box.container.write(f"/etc/systemd/system/{VENDOR}", vendor)
        box.container.write(f"{VENDOR_DIR}/gpu-supervise.conf", wrap_drop_in(vendor, wrapper))
        box.container.write(f"{VENDOR_DIR}/zz-test.conf", "\n".join(test))
        box.container.systemctl("daemon-reload")
        return box.container.unit(VENDOR)

    yield install
    _reset(box, VENDOR)


def test_wrapped_unit_reads_as_the_drop_in_says(box: Box, wrapped_agent: Install):
    """What `systemctl show` reads once the drop-in is merged over the vendor's unit (the check
    the recipe gives): the drop-in's values where the vendor's would break supervision, one
    ExecStart=, gpu-supervise's; the vendor's ExecStartPre= and ExecReload= as they were."""
    wrapped_agent()
    expected = {
        "LoadState": "loaded", "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure",
        "RestartUSec": "5s", "RestartPreventExitStatus": "2 126 127 203",
        "KillMode": "mixed", "TimeoutStopUSec": "30s", "SuccessExitStatus": "143",
    }  # fmt: skip
    out = box.container.systemctl(
        "show", "-p", ",".join([*expected, "After", "ExecStart", "ExecStartPre", "ExecReload"]),
        VENDOR,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    state = dict(line.split("=", 1) for line in lines)
    assert {k: state.get(k) for k in expected} == expected
    assert "nvidia-gpu-reset.target" in state["After"].split()
    (start,) = [x for x in lines if x.startswith("ExecStart=")]
    command = " ".join([PYTHON, "-m gpu_supervise --config /etc/gpu-supervise/config.toml --",
                        *PACKAGE.agent])  # fmt: skip
    assert f"argv[]={command} ;" in start
    assert "argv[]=/bin/echo vendor: pre-start ;" in state["ExecStartPre"]
    assert "argv[]=/bin/kill -HUP $MAINPID ;" in state["ExecReload"]


def test_wrapped_agent_is_active_only_after_ready(box: Box, wrapped_agent: Install):
    """Type=notify over the vendor's Type=simple: active only once gpu-supervise's READY=1 has
    arrived (a wrapper sleeps before exec'ing it), and nothing it sends is refused. The vendor's
    ExecStartPre= still runs first."""
    unit = wrapped_agent(wrapper=f"{SHARE}/slow-start.sh")
    _, after = _active_only_after_ready(box, unit, VENDOR)
    agent_lines(unit, after)
    messages = [e.message for e in unit.journal(after)]
    assert "vendor: pre-start" in messages
    started = next(i for i, m in enumerate(messages) if re.search(r"INFO +started ", m))
    assert messages.index("vendor: pre-start") < started
    rejected = [m for m in messages if "but reception" in m]  # "is disabled", "only permitted"
    assert not rejected


def test_wrapped_agent_restarts_on_a_mig_change(box: Box, wrapped_agent: Install):
    """Restart=on-failure where the vendor's unit has none (Restart=no): a MIG change makes
    gpu-supervise exit 1 and systemd start it again, with a new agent that sees the new UUIDs."""
    unit = wrapped_agent()
    _, new, first_pid, after = _running_then_reconfigured(box, unit, VENDOR)
    unit.wait_journal("[GPU-Watcher] MIG configuration change detected", after)
    exited = unit.wait(SubState="auto-restart", ExecMainStatus=1, ExecMainCode=1)
    assert exited["Result"] == "exit-code" and exited["NRestarts"] == "0"
    agents = agent_lines(unit, after, count=2)
    unit.wait(ActiveState="active", SubState="running", NRestarts=1)
    second_pid, second, _ = agents[1]
    assert second_pid != first_pid and second == new.uuids()
    _no_systemd_sigkill(unit, after)


def test_wrapped_stop_goes_through_gpu_supervise(box: Box, wrapped_agent: Install):
    """`systemctl stop` over the vendor's KillMode=control-group and TimeoutStopSec=1: the
    agent's SIGTERM comes from gpu-supervise alone (KillMode=mixed), it may take longer than
    the vendor's timeout to stop (TimeoutStopSec=30), and its death by SIGTERM, exit 143 through
    gpu-supervise, is a clean stop (SuccessExitStatus=143)."""
    unit = wrapped_agent(agent=[PYTHON, f"{SHARE}/term-agent.py"])
    after = box.container.cursor()
    box.container.systemctl("start", VENDOR)
    main = unit.wait(ActiveState="active", SubState="running")["MainPID"]
    unit.wait_journal(re.compile(r"^agent \d+: ready$"), after)

    box.container.systemctl("stop", VENDOR)
    state = unit.show()
    assert (state["ActiveState"], state["SubState"]) == ("inactive", "dead"), unit.tail()
    unit.wait_journal(re.compile(r"^agent \d+: stopping$"), after)
    senders = {
        m[1] for e in unit.journal(after) if (m := re.search(r"SIGTERM from pid (\d+)$", e.message))
    }
    assert senders == {main}, f"SIGTERM from {senders}, gpu-supervise is {main}"
    unit.wait_journal(f"{VENDOR}: Deactivated successfully", after)
    messages = [e.message for e in unit.journal(after)]
    assert not any("Failed with result" in m or "timed out" in m for m in messages), messages
    _no_systemd_sigkill(unit, after)


WRAPPED_FAILURES = {
    "configuration error": ({"env": {"GPU_SUPERVISE_WATCH_INTERVAL": "oops"}}, 2, "oops"),
    "agent not found": ({"agent": ["/usr/bin/no-such-gpu-agent"]}, 127, "no-such-gpu-agent"),
}


@pytest.mark.parametrize("case", WRAPPED_FAILURES)
def test_wrapped_agent_fails_without_a_restart_loop(box: Box, wrapped_agent: Install, case: str):
    """RestartPreventExitStatus= under the drop-in's Restart=on-failure: a configuration error
    (2) or a wrong agent path after `--` (127) fails the unit at once, with gpu-supervise's
    one line in the journal."""
    kwargs, code, hint = WRAPPED_FAILURES[case]
    _fails_at_once(box, wrapped_agent(**kwargs), VENDOR, code, hint)


def _uid(box: Box, pid: int | str) -> int:
    status = box.container.exec("cat", f"/proc/{pid}/status").stdout
    (line,) = [x for x in status.splitlines() if x.startswith("Uid:")]
    return int(line.split()[1])


def test_wrapped_agent_keeps_the_vendors_user_and_reload(box: Box, wrapped_agent: Install):
    """What the drop-in leaves alone still applies: the vendor's User= (gpu-supervise runs as
    that user, and so does the agent), and its ExecReload=/bin/kill -HUP $MAINPID, which now
    signals gpu-supervise, which forwards SIGHUP to the agent, once."""
    unit = wrapped_agent()
    after = box.container.cursor()
    box.container.systemctl("start", VENDOR)
    before = unit.wait(ActiveState="active", SubState="running")
    [(agent_pid, _, _)] = agent_lines(unit, after)
    nobody = int(box.container.exec("id", "-u", "nobody").stdout)
    assert (_uid(box, before["MainPID"]), _uid(box, agent_pid)) == (nobody, nobody)
    box.container.systemctl("reload", VENDOR)
    unit.wait_journal(f"agent {agent_pid}: got SIGHUP", after)
    unit.wait_journal(f"Reloaded {VENDOR}", after)
    state = unit.show()
    assert (state["ActiveState"], state["MainPID"], state["NRestarts"]) == (
        "active", before["MainPID"], "0"
    )  # fmt: skip
    time.sleep(0.3)  # a second SIGHUP, were there one, would be in by now
    got = [e for e in unit.journal(after) if f"agent {agent_pid}: got SIGHUP" in e.message]
    assert len(got) == 1


def test_wrapped_agent_outlives_the_vendors_watchdog(box: Box, wrapped_agent: Install):
    """The drop-in's WatchdogSec=30 replaces the vendor's one second, meant for the agent's pings
    (the agent has no NOTIFY_SOCKET now): the unit runs on well past that second, same process,
    no restart, and gpu-supervise's keep-alive is what systemd watches."""
    unit = wrapped_agent()
    after = box.container.cursor()
    box.container.systemctl("start", VENDOR)
    before = unit.wait(ActiveState="active", SubState="running")
    agent_lines(unit, after)
    time.sleep(VENDOR_WATCHDOG * 2)  # the vendor's watchdog, were it in force, would have fired
    state = unit.show("WatchdogUSec")
    assert (state["ActiveState"], state["MainPID"], state["NRestarts"], state["WatchdogUSec"]) == (
        "active", before["MainPID"], "0", "30s"
    )  # fmt: skip
    assert not any("Watchdog timeout" in e.message for e in unit.journal(after))


HUNG_WATCHDOG = 2  # seconds, in a test drop-in over the shipped unit's 30


def test_the_watchdog_restarts_a_hung_supervisor(box: Box, gpu_agent: Install):
    """WatchdogSec= in the shipped unit: gpu-supervise's WATCHDOG=1 keeps the unit running for
    many periods; once its loop cannot run (SIGSTOP), systemd's watchdog fires and Restart=
    brings a new gpu-supervise and agent."""
    assert "\nWatchdogSec=30\n" in UNIT_FILE.read_text()
    unit = gpu_agent(extra=["WatchdogSec=" + str(HUNG_WATCHDOG)])
    after = box.container.cursor()
    box.container.systemctl("start", UNIT)
    before = unit.wait(ActiveState="active", SubState="running")
    agent_lines(unit, after)
    time.sleep(HUNG_WATCHDOG * 3)  # three periods: a watchdog nobody pinged would have fired
    state = unit.show("WatchdogUSec")
    assert (state["ActiveState"], state["MainPID"], state["NRestarts"], state["WatchdogUSec"]) == (
        "active", before["MainPID"], "0", f"{HUNG_WATCHDOG}s"
    )  # fmt: skip
    assert not any("Watchdog timeout" in e.message for e in unit.journal(after))
    box.container.exec("kill", "-STOP", before["MainPID"])
    unit.wait_journal("Watchdog timeout", after, timeout=60)
    restarted = unit.wait(ActiveState="active", SubState="running", NRestarts="1", timeout=90)
    assert restarted["MainPID"] != before["MainPID"]
    agent_lines(unit, after, count=2, timeout=60)
