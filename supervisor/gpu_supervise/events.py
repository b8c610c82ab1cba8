"""What the watcher's decisions look like to the world: log lines (text for people, the same
events with fields in JSON), the Kubernetes termination message and systemd's status text.

Every line stays well under the 16 KiB at which container runtimes split a log line: the
change line carries the old and new UUID lists once, and the details follow in one line per
changed GPU, never in the same line.
"""

from __future__ import annotations

import os
from typing import Any

from loguru import logger

from . import __version__, logs
from .config import Settings
from .holders import Scan
from .probe import ProbeResult
from .text import clip
from .topology import Change, Gpu, Topology, onoff
from .watch import Action, Decision, Event, PendingReset

TAG = "[GPU-Watcher]"
STUCK = (
    "a probe is stuck in NVML while holding for a GPU reset: gpu-supervise itself now holds the "
    "GPU and would block the reset it waits for. Exiting 1 to release the handle."
)


def _uuid_list(uuids: list[str]) -> str:
    return "[" + ", ".join(uuids) + "]"


def change_line(change: Change) -> str:
    """The change line (old and new UUIDs), word for word as specified, so log alerts keep
    matching."""
    kind = "MIG configuration change" if change.is_mig_change else "GPU topology change"
    return (
        f"{TAG} {kind} detected (Old UUIDs: {_uuid_list(change.old.uuids())}, "
        f"New UUIDs: {_uuid_list(change.new.uuids())}). Initiating self-restart."
    )


def _pending_gpus(gpus: tuple[Gpu, ...]) -> str:
    return ", ".join(f"GPU {g.index} ({g.uuid}: MIG {onoff(g.mig_pending)})" for g in gpus)


def source_name(settings: Settings) -> str:
    """What the probes read: NVML, or the file of a dry run."""
    return "NVML" if settings.source == "nvml" else f"the topology source ({settings.source})"


def _failed(decision: Decision, settings: Settings) -> str:
    """`NVML failed 3 consecutive probes`, as the log, the last line and the message say it."""
    return f"{source_name(settings)} failed {len(decision.errors)} consecutive probes"


def restart_reason(decision: Decision, settings: Settings) -> str:
    """Why we exit 1, for the last line of the log."""
    if decision.event is Event.FAILING:
        return f"restart me ({_failed(decision, settings)})"
    if decision.event is Event.STUCK:
        return "restart me (a probe is stuck in NVML while holding: it would block the reset)"
    if decision.event is Event.RELEASED and decision.change is None:
        return "restart me (the pending MIG mode change was withdrawn)"
    if decision.event is Event.RELEASED:
        return "restart me (the MIG mode change took effect)"
    return "restart me (GPU topology changed)"


def termination_message(decision: Decision, settings: Settings) -> str:
    if decision.event is Event.FAILING:
        return "\n".join([f"gpu-supervise: {_failed(decision, settings)}:", *decision.errors])
    if decision.event is Event.STUCK:
        return f"gpu-supervise: {STUCK}"
    lines = []
    if decision.event is Event.RELEASED:
        lines.append(
            "gpu-supervise: the agent was stopped because a MIG mode change was pending a GPU "
            "reset; no GPU is pending any more."
        )
        if decision.change is None:
            lines.append("The pending change was withdrawn: the topology is as before.")
    if decision.change is not None:
        change = decision.change
        lines += [
            "gpu-supervise: GPU topology changed; restarting the agent.",
            f"old: {change.old.summary()}",
            f"new: {change.new.summary()}",
            *change.lines,
        ]
    return "\n".join(lines)


def holding_status(hold: PendingReset, settings: Settings, scan: Scan | None = None) -> str:
    """systemd's STATUS= while the agent is held back."""
    holders = ""
    if scan is not None:
        holders = f"; {len(scan.holders)} process(es) hold the GPU"
        holders += f" ({scan.unreadable} not readable)" if scan.unreadable else ""
    return (
        f"holding: MIG mode change pending a GPU reset on {_pending_gpus(hold.gpus)}; the agent "
        f"is stopped until the reset (at most {settings.pending_timeout:g} s){holders}"
    )


SHOWN_HOLDERS = 20  # holders named in one line; more are counted
UNSEEN = "processes outside it cannot be seen"


