#!/usr/bin/env bash
# The one script a GPU session runs: build ldm_engine._C for this GPU, run the GPU tests and the rest of
# the suite, run the benchmarks, and write logs, JSON and markdown tables under one results folder.
#
#   bash benchmarks/run_gpu.sh prepare          # HERE, before the device call: wheels + commit into .whl/
#   bash benchmarks/run_gpu.sh session          # THE device call (carry .whl; timeout_s 600): fits one
#                                               # 10-minute call of a 15-minute device budget
#   CALL_BUDGET=100000 bash benchmarks/run_gpu.sh all       # everything, where no time limit applies
#
# Phases: prepare | setup | tests (the GPU-marked tests: cuda, triton_gpu) | tests-rest (the rest of the
#         suite; CI runs it anyway) | bench-ops | bench-other (every other benchmarks/bench_*.py) |
#         bench-pipeline | bench (= bench-ops bench-other bench-pipeline) |
#         session (= setup tests bench-ops bench-pipeline, each capped, SD-Turbo only, no compile) |
#         all (= setup tests tests-rest bench).
# Every phase but prepare first makes sure the environment is set up (idempotent: carried wheels installed
# into /tmp/site, _C built for this GPU's architecture) and records env.json (GPU, driver, versions, commit,
# copy bandwidth and bf16 matmul ceilings).
#
# Results: ${OUT:-benchmarks/results/<date>-<gpu>}, at most 8 files per call (the device tool's limit):
#   session: env.json summary.md setup.log tests-gpu.log bench.log ops.json pipeline.json pipeline.md
#   other phases: tests-rest.log, ops.log, other.log, pipeline.log (+ other benchmarks' JSON)
#   (each call writes only its phases' files, plus env.json, setup.log and summary.md).
#
# Session budget (CALL_BUDGET=540 by default there): setup ~60 s (sm_90 build on 16 cores), GPU tests
# <= SESSION_TESTS_S=210, ops benchmark <= SESSION_OPS_S=100, pipeline benchmark (SD-Turbo, eager
# variants + CUDA graphs, RUNS=5 WARMUP=2) gets what is left.
#
# Environment knobs:
#   PYTHON=python3              interpreter (the device image's python3 holds torch)
#   CALL_BUDGET=570             seconds this invocation may take; steps get what is left (device calls: 600 max)
#   LDM_ENGINE_CUDA_ARCHS       compute capabilities to build (default: this GPU's, e.g. 90)
#   RUNS=10 WARMUP=3            pipeline benchmark repetitions
#   PIPELINE_MODELS=all         sd-turbo,sdxl-turbo,sd15,ddpm-cifar10 (comma list) or all (= those four)
#   COMPILE_MODELS=sd-turbo     models that also get diffusers+compile ("" for none)
#   OPS_ARGS=""                 extra arguments for benchmarks/bench_ops.py
#   TEST_WORKERS=8              pytest-xdist workers for the non-GPU part of the suite (0: no xdist)
#   GPU_TEST_WORKERS=12         pytest-xdist workers for the GPU tests (0: no xdist)
#   TEST_TIMEOUT=120            per-test limit (pytest-timeout, where installed): a hung kernel costs one test
#   OTHER_TIMEOUT=150           seconds for each other benchmarks/bench_*.py
#   LDM_ENGINE_GIT_COMMIT       commit to record when the checkout has no .git (prepare writes .whl/COMMIT)
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
CALL_BUDGET_DEFAULT=570
for p in "$@"; do [ "$p" = session ] && CALL_BUDGET_DEFAULT=540; done
CALL_BUDGET="${CALL_BUDGET:-$CALL_BUDGET_DEFAULT}"
SESSION=0
# Not in the device image, or there in another version. importlib_metadata (diffusers imports it; the image
# lacks it) stays at 8.x: 9+ needs lazy-importer before Python 3.15, which the image lacks too.
WHEELS=(diffusers==0.42.1 transformers==5.23.0 importlib_metadata==8.7.0)

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
expanded=()
for p in "${phases[@]}"; do
  case "$p" in
    all) expanded+=(setup tests tests-rest bench-ops bench-other bench-pipeline) ;;
    bench) expanded+=(bench-ops bench-other bench-pipeline) ;;
    session) SESSION=1; expanded+=(setup tests bench-ops bench-pipeline) ;;
    prepare|setup|tests|tests-rest|bench-ops|bench-other|bench-pipeline) expanded+=("$p") ;;
    -h|--help) sed -n '2,44p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown phase '$p' (prepare setup tests tests-rest bench-ops bench-other bench-pipeline" \
            "bench session all)" >&2
       exit 2 ;;
  esac
done

left() {  # seconds left of CALL_BUDGET minus a margin, at least 30
  local l=$(( CALL_BUDGET - SECONDS - ${1:-20} ))
  [ "$l" -lt 30 ] && l=30
  echo "$l"
}
cap() { local a=$1 b=$2; [ "$a" -lt "$b" ] && echo "$a" || echo "$b"; }

