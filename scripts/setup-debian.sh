#!/bin/sh
# System packages wgmesh needs on Debian (run as root). Idempotent.
#  - iproute2/iptables/nftables/conntrack: the lab's namespaces, NATs and packet filter
#  - wireguard-go, wireguard-tools: independent WireGuard peers for interop proofs
#  - qemu-system-x86 + linux-image-amd64 + busybox-static: the kernel-WireGuard VM (virtme-ng)
#  - coturn: a real STUN server; iperf3: throughput; tcpdump: capture proofs
#  - bind9-dnsutils: dig, to query the mesh DNS responder in the netns tests
#  - miniupnpd, miniupnpc: a real port-mapping router (UPnP-IGD, NAT-PMP, PCP) for lab NATs
#    and upnpc, to list its mappings
#  - postgresql: the service tier's real database
#  - prometheus: a real Prometheus scrapes control, relay and agent in the metrics test
#  - openssl, sqlite3: docs/deploy.md's private CA and online backup, run by its test
#  - dbus-daemon + dbus-system-bus-common: a private system bus for the test's own
#    systemd-resolved, which scripts/fetch-resolved.sh unpacks (never installs)
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    iproute2 iptables nftables conntrack iputils-ping procps psmisc kmod \
    wireguard-go wireguard-tools \
    qemu-system-x86 linux-image-amd64 busybox-static \
    coturn iperf3 tcpdump bind9-dnsutils miniupnpd miniupnpc \
    postgresql prometheus openssl sqlite3 dbus-daemon dbus-system-bus-common \
    python3-venv python3-dev gcc >/dev/null
sh "$(dirname "$0")/fetch-resolved.sh"
# coturn, postgresql, miniupnpd and prometheus must not run as system services; tests start
# their own.
systemctl disable --now coturn postgresql miniupnpd prometheus >/dev/null 2>&1 || true
