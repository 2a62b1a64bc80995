"""The declaration of the document's top level: ``listeners``, ``server_groups``, ``admin``,
``access_log``, ``shutdown_timeout`` and ``resolvers`` (each key once, with its type, default
and description), the rules that link sections (a listener's group must exist, names and
addresses must not clash) and ``CONFIG``, the one ``TypeAdapter`` that validates a document.

``parse_config(document)``: a parsed YAML document into the model, every problem at once.
pydantic validates the document against the declarations (``CONFIG``); each problem comes back
with its place, written as the file is (``server_groups.rs1.servers[1].address``), and the list
is put in the order the document is written (a left-out key sorts after its parent's keys), so
the file reads top to bottom. ``parse_server_change`` does the same for a runtime API body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler, TypeAdapter, ValidationError
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import core_schema

from .addresses import AdminHost, BindAddress, RedisUrl, Resolver, bind_is_loopback, parse_address
from .declare import Items, Loc, Problem, declared, given, problems_of
from .groups import ServerChange, ServerGroup, ShedRequest
from .listeners import Listener
from .model import DEFAULT_SHUTDOWN_TIMEOUT, Address, ConfigError, _show
from .quantities import Duration
from .sections import Tls
from .words import Bool, EnvName, FilePath, KeyPrefix, Name, String, Token, _name, choice


class GroupMap:
    """``Annotated`` metadata of ``server_groups``: the file maps each name to its group; the
    model keeps a tuple of groups in file order, each knowing its name."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def check(value: Any, inner: core_schema.ValidatorFunctionWrapHandler) -> Any:
            if isinstance(value, tuple):
                return value
            if not isinstance(value, Mapping):
                raise ValueError(f"expected a mapping, got {_show(value)}")
            if not value:
                raise ValueError("expected at least one server group")
            groups = inner(value)
            return tuple(replace(g, name=name) for name, g in groups.items())

        names = handler.generate_schema(Name)
        mapping = core_schema.dict_schema(names, handler.generate_schema(ServerGroup))
        return core_schema.no_info_wrap_validator_function(check, mapping)


