#!/usr/bin/env bash
# The fault-injection suite: processes killed at random points (tests/faults.rs), a worker cut
# off the network and healed, 64 workers against 2 servers (tests/faults_net.rs), checkpoints
# written, lost and resumed (tests/checkpoints.rs). The figures the tests print (recovery
# times, peak memory, steps/s) are what docs quote.
#
# GRADFLOW_FAULT_SECS (default here 60) is how long the 64-worker load runs; `cargo test`
# alone uses 20 s so the ordinary test run stays fast. The network partition needs root (it
# makes a network namespace and a veth pair); elsewhere it prints "skipped: ..." and passes.
# One test at a time, so that timings are not disturbed by the next test.
set -euo pipefail
cd "$(dirname "$0")/.."

export GRADFLOW_FAULT_SECS="${GRADFLOW_FAULT_SECS:-60}"

echo "== fault injection (GRADFLOW_FAULT_SECS=$GRADFLOW_FAULT_SECS)"
# --no-fail-fast: a failure in one file does not hide the results of the others.
cargo test -p gradflow-cli --no-fail-fast --test faults --test faults_net --test checkpoints -- --nocapture --test-threads=1
