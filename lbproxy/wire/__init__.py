"""Byte formats on the wire: HTTP/1 heads and bodies, WebSocket frames, header rules.

The bottom layer: imports nothing of lbproxy, no config, no event loop, no sockets.
"""
