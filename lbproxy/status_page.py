"""The HTML status page: the /status data as one self-refreshing page a person reads at a glance.

Owns the markup only (no data gathering, no I/O): a table per server group with a row per
server, coloured by state, and the listeners with their connection counts. Every value is
HTML-escaped; the page loads nothing from elsewhere.
"""

from __future__ import annotations

import html
import time
from typing import Any

REFRESH_SECONDS = 2

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;min-width:60%;background:#fff}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.up td.state{background:#2e7d32;color:#fff;font-weight:bold}
tr.down td.state{background:#c62828;color:#fff;font-weight:bold}
tr.unknown td.state{background:#f9a825;color:#000;font-weight:bold}
.bad{color:#c62828;font-weight:bold}
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def render_status_page(st: dict[str, Any]) -> str:
    rows: list[str] = []
    add = rows.append
    add("<!doctype html><html lang=en><head><meta charset=utf-8>")
    add(f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">')
    add("<title>lbproxy status</title>")
    add(f"<style>{_CSS}</style></head><body>")
    add(f"<h1>lbproxy {_e(st['version'])}</h1>")
    rl = st["last_reload"]
    reload_text = "ok" if rl["success"] else '<span class="bad">FAILED</span>'
    add(
        f"<div class=meta>pid {_e(st['pid'])} · config {_e(st['config']['path'])} "
        f"sha256 {_e((st['config']['sha256'] or '')[:12])} · last reload "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rl['time'])))} {reload_text}"
        f" · refreshes every {REFRESH_SECONDS}s</div>"
    )
    if not rl["success"]:
        add(f"<pre class=bad>{_e(rl['message'])}</pre>")

    add("<h2>Listeners</h2><table><tr><th>name</th><th>bind</th><th>group</th>")
    add("<th>connections</th><th>websockets</th><th>accepted</th><th>requests</th>")
    add("<th>idle timeout</th></tr>")
    for lst in st["listeners"]:
        add(
            f"<tr class=listener><td>{_e(lst['name'])}</td><td>{_e(lst['bind'])}</td>"
            f"<td>{_e(lst['server_group'])}</td>"
            f"<td class=num>{_e(lst['connections_active'])}</td>"
            f"<td class=num>{_e(lst['websockets_active'])}</td>"
            f"<td class=num>{_e(lst['connections_total'])}</td>"
            f"<td class=num>{_e(lst['requests_total'])}</td>"
            f"<td class=num>{_e(lst['idle_timeout'])} s</td></tr>"
        )
    add("</table>")

    for g in st["server_groups"]:
        total = len(g["servers"])
        add(
            f"<h2>Server group {_e(g['name'])} <span class=meta>({_e(g['scheduler'])}, "
            f"{_e(g['servers_up'])}/{total} up)</span></h2>"
        )
        add("<table><tr><th>server</th><th>state</th><th>weight</th><th>last check</th>")
        add("<th>latency</th><th>open</th><th>websockets</th><th>ws total</th>")
        add("<th>requests</th><th>errors</th><th>checks ok/failed</th></tr>")
        for s in g["servers"]:
            errors = sum(s["upstream_errors"].values())
            hc = s["health_checks"]
            add(
                f"<tr class='server {_e(s['state'])}' data-server='{_e(s['address'])}'>"
                f"<td>{_e(s['address'])}</td><td class=state>{_e(s['state']).upper()}</td>"
                f"<td class=num>{_e(s['weight'])}</td>"
                f"<td>{_e(s['last_check'] if s['checked'] else 'checks disabled')}</td>"
                f"<td class=num>{_ms(s['last_check_latency'])}</td>"
                f"<td class=num>{_e(s['active_connections'])}</td>"
                f"<td class=num>{_e(s['websockets_active'])}</td>"
                f"<td class=num>{_e(s['websockets_total'])}</td>"
                f"<td class=num>{_e(s['requests_total'])}</td>"
                f"<td class=num>{_e(errors)}</td>"
                f"<td class=num>{_e(hc['success'])}/{_e(hc['failure'])}</td></tr>"
            )
        add("</table>")
    add("</body></html>")
    return "".join(rows)
