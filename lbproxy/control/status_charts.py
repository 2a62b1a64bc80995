"""The status page's charts: the style and the small inline script that draws them.

Owns the drawing only. The script reads the history the page carries (``#history-data``, the
fine resolution of ``GET /status/history``) and draws inline SVG: per server group a row of
charts (requests and errors per second, latency p50/p99, connections and tunnels, WebSocket
messages per second both ways summed with a line per server), one row per listener
(requests, WebSocket messages both ways, closes by code class), and a sparkline of requests
per second in each server's table row. Events are vertical marks on the same time axis, their
text in an SVG ``<title>`` (shown on hover). A missing point (no data, a server down) breaks
the line: the gap is visible. Colours come from CSS variables with a dark scheme, and the
grid folds to one column on a phone. Nothing is fetched from anywhere.

Each drawn line carries ``data-series`` (its name), ``data-points`` (its non-empty points)
and ``data-runs`` (its unbroken stretches) so a test can read what is drawn.
"""

from __future__ import annotations

CHART_CSS = """
:root{color-scheme:light dark;--fg:#222;--muted:#666;--bg:#fafafa;--card:#fff;--grid:#ddd;
--c0:#1565c0;--c1:#c62828;--c2:#ef6c00;--c3:#2e7d32;
--ev-health:#c62828;--ev-reload:#6a1b9a;--ev-drain:#1565c0;--ev-rebalance:#2e7d32;--ev-api:#00838f;
--ev-worker:#ef6c00;--ev-dns:#558b2f}
@media (prefers-color-scheme: dark){
:root{--fg:#e6e6e6;--muted:#aaa;--bg:#16181c;--card:#1f2227;--grid:#3a3f47;
--c0:#64b5f6;--c1:#ef5350;--c2:#ffb74d;--c3:#81c784;
--ev-health:#ef5350;--ev-reload:#ce93d8;--ev-drain:#64b5f6;--ev-rebalance:#81c784;--ev-api:#4dd0e1;
--ev-worker:#ffb74d;--ev-dns:#aed581}
body{color:var(--fg);background:var(--bg)} table{background:var(--card)}
th{background:#2a2e35} th,td{border-color:#3a3f47} .meta,h1 .build{color:var(--muted)}
tr.down td{background:#3b1f1f} tr.unknown td{background:#3a3320} td.rate{color:var(--c0)}}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:.8em;
margin:.4em 0 1em}
.chart{background:var(--card);border:1px solid var(--grid);border-radius:4px;padding:.4em}
.chart h3{font-size:.9em;margin:0 0 .2em;font-weight:600}
.chart svg{width:100%;height:auto;display:block;overflow:visible}
.chart .axis{fill:var(--muted);font-size:10px} .chart .gridline{stroke:var(--grid)}
.line{fill:none;stroke-width:1.6;vector-effect:non-scaling-stroke}
.s0{stroke:var(--c0)} .s1{stroke:var(--c1)} .s2{stroke:var(--c2)} .s3{stroke:var(--c3)}
.legend{font-size:.8em;color:var(--muted)} .legend i{display:inline-block;width:.9em;
height:.25em;margin:0 .3em .2em .6em;vertical-align:middle}
.k0{background:var(--c0)} .k1{background:var(--c1)} .k2{background:var(--c2)}
.k3{background:var(--c3)}
.event{stroke-width:1.5;stroke-dasharray:3 2;vector-effect:non-scaling-stroke}
.event:hover{stroke-width:4}
.ev-health{stroke:var(--ev-health)} .ev-reload{stroke:var(--ev-reload)}
.ev-drain{stroke:var(--ev-drain)} .ev-rebalance{stroke:var(--ev-rebalance)}
.ev-api{stroke:var(--ev-api)} .ev-worker{stroke:var(--ev-worker)} .ev-dns{stroke:var(--ev-dns)}
td.spark{min-width:110px;padding:0 .3em} td.spark svg{width:110px;height:22px;display:block}
@media (max-width:700px){body{margin:.6em} table{font-size:.8em;display:block;overflow-x:auto}}
"""

