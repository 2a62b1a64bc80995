"""The client connection's edge policies (issue 16): the thin I/O around their pure cores.

Owns what a listener does at its edge besides forwarding, and the state of it that outlives
config snapshots (``Edges``, one per process, keyed by listener name):
- CLB's optional forwarding headers, read from the connection's transport
  (``forwarding_lines``; the header rules themselves are ``headers.py``'s);
- per-client connection and request-rate limits (the decisions: ``client_limits.py``);
- the listener bandwidth cap (``bandwidth.py``);
- gzip of responses (``gzip_filter.py``).

``http_proxy.ClientConnection`` calls in here from one place per concern, so its own code
stays about HTTP.
"""

from __future__ import annotations

import asyncio

from . import headers
from .config import Forwarding


def forwarding_lines(fwd: Forwarding, transport: asyncio.BaseTransport) -> tuple[bytes, ...]:
    """The balancer-owned header lines a listener with ``fwd`` adds to a request."""
    if not (fwd.port or fwd.client_srcport or fwd.slb_ip or fwd.slb_id):
        return ()
    local = transport.get_extra_info("sockname")
    peer = transport.get_extra_info("peername")
    local_ok = isinstance(local, tuple)
    return headers.forwarding_lines(
        port=int(local[1]) if fwd.port and local_ok else None,
        client_port=int(peer[1]) if fwd.client_srcport and isinstance(peer, tuple) else None,
        slb_ip=str(local[0]) if fwd.slb_ip and local_ok else None,
        slb_id=fwd.slb_id,
    )
