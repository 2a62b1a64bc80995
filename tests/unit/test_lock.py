"""requirements.lock (what scripts/test, scripts/demo and CI install) against pyproject.toml.

pyproject.toml keeps ranges, for those who install lbproxy into an environment of their own;
the lock, which ``scripts/lock`` writes, picks one version in each, with hashes. These tests
fail when the two drift apart: a requirement added, dropped, moved or narrowed in pyproject.toml
without ``scripts/lock`` run after it. Transitive packages are the lock's own business.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
RELOCK = "pyproject.toml and requirements.lock disagree: run scripts/lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?:\s*;[^\\]*)?\s*\\?$")
VIA = re.compile(r"^\s+#\s+(?:via\s+)?(\S.*)$")
HASH = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}\b")


@dataclass
class Pin:
    version: Version
    via: set[str] = field(default_factory=set)  # "-r extra-test.in" or the requiring package
    hashes: int = 0


def read_lock(text: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if m := PIN.match(line):
            current = pins[canonicalize_name(m[1])] = Pin(Version(m[2]))
        elif current is not None and HASH.match(line):
            current.hashes += 1
        elif current is not None and (m := VIA.match(line)):
            if m[1].strip() != "via":  # "# via" alone: the list follows, one per line
                current.via.add(m[1].strip())
        else:
            raise AssertionError(f"requirements.lock line {n}: unexpected {line!r}")
    return pins


def sections() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements by the input file scripts/lock makes for each section."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    out = {
        "dependencies.in": pyproject["project"]["dependencies"],
        "build-system.in": pyproject["build-system"]["requires"],
        "pip.in": ["pip"],  # the venv's installer is pinned too
    }
    for extra, reqs in pyproject["project"]["optional-dependencies"].items():
        out[f"extra-{extra}.in"] = reqs
    return {name: [Requirement(r) for r in reqs] for name, reqs in out.items()}


def test_every_requirement_of_pyproject_is_pinned_within_its_range() -> None:
    pins = read_lock(LOCK.read_text())
    for section, reqs in sections().items():
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate({"python_version": "3.11"}):
                continue
            pin = pins.get(canonicalize_name(req.name))
            assert pin is not None, f"{req} ({section}) is not in requirements.lock: {RELOCK}"
            assert req.specifier.contains(pin.version, prereleases=True), (
                f"requirements.lock pins {req.name}=={pin.version}, outside {req} ({section}): "
                + RELOCK
            )
            assert f"-r {section}" in pin.via, f"{req} ({section}) was not locked so: {RELOCK}"


def test_the_lock_asks_for_nothing_that_pyproject_does_not() -> None:
    asked = {
        (canonicalize_name(r.name), f"-r {section}")
        for section, reqs in sections().items()
        for r in reqs
    }
    for name, pin in read_lock(LOCK.read_text()).items():
        assert pin.via, f"requirements.lock: {name} says nothing of why it is there: {RELOCK}"
        for source in (v for v in pin.via if v.startswith("-r ")):
            assert (name, source) in asked, f"{name} ({source[3:]}) is no longer asked: {RELOCK}"


def test_every_pin_is_exact_and_hash_checked_and_names_no_index() -> None:
    text = LOCK.read_text()
    pins = read_lock(text)
    assert len(pins) > 20  # read at all: the lock has every transitive package
    for name, pin in pins.items():
        assert pin.hashes, f"requirements.lock: {name} has no hash"
    options = [ln for ln in text.splitlines() if ln.startswith("-")]
    assert options == [], f"requirements.lock must name no index or option: {options}"
    assert "://" not in text


def test_the_lock_reader_catches_drift() -> None:
    """The checks above can fail: a lock that pins outside a range, or an unasked package."""
    lock = read_lock(
        "aiohttp==3.8.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via -r dependencies.in\n"
        "left-pad==1.0 \\\n    --hash=sha256:" + "b" * 64 + "\n    # via\n"
        "    #   -r extra-test.in\n    #   aiohttp\n"
    )
    aiohttp = Requirement("aiohttp>=3.9,<4")
    assert not aiohttp.specifier.contains(lock["aiohttp"].version)
    assert lock["left-pad"].via == {"-r extra-test.in", "aiohttp"}
    assert "left-pad" not in {canonicalize_name(r.name) for r in sections()["extra-test.in"]}
