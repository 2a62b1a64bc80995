"""The sample chat backend: an aiohttp app with a WebSocket chat room.

Several instances of it sit behind lbproxy; their users see each other's messages
because every instance publishes to, and listens on, a shared message bus:

* ``backends.chat.bus`` owns the fan-out between instances (``MemoryBus`` for one
  process, ``RedisBus`` for Redis pub/sub across processes/hosts);
* ``backends.chat.app`` owns the HTTP/WebSocket side (``make_app``, ``ChatServer``);
* ``backends.chat.__main__`` owns the command line (``python -m backends.chat``).
"""

from backends.chat.app import ChatServer, make_app
from backends.chat.bus import Bus, MemoryBus, RedisBus

__all__ = ["Bus", "ChatServer", "MemoryBus", "RedisBus", "make_app"]
