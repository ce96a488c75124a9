"""Subnet-router and exit-node test helpers: the lab's LAN ranges, a policy, reachability
and the dumps that prove a host's routing was left as it was."""

from __future__ import annotations

from wgmesh.lab.network import Host, Lab

# The lab's internet and NAT WANs use all three IPv4 documentation ranges, so the LANs
# here come from the benchmarking range (RFC 2544), which nothing else in the lab uses.
LAN = "198.18.0.0/24"
FAR = "198.19.0"  # "the internet" that only the exit node's uplink reaches
POLICY = {"tags": ["tag:router", "tag:client", "tag:exit"],
          "rules": [{"src": ["tag:client"], "dst": [f"{LAN}:*", "0.0.0.0/0:*"]},
                    {"src": ["*"], "dst": ["tag:router:*", "tag:exit:*"]}],
          "autoApprovers": {"exitNode": ["tag:exit"]}}


def reaches(lab: Lab, host: Host, ip: str, timeout: int = 1) -> bool:
    return lab.run(host, ["ping", "-c1", "-W", str(timeout), ip], check=False).returncode == 0


def routes(lab: Lab, host: Host) -> str:
    return lab.run(host, ["ip", "route", "show", "table", "all"]).stdout


def host_dump(lab: Lab, host: Host) -> tuple[str, str, str]:
    return (routes(lab, host), lab.run(host, ["ip", "rule"]).stdout,
            lab.run(host, ["ip", "-6", "rule"]).stdout)
