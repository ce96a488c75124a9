"""The asyncio drivers of the sans-I/O relay protocol in :mod:`wgmesh.relay`.

``stream`` (frame I/O), ``connection`` (dial and handshake), ``client`` (home
selection and failover), ``server`` (forwarding), ``stunserver`` (the STUN
responder) and ``mesh`` (the links between the relays of a region).
"""