def holders_line(scan: Scan) -> tuple[str, str]:
    """The level and text of the line on who blocks the reset. It says the reset can go ahead
    only when every process could be read and all of them were in sight."""
    unreadable = f"{scan.unreadable} process(es) not readable"
    if scan.holders:
        shown = "; ".join(h.describe() for h in scan.holders[:SHOWN_HOLDERS])
        more = len(scan.holders) - SHOWN_HOLDERS
        shown += f"; and {more} more" if more > 0 else ""
        caveats = [f"and {unreadable}"] if scan.unreadable else []
        caveats += ["processes outside this container cannot be seen"] * scan.namespace_only
        caveat = f" ({'; '.join(caveats)})" if caveats else ""
        return "WARNING", (
            f"{TAG} the GPU reset is blocked by {len(scan.holders)} process(es) holding NVIDIA "
            f"devices open: {shown}{caveat}"
        )
    where = " in this container" if scan.namespace_only else ""
    unseen = f" ({UNSEEN})" if scan.namespace_only else ""
    if scan.unreadable:
        return "WARNING", (
            f"{TAG} the GPU reset may be blocked: {unreadable} (their descriptors need "
            f"CAP_SYS_PTRACE); no other process{where} holds an NVIDIA device open{unseen}"
        )
    if scan.namespace_only:
        return "INFO", f"{TAG} no process{where} holds an NVIDIA device open{unseen}"
    return "INFO", f"{TAG} no process holds an NVIDIA device open: the GPU reset can go ahead"


def log_holders(scan: Scan) -> None:
    """Who still blocks the reset the hold waits for (holders.py): WARNING while anyone does,
    or may."""
    level, line = holders_line(scan)
    logger.bind(
        event="gpu_holders",
        holders=[
            {"pid": h.pid, "cmdline": h.cmdline, "container": h.container, "devices": h.devices}
            for h in scan.holders[:SHOWN_HOLDERS]
        ],
        count=len(scan.holders),
        unreadable=scan.unreadable,
        namespace_only=scan.namespace_only,
    ).log(level, line)


def command(argv: list[str]) -> str:
    """The agent's command line as the log shows it: quoted as a shell would, clipped."""
    import shlex

    return clip(shlex.join(argv), 300)


def log_start(settings: Settings, reaper: bool) -> None:
    """The first line: what runs, with which settings read from where."""
    config = f"configuration {settings.config_file}" if settings.config_file else (
        "no configuration file"
    )
    who = "PID 1" if os.getpid() == 1 else "a child subreaper" if reaper else "not a subreaper"
    if settings.watch_enabled:
        tripwire = (
            f"tripwire every {settings.tripwire_every:g} s on {settings.procfs_root}"
            if settings.tripwire_every > 0
            else "no tripwire"
        )
        watching = (
            f"watching {source_name(settings)} every {settings.interval:g} s after a "
            f"{settings.cooldown:g} s cool-down, settle {settings.settle:g} s, "
            f"{settings.failure_threshold} failed probes restart, MIG pending: "
            f"{settings.on_pending} up to {settings.pending_timeout:g} s, {tripwire}"
        )
    else:
        watching = "not watching the GPU topology"
    logger.bind(
        event="start",
        version=__version__,
        config=settings.config_file,
        source=settings.source if settings.watch_enabled else None,
        interval=settings.interval,
        cooldown=settings.cooldown,
        settle=settings.settle,
        failure_threshold=settings.failure_threshold,
        pending_timeout=settings.pending_timeout,
        tripwire_interval=settings.tripwire_every,
        pid1=os.getpid() == 1,
        subreaper=reaper,
    ).info(f"gpu-supervise {__version__}: {config}; {watching}; {who}")


def log_heartbeat(beat: Any, now: float, state: str, baseline: Topology | None) -> None:
    """Proof of life: the probes since the last heartbeat, and the layout watched."""
    layout = baseline.summary() if baseline is not None else "no baseline yet"
    logger.bind(
        event="heartbeat", probes=beat.probes, failures=beat.failures, state=state,
        last_probe_seconds=round(beat.last_seconds, 6), layout=layout,
    ).info(
        f"{TAG} alive ({state}): {beat.probes} probe(s) in {now - beat.since:.0f} s, "
        f"{beat.failures} failed, the last one {beat.last_seconds * 1000:.1f} ms; layout: {layout}"
    )  # fmt: skip


