#!/usr/bin/env bash
# Brings up the local stack (Postgres, Redis, RabbitMQ, test image; then `drover dev` with
# API, dispatcher and one agent) and runs one demo run, printing its output.
# Leaves `drover dev` running when DROVER_DEMO_KEEP=1 (stop it with: kill $(cat /tmp/drover-dev.pid)).
set -euo pipefail
cd "$(dirname "$0")/.."

ADDR=${DROVER_DEMO_ADDR:-127.0.0.1:50051}
bash deploy/local-services.sh
cargo build --workspace --bins --locked -q
export DROVER_ENDPOINT="http://$ADDR"

target/debug/drover dev --listen "$ADDR" > /tmp/drover-dev.log 2>&1 &
DEV_PID=$!
echo "$DEV_PID" > /tmp/drover-dev.pid
stop() { [ "${DROVER_DEMO_KEEP:-0}" = 1 ] || { kill "$DEV_PID" 2>/dev/null || true; wait "$DEV_PID" 2>/dev/null || true; }; }
trap stop EXIT

for _ in $(seq 1 100); do
  target/debug/drover list --limit 1 >/dev/null 2>&1 && break
  kill -0 "$DEV_PID" 2>/dev/null || { cat /tmp/drover-dev.log; exit 1; }
  sleep 0.2
done

echo "\$ drover submit --wait --image drover/busybox:latest -- sh -c 'echo hello from drover; id; uname -sm'"
target/debug/drover submit --wait --image drover/busybox:latest \
  -- sh -c 'echo hello from drover; id; uname -sm'
echo
echo "\$ drover list"
target/debug/drover list --limit 5
