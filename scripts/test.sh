#!/bin/sh
# Run every tier: lint, types, unit, netns (root), kernel (one virtme-ng VM), service
# (PostgreSQL). Starts the servers the tests need and stops them afterwards.
# Soak tests (large repeats of proven paths) run only with --soak or WGMESH_SOAK=1.
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/mypy
# the sans-I/O protocol cores are typed strictly
.venv/bin/mypy --strict --follow-imports=silent src/wgmesh/netmap.py src/wgmesh/traversal.py src/wgmesh/pmtu.py \
    src/wgmesh/relay.py src/wgmesh/stun.py src/wgmesh/disco.py src/wgmesh/wireguard/noise.py \
    src/wgmesh/wireguard/session.py src/wgmesh/wireguard/filter.py src/wgmesh/control/world.py \
    src/wgmesh/control/policy.py src/wgmesh/control/envelope.py src/wgmesh/control/routes.py \
    src/wgmesh/lock.py src/wgmesh/portmap.py src/wgmesh/drop/protocol.py \
    src/wgmesh/relaynet/handoff.py
.venv/bin/wgmesh lab clean >/dev/null
if [ -z "${WGMESH_TEST_POSTGRES_DSN:-}" ]; then
    # the service tier's real PostgreSQL: exports WGMESH_TEST_POSTGRES_DSN and WGMESH_PG_DIR.
    # Captured first: `eval "$(...)"` alone would swallow its failure.
    pg_env=$(sh scripts/start-postgres.sh) || {
        echo "test.sh: scripts/start-postgres.sh failed (its message is above)" >&2
        exit 1
    }
    eval "$pg_env"
    trap 'sh scripts/start-postgres.sh --stop "$WGMESH_PG_DIR" >/dev/null 2>&1 || true' EXIT
fi
# --durations: the slowest tests in the log, for the CI time budget (see also the
# per-tier lines and the kernel tier's VM line in the summary)
$PY -m pytest -p no:cacheprovider --durations=15 "$@"
