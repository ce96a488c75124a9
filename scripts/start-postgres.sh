#!/bin/sh
# Start a throwaway PostgreSQL for the service tier and print its DSN.
#
#   eval "$(scripts/start-postgres.sh [DIR])"   # exports WGMESH_TEST_POSTGRES_DSN, WGMESH_PG_DIR
#   scripts/start-postgres.sh --stop DIR        # stop it and delete DIR
#
# initdb refuses to run as root, so as root the cluster runs as user postgres.
# It listens on 127.0.0.1 (a free port) and a unix socket inside DIR only;
# trust auth is fine because nothing outside this machine can connect.
set -eu
BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "${1:-}" = "--stop" ]; then
    DIR=${2:?usage: $0 --stop DIR}
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
    exit 0
fi

DIR=${1:-$(mktemp -d /tmp/wgmesh-pg.XXXXXX)}
mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" \
    start >/dev/null
as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres wgmesh
DSN="postgresql://postgres@127.0.0.1:$PORT/wgmesh"
echo "export WGMESH_TEST_POSTGRES_DSN='$DSN'"
echo "export WGMESH_PG_DIR='$DIR'"
echo "# stop with: $0 --stop $DIR" >&2
