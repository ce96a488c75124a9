"""Build a small lab by hand and look at what a NAT does to a UDP flow.

Run as root: ``.venv/bin/python examples/lab_nat_check.py``
"""

import json
import sys

from wgmesh.lab import Lab
from wgmesh.lab.natprobe import classify

with Lab() as lab:
    servers = [lab.add_public_host(f"srv{i}") for i in (1, 2)]
    for s in servers:
        lab.python(s, "-m", "wgmesh.lab.natprobe", "serve", s.ip, s.alt_ip or s.ip
                   ).wait_for_output("ready")
    home = lab.add_nat("home", kind="eim", hairpin=True)
    laptop = lab.add_host("laptop", nat=home)
    out = lab.run(laptop, [sys.executable, "-m", "wgmesh.lab.natprobe", "probe",
                           servers[0].ip, servers[1].ip]).stdout
    print(json.dumps(classify("eim", laptop.ip, json.loads(out)), indent=2))
