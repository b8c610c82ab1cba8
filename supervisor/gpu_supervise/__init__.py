"""gpu-supervise: run a GPU monitoring agent as a child and restart it when the GPU topology
(GPUs, MIG mode, MIG devices) changes, so the agent never keeps stale NVML handles.

The modules form layers; each uses only those below it (tests/test_layers.py keeps it so):

    entry, __main__    the console script: hold signals, then hand over to cli
    cli                parse the command line, start the agent, hand over to the loop
    demo, install      the other commands
    supervise          the main loop: states, signals, reaping, stopping, holding
    events             what decisions look like: log lines, status texts, termination message
    watch              the policy: pure, given readings and the time
    probe              readings in a thread of their own, each under a deadline
    sources, nvml      where readings come from: NVML, or a file
    tripwire           the driver's MIG tree in procfs: a change hurries the next probe
    child, report      the agent's processes; systemd's notify socket, the termination log
    args, config       command-line parsing; settings from file, environment and flags
    logs, topology     the log sink; the topology model and its diff
    files, signals     opening files safely; which signals are forwarded
"""

__version__ = "0.1.0"
