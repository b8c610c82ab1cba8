"""The NVML topology source: one full enumeration per probe, NVML open only while it runs.

Why init and shut down around every probe: a process holding NVML open is a GPU client, and a
MIG mode change needs a GPU reset that such a client blocks. Why re-enumerate every time: MIG
handles become invalid when their instance is destroyed, so no handle outlives its probe.
"""

from __future__ import annotations

from typing import Any

from .topology import (
    Gpu,
    MigDevice,
    NvmlRefused,
    ProbeError,
    SourceUnavailable,
    Topology,
    profile_from_name,
)

# NVML return codes this module reasons about (nvml.h).
NOT_SUPPORTED = 3
NOT_FOUND = 6
INVALID_ARGUMENT = 2
NO_PERMISSION = 4
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
LIB_RM_VERSION_MISMATCH = 18

# "The node has no usable NVML": a state the watcher treats as "no GPUs", never as a failure.
UNUSABLE = {DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND}
# nvmlInit refusing every process, the agent too, until someone fixes the node: a failure, and
# before any good reading the sign that the agent started without NVML (a slow or odd init is not).
REFUSED = {NO_PERMISSION, LIB_RM_VERSION_MISMATCH}
# A MIG device index with nothing behind it: indices are sparse.
EMPTY_SLOT = {NOT_FOUND, INVALID_ARGUMENT}


def _raw(nv: Any, name: str) -> Any:
    """A binding function without its strict UTF-8 decoding (nvidia-ml-py wraps the string
    getters in a decorator that decodes): the bytes NVML gave, to judge ourselves."""
    fn = getattr(nv, name)
    return getattr(fn, "__wrapped__", fn)


def _text(value: Any) -> str:
    """Description (a name, a bus id, the driver version): whatever bytes NVML gives, never a
    reason for a probe to fail; what is not UTF-8 shows as \\xNN."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def _uuid(nv: Any, handle: Any, what: str) -> str:
    """Identity: a UUID that is not plain text is a failed probe, not a guess."""
    value = _raw(nv, "nvmlDeviceGetUUID")(handle)
    if isinstance(value, str):
        return value
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ProbeError(f"{what}: NVML gave a UUID that is not text: {value!r}") from None
    if not text.isprintable():
        raise ProbeError(f"{what}: NVML gave a UUID that is not text: {value!r}")
    return text


class NvmlSource:
    """Reads the topology through nvidia-ml-py (which dlopens `libnvidia-ml.so.1`)."""

    def probe(self) -> Topology:
        import pynvml  # imported on first probe: `--no-watch` never pays for it

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            if exc.value in UNUSABLE:
                raise SourceUnavailable(f"NVML is not usable: {exc}") from None
            error = NvmlRefused if exc.value in REFUSED else ProbeError
            raise error(f"nvmlInit: {exc} (NVML error {exc.value})") from None
        try:
            return self._enumerate(pynvml)
        except pynvml.NVMLError as exc:
            raise ProbeError(f"{exc} (NVML error {exc.value}) during enumeration") from None
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass  # nothing is held; the next probe inits again

    def _enumerate(self, nv: Any) -> Topology:
        driver = _text(_raw(nv, "nvmlSystemGetDriverVersion")())
        gpus = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _uuid(nv, handle, f"GPU {index}")
            current, pending = _mig_mode(nv, handle)
            migs: tuple[MigDevice, ...] = ()
            if current:
                migs = tuple(_mig_devices(nv, handle, uuid))
            gpus.append(
                Gpu(
                    index=index,
                    uuid=uuid,
                    name=_text(_raw(nv, "nvmlDeviceGetName")(handle)),
                    pci_bus_id=_text(nv.nvmlDeviceGetPciInfo(handle).busId),
                    mig_current=current,
                    mig_pending=pending,
                    mig_devices=migs,
                )
            )
        return Topology(gpus=tuple(gpus), driver_version=driver, nvml=True)


def _mig_mode(nv: Any, handle: Any) -> tuple[bool | None, bool | None]:
    """Decide on the current mode; a GPU answering NOT_SUPPORTED simply has no MIG."""
    try:
        current, pending = nv.nvmlDeviceGetMigMode(handle)
    except nv.NVMLError as exc:
        if exc.value in (NOT_SUPPORTED, FUNCTION_NOT_FOUND):
            return None, None
        raise
    return bool(current), bool(pending)


def _mig_devices(nv: Any, handle: Any, parent_uuid: str) -> list[MigDevice]:
    out = []
    for index in range(nv.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except nv.NVMLError as exc:
            if exc.value in EMPTY_SLOT:
                continue
            raise
        attrs = nv.nvmlDeviceGetAttributes(mig)
        name = _text(_raw(nv, "nvmlDeviceGetName")(mig))
        out.append(
            MigDevice(
                index=index,
                uuid=_uuid(nv, mig, f"MIG device {index} of {parent_uuid}"),
                parent_uuid=parent_uuid,
                gpu_instance_id=int(nv.nvmlDeviceGetGpuInstanceId(mig)),
                compute_instance_id=int(nv.nvmlDeviceGetComputeInstanceId(mig)),
                slices=int(attrs.gpuInstanceSliceCount),
                memory_mb=int(attrs.memorySizeMB),
                profile=profile_from_name(name),
                name=name,
            )
        )
    return out
