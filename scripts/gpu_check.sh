#!/usr/bin/env bash
# GPU acceptance run for the CUDA backend, on a GPU machine WITHOUT a Rust toolchain.
#
# It takes prebuilt binaries from a bundle folder (default .gpu/ at the repo root), built on a
# development machine by `bash scripts/gpu_check.sh --bundle` (cargo build --release, the
# cuda_ops/cuda_compile test executables, the criterion bench executable), laid out as:
#   .gpu/asa                     the release CLI
#   .gpu/tests/<name>            test executables (cuda_ops, cuda_compile, any others)
#   .gpu/asa-bench               the `benches/asa.rs` criterion executable
#
# Steps (each with its own timeout; the run goes on past failures):
#   1. find libcuda / libnvrtc / libcublas (CUDA install, system libs, Python nvidia wheels) and
#      ptxas; set LD_LIBRARY_PATH and PATH
#   2. asa doctor                         (driver, GPU, libraries, every kernel compiled)
#   3. every test executable in .gpu/tests (cuda_ops: GPU-vs-CPU ops, layer, train step, fixtures)
#   4. asa parity tests/fixtures --device cuda
#   5. asa train-mini --device cuda --steps 100 --outdir $OUT/run
#   5b. asa bench --config practice-run --device cuda (tokens/s, MFU; JSON in $OUT), once more
#       launched op by op (ASA_CUDA_GRAPH=0: no CUDA graph), with the linear attention's serial walk, with its tiles of 64 positions, with
#       cuBLAS' own bf16 rounding, and with the slot scan's and linear attention's f64 tiles
#       instead of the tensor-core ones (ASA_CUDA_TENSOR_CORES=0) (A/Bs),
#       and with ASA_CUDA_PROFILE=1 for the per-kernel breakdown
#   5c. asa kernel-cost --config practice-run (the static counts beside the profile)
#   5d. asa bench-decode: recurrent decoding's per-token latency to 16k tokens, GPU and CPU
#   6. benches: .gpu/asa-bench --bench (CPU vs CUDA, tokens/s)
# Everything goes to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out). Exit status: 0 when
# every step passed, 1 otherwise. Total budget: under 9 minutes on one H100.
#
# Usage (repo root): OUT=/some/dir bash scripts/gpu_check.sh [BUNDLE_DIR]
#   GPU_CHECK_BUDGET_S (default 520): seconds after which the bench step is skipped/cut.
#   GPU_CHECK_QUICK=1: the tests, parity, the training run and one practice-run bench only (no
#     doctor, no kernel-compile test, no A/Bs, no profile, no criterion benches): a confirmation
#     run for the end of a lease.
# Build the bundle on the development machine: bash scripts/gpu_check.sh --bundle
set -u

cd "$(dirname "$0")/.."

# ---- bundle mode (on the development machine, with cargo): build .gpu/ -----------------------
if [ "${1:-}" = "--bundle" ]; then
    set -e
    # executable of a cargo target (kind test|bench, name) from cargo's JSON messages
    exe_of() {
        python3 -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
out = ""
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("name") == name and kind in t.get("kind", []):
        out = m["executable"]
print(out)' "$1" "$2"
    }
    rm -rf .gpu
    mkdir -p .gpu/tests
    cargo build --release
    cp "${CARGO_TARGET_DIR:-target}/release/asa" .gpu/asa
    for t in cuda_ops cuda_compile cuda_train; do
        exe=$(cargo test --release --no-run --test "$t" --message-format=json | exe_of test "$t")
        [ -n "$exe" ] || { echo "no executable for test $t" >&2; exit 1; }
        cp "$exe" ".gpu/tests/$t"
    done
    exe=$(cargo bench --no-run --bench asa --message-format=json | exe_of bench asa)
    [ -n "$exe" ] || { echo "no executable for bench asa" >&2; exit 1; }
    cp "$exe" .gpu/asa-bench
    du -sh .gpu
    ls -la .gpu .gpu/tests
    exit 0
fi

BUNDLE="${1:-.gpu}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
FAILED=()
START=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }

# run NAME TIMEOUT CMD...: runs a step, logs its output and status
run() {
    local name="$1" limit="$2"
    shift 2
    log ""
    log "=== $name: $* (timeout ${limit}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/step-$name.log" 2>&1
    local rc=$?
    cat "$OUT/step-$name.log" >>"$LOG"
    log "=== $name: rc=$rc ($(( $(date +%s) - t0 ))s)"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name(rc=$rc)")
    fi
    return 0
}

