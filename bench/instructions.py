"""User-space instructions per proxied HTTP request and per WebSocket connection, counted by
callgrind: a figure that the machine's noise does not move.

``bench.run`` measures CPU time, which is what the budgets are about, but on a shared 2-core VM
the same build's figure moves by 10-30% between rounds, more than most single changes are
worth. Callgrind counts the instructions the proxy's process executes (the kernel's work is not
in it: the system calls and the TCP stack, about half of the CPU time per request), and the
count repeats to within a fraction of a percent whatever else the machine does. Use it to tell
whether a change to the proxy's own code made it cheaper; use ``bench.run`` for the budgets.

Each target runs under ``valgrind --tool=callgrind`` (about 50 times slower), on the same
backends as ``bench.run`` (two nginx HTTP backends, two ``bench.wsecho``): warmed with load
until it has finished starting, its counters zeroed, then loaded for ``--seconds``, then its
counters dumped. The load: ``wrk`` with its plain request (``http``), the same with the ten
browser-like header lines (``http10``), and ``bench.wsload churn`` (``churn``: connect,
upgrade, one echo, close). nginx runs as one process (``master_process off``) so that its one
process is the one counted.

Run (from the repository root):

    .venv/bin/python -m bench.instructions [--baseline DIR] [--only lbproxy,baseline,nginx]
        [--shapes http,http10,churn] [--seconds 6]

Not a test. Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (
    BROWSER_HEADERS,
    TARGET_CLASSES,
    Backends,
    Baseline,
    Pinning,
    Procs,
    Target,
    running,
    wait_port,
    wrk,
)

SHAPES = ("http", "http10", "churn")
WARMUP = 12.0  # seconds of load before counting: lbproxy under callgrind starts slowly
CONNS = 8  # wrk connections (callgrind serialises the proxy: more only queue)
CHURN_CONNS = 4


def log(msg: str) -> None:
    print(f"[instructions {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def command(target: Target) -> list[str]:
    cmd = target.command()
    if target.name == "nginx":
        i = cmd.index("-g")
        cmd[i + 1] = "daemon off; master_process off;"
    return cmd


def load(target: Target, shape: str, seconds: float) -> int:
    """Run one load shape for ``seconds``; how many requests or connections it made."""
    if shape == "churn":
        out = subprocess.run(
            [sys.executable, "-m", "bench.wsload", "churn", "--target", target.ws_targets,
             "--conns", str(CHURN_CONNS), "--duration", str(seconds)],
            capture_output=True, text=True, timeout=seconds + 120,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if result.get("failed"):
            log(f"{target.name}: {result['failed']} WebSocket connections failed")
        return int(result["connections"])
    headers = BROWSER_HEADERS if shape == "http10" else ()
    w = wrk(target.http_url, seconds, conns=CONNS, headers=headers)
    if w.errors:
        log(f"{target.name}: {w.errors}")
    return w.requests


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True, timeout=60)


def totals(path: Path) -> int:
    """The instruction count of a callgrind dump (its ``totals:`` or ``summary:`` line)."""
    for _ in range(100):  # the dump is written by the process: wait for it
        if path.exists():
            text = path.read_text(errors="replace")
            m = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
            if m:
                return int(m.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind dump at {path}")


def measure(target: Target, shapes: tuple[str, ...], seconds: float) -> dict[str, float]:
    """Instructions per request (http, http10) or per WebSocket connection (churn)."""
    out = target.tmp / "callgrind.out"
    proc = target.procs.start(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *command(target)],
        target.tmp / "stderr.log",
    )
    try:
        wait_port(target.http_port, proc, target.name, timeout=180)
        wait_port(target.ws_port, proc, target.name, timeout=180)
        load(target, "http", WARMUP)
        load(target, "churn", 2)
        figures: dict[str, float] = {}
        for n, shape in enumerate(shapes, 1):
            control("-z", str(proc.pid))
            count = load(target, shape, seconds)
            control("-d", str(proc.pid))
            instructions = totals(Path(f"{out}.{proc.pid}.{n}"))
            figures[shape] = instructions / max(count, 1)
            log(f"{target.name} {shape}: {count:,} in {seconds:g}s, {figures[shape]:,.0f} a one")
        return figures
    finally:
        target.procs.stop(proc)


ROWS = {
    "http": "user-space instructions per HTTP request (wrk's)",
    "http10": "the same, 10 browser-like header lines",
    "churn": "user-space instructions per WebSocket connection (connect, echo, close)",
}


def table(results: dict[str, dict[str, float]], shapes: tuple[str, ...]) -> str:
    names = list(results)
    head = "| figure | " + " | ".join(names) + " |"
    ratios = [n for n in names if n != "nginx" and "nginx" in results]
    if ratios:
        head += " " + " | ".join(f"{n}/nginx" for n in ratios) + " |"
    if "lbproxy" in results and "baseline" in results:
        head += " lbproxy/baseline |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for shape in shapes:
        row = f"| {ROWS[shape]} | " + " | ".join(f"{results[n][shape]:,.0f}" for n in names) + " |"
        for n in ratios:
            row += f" {results[n][shape] / results['nginx'][shape]:.2f}x |"
        if "lbproxy" in results and "baseline" in results:
            row += f" {results['lbproxy'][shape] / results['baseline'][shape]:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="lbproxy,nginx")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--baseline", type=Path, help="another checkout, with its .venv")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    shapes = tuple(args.shapes.split(","))
    names = args.only.split(",")
    if args.baseline is not None and "baseline" not in names:
        names.append("baseline")
    Baseline.tree = args.baseline.resolve() if args.baseline is not None else None
    procs = Procs()
    pinning = Pinning(set(), set())  # instructions do not depend on where a process runs
    with running(procs), tempfile.TemporaryDirectory(prefix="lbproxy-instr-") as d:
        tmp = Path(d)
        backends = Backends()
        backends.start(procs, tmp)
        results: dict[str, dict[str, float]] = {}
        for name in names:
            target = TARGET_CLASSES[name](backends, procs, pinning, tmp)
            why = target.available()
            if why is not None:
                log(f"{name}: skipped ({why})")
                continue
            results[name] = measure(target, shapes, args.seconds)
        print(table(results, shapes))


if __name__ == "__main__":
    main()
