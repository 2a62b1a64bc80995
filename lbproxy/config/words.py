"""Leaf values of the config file that are words, choices and lists: names, strings, file and
URL paths, tokens, cookie names, secrets, environment variable names, one of a few choices,
true or false, lists of status codes and of media types, each a parser and its leaf type
(``leaf.Leaf``).

Pure: no I/O, no YAML; it imports only ``leaf``, ``model`` and ``wire``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from ..wire.status_codes import parse_expected_codes
from .leaf import STR, Leaf
from .model import MIN_STICKY_SECRET, _show


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _drain_code(value: Any) -> int:
    if isinstance(value, bool) or value not in (1001, 1012):
        raise ValueError(
            f"expected 1001 (Going Away) or 1012 (Service Restart), got {_show(value)}"
        )
    return int(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value

    return conv


def _name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"expected a name of letters, digits, '_', '.', '-', got {_show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not _header_safe(value):
        raise ValueError(f"expected a path starting with '/', got {_show(value)}")
    return value


def _header_safe(text: str) -> bool:
    """No space or control character: ``text`` goes verbatim into a check's request head."""
    return not any(c <= " " or c == "\x7f" for c in text)


def _token(value: Any) -> str:
    """A bearer token: visible ASCII, no spaces (it is compared with a header value)."""
    if (
        not isinstance(value, str)
        or not value
        or not value.isascii()
        or not value.isprintable()
        or " " in value
    ):
        # The value is a secret: never echo it.
        raise ValueError("expected a non-empty token of visible ASCII characters, no spaces")
    return value


def _check_host(value: Any) -> str:
    if not isinstance(value, str) or not _header_safe(value):
        raise ValueError(f"expected a Host header value like example.com, got {_show(value)}")
    return value


def _prefix(value: Any) -> str:
    """A path prefix: starts with '/', no space, control character, '?' or '#'."""
    path = _path(value)
    if "?" in path or "#" in path:
        raise ValueError(f"expected a path prefix without '?' or '#', got {value!r}")
    return path


# RFC 6265 cookie-name: an RFC 2616 token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(
            f"expected a cookie name of letters, digits and !#$%&'*+-.^_`|~, got {_show(value)}"
        )
    return value


def _codes(value: Any) -> tuple[str | int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list like [http_2xx, 301], got {_show(value)}")
    return parse_expected_codes(value)


_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")


def _media_types(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of media types like [text/csv], got {_show(value)}")
    out = set()
    for item in value:
        text = item.strip().lower() if isinstance(item, str) else None
        if text is None or not _MEDIA_TYPE.fullmatch(text):
            raise ValueError(
                f"expected media types like text/csv (no parameters), got {_show(item)}"
            )
        out.add(text)
    return frozenset(out)


def _slb_id(value: Any) -> str:
    """The instance name sent as SLB-ID: visible ASCII without spaces (a header value)."""
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
        raise ValueError(f"expected a name of visible ASCII characters, got {_show(value)}")
    if " " in value or len(value) > 256:
        raise ValueError(f"expected a name without spaces, at most 256 characters, got {value!r}")
    return value


def _file_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path, got {_show(value)}")
    return value


def _secret(value: Any) -> str:
    """``sticky_session.secret``: printable, long enough to be a key. Never echoed."""
    if not isinstance(value, str) or not value.isprintable():
        raise ValueError("expected a string of printable characters")
    if len(value) < MIN_STICKY_SECRET:
        raise ValueError(f"expected at least {MIN_STICKY_SECRET} characters")
    return value


_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _KEY_PREFIX.fullmatch(value):
        raise ValueError(
            f"expected 1 to 64 of A-Z a-z 0-9 _ . : {{ }} -, like lbproxy:, got {_show(value)}"
        )
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(
            f"expected an environment variable name like LB_ADMIN_TOKEN, got {_show(value)}"
        )
    return value


# The leaf types.


def choice(*choices: str) -> Leaf:
    return Leaf(_choice(*choices), "one of " + ", ".join(choices), {"enum": list(choices)})


Bool = Annotated[bool, Leaf(_bool, "true or false", {"type": "boolean"})]
Name = Annotated[str, Leaf(_name, "name", {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"})]
String = Annotated[str, Leaf(_string, "string", STR)]
FilePath = Annotated[str, Leaf(_file_path, "file path", {"type": "string", "minLength": 1})]
EnvName = Annotated[
    str, Leaf(_env_name, "variable name", {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"})
]
UrlPath = Annotated[str, Leaf(_path, "path", {"type": "string", "pattern": "^/"})]
Prefix = Annotated[str, Leaf(_prefix, "path prefix", {"type": "string", "pattern": "^/"})]
Token = Annotated[str, Leaf(_token, "token", {"type": "string", "minLength": 1})]
CheckHost = Annotated[str, Leaf(_check_host, "host", STR)]
CookieName = Annotated[str, Leaf(_cookie_name, "cookie name", STR)]
Secret = Annotated[
    str, Leaf(_secret, "secret, 16+ characters", {"type": "string", "minLength": 16})
]
SlbId = Annotated[str, Leaf(_slb_id, "visible ASCII", {"type": "string", "maxLength": 256})]
KeyPrefix = Annotated[str, Leaf(_key_prefix, "key prefix", {"type": "string", "maxLength": 64})]
MediaTypes = Annotated[
    frozenset[str],
    Leaf(_media_types, "list of media types", {"type": "array", "items": {"type": "string"}}),
]
Codes = Annotated[
    tuple[str | int, ...],
    Leaf(
        _codes,
        "list of http_2xx..http_5xx or codes",
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    ),
]
DrainCode = Annotated[int, Leaf(_drain_code, "1001 or 1012", {"enum": [1001, 1012]})]
FilePath_: Leaf = FilePath.__metadata__[0]  # type: ignore[attr-defined]
Bool_: Leaf = Bool.__metadata__[0]  # type: ignore[attr-defined]
String_: Leaf = String.__metadata__[0]  # type: ignore[attr-defined]
