"""What the watcher's decisions read like to people and machines: the change line, the last
line's reason and systemd's status texts (the termination message's are in
test_termination_message.py). Pure functions, checked word for word: log alerts and dashboards
match them."""

from __future__ import annotations

from gpu_supervise import events
from gpu_supervise.config import Settings
from gpu_supervise.holders import Holder, Scan
from gpu_supervise.topology import Gpu, MigDevice, Topology, diff, onoff
from gpu_supervise.watch import Action, Decision, Event, PendingReset


def mig(parent: str, gi: int, uuid: str) -> MigDevice:
    return MigDevice(gi, uuid, parent, gi, 0, 1, 4864, "1g.5gb", "NVIDIA A100 MIG 1g.5gb")


def gpu(index: int, uuid: str, *migs: MigDevice, pending: bool | None = None) -> Gpu:
    on = bool(migs)
    return Gpu(index, uuid, "NVIDIA A100", "bus", on, on if pending is None else pending, migs)


A = gpu(0, "GPU-a", mig("GPU-a", 7, "MIG-1"), mig("GPU-a", 8, "MIG-2"))
A_RECONFIGURED = gpu(0, "GPU-a", mig("GPU-a", 1, "MIG-3"))
B = gpu(1, "GPU-b")
OLD = Topology((A, B))
MIG_CHANGE = diff(OLD, Topology((A_RECONFIGURED, B)))
GPU_LOST = diff(OLD, Topology((A,)))
NVML = Settings()
FILE = Settings(source="file:/srv/node.json")


def decision(event: Event, change=None, errors: tuple[str, ...] = ()) -> Decision:
    return Decision(event, 0.0, change=change, errors=errors, action=Action.RESTART)


def hold(*gpus: Gpu) -> PendingReset:
    """A hold for these pending GPUs, in this order."""
    return PendingReset({(g.uuid, g.mig_pending): (g, 0.0) for g in gpus})


# -- the change line -------------------------------------------------------------------------------


def test_uuid_lists_read_as_the_prd_writes_them():
    assert events._uuid_list([]) == "[]"
    assert events._uuid_list(["GPU-a"]) == "[GPU-a]"
    assert events._uuid_list(["GPU-a", "MIG-1", "MIG-2"]) == "[GPU-a, MIG-1, MIG-2]"


def test_the_change_line_word_for_word():
    assert events.change_line(MIG_CHANGE) == (
        "[GPU-Watcher] MIG configuration change detected (Old UUIDs: [GPU-a, MIG-1, MIG-2, "
        "GPU-b], New UUIDs: [GPU-a, MIG-3, GPU-b]). Initiating self-restart."
    )
    assert events.change_line(GPU_LOST) == (
        "[GPU-Watcher] GPU topology change detected (Old UUIDs: [GPU-a, MIG-1, MIG-2, GPU-b], "
        "New UUIDs: [GPU-a, MIG-1, MIG-2]). Initiating self-restart."
    )


# -- why we exit 1 -----------------------------------------------------------------------------


def test_where_the_probes_read_from():
    assert events.source_name(NVML) == "NVML"
    assert events.source_name(FILE) == "the topology source (file:/srv/node.json)"


def test_the_restart_reason_of_every_restart():
    failing = decision(Event.FAILING, errors=("GPU is lost",) * 3)
    assert events.restart_reason(failing, NVML) == "restart me (NVML failed 3 consecutive probes)"
    assert events.restart_reason(failing, FILE) == (
        "restart me (the topology source (file:/srv/node.json) failed 3 consecutive probes)"
    )
    stuck = decision(Event.STUCK, errors=("probe 9 timed out",))
    assert events.restart_reason(stuck, NVML) == (
        "restart me (a probe is stuck in NVML while holding: it would block the reset)"
    )
    assert events.restart_reason(decision(Event.RELEASED), NVML) == (
        "restart me (the pending MIG mode change was withdrawn)"
    )
    assert events.restart_reason(decision(Event.RELEASED, MIG_CHANGE), NVML) == (
        "restart me (the MIG mode change took effect)"
    )
    assert events.restart_reason(decision(Event.CHANGED, MIG_CHANGE), NVML) == (
        "restart me (GPU topology changed)"
    )


