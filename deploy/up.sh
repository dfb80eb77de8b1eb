#!/usr/bin/env bash
# Brings the whole platform up on this machine: the local stack (Postgres and
# tansu), then every Rapport service in one process, talking over Kafka.
# The first run creates a workspace called "Local" and saves its keys in
# $RAPPORT_STATE_DIR/local-workspace.json. Stop with Ctrl-C.

set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=deploy/local-stack.sh
. deploy/local-stack.sh

cargo build --bin rapport
rapport="$CARGO_TARGET_DIR/debug/rapport"

export RAPPORT_DATABASE_URL=${RAPPORT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/rapport}
export RAPPORT_KAFKA_BROKERS=${RAPPORT_KAFKA_BROKERS:-$KAFKA_HOST:$KAFKA_PORT}
export RAPPORT_LOG_FORMAT=${RAPPORT_LOG_FORMAT:-pretty}

"$rapport" topics create >/dev/null
"$rapport" migrate

keys="$RAPPORT_STATE_DIR/local-workspace.json"
if [ ! -s "$keys" ]; then
  "$rapport" workspace create Local --output json >"$keys"
fi
echo "workspace keys: $keys"
cat "$keys"

exec "$rapport" serve
