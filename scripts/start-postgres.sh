#!/bin/sh
# A throwaway PostgreSQL for the service tier.
#   start-postgres.sh DIR         initdb into DIR, start on 127.0.0.1, print the DSN (only that)
#   start-postgres.sh --stop DIR  stop it
# scripts/test.sh relies on this interface.
set -eu
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$BIN" ] || { echo "postgresql not installed (scripts/setup-debian.sh)" >&2; exit 1; }
if [ "${1:-}" = "--stop" ]; then
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$2/data' -m fast stop" >/dev/null
    rm -rf "$2"
    exit 0
fi
DIR=$1
PORT=${WGMESH_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
mkdir -p "$DIR"
chown postgres "$DIR"
su postgres -s /bin/sh -c "$BIN/initdb -D '$DIR/data' -A trust -U postgres >/dev/null"
su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$DIR/data' -l '$DIR/log' -w -o \"-c listen_addresses=127.0.0.1 -p $PORT -k '$DIR' -c max_connections=300 -c fsync=off\" start" >/dev/null
su postgres -s /bin/sh -c "$BIN/createdb -h 127.0.0.1 -p $PORT wgmesh_test"
echo "postgresql://postgres@127.0.0.1:$PORT/wgmesh_test"