# Drawn with DOM calls only (no innerHTML): the event texts come from config and backends.
CHART_SCRIPT = """
(function () {
  var el = document.getElementById("history-data"), h = null;
  try { h = JSON.parse(el.textContent); } catch (e) {}
  if (!h || !h.resolution || !h.resolution.times.length) return;
  var NS = "http://www.w3.org/2000/svg", res = h.resolution, times = res.times;
  var t0 = times[0], t1 = Math.max(h.time, times[times.length - 1]);
  if (!(t1 > t0)) t1 = t0 + res.interval;
  function svg(tag, attrs, parent) {
    var n = document.createElementNS(NS, tag);
    for (var k in attrs) n.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(n);
    return n;
  }
  function html(tag, cls, text, parent) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text) n.textContent = text;
    if (parent) parent.appendChild(n);
    return n;
  }
  function fmt(v) {
    if (v >= 100) return Math.round(v) + "";
    if (v >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }
  function clock(t) {
    var d = new Date(t * 1000);
    var two = function (n) { return ("0" + n).slice(-2); };
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  // One line per series: a path broken wherever a value is null.
  function draw(root, W, H, pad, lines, scale, events) {
    var max = 0;
    lines.forEach(function (l) {
      l.values.forEach(function (v) { if (v !== null && v * scale > max) max = v * scale; });
    });
    if (!(max > 0)) max = 1;
    var x = function (t) { return pad + (W - pad - 2) * (t - t0) / (t1 - t0); };
    var y = function (v) { return H - 12 - (H - 16) * v * scale / max; };
    if (pad) {
      var top = y(max / scale);
      svg("line", {"class": "gridline", x1: pad, x2: W, y1: top, y2: top}, root);
      svg("line", {"class": "gridline", x1: pad, x2: W, y1: H - 12, y2: H - 12}, root);
      svg("text", {"class": "axis", x: 0, y: top + 4}, root).textContent = fmt(max);
      svg("text", {"class": "axis", x: 0, y: H - 9}, root).textContent = "0";
      svg("text", {"class": "axis", x: pad, y: H}, root).textContent = clock(t0);
      var end = svg("text", {"class": "axis", x: W, y: H, "text-anchor": "end"}, root);
      end.textContent = clock(t1);
    }
    (events || []).forEach(function (e) {
      if (e.time < t0 || e.time > t1) return;
      var m = svg("line", {"class": "event ev-" + e.kind, "data-kind": e.kind,
        x1: x(e.time), x2: x(e.time), y1: 2, y2: H - 12}, root);
      svg("title", {}, m).textContent = clock(e.time) + " " + e.kind + ": " + e.text;
    });
    lines.forEach(function (l, i) {
      var d = "", points = 0, runs = 0, pen = false;
      l.values.forEach(function (v, j) {
        if (v === null || times[j] === null) { pen = false; return; }
        d += (pen ? "L" : "M") + x(times[j]).toFixed(1) + " " + y(v).toFixed(1);
        if (!pen) runs++;
        pen = true;
        points++;
      });
      svg("path", {"class": "line s" + (l.color === undefined ? i : l.color), d: d || "M0 0",
        "data-series": l.name, "data-points": points, "data-runs": runs}, root);
    });
  }
  function chart(row, title, lines, scale, events) {
    var box = html("div", "chart", "", row);
    box.dataset.chart = title;
    html("h3", "", title, box);
    var W = 400, H = 130;
    var root = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img"}, box);
    svg("title", {}, root).textContent = title;
    draw(root, W, H, 28, lines, scale, events);
    var legend = html("div", "legend", "", box);
    lines.forEach(function (l, i) {
      html("i", "k" + (l.color === undefined ? i : l.color), "", legend);
      legend.appendChild(document.createTextNode(l.name));
    });
  }
  function pick(entity, names, labels) {
    return names.map(function (n, i) {
      return {name: labels ? labels[i] : n, values: entity.series[n]};
    });
  }
  var charts = document.getElementById("charts");
  var events = h.events || [];
  Object.keys(res.groups).sort().forEach(function (name) {
    var g = res.groups[name];
    var mine = events.filter(function (e) { return !e.group || e.group === name; });
    html("h3", "", "Server group " + name, charts);
    var row = html("div", "charts", "", charts);
    row.dataset.group = name;
    chart(row, "requests and errors /s", pick(g, ["requests", "errors_5xx", "connect_failures"],
      ["requests", "5xx", "failed connects"]), 1, mine);
    chart(row, "latency (ms)", pick(g, ["p50", "p99"]), 1000, mine);
    chart(row, "connections and tunnels", pick(g, ["connections", "tunnels"]), 1, mine);
    var servers = Object.keys(res.servers).sort().map(function (id) { return res.servers[id]; })
      .filter(function (s) { return s.group === name; });
    if (servers.length) {
      chart(row, "WebSocket messages /s by server", servers.map(function (s, k) {
        return {name: s.address, values: s.series.ws_messages, color: k % 4};
      }), 1, mine);
    }
  });
  Object.keys(res.listeners).sort().forEach(function (name) {
    var l = res.listeners[name];
    var mine = events.filter(function (e) { return !e.group || e.group === l.group; });
    html("h3", "", "Listener " + name, charts);
    var row = html("div", "charts", "", charts);
    row.dataset.listener = name;
    chart(row, "requests and 5xx /s", pick(l, ["requests", "errors_5xx"], ["requests", "5xx"]),
      1, mine);
    chart(row, "WebSocket messages /s", pick(l, ["ws_messages_in", "ws_messages_out"],
      ["client to server", "server to client"]), 1, mine);
    chart(row, "WebSocket closes /s by code", pick(l, ["closes_1000", "closes_1001",
      "closes_1006", "closes_other"], ["1000", "1001", "1006", "other"]), 1, mine);
  });
  var span = res.interval * res.points, unit = span >= 120 ? 60 : 1;
  document.getElementById("history-title").textContent = "Last " + Math.round(span / unit) +
    (unit === 60 ? " minutes" : " seconds") + " (a point every " + res.interval + " s)";
  document.getElementById("history").hidden = false;
  var cells = document.querySelectorAll("td.spark");
  for (var i = 0; i < cells.length; i++) {
    var s = res.servers[cells[i].dataset.id];
    if (!s) continue;
    var root = svg("svg", {viewBox: "0 0 110 22", preserveAspectRatio: "none"}, cells[i]);
    svg("title", {}, root).textContent = "requests/s, last 15 minutes";
    var own = events.filter(function (e) { return e.server === s.id; });
    draw(root, 110, 22 + 12, 0, [{name: "requests", values: s.series.requests}], 1, own);
  }
})();
"""