@declared
@dataclass(frozen=True, slots=True)
class Admin:
    """The admin listener (``admin``). Safe by default: a bind off loopback needs a token (or
    ``insecure: true``); the checks on every request (Host, Origin, content type, token) are
    ``control.admin_guard``'s. ``token`` is the token in effect: as written, or what
    ``token_file`` / ``token_env`` held when the file was loaded (``control.loading``)."""

    bind: Annotated[
        BindAddress,
        Field(
            description=(
                "the admin listener (never one of the proxied listeners): `GET /` status "
                "page, `GET /status` JSON, `GET /status/history` JSON (see "
                "[Monitoring](#monitoring)), `GET /metrics` Prometheus, `GET /healthz`, `POST "
                "/-/reload`, `GET /-/servers`, `PUT /-/servers/{group}/{host:port}` and `POST "
                "/-/servers/{group}/{host:port}/shed` (see "
                "[Runtime server state](#runtime-server-state)). Loopback unless you bind it "
                "elsewhere; off loopback it needs a token or `insecure: true` (see [Securing "
                "the admin listener](#securing-the-admin-listener)). A reload that changes it "
                "opens the new address first (or fails, changing nothing)"
            ),
        ),
    ] = Address("127.0.0.1", 8404)  # noqa: RUF009 (frozen: one shared default is safe)
    token: Annotated[
        Token,
        Field(
            description=(
                "when set, `POST /-/reload`, `GET /-/servers` and `PUT /-/servers/...` need "
                "`Authorization: Bearer <token>` (compared in constant time; 401 otherwise). "
                "The read-only pages need none (see `token_for_reads`). Visible ASCII, no "
                "spaces. Only one of `token`, `token_file`, `token_env`"
            ),
            json_schema_extra={"x-default": "none"},
        ),
    ] = field(default="", repr=False)
    token_file: Annotated[
        FilePath | None,
        Field(
            description=(
                "the token read from this file (relative to the config file) at start and at "
                "every reload, so rotating it is: write the new token, reload. Refused (a "
                "config error) when the file is readable or writable by group or others "
                "(`mode & 0o077`; `chmod 600` it), empty, or not visible ASCII; one trailing "
                "newline is dropped"
            ),
        ),
    ] = None
    token_env: Annotated[
        EnvName | None,
        Field(
            description=(
                "the token read from this environment variable (a name like "
                "`LBPROXY_ADMIN_TOKEN`); unset or empty is a config error"
            ),
        ),
    ] = None
    token_for_reads: Annotated[
        Bool,
        Field(
            description=(
                "`true`: the token guards every page (`/`, `/status`, `/status/history`, "
                "`/metrics`), not only "
                "the writes and `/-/servers`; `/healthz` stays open. Needs a token"
            ),
        ),
    ] = False
    insecure: Annotated[
        Bool,
        Field(
            description=(
                "`true`: a `bind` off loopback without a token is meant (a trusted network); "
                "a warning is logged at every start and reload. Without it such a bind is a "
                "config error (`--check` exits 2)"
            ),
        ),
    ] = False
    allowed_hosts: Annotated[
        Annotated[tuple[AdminHost, ...], Items("host names")],
        Field(
            description=(
                "a list of host names (or IP addresses, no port) the admin answers to besides "
                "its own (see [Securing the admin listener](#securing-the-admin-listener)); "
                "any other `Host` gets 421"
            ),
        ),
    ] = ()
    tls: Annotated[
        Tls | None,
        Field(
            description=(
                "https on the admin listener: the same keys as "
                "[`listeners[].tls`](#listenerstls) (`cert`/`key` or `certificates`, "
                "`policy`, `client_ca`, `client_auth`). The files are checked at load (a bad "
                "one fails `--check` and the reload) and watched like a listener's: a renewed "
                "certificate is served after the automatic reload (the admin socket is opened "
                "again on the same address; a moment without the admin)"
            ),
        ),
    ] = None

    def insecure_warning(self) -> str | None:
        """The warning an open admin (``insecure: true``, no token) logs at every start and
        reload, or None."""
        if self.insecure and not self.token:
            return (
                f"admin.insecure: the admin on {self.bind} takes reloads and server changes "
                "from anyone who can reach it (no token); set admin.token_file to close it"
            )
        return None

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        sources = [k for k in ("token", "token_file", "token_env") if k in raw]
        if len(sources) > 1:
            out.append(((), f"{' and '.join(sources)}: give only one source of the token"))
        if not isinstance(value, Admin):
            return out
        if not sources and not value.insecure and not bind_is_loopback(value.bind):
            out.append(
                (
                    (),
                    f"bind {value.bind} is reachable from other machines and no token is set: "
                    "anyone reaching it could reload or drain every server. Set admin.token, "
                    "admin.token_file or admin.token_env (clients then send 'Authorization: "
                    "Bearer <token>'), bind to 127.0.0.1, or set admin.insecure: true if the "
                    "network is trusted",
                )
            )
        if value.token_for_reads and not sources:
            out.append(((), "token_for_reads: needs a token (token, token_file or token_env)"))
        return out


@declared
@dataclass(frozen=True, slots=True)
class AccessLog:
    enabled: Annotated[
        Bool,
        Field(
            description=(
                "one line per HTTP request (`time type=http client listener method path "
                "protocol status server upstream_time total_time bytes_in bytes_out`; "
                "`protocol` is the client's: `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`), one per "
                "WebSocket tunnel when it closes (`type=websocket`, `protocol=HTTP/1.1` and "
                "`status=101`, or `protocol=HTTP/2` and `status=200` for a WebSocket over "
                "HTTP/2, `duration`, `close_reason` as in "
                "`lbproxy_websocket_closes_total`, `messages_in`/`messages_out` data messages "
                "each way, `close_code` of the first close frame: `-` none passed, `none` one "
                "without a code). A response cut after it started (a backend closing or "
                "stalling mid-body until a timeout) gets its line too, with the status that "
                "started, and counts in `lbproxy_requests_total` likewise"
            ),
        ),
    ] = True
    format: Annotated[
        Annotated[str, choice("text", "json")],
        Field(
            description=("`text` (`key=value` pairs) or `json` (one object per line)"),
        ),
    ] = "text"
    path: Annotated[
        String,
        Field(
            description=(
                "file to append to; empty means stderr. Lines are written by a background "
                "thread, so a slow disk never stalls the proxy"
            ),
        ),
    ] = ""


