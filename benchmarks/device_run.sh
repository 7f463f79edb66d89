#!/usr/bin/env bash
# One GPU session's measurements in one command, on a machine with torch, triton and transformers
# but no network (the `device` tool's image): moeserve is imported from this checkout through a
# namespace of symlinks, the small wheels the image lacks come from .whls/ (carry it, with the
# generated protos/moeserve/v1/*_pb2*.py), and everything lands in $OUT.
#
#   bash benchmarks/device_run.sh              # GPU tests, engine profile, serving benchmark (~5 min on an H100)
#   bash benchmarks/device_run.sh tests        # only the GPU tests (serving path and kernels)
#   bash benchmarks/device_run.sh serving      # only bench_serving (both models, moeserve and HF)
#   TESTS="tests/kernels/test_paged_decode_attention.py" bash benchmarks/device_run.sh   # other GPU tests
#   bash benchmarks/device_run.sh kernels      # kernel tests (TEST_S=0: none), autotune (TUNE_ARGS), bench_kernels (BENCH_ARGS);
#                                              # the tuned table is copied to $OUT/configs
#
# Each part has its own time limit, so one that hangs leaves the others their time.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/moeserve_ns/moeserve
for f in cluster experts router kernels models chaos; do ln -sfn "$PWD/$f" "/tmp/moeserve_ns/moeserve/$f"; done
ln -sfn "$PWD/protos/moeserve/v1" /tmp/moeserve_ns/moeserve/v1
if ls .whls/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/moeserve_site .whls/*.whl
fi
export PYTHONPATH=/tmp/moeserve_ns:/tmp/moeserve_site:$PWD/tests
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
what=${1:-all}

if [ "$what" = all ] || [ "$what" = tests ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        ${TESTS:-tests/router/test_decode_graphs.py tests/models/test_padded_attention.py tests/kernels} 2>&1 | tail -8
fi
if [ "$what" = kernels ]; then
    if [ "${TEST_S:-150}" != 0 ]; then
        timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -o addopts="" -n 4 tests/kernels 2>&1 | tail -8
    fi
    timeout ${TUNE_S:-300} python3 benchmarks/autotune_kernels.py --log "$OUT/autotune.json" ${TUNE_ARGS:-} 2>&1 | tail -30
    mkdir -p "$OUT/configs" && cp kernels/configs/*.json "$OUT/configs/"
    timeout ${KBENCH_S:-200} python3 benchmarks/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -45
fi
if [ "$what" = all ] || [ "$what" = profile ]; then
    mkdir -p "$OUT/profile"
    timeout 150 python3 benchmarks/profile_engine.py --out-dir "$OUT/profile" --decode-steps 10 2>&1 \
        | grep -v "USDT\|^\s*$\|_warn" | tail -12
fi
if [ "$what" = all ] || [ "$what" = serving ]; then
    timeout 300 python3 benchmarks/bench_serving.py --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/serving.log" \
        | grep -v "^\s*$" | tail -30
fi