def test_a_mode_change_with_no_instance_says_what_changed_below_identical_lists():
    """MIG turned on with no instance yet: the UUID lists are the same (a GPU UUID either way),
    so the per-GPU line and the termination message must say what changed."""
    off = Topology((gpu(0, "GPU-a"), B))
    on = Topology((Gpu(0, "GPU-a", "NVIDIA A100", "bus", True, True), B))
    change = diff(off, on)
    assert events.change_line(change) == (
        "[GPU-Watcher] MIG configuration change detected (Old UUIDs: [GPU-a, GPU-b], "
        "New UUIDs: [GPU-a, GPU-b]). Initiating self-restart."
    )
    assert change.gpu_lines == (("GPU-a", "GPU 0 GPU-a (NVIDIA A100): MIG mode off -> on"),)
    assert events.termination_message(decision(Event.RELEASED, change), NVML).endswith(
        "old: GPU 0: MIG off; GPU 1: MIG off\n"
        "new: GPU 0: MIG on, no devices; GPU 1: MIG off\n"
        "GPU 0 GPU-a (NVIDIA A100): MIG mode off -> on"
    )
    back = diff(on, off)
    assert back.lines == ("GPU 0 GPU-a (NVIDIA A100): MIG mode on -> off",)


# -- systemd's status texts ------------------------------------------------------------------


def test_the_mode_a_pending_change_goes_to():
    assert onoff(gpu(0, "GPU-a", pending=True).mig_pending) == "on"
    assert onoff(gpu(0, "GPU-a", pending=False).mig_pending) == "off"
    assert onoff(gpu(0, "GPU-a", pending=None).mig_pending) == "off"  # no MIG support: not "on"


def test_the_status_while_holding():
    held = hold(gpu(0, "GPU-a", pending=True), gpu(2, "GPU-c", pending=False))
    assert events.holding_status(held, NVML) == (
        "holding: MIG mode change pending a GPU reset on GPU 0 (GPU-a: MIG on), GPU 2 (GPU-c: "
        "MIG off); the agent is stopped until the reset (at most 300 s)"
    )
    scan = Scan([Holder(7, "nvidia-smi", "", ("/dev/nvidiactl",))] * 2, 0, False)
    assert events.holding_status(held, NVML, scan) == (
        "holding: MIG mode change pending a GPU reset on GPU 0 (GPU-a: MIG on), GPU 2 (GPU-c: "
        "MIG off); the agent is stopped until the reset (at most 300 s); 2 process(es) hold the GPU"
    )
    unread = Scan(scan.holders, 3, False)
    assert events.holding_status(held, NVML, unread).endswith("2 process(es) hold the GPU (3 not "
                                                              "readable)")  # fmt: skip
    single = hold(gpu(3, "GPU-d", pending=True))
    assert events.holding_status(single, Settings(pending_timeout=42.5)) == (
        "holding: MIG mode change pending a GPU reset on GPU 3 (GPU-d: MIG on); the agent is "
        "stopped until the reset (at most 42.5 s)"
    )


def test_the_status_while_running():
    argv = ["/usr/bin/dcgm-exporter", "-c", "1000"]
    assert events.running_status(argv, 42, NVML) == (
        "running /usr/bin/dcgm-exporter as pid 42; watching the GPU topology every 30 s"
    )
    assert events.running_status(argv, 7, Settings(interval=0.5)) == (
        "running /usr/bin/dcgm-exporter as pid 7; watching the GPU topology every 0.5 s"
    )
    assert events.running_status(argv, 7, Settings(watch_enabled=False)) == (
        "running /usr/bin/dcgm-exporter as pid 7; not watching the GPU topology"
    )