@declared
@dataclass(frozen=True, slots=True)
class Cluster:
    """A fleet of instances sharing state through one Redis (``cluster``); the I/O is
    ``control.cluster``'s, the decisions ``core.fleet``'s."""

    redis: Annotated[
        RedisUrl,
        Field(
            description=(
                "the Redis every instance of the fleet uses: `redis://host:6379/0`, "
                "`rediss://host:6380/0` (TLS, checked against the system's CAs, or "
                "`?ssl_ca_certs=/path/ca.pem`) or `unix:///path/redis.sock`; a password goes "
                "in it (`redis://:secret@host:6379/0`, or `user:secret@` with Redis ACLs), "
                "never shown by `/status` or the logs"
            ),
        ),
    ]
    name: Annotated[
        Name | None,
        Field(
            description=(
                "this instance's name in the fleet (unique per instance; shown in "
                "`/-/cluster` and as who set an override)"
            ),
            json_schema_extra={"x-default": "the host name"},
        ),
    ] = None
    prefix: Annotated[
        KeyPrefix,
        Field(
            description=(
                "the start of every Redis key lbproxy writes, so fleets (or other users) can "
                "share one Redis"
            ),
        ),
    ] = "lbproxy:"

    _required = {"redis": "a Redis URL like redis://host:6379/0"}


@declared
@dataclass(frozen=True, slots=True)
class Config:
    listeners: Annotated[
        tuple[Listener, ...],
        Items("listeners", non_empty=True),
        Field(description="the listeners, see `listeners[]`"),
    ]
    server_groups: Annotated[
        tuple[ServerGroup, ...],
        GroupMap(),
        Field(description="the server groups by name, see `server_groups.<name>`"),
    ]
    admin: Annotated[Admin, Field(description="the admin listener, see `admin`")] = field(
        default_factory=Admin
    )
    access_log: Annotated[AccessLog, Field(description="the access log, see `access_log`")] = field(
        default_factory=AccessLog
    )
    shutdown_timeout: Annotated[
        Duration,
        Field(
            description=(
                "on SIGTERM/SIGINT, how long open WebSocket tunnels may go on before the "
                "proxy closes them (close frame 1001 both ways, then up to 2 s for the "
                "handshake)"
            ),
        ),
    ] = DEFAULT_SHUTDOWN_TIMEOUT
    resolvers: Annotated[
        Annotated[tuple[Resolver, ...], Items("like [127.0.0.1:53]")],
        Field(
            description=(
                "the name servers `discovery` asks, as a list of `ip` or `ip:port` "
                "(`[v6]:port`; port 53 by default); none: those of `/etc/resolv.conf`"
            ),
        ),
    ] = ()
    cluster: Annotated[
        Cluster | None,
        Field(
            description=(
                "several instances as one fleet through Redis: shared runtime overrides, "
                "fleet-wide `wlc` and a fleet view, see `cluster` and [Several "
                "instances](#several-instances). Without it each instance stands alone"
            ),
        ),
    ] = None
    # sha256 of the file's bytes; not part of equality, so a comment-only edit is a no-op reload.
    digest: SkipJsonSchema[str] = field(default="", compare=False)

    _internal = ("digest",)
    _required = {
        "listeners": "a list with at least one listener",
        "server_groups": "a mapping of group name to group",
    }

    def group(self, name: str) -> ServerGroup:
        for g in self.server_groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        """Links between sections. Every group *declared* counts, valid or not: a group with
        its own problems (reported already) must not also fail each listener that uses it."""
        out: list[Problem] = []
        groups = raw.get("server_groups")
        declared_groups = {str(k) for k in groups} if isinstance(groups, Mapping) else set()
        known = ", ".join(sorted(declared_groups)) or "none defined"
        listeners = raw.get("listeners")
        names: set[str] = set()
        binds: dict[Address, str] = {}
        for i, lst in enumerate(listeners if isinstance(listeners, list) else ()):
            if not isinstance(lst, Mapping):
                continue
            name = given(lst, "name", _name)
            if name is not None:
                if name in names:
                    out.append((("listeners", i, "name"), f"duplicate listener name {name!r}"))
                names.add(name)
            bind = given(lst, "bind", lambda v: parse_address(v, allow_port_zero=True))
            if bind is not None and bind.port != 0:  # port 0: a free port each, never a clash
                if bind in binds:
                    out.append(
                        (("listeners", i, "bind"), f"{bind} is already used by {binds[bind]}")
                    )
                else:
                    binds[bind] = f"listener {name}" if name is not None else f"listeners[{i}]"
            places: list[tuple[Loc, Any]] = [
                (("listeners", i, "server_group"), lst.get("server_group"))
            ]
            rules = lst.get("rules")
            for j, rule in enumerate(rules if isinstance(rules, list) else ()):
                if isinstance(rule, Mapping):
                    places.append(
                        (("listeners", i, "rules", j, "server_group"), rule.get("server_group"))
                    )
            for loc, group in places:
                if given({"g": group}, "g", _name) is not None and group not in declared_groups:
                    out.append((loc, f"no server group {group!r} (known: {known})"))
            limits = lst.get("limits")
            if (
                isinstance(limits, Mapping)
                and limits.get("scope") == "cluster"
                and not isinstance(raw.get("cluster"), Mapping)
            ):
                out.append(
                    (
                        ("listeners", i, "limits", "scope"),
                        "scope: cluster needs the top-level cluster (its Redis)",
                    )
                )
        admin = raw.get("admin")
        bind = (
            given(admin, "bind", lambda v: parse_address(v, allow_port_zero=True))
            if isinstance(admin, Mapping)
            else None
        )
        if bind is None and not (isinstance(admin, Mapping) and "bind" in admin):
            bind = Admin().bind
        if bind is not None and bind.port != 0 and bind in binds:
            out.append((("admin", "bind"), f"{bind} is already used by {binds[bind]}"))
        return out


