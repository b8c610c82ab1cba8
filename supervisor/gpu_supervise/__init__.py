"""gpu-supervise: run a GPU monitoring agent as a child and restart it when the GPU topology
(GPUs, MIG mode, MIG devices) changes, so the agent never keeps stale NVML handles."""

__version__ = "0.1.0"
