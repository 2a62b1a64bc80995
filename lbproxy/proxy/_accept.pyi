"""Stub of the listener's C accept loop (``_accept.c``): see that file's comment."""

from typing import Any

def accept(fd: int, most: int, /) -> tuple[list[tuple[int, Any]], int]: ...
