#!/usr/bin/env bash
# The GPU check of MoMA-FL (`make gpu-check`; docs/benchmarks.md, "GPU check").
#
# On a machine with an NVIDIA GPU and no package index: install what the GPU path needs from
# wheels prepared beforehand (flwr, opacus, cryptography and what they need beyond that
# machine's Python, then this project with --no-deps), run the GPU tests (pytest -m gpu) and
# print the GPU figures (bench/gpu_check.py). About 6-7 minutes on one H100. Exits non-zero
# on any failure; when it cannot start (no CUDA GPU, no wheels) with one line "error: ...".
#
#   bash bench/gpu_check.sh prepare [DIR]
#       where PyPI is reachable (not on the GPU machine): download the wheels for the GPU
#       machine's Python 3.12 into DIR (default .gpu-wheels/, git-ignored, about 36 MB); needs
#       this project's .venv (make test-fast creates it): the versions are the ones tested here
#   bash bench/gpu_check.sh [--out DIR] [--skip-tests] [driver options, e.g. --parts dp]
#       on the GPU machine, with DIR (default runs/gpu-check) receiving gpu_check.md/.json
#
# Environment: PYTHON (the GPU machine's Python with torch; default python3), GPU_CHECK_WHEELS
# (the wheel folder; default .gpu-wheels/ in the repository), PREPARE_PYTHON (prepare: the
# Python whose installed versions are downloaded; default .venv/bin/python).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.gpu-wheels}
PY=${PYTHON:-python3}
MAX_MIB=64
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64
           manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
           manylinux_2_31_x86_64 manylinux_2_34_x86_64)

usage() {  # the comment at the top of this file
    sed -n '2,/^set -uo/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
    echo "error: $*" >&2
    exit 2
}

prepare() {
    local dir=${1:-$WHEELS} prep=${PREPARE_PYTHON:-$ROOT/.venv/bin/python} pins platform_args=()
    [[ -x $prep ]] || die "$prep not found: create the project's .venv first (make test-fast)"
    mkdir -p "$dir" || die "cannot create $dir"
    rm -f "$dir"/*.whl "$dir"/requirements-gpu.txt
    pins=$("$prep" "$ROOT/bench/gpu_check.py" --prepare-wheels "$dir") \
        || die "could not list the wheels (flwr and opacus installed in $prep?)"
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    # shellcheck disable=SC2086 # one requirement per word
    "$prep" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${platform_args[@]}" -d "$dir" $pins \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
        || die "pip download failed (above)"
    local bytes
    bytes=$(du -sb "$dir" | cut -f1)
    ((bytes <= MAX_MIB * 1024 * 1024)) \
        || die "$dir holds $((bytes / 1048576)) MiB, over the $MAX_MIB MiB a GPU run can carry"
    echo "$(find "$dir" -name '*.whl' | wc -l) wheels, $((bytes / 1048576)) MiB in $dir"
}

check_gpu() {
    command -v "$PY" >/dev/null 2>&1 || die "$PY not found: set PYTHON to the GPU machine's Python"
    "$PY" -c "import torch" >/dev/null 2>&1 || die "$PY cannot import torch: set PYTHON to the \
GPU machine's Python with torch"
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        >/dev/null 2>&1 || die "no CUDA GPU here (torch.cuda.is_available() is false for \
$PY): run bench/gpu_check.sh on a machine with an NVIDIA GPU"
}

install() {
    [[ -f $WHEELS/requirements-gpu.txt ]] || die "no wheels in $WHEELS: run 'bash \
bench/gpu_check.sh prepare' where PyPI is reachable and bring that folder along"
    local pip=("$PY" -m pip install -q --disable-pip-version-check --no-index)
    # what is missing or too old in this Python, resolved against what it already has
    "${pip[@]}" --find-links "$WHEELS" -r "$WHEELS/requirements-gpu.txt" \
        || die "installing the wheels of $WHEELS failed (above)"
    # flwr without uv (only for installing app dependencies at run time, turned off here)
    "${pip[@]}" --no-deps "$WHEELS"/flwr-*.whl || die "installing flwr failed (above)"
    # this project (console scripts: moma-server, moma-client …); build backend from the wheels
    "${pip[@]}" --find-links "$WHEELS" --no-deps -e "$ROOT" \
        || die "installing moma-fl failed (above)"
    "$PY" -c "import cryptography, flwr, opacus; import client.site_training, server.cli" \
        || die "the GPU path does not import after the installation (above)"
}

run() {
    local out=$ROOT/runs/gpu-check skip_tests=0 args=() start rc_tests=0 rc_driver=0
    while (($#)); do
        case $1 in
            --out) [[ $# -ge 2 ]] || die "--out needs a folder"; out=$2; shift 2 ;;
            --skip-tests) skip_tests=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) args+=("$1"); shift ;;
        esac
    done
    start=$(date +%s)
    check_gpu
    mkdir -p "$out" || die "cannot create $out"
    out=$(cd "$out" && pwd)
    echo "== installing from $WHEELS"
    install
    echo "== installed in $(($(date +%s) - start)) s"
    cd "$ROOT" || die "cannot enter $ROOT"
    if ((!skip_tests)); then
        echo "== GPU tests (pytest -m gpu)"
        "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
            | tee "$out/gpu_tests.log"
        rc_tests=${PIPESTATUS[0]}
    fi
    echo "== GPU figures"
    # the driver skips torch.compile when it would end past 8 minutes from the start
    PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --out "$out" --deadline "$((start + 460))" \
        ${args[@]+"${args[@]}"}
    rc_driver=$?
    echo "== $(($(date +%s) - start)) s in all; tests exit $rc_tests, figures exit $rc_driver"
    ((rc_tests == 0 && rc_driver == 0)) || exit 1
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    *) run "$@" ;;
esac
