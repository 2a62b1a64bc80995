"""The data path: client sockets, the HTTP/1 and HTTP/2 fronts, one exchange per
request, WebSocket tunnels, the upstream pool, edge policies, gzip, listeners, TLS and the
access log. Protocol callbacks around the core; imports core, config and wire.
"""
