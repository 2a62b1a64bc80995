"""lbproxy: a layer-7 load balancer for real-time web apps (HTTP and WebSocket)."""

__version__ = "0.1.0"
