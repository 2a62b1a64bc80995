"""``deploy/grafana/lbproxy.json`` and ``deploy/prometheus/alerts.yml`` (issue 23).

- the alert rules pass ``promtool check rules`` and their unit tests ``promtool test rules``
  (Debian's ``prometheus`` package, installed by scripts/test; missing, the test fails);
- the dashboard is importable: a datasource variable every query uses, job and instance
  variables every query filters on;
- every metric name and label the dashboard's and the rules' PromQL name is one a running
  lbproxy's ``/metrics`` exports (a renamed metric or label fails here, not on a screen).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.control.metric_families import FAMILIES
from tests.support import config_doc, proxy_url

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "lbproxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
# Labels Prometheus adds to every series it scrapes (the target's), and its own metric `up`.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_METRICS = {"up": {"job", "instance"}}

_METRIC = re.compile(r"\b(lbproxy_[a-z0-9_]+|up)\b(?!\s*\()")
_SELECTOR = re.compile(r"\b(lbproxy_[a-z0-9_]+|up)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install it with `apt-get install -y prometheus` "
            "(scripts/test does this)",
            pytrace=False,
        )
    return path


def run(*args: str) -> str:
    done = subprocess.run(args, cwd=ALERTS.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    assert "SUCCESS: 9 rules found" in run(tool, "check", "rules", str(ALERTS))
    assert "SUCCESS" in run(tool, "test", "rules", str(ALERTS_TEST))


def test_promtool_test_rules_fails_a_rule_that_does_not_fire(tmp_path: Path) -> None:
    # The unit tests can fail: the same tests against rules whose 5xx threshold is 50%.
    tool = promtool()
    text = ALERTS.read_text().replace(") > 0.05", ") > 0.5")
    assert text != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(text)
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST.read_text())
    done = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0 and "LbproxyHigh5xxRatio" in done.stdout + done.stderr


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_the_rules_cover_what_the_issue_asks() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert names == {
        "LbproxyGroupNoServerUp",
        "LbproxyServerDown",
        "LbproxyHigh5xxRatio",
        "LbproxyWebSocketAbnormalCloses",
        "LbproxyConfigReloadFailed",
        "LbproxyCertificateExpiresSoon",
        "LbproxyCertificateExpired",
        "LbproxyFleetDegraded",
        "LbproxyClusterRedisDown",
    }
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    assert tested == names  # every rule has unit tests


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in dash["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_importable_with_datasource_job_and_instance_variables() -> None:
    dash = dashboard()
    assert dash["uid"] == "lbproxy" and dash["title"] == "lbproxy" and dash["schemaVersion"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # Every query is scoped to the chosen job and instance.
            for _, matchers in _SELECTOR.findall(t["expr"]):
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, t
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in (
        "requests",
        "5xx",
        "duration",
        "tunnels",
        "messages",
        "close codes",
        "backend state",
        "drain",
        "dns",
        "tls handshake",
        "certificates",
    ):
        assert topic in titles, topic


def exported(metrics_text: str) -> dict[str, set[str]]:
    """Sample name -> its labels, as /metrics says: the labels of the samples it has, and for
    a family with none yet (no DNS discovery in this run, say) the ones it declares."""
    declared = {f.name: set(f.labels) for f in FAMILIES}
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(metrics_text):
        names = {
            "counter": [fam.name + "_total"],
            "histogram": [fam.name + s for s in ("_bucket", "_sum", "_count")],
        }.get(fam.type, [fam.name])
        for name in names:
            seen = {k for s in fam.samples if s.name == name for k in s.labels}
            out[name] = (seen or declared[fam.name]) - {"le"}
            if name.endswith("_bucket"):
                out[name].add("le")
    return out


def queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every query in the dashboard and the rules."""
    dash = dashboard()
    out = [
        (f"panel {p['title']!r}", t["expr"], t.get("legendFormat", ""))
        for p in dash["panels"]
        for t in p.get("targets", [])
    ]
    for a in dash["annotations"]["list"]:
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"], ""))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
            assert m, v["query"]
            out.append((f"variable {v['name']}", f"sum by ({m.group(2)}) ({m.group(1)})", ""))
    out += [(f"alert {r['alert']}", r["expr"], "") for r in alert_rules()]
    return out


def problems_of(expr: str, legend: str, metrics: dict[str, set[str]]) -> list[str]:
    problems: list[str] = []
    names = set(_METRIC.findall(expr))
    if not names:
        return ["names no metric"]
    labels: set[str] = set(TARGET_LABELS)
    for name in names:
        if name not in metrics:
            problems.append(f"{name} is not exported")
        else:
            labels |= metrics[name]
    for name, matchers in _SELECTOR.findall(expr):
        for label in _MATCHER.findall(matchers):
            if label not in metrics.get(name, set()) | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    grouped: set[str] = set()
    for group in _GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",") if x.strip()):
            grouped.add(label)
            if label not in labels:
                problems.append(f"no metric of it has the label {label} it groups by")
    for label in _LEGEND.findall(legend):
        if label not in (grouped or labels):
            problems.append(f"the legend names {label}, which the result does not carry")
    return problems


async def test_every_metric_and_label_queried_is_one_lbproxy_exports(
    make_backend, make_proxy, make_admin
):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(proxy, path="/whoami")) as r:
            assert r.status == 200
        async with s.ws_connect(proxy_url(proxy, path="/ws")) as ws:
            await ws.send_str("hi")
            await ws.receive()
        async with s.get(f"http://{admin.address}/metrics") as r:
            metrics = exported(await r.text())
    metrics.update({k: set(v) for k, v in PROMETHEUS_METRICS.items()})
    found = queries()
    assert len(found) > 40
    queried = {n for _, expr, _ in found for n in _METRIC.findall(expr)}
    assert len(queried) >= 28, sorted(queried)  # the extraction finds what is there
    problems = [
        f"{where}: {p}" for where, expr, legend in found for p in problems_of(expr, legend, metrics)
    ]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_metric_or_label_that_is_not_exported() -> None:
    metrics = {"lbproxy_requests_total": {"listener", "code"}}
    assert problems_of("rate(lbproxy_requests_total[5m])", "", metrics) == []
    assert problems_of("rate(lbproxy_request_total[5m])", "", metrics) == [
        "lbproxy_request_total is not exported"
    ]
    assert problems_of('lbproxy_requests_total{status="500"}', "", metrics) == [
        "lbproxy_requests_total has no label status"
    ]
    assert problems_of("sum by (listner) (lbproxy_requests_total)", "", metrics) == [
        "no metric of it has the label listner it groups by"
    ]
    assert problems_of("sum by (code) (lbproxy_requests_total)", "{{listener}}", metrics) == [
        "the legend names listener, which the result does not carry"
    ]
