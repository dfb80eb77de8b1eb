#!/usr/bin/env bash
# Runs a benchmark against the local stack and prints its table:
#   ./deploy/bench.sh ingestion [--events N] [--concurrency C] [--rate R] ...
#   ./deploy/bench.sh contacts [--contacts N] [--batch B] [--concurrency C] [--get-rate R] [--get-seconds S]
# Builds the release binaries first. Results go in docs/benchmarks.md.

set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=deploy/local-stack.sh
. deploy/local-stack.sh

cargo build --release --bin rapport --bin rapport-bench
export TEST_KAFKA_BROKERS=${TEST_KAFKA_BROKERS:-$KAFKA_HOST:$KAFKA_PORT}
exec "$CARGO_TARGET_DIR/release/rapport-bench" "$@"
