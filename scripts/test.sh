#!/bin/sh
# Run every tier: lint, unit, netns (root), kernel (one virtme-ng VM), service (PostgreSQL).
# Starts the servers the tests need and stops them afterwards.
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/wgmesh lab clean >/dev/null
if [ -z "${WGMESH_TEST_POSTGRES_DSN:-}" ]; then
    # the service tier's real PostgreSQL: exports WGMESH_TEST_POSTGRES_DSN and WGMESH_PG_DIR
    eval "$(sh scripts/start-postgres.sh)"
    trap 'sh scripts/start-postgres.sh --stop "$WGMESH_PG_DIR" >/dev/null 2>&1 || true' EXIT
fi
$PY -m pytest -p no:cacheprovider "$@"
