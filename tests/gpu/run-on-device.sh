#!/usr/bin/env bash
# The whole real-GPU check, run once on a machine with an NVIDIA GPU and its driver.
# Read-only: nvidia-smi -L / --query-gpu and NVML getters; nothing that changes the GPU.
#   tests/gpu/prepare-wheels.sh           (here, first)
#   bash tests/gpu/run-on-device.sh       (there, from the repository root, .whl carried)
# Results go to $OUT (the device tool's folder) or /tmp/gpu-check.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
{
    echo "## nvidia-smi -L"; nvidia-smi -L
    echo "## nvidia-smi --query-gpu"
    nvidia-smi --query-gpu=uuid,name,pci.bus_id,mig.mode.current,mig.mode.pending,driver_version \
        --format=csv
    echo "## python"; python3 --version; python3 -m pip list 2>/dev/null | grep -i -E "nvidia-ml|psutil|pytest|loguru"
} 2>&1 | tee "$out/environment.txt"
gpu-supervise --version
gpu-supervise snapshot | tee "$out/snapshot.txt"
gpu-supervise snapshot --json > "$out/snapshot.json"
python3 tests/gpu/check.py --seconds "${GPU_CHECK_WATCH_SECONDS:-125}" --probes 200 \
    --report "$out/report.md" --json "$out/results.json"
check=$?
# The same checks as tests; the 120 s watch above is the long one, so the test's is shorter.
GPU_CHECK_REAL=1 GPU_CHECK_SECONDS=20 python3 -m pytest -p no:cacheprovider -q \
    -o addopts="" tests/gpu 2>&1 | tee "$out/pytest.txt"
tests=${PIPESTATUS[0]}
echo "check.py exit $check, pytest exit $tests"
exit $(( check || tests ))
