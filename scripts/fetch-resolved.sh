#!/bin/sh
# Debian's systemd-resolved (with the libsystemd-shared it links to), unpacked into a cache
# directory, never installed: installing it would point /etc/resolv.conf at its stub
# resolver, which does not run on a machine whose PID 1 is not systemd. The netns tests
# run it from here in a private mount namespace (tests/support/resolvedtools.py), with
# bin/ wrappers that load its own libsystemd-shared. Idempotent (as root, after apt-get
# update): skips when the unpacked version is the archive's candidate.
set -eu
dest=${WGMESH_RESOLVED_ROOT:-/var/cache/wgmesh/systemd-resolved}
version=$(apt-cache policy systemd-resolved | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] || {
    echo "fetch-resolved.sh: no systemd-resolved in the apt lists" >&2
    exit 1
}
[ "$(cat "$dest/VERSION" 2>/dev/null || true)" = "$version" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chown _apt "$tmp" 2>/dev/null || true  # apt downloads as _apt where it may
(cd "$tmp" && apt-get download -qq "systemd-resolved=$version" "libsystemd-shared=$version")
rm -rf "$dest"
mkdir -p "$dest/bin"
for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$dest"
done
libdir=$(dirname "$(find "$dest" -name 'libsystemd-shared-*.so' | head -1)")
for tool in usr/bin/resolvectl lib/systemd/systemd-resolved; do
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$libdir" "$dest/$tool" \
        > "$dest/bin/${tool##*/}"
    chmod 755 "$dest/bin/${tool##*/}"
done
echo "$version" > "$dest/VERSION"
