#!/bin/sh
# Start a throwaway PostgreSQL for the service tier and print its DSN.
#
#   eval "$(scripts/start-postgres.sh [DIR])"   # exports WGMESH_TEST_POSTGRES_DSN, WGMESH_PG_DIR
#   scripts/start-postgres.sh --stop DIR        # stop it and delete DIR
#
# initdb refuses to run as root, so as root the cluster runs as user postgres.
# It listens on 127.0.0.1 (a free port) and a unix socket inside DIR only;
# trust auth is fine because nothing outside this machine can connect.
# On any failure it says why on stderr, removes what it started and exits 1.
set -eu
BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_stop() { as_pg "$BIN/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null 2>&1 || true; }

if [ "${1:-}" = "--stop" ]; then
    pg_stop "${2:?usage: $0 --stop DIR}"
    rm -rf "$2"
    exit 0
fi

fail() {  # fail MESSAGE [LOG]: the message and the log's tail, then undo what this run did
    echo "start-postgres.sh: $1" >&2
    if [ -n "${2:-}" ] && [ -f "$2" ]; then tail -n 20 "$2" >&2; fi
    if [ -n "$STARTED" ]; then pg_stop "$DIR"; fi
    if [ -n "$OWN_DIR" ]; then rm -rf "$DIR"; fi
    exit 1
}

DIR=${1:-}
OWN_DIR= STARTED=  # what this run did, so that a failure undoes just that
if [ -z "$DIR" ]; then DIR=$(mktemp -d /tmp/wgmesh-pg.XXXXXX) OWN_DIR=1
elif [ ! -e "$DIR" ]; then OWN_DIR=1
fi
[ -x "${BIN:-/nonexistent}/initdb" ] ||
    fail "no PostgreSQL server in '${BIN:-/usr/lib/postgresql/*/bin}' (scripts/setup-debian.sh installs postgresql; PG_BIN=DIR points elsewhere)"
mkdir -p "$DIR"
if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR" || fail "no user postgres to run the server"; fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 ||
    fail "initdb failed:" "$DIR/initdb.log"
STARTED=1
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" \
    start >/dev/null || fail "the server did not start:" "$DIR/server.log"
as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres wgmesh || fail "createdb failed"
DSN="postgresql://postgres@127.0.0.1:$PORT/wgmesh"
echo "export WGMESH_TEST_POSTGRES_DSN='$DSN'"
echo "export WGMESH_PG_DIR='$DIR'"
echo "# stop with: $0 --stop $DIR" >&2