def log_left_behind(survivors: list[Any]) -> None:
    """The agent exited but its descendants did not (it daemonized): say what is stopped."""
    if not survivors:
        return
    shown = "; ".join(f"pid {s.pid}: {clip(s.cmdline, 200)}" for s in survivors[:SHOWN_HOLDERS])
    more = f"; and {len(survivors) - SHOWN_HOLDERS} more" if len(survivors) > SHOWN_HOLDERS else ""
    logger.bind(event="left_behind", pids=[s.pid for s in survivors]).warning(
        f"the agent exited and left {len(survivors)} process(es) running; stopping them (run the "
        f"agent in the foreground: a daemon that forks away is stopped with it): {shown}{more}"
    )


def running_status(argv: list[str], pid: int, settings: Settings) -> str:
    watching = (
        f"watching the GPU topology every {settings.interval:g} s"
        if settings.watch_enabled
        else "not watching the GPU topology"
    )
    return f"running {argv[0]} as pid {pid}; {watching}"


def _log_change(change: Change) -> None:
    logs.decision(
        event="topology_changed",
        kind="mig" if change.is_mig_change else "gpu",
        old_layout=change.old.summary(),
        new_layout=change.new.summary(),
    ).info(change_line(change))
    for gpu_uuid, line in change.gpu_lines:
        if not gpu_uuid:  # about the node, not one GPU (NVML became usable...)
            logs.decision(event="node_changed").info(f"{TAG}   {line}")
            continue
        logs.decision(
            event="gpu_changed",
            gpu=gpu_uuid,
            old_uuids=_gpu_uuids(change.old, gpu_uuid),
            new_uuids=_gpu_uuids(change.new, gpu_uuid),
        ).info(f"{TAG}   {line}")


def _gpu_uuids(topo: Topology, gpu_uuid: str) -> list[str]:
    """One GPU's UUID followed by its MIG devices', as in the change line; [] if it is absent."""
    gpus = [g for g in topo.gpus if g.uuid == gpu_uuid]
    return Topology(tuple(gpus), nvml=topo.nvml).uuids()


def log_decision(decision: Decision, result: ProbeResult | None, settings: Settings) -> None:
    """The decision's lines, from what it carries. `result` is None when the decision is about
    a probe that never answered."""
    v = decision.event
    if v is Event.BASELINE:
        assert result is not None
        _log_baseline(result)
    elif v in (Event.UNCHANGED, Event.AWAITS_RESET):
        _log_quiet(decision, result)
    elif v is Event.DIFFERS:
        _log_settling(decision, settings)
    elif v is Event.REVERTED:
        logger.info(f"{TAG} topology is back to the baseline; no restart")
    elif v is Event.CHANGED:
        assert decision.change is not None
        _log_change(decision.change)
    elif v in (Event.RELEASED, Event.TIMED_OUT, Event.STUCK):
        _log_hold_end(decision, settings)
    elif v is Event.TOLERATED:
        _log_tolerated(decision, settings)
    elif v in (Event.FAILING, Event.BROKEN):
        _log_failing(decision, settings)
    _log_pending(decision, settings)


def _log_baseline(result: ProbeResult) -> None:
    topo = result.topology
    assert topo is not None
    if result.unavailable:
        logger.bind(event="baseline", reason=result.unavailable).warning(
            f"{TAG} baseline: no GPUs ({result.unavailable}); running the agent anyway, "
            "NVML appearing later counts as a topology change"
        )
    else:
        migs = sum(len(g.mig_devices) for g in topo.gpus)
        logger.bind(event="baseline", uuids=topo.uuids()).info(
            f"{TAG} baseline: {len(topo.gpus)} GPU(s), {migs} MIG device(s): {topo.summary()}"
        )


def _log_quiet(decision: Decision, result: ProbeResult | None) -> None:
    """UNCHANGED and AWAITS_RESET: nothing new, at DEBUG."""
    seq = result.seq if result is not None else "?"
    if decision.event is Event.UNCHANGED:
        seconds = result.seconds if result is not None else 0.0
        logger.debug(f"{TAG} probe {seq}: topology unchanged ({seconds:.3f} s)")
    else:
        logger.debug(f"{TAG} probe {seq}: a MIG mode change is still pending a GPU reset")