log "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) bundle=$BUNDLE out=$OUT"
nvidia-smi >>"$LOG" 2>&1 || log "nvidia-smi: not available"

# ---- 1. libraries -------------------------------------------------------------------------------
SEARCH_DIRS=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
    /usr/local/cuda-*/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu \
    /usr/lib64 /lib/x86_64-linux-gnu; do
    [ -d "$d" ] && SEARCH_DIRS+=("$d")
done
for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
        NV=$("$py" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
        if [ -n "$NV" ] && [ -d "$NV" ]; then
            for d in "$NV"/*/lib; do [ -d "$d" ] && SEARCH_DIRS+=("$d"); done
        fi
        break
    fi
done
[ -n "${ASA_CUDA_PYPI_DIR:-}" ] && [ -d "$ASA_CUDA_PYPI_DIR/nvidia/cu13/lib" ] && SEARCH_DIRS+=("$ASA_CUDA_PYPI_DIR/nvidia/cu13/lib")

LIBDIRS=""
for lib in libcuda.so libnvrtc.so libcublas.so libcublasLt.so; do
    found=""
    for d in "${SEARCH_DIRS[@]}"; do
        f=$(ls "$d"/$lib* 2>/dev/null | grep -v stubs | head -n 1)
        if [ -n "$f" ]; then
            found="$d"
            break
        fi
    done
    if [ -n "$found" ]; then
        log "found $lib* in $found"
        case ":$LIBDIRS:" in *":$found:"*) ;; *) LIBDIRS="${LIBDIRS:+$LIBDIRS:}$found" ;; esac
    else
        log "NOT FOUND: $lib*"
        FAILED+=("find-$lib")
    fi
done
export LD_LIBRARY_PATH="$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for p in /usr/local/cuda/bin "${NV:-/nonexistent}/cu13/bin"; do
    [ -x "$p/ptxas" ] && export PATH="$p:$PATH" && log "ptxas: $p/ptxas" && break
done

# ---- 2. doctor ------------------------------------------------------------------------------------
QUICK="${GPU_CHECK_QUICK:-0}"
if [ "$QUICK" = 1 ]; then
    log "quick run: doctor, cuda_compile, A/Bs, profile and criterion benches skipped"
    rm -f "$BUNDLE/tests/cuda_compile"
fi
if [ "$QUICK" = 1 ]; then
    :
elif [ -x "$BUNDLE/asa" ]; then
    run doctor 120 "$BUNDLE/asa" doctor
else
    log "NOT FOUND: $BUNDLE/asa"
    FAILED+=("asa-binary")
fi

# ---- 3. test executables --------------------------------------------------------------------------
if [ -d "$BUNDLE/tests" ]; then
    for t in "$BUNDLE"/tests/*; do
        [ -x "$t" ] || continue
        run "test-$(basename "$t")" 300 "$t" --test-threads=4 --nocapture
        # on the GPU machine the CUDA tests must really run, not skip
        if grep -q "^SKIPPED .*no CUDA device" "$OUT/step-test-$(basename "$t").log" 2>/dev/null; then
            log "=== test-$(basename "$t"): tests SKIPPED for lack of a CUDA device"
            FAILED+=("test-$(basename "$t")-skipped")
        fi
    done
else
    log "NOT FOUND: $BUNDLE/tests"
    FAILED+=("tests")
fi

# ---- 4. parity on the GPU -------------------------------------------------------------------------
[ -x "$BUNDLE/asa" ] && run parity-cuda 180 "$BUNDLE/asa" parity tests/fixtures --device cuda

# ---- 5. a short training run ----------------------------------------------------------------------
[ -x "$BUNDLE/asa" ] && run train-mini-cuda 180 "$BUNDLE/asa" train-mini --device cuda --steps 100 --outdir "$OUT/run"

# ---- 5b. the practice-run step (issue #5's GPU figure: tokens/s and MFU, ours only; the
# reference needs PyTorch with CUDA on the device: `asa bench --reference` by hand) ------------
[ -x "$BUNDLE/asa" ] && run bench-practice-run 150 \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 2 --iters 3 --json "$OUT/bench-practice-run.json"
if [ "$QUICK" != 1 ]; then
# A/B in the same run: the step launched op by op instead of replayed as a CUDA graph (the
# graph is captured at the second step: 2 warmup steps), the linear attention as the serial
# warp walk over T (the tiled kernels' baseline) and with tiles of 64 positions (the default:
# 32), and the bf16 GEMMs with cuBLAS rounding the f32 inputs itself (no convert kernels)
[ -x "$BUNDLE/asa" ] && run bench-practice-run-no-graph 150 env ASA_CUDA_GRAPH=0 \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 2 --iters 3 --json "$OUT/bench-practice-run-no-graph.json"
[ -x "$BUNDLE/asa" ] && run bench-practice-run-walk-linear 150 env ASA_CUDA_LINEAR=walk:1000000 \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 1 --iters 3 --json "$OUT/bench-practice-run-walk-linear.json"
[ -x "$BUNDLE/asa" ] && run bench-practice-run-tiled64-linear 150 env ASA_CUDA_LINEAR=tiled:64 \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 1 --iters 3 --json "$OUT/bench-practice-run-tiled64-linear.json"
[ -x "$BUNDLE/asa" ] && run bench-practice-run-cublas-bf16 150 env ASA_CUDA_BF16_GEMM=cublas \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 1 --iters 3 --json "$OUT/bench-practice-run-cublas-bf16.json"
[ -x "$BUNDLE/asa" ] && run bench-practice-run-f64-tiles 150 env ASA_CUDA_TENSOR_CORES=0 \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 1 --iters 3 --json "$OUT/bench-practice-run-f64-tiles.json"
# recurrent decoding (issue 13): per-token latency and state against position, recurrent vs a
# full forward per token, on the GPU and on this machine's CPU, for the train-mini model of step
# 5 (the CPU in the same run, so the two are comparable), and the practice-run model on the GPU
[ -x "$BUNDLE/asa" ] && run bench-decode-cuda-mini 120 \
    "$BUNDLE/asa" bench-decode --device cuda --ckpt "$OUT/run/mini" --max-len 16384 --full-at 128,1024,4096,16384 --json "$OUT/bench-decode-cuda-mini.json"
[ -x "$BUNDLE/asa" ] && run bench-decode-cpu-mini 120 \
    "$BUNDLE/asa" bench-decode --device cpu --ckpt "$OUT/run/mini" --max-len 16384 --full-at 128,1024 --json "$OUT/bench-decode-cpu-mini.json"
[ -x "$BUNDLE/asa" ] && run bench-decode-cuda-practice-run 120 \
    "$BUNDLE/asa" bench-decode --device cuda --config practice-run --max-len 4096 --full-at 1024,4096 --json "$OUT/bench-decode-cuda-practice-run.json"
# per-kernel time of the same step (every launch synchronised: slower, for the breakdown only)
[ -x "$BUNDLE/asa" ] && run profile-practice-run 120 env ASA_CUDA_PROFILE=1 \
    "$BUNDLE/asa" bench --config practice-run --device cuda --warmup 1 --iters 1
# the static cost of the same step (no GPU used): launches per kernel to hold against the
# profile's, for the cost model's calibration (issue 11)
[ -x "$BUNDLE/asa" ] && run kernel-cost-practice-run 60 \
    "$BUNDLE/asa" kernel-cost --config practice-run --json "$OUT/kernel-cost.json"

# ---- 6. benches -----------------------------------------------------------------------------------
if [ -x "$BUNDLE/asa-bench" ]; then
    ELAPSED=$(( $(date +%s) - START ))
    LEFT=$(( ${GPU_CHECK_BUDGET_S:-520} - ELAPSED ))
    if [ "$LEFT" -gt 60 ]; then
        run bench "$LEFT" "$BUNDLE/asa-bench" --bench
    else
        log "bench: skipped, only ${LEFT}s of the 9-minute budget left"
        FAILED+=("bench-skipped")
    fi
else
    log "NOT FOUND: $BUNDLE/asa-bench"
    FAILED+=("asa-bench")
fi

fi

# ---- summary --------------------------------------------------------------------------------------
log ""
log "gpu_check: $(( $(date +%s) - START ))s total"
if [ "${#FAILED[@]}" -eq 0 ]; then
    log "gpu_check: ALL PASSED"
    exit 0
fi
log "gpu_check: FAILED: ${FAILED[*]}"
exit 1
