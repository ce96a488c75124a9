#!/bin/sh
# Run every tier: lint, unit, netns (root), kernel (one virtme-ng VM), service (PostgreSQL).
# Starts the servers the tests need and stops them afterwards.
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/wgmesh lab clean >/dev/null
if [ -x scripts/start-postgres.sh ] && [ -z "${WGMESH_TEST_POSTGRES_DSN:-}" ]; then
    PGDIR=$(mktemp -d /tmp/wgmesh-pg.XXXXXX)
    WGMESH_TEST_POSTGRES_DSN=$(sh scripts/start-postgres.sh "$PGDIR")
    export WGMESH_TEST_POSTGRES_DSN
    trap 'sh scripts/start-postgres.sh --stop "$PGDIR" >/dev/null 2>&1 || true' EXIT
fi
$PY -m pytest -p no:cacheprovider "$@"
