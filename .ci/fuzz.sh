#!/usr/bin/env bash
# Runs every cargo-fuzz target of crates/gradflow-fuzz in turn, each for SECONDS_PER_TARGET
# (default 600), one process on one core, and prints one line per target with its executions.
# Fails if any target crashes (panic, failed assertion, out of memory, timeout); the crashing
# input is kept under $FUZZ_WORK/artifacts/<target>/.
#
#   .ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). Not run by
# CI; see docs/fuzzing.md. The committed corpus is only read: new inputs go to
# $FUZZ_WORK/corpus/<target>/ (default /tmp/gradflow-fuzz), logs to $FUZZ_WORK/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"
shift || true
fuzz_dir=crates/gradflow-fuzz
work="${FUZZ_WORK:-/tmp/gradflow-fuzz}"
nice_level="${FUZZ_NICE:-10}"
rss_limit_mb="${FUZZ_RSS_LIMIT_MB:-2048}"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir "$fuzz_dir")
fi

echo "== build (nightly, address sanitizer, debug assertions)"
nice -n "$nice_level" cargo +nightly fuzz build --fuzz-dir "$fuzz_dir"

stat() { # stat NAME LOG: the value of libFuzzer's final `stat::NAME`
    sed -n "s/^stat::$1: *\([0-9]*\).*/\1/p" "$2" | tail -n 1
}

failed=()
printf '%-22s %14s %10s %8s %9s  %s\n' target executions exec/s corpus rss_mb result
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    log="$work/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$work/logs"
    set +e
    nice -n "$nice_level" cargo +nightly fuzz run --fuzz-dir "$fuzz_dir" "$t" "$corpus" "$fuzz_dir/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb="$rss_limit_mb" -timeout=30 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1
    rc=$?
    set -e
    execs="$(stat number_of_executed_units "$log")"
    per_sec="$(stat average_exec_per_sec "$log")"
    rss="$(stat peak_rss_mb "$log")"
    files="$(find "$corpus" "$fuzz_dir/corpus/$t" -type f | wc -l)"
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        result="CRASH (exit $rc; see $log and $artifacts/)"
        failed+=("$t")
    fi
    printf '%-22s %14s %10s %8s %9s  %s\n' "$t" "${execs:-?}" "${per_sec:-?}" "$files" "${rss:-?}" "$result"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
