#!/bin/sh
# Everything wgmesh needs on a fresh Debian machine, as root: system packages,
# then a venv at .venv with wgmesh and its test extras installed (editable).
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup-debian.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
echo "installed: $(.venv/bin/wgmesh --help | head -1)"
