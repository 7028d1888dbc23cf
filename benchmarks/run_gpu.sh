#!/usr/bin/env bash
# The one script a GPU session runs: build ldm_engine._C for this GPU, run the GPU tests and the rest of
# the suite, run the benchmarks, and write logs, JSON and markdown tables under one results folder.
#
#   bash benchmarks/run_gpu.sh prepare                      # HERE, before device calls: wheels + commit into .whl/
#   bash benchmarks/run_gpu.sh setup tests bench-ops bench-other   # device call 1 (carry .whl)
#   bash benchmarks/run_gpu.sh bench-pipeline                      # device call 2 (carry .whl)
#   CALL_BUDGET=100000 bash benchmarks/run_gpu.sh all       # everything, where no 10-minute limit applies
#
# Phases: prepare | setup | tests | bench-ops | bench-other (every other benchmarks/bench_*.py) |
#         bench-pipeline | bench (= bench-ops bench-other bench-pipeline) | all (= setup tests bench).
# Every phase but prepare first makes sure the environment is set up (idempotent: carried wheels installed
# into /tmp/site, _C built for this GPU's architecture) and records env.json (GPU, driver, versions, commit,
# copy bandwidth and bf16 matmul ceilings).
#
# Results: ${OUT:-benchmarks/results/<date>-<gpu>}, at most 8 files per call (the device tool's limit):
#   call 1: env.json summary.md setup.log tests-gpu.log tests-rest.log ops.log ops.json other.log
#   call 2: env.json summary.md setup.log pipeline.json pipeline.md pipeline.log
#   (each call writes only its phases' files, plus env.json, setup.log and summary.md).
#
# Environment knobs:
#   PYTHON=python3              interpreter (the device image's python3 holds torch)
#   CALL_BUDGET=570             seconds this invocation may take; steps get what is left (device calls: 600 max)
#   LDM_ENGINE_CUDA_ARCHS       compute capabilities to build (default: this GPU's, e.g. 90)
#   RUNS=10 WARMUP=3            pipeline benchmark repetitions
#   PIPELINE_MODELS=all         sd-turbo,sdxl-turbo,sd15 (comma list) or all
#   COMPILE_MODELS=sd-turbo     models that also get diffusers+compile ("" for none)
#   OPS_ARGS=""                 extra arguments for benchmarks/bench_ops.py
#   TEST_WORKERS=8              pytest-xdist workers for the non-GPU part of the suite (0: no xdist)
#   OTHER_TIMEOUT=150           seconds for each other benchmarks/bench_*.py
#   LDM_ENGINE_GIT_COMMIT       commit to record when the checkout has no .git (prepare writes .whl/COMMIT)
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
CALL_BUDGET="${CALL_BUDGET:-570}"
WHEELS=(diffusers==0.42.1 transformers==5.23.0 importlib_metadata==10.2.0)   # not in the device image / other version

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
expanded=()
for p in "${phases[@]}"; do
  case "$p" in
    all) expanded+=(setup tests bench-ops bench-other bench-pipeline) ;;
    bench) expanded+=(bench-ops bench-other bench-pipeline) ;;
    prepare|setup|tests|bench-ops|bench-other|bench-pipeline) expanded+=("$p") ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown phase '$p' (prepare setup tests bench-ops bench-other bench-pipeline bench all)" >&2
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
for name in ("torch", "triton", "diffusers", "transformers", "pytest_benchmark", "xdist"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {spec.origin if spec else 'MISSING'}")
EOF
  } 2>&1 | tee -a "$RES/setup.log"
  timeout "$(left)" "$PY" benchmarks/common.py env --ceilings --json "$RES/env.json" 2>&1 | tee -a "$RES/setup.log"
}

run_tests() {
  local xdist="" rc=0
  # pytest-xdist is in the device image; TEST_WORKERS=0 runs the suite in one process
  [ "${TEST_WORKERS:-8}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null && xdist="-n ${TEST_WORKERS:-8}"
  echo "== GPU tests: pytest tests -m 'cuda or triton_gpu'" | tee "$RES/tests-gpu.log"
  timeout "$(cap "$(left 60)" 300)" "$PY" -m pytest tests -m "cuda or triton_gpu" -q -rs -p no:cacheprovider \
    2>&1 | tee -a "$RES/tests-gpu.log" || rc=1
  echo "== rest of the suite: pytest tests -m 'not (cuda or triton_gpu)' $xdist" | tee "$RES/tests-rest.log"
  # shellcheck disable=SC2086
  timeout "$(left)" "$PY" -m pytest tests -m "not (cuda or triton_gpu)" -q -rs -p no:cacheprovider $xdist \
    2>&1 | tee -a "$RES/tests-rest.log" || rc=1
  return $rc
}

run_bench_ops() {
  if [ ! -f benchmarks/bench_ops.py ]; then
    echo "bench-ops: benchmarks/bench_ops.py does not exist yet" | tee "$RES/ops.log"; return 0
  fi
  local extra=()   # options offered by the script's source (running --help could run a script without argparse)
  grep -q '"--json"' benchmarks/bench_ops.py && extra+=(--json "$RES/ops.json")
  grep -q '"--markdown"' benchmarks/bench_ops.py && extra+=(--markdown "$RES/ops.md")
  # shellcheck disable=SC2086
  timeout "$(cap "$(left)" 300)" "$PY" benchmarks/bench_ops.py ${extra[@]+"${extra[@]}"} ${OPS_ARGS:-} 2>&1 \
    | tee "$RES/ops.log"
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
  local models="${PIPELINE_MODELS:-all}" compile=() budget
  [ -n "${COMPILE_MODELS-sd-turbo}" ] && compile=(--compile --compile-models "${COMPILE_MODELS-sd-turbo}")
  budget="$(left 30)"
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_pipeline.py --model ${models//,/ } --device cuda --runs "${RUNS:-10}" --warmup "${WARMUP:-3}" \
    ${compile[@]+"${compile[@]}"} --time-budget "$budget" \
    --json "$RES/pipeline.json" --markdown "$RES/pipeline.md" 2>&1 | tee "$RES/pipeline.log"
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
        bench-ops) run_bench_ops || status=1 ;;
        bench-other) run_bench_other || status=1 ;;
        bench-pipeline) run_bench_pipeline || status=1 ;;
      esac ;;
  esac
done
"$PY" benchmarks/common.py summary "$RES" >/dev/null && echo && cat "$RES/summary.md"
echo "run_gpu.sh: done in ${SECONDS}s; results in $RES: $(ls "$RES" | tr '\n' ' ')"
exit $status
