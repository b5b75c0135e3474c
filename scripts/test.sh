#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what it
# needs (apt packages, Debian's containerd/SOCI into .deps/), then runs the
# stages in order and reports each with its time.
#
#   bash scripts/test.sh            all stages
#   bash scripts/test.sh unit real  only the named stages
#
# Stages: deps, lint, unit, golden, real, demo, packages.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export CARGO_TERM_COLOR=never
export SOCI_NODE_DEPS="$here/.deps"

all=(deps lint unit golden real demo packages)
stages=("$@")
((${#stages[@]})) || stages=("${all[@]}")

log_dir="$here/target/test-logs"
mkdir -p "$log_dir"
summary=()
failed=0
total_passed=0
total_failed=0

# Sum cargo's "test result: ok. N passed; M failed" lines of a log.
passed_in() { grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$1" | awk '{s+=$4} END {print s+0}'; }
failed_in() { grep -Eo 'test result: .*; [0-9]+ failed' "$1" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}'; }

stage_deps()   { bash scripts/test-deps.sh; }
stage_lint()   { cargo fmt --all -- --check && cargo clippy --all-targets --quiet -- -D warnings; }
stage_unit()   { cargo test --lib --bins; }
stage_golden() { cargo test --test golden_containerd; }
# Every integration test file but the golden and package ones: real
# containerd, SOCI, registry (tests/*.rs; new files join automatically).
stage_real() {
  local args=() f
  for f in tests/*.rs; do
    f=$(basename "$f" .rs)
    case "$f" in golden_containerd) ;; *) args+=(--test "$f") ;; esac
  done
  cargo test "${args[@]}"
}
stage_demo()   { bash scripts/demo.sh; }
stage_packages() { bash tests/packages/run.sh; }

for s in "${stages[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then
    echo "unknown stage '$s'; stages: ${all[*]}" >&2
    exit 2
  fi
  log="$log_dir/$s.log"
  echo "=== stage $s (log: target/test-logs/$s.log)"
  start=$(date +%s)
  if "stage_$s" 2>&1 | tee "$log"; then rc=0; else rc=1; fi
  secs=$(( $(date +%s) - start ))
  counts=""
  if grep -q 'test result:' "$log"; then
    p=$(passed_in "$log") f=$(failed_in "$log")
    total_passed=$((total_passed + p)) total_failed=$((total_failed + f))
    counts=" ($p passed, $f failed)"
  fi
  if ((rc == 0)); then
    summary+=("PASS  $s  ${secs}s$counts")
  else
    summary+=("FAIL  $s  ${secs}s$counts")
    failed=$((failed + 1))
  fi
done

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
echo "stages: $(( ${#stages[@]} - failed )) passed, $failed failed"
echo "tests: $total_passed passed, $total_failed failed"
((failed == 0))
