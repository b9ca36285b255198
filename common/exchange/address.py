"""Which addresses a listening socket keeps on this machine. Pure.

`storefed serve` refuses `--no-auth` and the dashboard warns unless they listen on loopback:
what they show must not reach the network without a key.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds to this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False
