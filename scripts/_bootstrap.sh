# Shared by scripts/demo and scripts/test: make this checkout runnable on a fresh machine.
# Installs Debian packages when missing (as root, or through sudo) and the Python packages
# into a local virtual environment, .venv/, that nothing else on the machine sees.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
VENV27="$ROOT/.venv27"
_apt_updated=0

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# ensure_apt BINARY:PACKAGE ...  — install PACKAGE when BINARY is not on the PATH.
ensure_apt() {
    local missing=()
    for pair in "$@"; do
        local bin="${pair%%:*}" pkg="${pair##*:}"
        command -v "$bin" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_install "${missing[@]}"
}

# apt_install PACKAGE ...  — install Debian packages (as root, or through sudo).
apt_install() {
    local missing=("$@")
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            say "missing Debian packages: ${missing[*]} (not root and no sudo: install them yourself)"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing packages: ${missing[*]} (no apt-get here: install them yourself)"
        return 1
    fi
    say "installing Debian packages: ${missing[*]}"
    if [ "$_apt_updated" -eq 0 ]; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        _apt_updated=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# ensure_build_tools  — what compiling the hot modules needs: a C compiler and the headers of
# the Python that runs lbproxy. Without them setup.py falls back to the pure-Python build.
ensure_build_tools() {
    local py="${PYTHON:-python3}"
    ensure_apt gcc:gcc || return 0
    "$py" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || apt_install python3-dev || true
}

# ensure_venv  — .venv with exactly the packages of requirements.lock (hash-checked; the same
# for scripts/test and scripts/demo, so either one's install and build serve the other),
# lbproxy installed editable, and the in-place build current (scripts/build.py: compiled, or
# pure with LBPROXY_PURE=1). Installs again only when the lock's content changed.
ensure_venv() {
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "lbproxy needs Python 3.11 or newer ($py is $("$py" --version 2>&1))"
        return 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            apt_install python3-venv
            "$py" -m venv "$VENV"
        fi
    fi
    "$VENV/bin/python" "$ROOT/scripts/build.py" --install
}

# ensure_venv27  — .venv27: a Python 2.7 virtualenv with Autobahn|Testsuite's wstest, which
# runs on nothing newer (tests/integration/test_autobahn.py). The interpreter is pyenv's 2.7
# ($PYTHON27 overrides); without one this fails: it is not on PyPI and nothing here can build it.
ensure_venv27() {
    local py="${PYTHON27:-${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python2.7}"
    local reqs="$ROOT/scripts/autobahn-requirements.txt"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
        say "the Autobahn|Testsuite test needs Python 2.7: $py is missing or not 2.7"
        say "install it with 'pyenv install 2.7.18', or point PYTHON27 at a python2.7"
        return 1
    fi
    if [ ! -x "$VENV27/bin/python" ]; then
        # virtualenv (its last release that runs on 2.7) from a throwaway folder, so that
        # nothing is installed into pyenv's own 2.7.
        local tool
        tool="$(mktemp -d)"
        say "creating .venv27 (Python 2.7, for Autobahn|Testsuite)"
        _pip27 "$py" --target "$tool" "virtualenv==20.15.1"
        PYTHONPATH="$tool" "$py" -m virtualenv -q --no-download "$VENV27" >/dev/null
        rm -rf "$tool"
    fi
    # Installed again when the requirements' content changes (not their mtime: a checkout or a
    # fresh clone touches them); hash-checked, like requirements.lock for .venv.
    local stamp="$VENV27/.installed-autobahn" digest
    digest="$("$py" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$reqs")"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
        say "installing Autobahn|Testsuite into .venv27 (compiles a few C extensions: ~2 min)"
        rm -f "$stamp"
        _pip27 "$VENV27/bin/python" --require-hashes -r "$reqs" || return 1
        "$VENV27/bin/wstest" --autobahnversion >/dev/null || return 1
        echo "$digest" >"$stamp"
    fi
}

# _pip27 PYTHON ARGS...  — pip install on Python 2.7, quiet about 2.7's end of life and about
# find-links folders that list no such package.
_pip27() {
    local py="$1"
    shift
    PIP_NO_PYTHON_VERSION_WARNING=1 "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v -e 'is ignored: it is neither a file' -e '^DEPRECATION: Python 2.7' || true; } >&2
}