# ---------------------------------------------------------------------------------------------- prepare
prepare() {
  # Runs where pip can reach a registry (not on the device machine): wheels the device image lacks,
  # and the commit, into .whl/ (git-ignored through .git/info/exclude; name it in the run call's carry).
  mkdir -p .whl
  if [ -d .git ]; then
    mkdir -p .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  fi
  for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"; ver="${spec##*==}"
    if ! ls .whl/"${name//-/_}"-"$ver"-*.whl >/dev/null 2>&1; then
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec" || { echo "prepare: could not download $spec" >&2; return 1; }
    fi
  done
  if git rev-parse HEAD >/dev/null 2>&1; then
    dirty=""; [ -n "$(git status --porcelain --untracked-files=no)" ] && dirty=" dirty"
    echo "$(git rev-parse HEAD)$dirty" > .whl/COMMIT
  fi
  echo "prepare: $(ls .whl | tr '\n' ' ')"
  echo "prepare: commit $(cat .whl/COMMIT 2>/dev/null || echo unknown); now call the device with carry [\".whl\"]"
}

if [ "${expanded[*]}" = "prepare" ]; then prepare; exit $?; fi
for p in "${expanded[@]}"; do [ "$p" = prepare ] && { prepare || exit 1; }; done

# ---------------------------------------------------------------------------------------------- environment
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The repo (ldm_engine and its in-place _C) first, then the carried wheels, then the image's site-packages.
pp="$REPO"
ls .whl/*.whl >/dev/null 2>&1 && pp="$REPO:/tmp/site"
export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${OUT:-}" ]; then RES="$OUT"; else RES="$("$PY" benchmarks/common.py results-dir)"; fi
mkdir -p "$RES"
echo "run_gpu.sh: phases ${expanded[*]}; results in $RES; budget ${CALL_BUDGET}s"

setup() {
  {
    echo "== setup $(date -u +%FT%TZ)"
    if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.ldm_engine_wheels ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.ldm_engine_wheels || echo "setup: installing the carried wheels failed"
    fi
    nvidia-smi || true
    arch="${LDM_ENGINE_CUDA_ARCHS:-$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}")' 2>/dev/null)}"
    stamp="build/.ldm_engine_gpu_stamp"
    want="$arch $("$PY" -c 'import sys; print(sys.version_info[:2])') $(cat setup.py csrc/* 2>/dev/null | sha1sum | cut -c1-16)"
    if [ -z "$arch" ]; then
      echo "setup: torch sees no CUDA device; not building _C"
    elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
      echo "setup: _C already built ($want)"
    else
      echo "setup: building _C for sm_$arch"
      rm -f ldm_engine/_C*.so
      if LDM_ENGINE_CUDA_ARCHS="$arch" LDM_ENGINE_NVCC_THREADS="${LDM_ENGINE_NVCC_THREADS:-8}" \
          timeout "$(left 240)" "$PY" setup.py build_ext --inplace; then
        mkdir -p build && echo "$want" > "$stamp"
      else
        echo "setup: BUILD FAILED (the cuda ops backend will be reported as unavailable)"
      fi
    fi
    "$PY" - <<'EOF'
import importlib.util
from ldm_engine._cuda import device_info
print("ldm_engine._C:", device_info())
for name in ("torch", "triton", "diffusers", "transformers", "pytest_benchmark", "xdist", "pytest_timeout"):
    try:  # a real import: a carried wheel with a missing dependency shows here, not in every test
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '')}: {mod.__file__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: IMPORT FAILED: {type(e).__name__}: {e}")
EOF
  } 2>&1 | tee -a "$RES/setup.log"
  timeout "$(left)" "$PY" benchmarks/common.py env --ceilings --json "$RES/env.json" 2>&1 | tee -a "$RES/setup.log"
}

xdist_opts() {  # "-n N" when pytest-xdist is installed and N > 0
  [ "$1" != 0 ] && "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"
}
timeout_opts() {  # per-test limit when pytest-timeout is installed (thread method: also ends a hung CUDA call)
  "$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${TEST_TIMEOUT:-120} --timeout-method thread"
}

run_tests() {  # the GPU-marked tests (the rest of the suite runs in CI on every landing)
  local limit; limit="$(cap "$(left 60)" 300)"
  [ $SESSION -eq 1 ] && limit="$(cap "$limit" "${SESSION_TESTS_S:-210}")"
  # 12 workers: most of this phase is Triton compiling one kernel per config, on the CPU (16 cores there).
  local opts; opts="$(xdist_opts "${GPU_TEST_WORKERS:-12}") $(timeout_opts)"
  # Each failure is printed when it happens (tests/conftest.py), so a run cut off by its limit still names
  # what failed and why; the _C smoke tests run first, alone, so a broken build shows in seconds.
  export LDM_ENGINE_FAILURES_NOW=1
  echo "== GPU tests: _C smoke, then pytest tests -m 'cuda or triton_gpu' $opts (limit ${limit}s)" \
    | tee "$RES/tests-gpu.log"
  local t0=$SECONDS
  timeout 60 "$PY" -m pytest tests/test_cuda_extension.py -m cuda -q -rs -p no:cacheprovider 2>&1 \
    | tee -a "$RES/tests-gpu.log"
  limit=$(( limit - (SECONDS - t0) )); [ "$limit" -lt 30 ] && limit=30
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" -m pytest tests -m "cuda or triton_gpu" -q -rfEs -p no:cacheprovider $opts \
    --deselect tests/test_cuda_extension.py 2>&1 | tee -a "$RES/tests-gpu.log"
}

run_tests_rest() {
  local opts; opts="$(xdist_opts "${TEST_WORKERS:-8}") $(timeout_opts)"
  echo "== rest of the suite: pytest tests -m 'not (cuda or triton_gpu)' $opts" | tee "$RES/tests-rest.log"
  # shellcheck disable=SC2086
  timeout "$(left)" "$PY" -m pytest tests -m "not (cuda or triton_gpu)" -q -rs -p no:cacheprovider $opts \
    2>&1 | tee -a "$RES/tests-rest.log"
}

run_bench_ops() {
  if [ ! -f benchmarks/bench_ops.py ]; then
    echo "bench-ops: benchmarks/bench_ops.py does not exist yet" | tee "$RES/ops.log"; return 0
  fi
  local extra=()   # options offered by the script's source (running --help could run a script without argparse)
  grep -q '"--json"' benchmarks/bench_ops.py && extra+=(--json "$RES/ops.json")
  grep -q '"--markdown"' benchmarks/bench_ops.py && extra+=(--markdown "$RES/ops.md")
  local limit log="$RES/ops.log"; limit="$(cap "$(left)" 300)"
  [ $SESSION -eq 1 ] && { limit="$(cap "$limit" "${SESSION_OPS_S:-100}")"; log="$RES/bench.log"; }
  echo "== bench_ops.py (limit ${limit}s)" | tee -a "$log"
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" benchmarks/bench_ops.py ${extra[@]+"${extra[@]}"} ${OPS_ARGS:-} 2>&1 | tee -a "$log"
}

run_bench_other() {  # every other benchmarks/bench_*.py, in its default mode; one log, JSON where supported
  local f name extra rc=0
  : > "$RES/other.log"
  for f in benchmarks/bench_*.py; do
    name="$(basename "$f" .py)"
    case "$name" in bench_ops|bench_pipeline) continue ;; esac
    extra=()
    grep -q '"--json"' "$f" && extra+=(--json "$RES/${name#bench_}.json")
    echo "== $f ${extra[*]}" | tee -a "$RES/other.log"
    timeout "$(cap "$(left 60)" "${OTHER_TIMEOUT:-150}")" "$PY" "$f" ${extra[@]+"${extra[@]}"} 2>&1 | tee -a "$RES/other.log" || rc=1
  done
  return $rc
}

run_bench_pipeline() {
  local models="${PIPELINE_MODELS:-all}" compile_models="${COMPILE_MODELS-sd-turbo}" runs="${RUNS:-10}"
  local warmup="${WARMUP:-3}" log="$RES/pipeline.log" compile=() budget
  if [ $SESSION -eq 1 ]; then
    models="${PIPELINE_MODELS:-sd-turbo}"; compile_models="${COMPILE_MODELS-}"; runs="${RUNS:-5}"
    warmup="${WARMUP:-2}"; log="$RES/bench.log"
  fi
  [ -n "$compile_models" ] && compile=(--compile --compile-models "$compile_models")
  budget="$(left 30)"
  echo "== bench_pipeline.py --model $models (budget ${budget}s)" | tee -a "$log"
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_pipeline.py --model ${models//,/ } --device cuda --runs "$runs" --warmup "$warmup" \
    ${compile[@]+"${compile[@]}"} --time-budget "$budget" \
    --json "$RES/pipeline.json" --markdown "$RES/pipeline.md" 2>&1 | tee -a "$log"
}

status=0
setup_done=0
for p in "${expanded[@]}"; do
  case "$p" in
    prepare) ;;
    setup) setup; setup_done=1 ;;
    *)
      [ $setup_done -eq 0 ] && { setup; setup_done=1; }
      case "$p" in
        tests) run_tests || status=1 ;;
        tests-rest) run_tests_rest || status=1 ;;
        bench-ops) run_bench_ops || status=1 ;;
        bench-other) run_bench_other || status=1 ;;
        bench-pipeline) run_bench_pipeline || status=1 ;;
      esac ;;
  esac
done
"$PY" benchmarks/common.py summary "$RES" >/dev/null && echo && cat "$RES/summary.md"
echo "run_gpu.sh: done in ${SECONDS}s; results in $RES: $(ls "$RES" | tr '\n' ' ')"
exit $status
