"""How a leaf value of the config file is declared: ``Leaf``, the ``Annotated`` metadata of a
leaf type. Each leaf value (``30s``, ``1MiB``, ``host:port``, a name...) is parsed by a function
from a YAML value to the runtime value that raises ValueError with a message written for the
person editing the file, and declared as ``Annotated[<runtime type>, Leaf(<parser>, <kind>,
<JSON schema>)]``, so a key's type says at once how it is parsed, its bounds and unit, and what
an editor may offer (``60``, ``"30s"``; ``8192``, ``"8KiB"``). The leaf types, by kind:
``quantities`` (durations, sizes, bandwidths, rates, numbers in bounds), ``addresses``
(host:port, name servers, CIDRs, hosts, DNS names, Redis URLs) and ``words`` (names, strings,
paths, tokens, secrets, choices, lists).

Pure: no I/O, no YAML. The leaf modules import no other declaration module (only this one,
``model`` and ``wire``), so the declarations (``sections``, ``groups``, ``listeners``, ``top``)
sit right above them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

STR: dict[str, Any] = {"type": "string"}  # the JSON schema of a leaf that is any string


class Leaf:
    """``Annotated`` metadata of a leaf value: ``parse`` validates and converts it (its
    ValueError is the problem's message), ``schema`` is the JSON schema of what it accepts and
    ``kind`` names it in the README (``duration``, ``size 64 B..1 MiB``...)."""

    def __init__(self, parse: Callable[[Any], Any], kind: str, schema: dict[str, Any]) -> None:
        self.parse = parse
        self.kind = kind
        self.schema = schema

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.parse)

    def __get_pydantic_json_schema__(
        self, cs: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**self.schema, "x-kind": self.kind}
