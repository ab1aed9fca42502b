"""The Grafana dashboard: importable, laid out without overlaps, and in step with the metrics the server exports."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

# Imported as the rest of the suite does (conftest imports server, which imports it): in the test
# process PROMETHEUS_MULTIPROC_DIR is unset, so the metrics live in the default registry and
# importing writes no files. Only the objects' names, types and labels are read here.
from policy_server.telemetry import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "policy-server-dashboard.json"
ROWS = ["Traffic", "Latency", "Batching", "Models", "Episodes", "Cache", "CUDA", "Front door", "Answer safety"]
GRID_COLUMNS = 24

# How /metrics names a family's samples (multiprocess mode writes no _created samples).
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("_sum", "_count")}
# Labels a query may use that the metric objects do not declare: Prometheus adds job and instance
# when it scrapes, a histogram's buckets carry le, and a "liveall" gauge gets one series per pid.
SCRAPE_LABELS = frozenset({"job", "instance"})
# Being added to metrics.py: allowed in queries only while it does not define them yet, after
# which they are checked like every other metric (and must keep these names).
PENDING_HISTOGRAMS = {"policy_h2d_seconds": ("model",), "policy_d2h_seconds": ("model",)}

METRIC_NAME = re.compile(r"\bpolicy_[a-z0-9_]*[a-z0-9]\b")
SELECTOR = re.compile(r"\b(policy_[a-z0-9_]*[a-z0-9])\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and rows, and the panels kept inside collapsed rows."""
    top = dashboard["panels"]
    return top + [child for panel in top for child in panel.get("panels", [])]


def graph_panels(dashboard: dict) -> list[dict]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [(panel["title"], target["expr"]) for panel in graph_panels(dashboard) for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def defined_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) of every prometheus_client metric object in policy_server.telemetry.metrics."""
    families = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        (family,) = obj.describe()
        assert family.type in SAMPLE_SUFFIXES, f"{family.name}: a {family.type}; teach this test its sample names"
        labels = tuple(obj._labelnames)
        if family.type == "gauge" and obj._multiprocess_mode in ("all", "liveall"):
            labels += ("pid",)
        families[family.name] = (family.type, labels)
    return families


def sample_labels(families: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, frozenset[str]]:
    """Every sample name /metrics can write -> the labels a query may match on it."""
    samples = {}
    for name, (kind, labels) in families.items():
        for suffix in SAMPLE_SUFFIXES[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            samples[name + suffix] = frozenset(labels) | SCRAPE_LABELS | extra
    return samples


def test_dashboard_imports_through_a_prometheus_input():
    dashboard = load_dashboard()
    assert dashboard["id"] is None and dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")

    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "model"} <= variables.keys()
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    assert datasource["current"]["value"] == "${DS_PROMETHEUS}"
    for name in ("job", "instance", "model"):
        assert variables[name]["type"] == "query"

    # Everything queries the chosen data source through the variable.
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in graph_panels(dashboard):
        assert panel["datasource"] == chosen, panel["title"]
        assert all(target["datasource"] == chosen for target in panel["targets"]), panel["title"]
    assert all(variables[name]["datasource"] == chosen for name in ("job", "instance", "model"))


def test_rows_in_order():
    assert [panel["title"] for panel in all_panels(load_dashboard()) if panel["type"] == "row"] == ROWS


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    panels = all_panels(load_dashboard())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids

    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_COLUMNS, (panel["title"], grid)
        boxes.append((panel["title"], x, y, x + w, y + h))
    for (a, ax0, ay0, ax1, ay1), (b, bx0, by0, bx1, by1) in itertools.combinations(boxes, 2):
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{a!r} overlaps {b!r}"


def test_every_panel_has_a_title_and_a_query():
    for panel in all_panels(load_dashboard()):
        assert panel.get("title", "").strip(), panel["id"]
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
            assert all(target.get("expr", "").strip() for target in panel["targets"]), panel["title"]


def test_queries_use_only_exported_metrics_and_their_labels():
    families = defined_families()
    pending = {name: ("histogram", labels) for name, labels in PENDING_HISTOGRAMS.items() if name not in families}
    allowed = sample_labels({**families, **pending})

    for where, expr in queries(load_dashboard()):
        names = set(METRIC_NAME.findall(expr))
        assert names, f"{where}: no policy_ metric in {expr!r}"
        unknown = names - allowed.keys()
        assert not unknown, f"{where}: {sorted(unknown)} not exported (known: {sorted(allowed)})"
        for name, matchers in SELECTOR.findall(expr):
            bad = set(MATCHER_LABEL.findall(matchers)) - allowed[name]
            assert not bad, f"{where}: {name} has no label {sorted(bad)}"
        known_labels = frozenset().union(*(allowed[name] for name in names))
        for grouping in GROUPING.findall(expr):
            bad = {label.strip() for label in grouping.split(",") if label.strip()} - known_labels
            assert not bad, f"{where}: grouping by {sorted(bad)}, which none of {sorted(names)} has"


def test_every_exported_metric_has_a_panel():
    used = {name for panel in graph_panels(load_dashboard()) for target in panel["targets"]
            for name in METRIC_NAME.findall(target["expr"])}
    for name, (kind, _) in defined_families().items():
        samples = {name + suffix for suffix in SAMPLE_SUFFIXES[kind]}
        assert samples & used, f"{name} ({kind}) is exported but no panel shows it"


def test_cuda_panels_say_they_are_cuda_only():
    for panel in graph_panels(load_dashboard()):
        exprs = " ".join(target["expr"] for target in panel["targets"])
        if any(name in exprs for name in PENDING_HISTOGRAMS):
            assert "CUDA" in panel["description"], panel["title"]
