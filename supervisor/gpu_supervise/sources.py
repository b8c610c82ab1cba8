"""Where topology readings come from: one interface, two implementations.

`nvml` (the default) reads the real driver. `file:PATH` re-reads a JSON document (what
`gpu-supervise snapshot --json` writes) at every probe: it drives the demo and lets operators
dry-run their configuration and log alerts on a machine without GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .files import read_regular_file
from .topology import ProbeError, SourceUnavailable, Topology

# A 64-GPU node with 16 MIG devices each is about 100 KB: anything this big is something else.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class Source(Protocol):
    def probe(self) -> Topology:
        """One full reading. Raises SourceUnavailable (no usable NVML) or ProbeError."""
        ...


class FileSource:
    def __init__(self, path: Path) -> None:
        self.path = path

    def probe(self) -> Topology:
        try:
            data = read_regular_file(str(self.path), MAX_DOCUMENT_BYTES + 1)
        except FileNotFoundError:
            raise SourceUnavailable(f"{self.path} does not exist") from None
        except OSError as exc:
            raise ProbeError(f"cannot read {self.path}: {exc.strerror}") from None
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ProbeError(f"{self.path}: larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return Topology.from_json(json.loads(data))
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ProbeError(f"{self.path}: {exc}") from None


def open_source(spec: str) -> Source:
    if spec.startswith("file:"):
        return FileSource(Path(spec[len("file:") :]))
    from .nvml import NvmlSource

    return NvmlSource()
