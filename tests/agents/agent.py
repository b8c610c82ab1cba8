"""A small stand-in monitoring agent for the end-to-end tests (run under gpu-supervise).

It reads the GPU/MIG UUIDs it sees through nvidia-ml-py once at start (as a real agent caches
its handles), prints them, then idles; with --hold-nvml it keeps NVML open all the while, as a
real agent does. It logs every signal it receives to stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

# Every signal it can catch, but for faults of its own and those a terminal or its own I/O
# raise: it reports each one it gets.
NOT_RECORDED = {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
    signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT,
    signal.SIGPIPE, signal.SIGTTIN, signal.SIGTTOU,
}  # fmt: skip
SIGNALS = sorted(signal.valid_signals() - NOT_RECORDED)


def name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def uuids(hold: bool = False) -> list[str]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [f"<no NVML: {exc}>"]
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(pynvml.nvmlDeviceGetUUID(handle))
            try:
                current, _ = pynvml.nvmlDeviceGetMigMode(handle)
            except pynvml.NVMLError:
                current = 0
            if current:
                for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                    try:
                        mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                    except pynvml.NVMLError:
                        continue
                    out.append(pynvml.nvmlDeviceGetUUID(mig))
        return out
    finally:
        if not hold:
            pynvml.nvmlShutdown()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-nvml", action="store_true", help="do not read UUIDs")
    parser.add_argument("--hold-nvml", action="store_true", help="keep NVML open until exit")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    parser.add_argument("--exit-on-term", type=int, default=None, help="exit N on SIGTERM")
    parser.add_argument("--grandchild", action="store_true", help="leave a setsid grandchild")
    parser.add_argument("--pidfile", default=None, help="write our pid (and grandchild's)")
    parser.add_argument("--run", type=float, default=3600.0, help="seconds to run, then exit")
    parser.add_argument("--exit", type=int, default=0, help="exit code after --run")
    args = parser.parse_args()

    got: list[int] = []

    def record(signum: int, _frame: object) -> None:
        got.append(signum)

    for sig in SIGNALS:
        signal.signal(sig, record)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    pids = [os.getpid()]
    if args.grandchild:
        # A daemon that leaves our process group and session: only a tree walk finds it.
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(ready_w, b"x")
            while True:
                time.sleep(1)
        os.read(ready_r, 1)  # the pid file is written once the grandchild has left our session
        pids.append(pid)
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as fh:
            fh.write(" ".join(map(str, pids)))
        os.replace(args.pidfile + ".tmp", args.pidfile)

    if not args.no_nvml:
        print(f"agent {os.getpid()}: UUIDs {' '.join(uuids(args.hold_nvml))}", flush=True)
    print(f"agent {os.getpid()}: ready", flush=True)
    deadline = time.monotonic() + args.run
    while time.monotonic() < deadline:
        time.sleep(0.02)
        while got:
            sig = got.pop(0)
            print(f"agent {os.getpid()}: got {name(sig)}", flush=True)
            if sig == signal.SIGTERM and args.exit_on_term is not None:
                return args.exit_on_term
            if sig == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
