#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the integration tests (tests/integration).
#
#   scripts/postgres.sh install          apt-get install Debian's postgresql (root; no-op if present)
#   scripts/postgres.sh start PORT       initdb a temp cluster, start it on 127.0.0.1:PORT, create
#                                        database `mlflow`; prints "URI DATADIR" on stdout
#   scripts/postgres.sh stop DATADIR     stop that server and delete its folder
#
# Trust authentication on loopback only; fsync off: test data, not a real database. PostgreSQL
# refuses to run as root, so as root the server runs as the `postgres` user the package creates.
set -euo pipefail

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install() {
  if [ -n "$(pg_bin)" ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "postgres.sh: PostgreSQL is not installed and we are not root: apt-get install postgresql" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
}

start() {
  local port=$1 bin dir
  install
  bin=$(pg_bin)
  dir=$(mktemp -d /tmp/chromoseg-pg.XXXXXX)
  chmod 755 "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2; exit 1; }
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" \
    start >&2 || { cat "$dir/server.log" >&2; exit 1; }
  as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres mlflow >&2
  # The driver named explicitly: SQLAlchemy 2.1 defaults to psycopg 3, the extra installs psycopg2.
  echo "postgresql+psycopg2://postgres@127.0.0.1:$port/mlflow $dir"
}

stop() {
  local dir=$1
  case "$dir" in /tmp/chromoseg-pg.*) ;; *) echo "postgres.sh: refusing to remove $dir" >&2; exit 2 ;; esac
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:?port}" ;;
  stop) stop "${2:?datadir}" ;;
  *) echo "usage: $0 install | start PORT | stop DATADIR" >&2; exit 2 ;;
esac