def _log_settling(decision: Decision, settings: Settings) -> None:
    what = "topology differs from the baseline"
    if decision.holding:
        waiting = decision.candidate is not None and decision.candidate.pending_mig_changes()
        what = (
            "a MIG mode change took effect while a GPU still waits for a reset"
            if waiting
            else "no GPU is pending a reset any more"
        )
    now = decision.change.new.summary() if decision.change else "as the baseline"
    logger.bind(event="settling", diff=list(decision.change.lines) if decision.change else []).info(
        f"{TAG} {what}; confirming in {settings.settle:g} s (now: {now})"
    )


def _log_hold_end(decision: Decision, settings: Settings) -> None:
    """RELEASED, TIMED_OUT, STUCK: how a hold ends."""
    v = decision.event
    if v is Event.RELEASED and decision.change is None:
        logs.decision(event="hold_released", withdrawn=True).info(
            f"{TAG} the pending MIG mode change was withdrawn: no GPU waits for a reset and "
            "the topology is as before. Initiating self-restart."
        )
    elif v is Event.RELEASED:
        assert decision.change is not None
        logs.decision(event="hold_released", withdrawn=False).info(
            f"{TAG} the MIG mode change took effect: no GPU waits for a reset any more"
        )
        _log_change(decision.change)
    elif v is Event.TIMED_OUT:
        gpus = _pending_gpus(decision.newly_pending)
        logger.bind(event="hold_timed_out", gpus=[g.uuid for g in decision.newly_pending]).warning(
            f"{TAG} MIG mode change on {gpus} still pending after {settings.pending_timeout:g} s "
            "each: the GPU reset did not happen. Starting the agent again; it may block the reset "
            "again (no further hold for these pending changes)"
        )
    else:
        logs.decision(event="probe_stuck", error=decision.errors[-1]).error(
            f"{TAG} {decision.errors[-1]}: {STUCK}"
        )


def _log_tolerated(decision: Decision, settings: Settings) -> None:
    n, limit = len(decision.errors), settings.failure_threshold
    count = "while holding" if decision.holding else f"{n}/{limit} consecutive"
    logger.bind(event="probe_failed", error=decision.errors[-1], failures=n).warning(
        f"{TAG} topology probe failed ({count}): {decision.errors[-1]}"
    )


def _log_failing(decision: Decision, settings: Settings) -> None:
    """FAILING (a restart) and BROKEN (failing since start: no restart could help)."""
    if decision.event is Event.FAILING:
        old = decision.baseline.uuids() if decision.baseline else []
        logs.decision(
            event="nvml_failing", errors=list(decision.errors), old_uuids=old, restarting=True
        ).error(
            f"{TAG} {_failed(decision, settings)} (errors: {'; '.join(decision.errors)}). "
            "Initiating self-restart."
        )
        return
    bound = logger.bind(event="nvml_failing", errors=[decision.errors[-1]], restarting=False)
    then = (  # only an NVML that refused to start left the agent without one
        "the agent is restarted once it works"
        if decision.refused
        else "the first good probe is the baseline"
    )
    text = (
        f"{TAG} {source_name(settings)} has failed every probe since start "
        f"({len(decision.errors)} so far; last: {decision.errors[-1]}). Not restarting: a "
        f"restart cannot give the agent a working NVML. Probing every {settings.interval:g} "
        f"s; {then}."
    )
    if decision.loud:
        bound.error(text)
    else:
        bound.debug(text)


def _log_pending(decision: Decision, settings: Settings) -> None:
    if decision.action is Action.HOLD:
        for gpu in decision.newly_pending:
            mode = onoff(gpu.mig_pending)
            logger.bind(event="mig_pending", gpu=gpu.uuid, pending=mode, hold=True).info(
                f"{TAG} {gpu.describe()}: MIG mode change to {mode} is pending a GPU reset; "
                "stopping the agent so the reset can go ahead "
                f"(holding up to {settings.pending_timeout:g} s)"
            )
    elif decision.event is not Event.TIMED_OUT:
        for gpu in decision.newly_pending:
            held, mode = decision.holding, onoff(gpu.mig_pending)
            logger.bind(event="mig_pending", gpu=gpu.uuid, pending=mode, hold=held).info(
                f"{TAG} {gpu.describe()}: MIG mode change to {mode} is pending a GPU reset; "
                + ("still holding" if held else "it counts once it takes effect")
            )
