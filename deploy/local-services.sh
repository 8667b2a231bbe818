#!/usr/bin/env bash
# Installs (from Debian packages) and starts the services drover needs on one machine:
# PostgreSQL, Redis and RabbitMQ, plus the local test image drover/busybox:latest.
# Idempotent and quick when everything already runs; needs no systemd. Run as root.
#
# Environment (defaults in brackets):
#   DROVER_STATE_DIR   where data directories and logs live [/var/lib/drover-dev]
#   DROVER_PG_PORT     Postgres port [5432]; user/password/database drover/drover/drover
#   DROVER_REDIS_PORT  Redis port [6379]
#   DROVER_SKIP_IMAGE  set to 1 to skip building drover/busybox:latest
set -euo pipefail

STATE_DIR=${DROVER_STATE_DIR:-/var/lib/drover-dev}
PG_PORT=${DROVER_PG_PORT:-5432}
REDIS_PORT=${DROVER_REDIS_PORT:-6379}
mkdir -p "$STATE_DIR"

log() { printf '[local-services] %s\n' "$*" >&2; }

need_pkgs=()
command -v pg_ctlcluster >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/postgres ] || need_pkgs+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v rabbitmq-server >/dev/null 2>&1 || need_pkgs+=(rabbitmq-server)
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/timestamp.proto ] || need_pkgs+=(libprotobuf-dev)
[ -x /bin/busybox ] && /bin/busybox --help 2>&1 | grep -q 'static' || dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
command -v psql >/dev/null 2>&1 || need_pkgs+=(postgresql-client)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not try to start services through init scripts here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# ---- PostgreSQL -------------------------------------------------------------------------
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
PG_DATA="$STATE_DIR/postgres"
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }
if ! pg_ready; then
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    log "initialising postgres in $PG_DATA"
    mkdir -p "$PG_DATA" && chown postgres:postgres "$PG_DATA"
    su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$PG_DATA' -A trust -U postgres" >/dev/null
    cat >> "$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
max_connections = 500
unix_socket_directories = '$PG_DATA'
fsync = off
synchronous_commit = on
CONF
  fi
  log "starting postgres on port $PG_PORT"
  su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$PG_DATA' -l '$PG_DATA/server.log' -w -t 60 start" >/dev/null
fi
psql_admin() { psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
# fsync off survives a killed process (not a power cut); synchronous_commit off would not: a
# commit could be acknowledged, and acted on, before its WAL left Postgres. Older set-ups of
# this script had it off; turn it on for them too.
if [ "$(psql_admin -c "SHOW synchronous_commit")" != "on" ]; then
  psql_admin -c "ALTER SYSTEM SET synchronous_commit = on" -c "SELECT pg_reload_conf()" >/dev/null
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname='drover'")" != "1" ]; then
  psql_admin -c "CREATE ROLE drover LOGIN SUPERUSER PASSWORD 'drover'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname='drover'")" != "1" ]; then
  psql_admin -c "CREATE DATABASE drover OWNER drover"
fi

# ---- Redis --------------------------------------------------------------------------------
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  log "starting redis on port $REDIS_PORT"
  mkdir -p "$STATE_DIR/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
    --dir "$STATE_DIR/redis" --logfile "$STATE_DIR/redis/redis.log" --save '' --appendonly no
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# ---- RabbitMQ -----------------------------------------------------------------------------
rabbit_up() { timeout 20 rabbitmqctl -q status >/dev/null 2>&1; }
if ! rabbit_up; then
  log "starting rabbitmq"
  export RABBITMQ_MNESIA_BASE="$STATE_DIR/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$STATE_DIR/rabbitmq/log"
  mkdir -p "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
  chown -R rabbitmq:rabbitmq "$STATE_DIR/rabbitmq" 2>/dev/null || true
  # The Debian wrapper drops to the rabbitmq user itself.
  rabbitmq-server -detached >/dev/null 2>&1 || true
  ok=0
  for _ in $(seq 1 60); do
    if timeout 30 rabbitmqctl -q await_startup >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  [ "$ok" = 1 ] || { log "rabbitmq did not start; see $RABBITMQ_LOG_BASE"; exit 1; }
fi

# ---- Docker test image --------------------------------------------------------------------
if [ "${DROVER_SKIP_IMAGE:-0}" != 1 ]; then
  if ! docker info >/dev/null 2>&1; then
    log "docker daemon not answering: skipping drover/busybox image (agents will say so too)"
  elif ! docker image inspect drover/busybox:latest >/dev/null 2>&1; then
    log "building drover/busybox:latest from busybox-static"
    ctx=$(mktemp -d)
    mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/workspace"
    cp /bin/busybox "$ctx/rootfs/bin/busybox"
    for applet in $(/bin/busybox --list); do
      [ "$applet" = busybox ] || ln -sf busybox "$ctx/rootfs/bin/$applet"
    done
    chmod 1777 "$ctx/rootfs/tmp"
    printf 'FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nWORKDIR /workspace\nCMD ["/bin/sh"]\n' > "$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t drover/busybox:latest "$ctx" >/dev/null
    rm -rf "$ctx"
  fi
fi
log "ready: postgres 127.0.0.1:$PG_PORT, redis 127.0.0.1:$REDIS_PORT, rabbitmq 127.0.0.1:5672"