# The whole document: ``CONFIG.validate_python(doc)`` validates it, ``CONFIG.json_schema()``
# describes it.
CONFIG: TypeAdapter[Config] = TypeAdapter(Config)


SERVER_CHANGE: TypeAdapter[ServerChange] = TypeAdapter(ServerChange)
SHED_REQUEST: TypeAdapter[ShedRequest] = TypeAdapter(ShedRequest)


def parse_config(doc: Any) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem found."""
    if doc is None:
        raise ConfigError(["the config file is empty"])
    try:
        return CONFIG.validate_python(doc)
    except ValidationError as exc:
        problems = sorted(problems_of(exc), key=lambda p: _position(doc, p[0]))
        raise ConfigError([_problem(loc, message) for loc, message in problems]) from None


def _problem(loc: Loc, message: str) -> str:
    place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")
    return f"{place}: {message}" if place else message


def _position(doc: Any, loc: Loc) -> tuple[int, ...]:
    """Where ``loc`` is written in ``doc``: the index of each step in its mapping or list; a
    step the document does not have (a required key left out) sorts after what it has, and a
    problem of a whole section after those inside it."""
    out: list[int] = []
    node = doc
    for step in loc:
        if isinstance(node, Mapping) and step in node:
            out.append(list(node).index(step))
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            out.append(step)
            node = node[step]
        else:
            out.append(len(node) if isinstance(node, Mapping | list) else 0)
            return tuple(out)
    # A problem of a whole section comes after the problems inside it.
    return (*out, 1 << 30) if isinstance(node, Mapping | list) else tuple(out)


def parse_server_change(body: Any) -> tuple[list[str], ServerChange | None]:
    """A runtime API body (``admin``): (problems, the change); every problem at once."""
    try:
        return [], SERVER_CHANGE.validate_python(body)
    except ValidationError as exc:
        return [_problem(loc, message) for loc, message in problems_of(exc)], None


def parse_shed(body: Any) -> tuple[list[str], ShedRequest | None]:
    """A ``POST /-/servers/.../shed`` body (``admin``): (problems, the request)."""
    try:
        return [], SHED_REQUEST.validate_python(body)
    except ValidationError as exc:
        return [_problem(loc, message) for loc, message in problems_of(exc)], None
