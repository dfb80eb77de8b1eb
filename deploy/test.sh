#!/usr/bin/env bash
# Runs Rapport's whole test suite: lints the protobuf contracts (and checks
# that v1 only changed compatibly since the previous commit), renders and
# validates every Kubernetes overlay, checks formatting, then runs every test
# against real Postgres and a real Kafka broker (tansu). The local stack is
# installed and started first.

set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=deploy/local-stack.sh
. deploy/local-stack.sh

echo "== buf lint"
buf lint proto

if git rev-parse --verify --quiet HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto/buf.yaml 2>/dev/null; then
  echo "== buf breaking (against the previous commit)"
  buf breaking proto --against ".git#ref=HEAD~1,subdir=proto"
else
  echo "== buf breaking skipped: no previous commit with proto/"
fi

echo "== Kubernetes manifests (kubectl kustomize + kubernetes-validate)"
./deploy/validate-k8s.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

# Databases left by earlier test runs.
stale=$(psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'rapport\_test\_%' OR datname LIKE 'rapport\_bench\_%'" 2>/dev/null || true)
for database in $stale; do
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
done

echo "== tests"
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export TEST_KAFKA_BROKERS=${TEST_KAFKA_BROKERS:-$KAFKA_HOST:$KAFKA_PORT}
cargo nextest run --workspace --profile ci "$@"
