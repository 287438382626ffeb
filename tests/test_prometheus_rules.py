"""Alerting and recording rules beside docker/prometheus/prometheus.yml.

* ``promtool check rules`` on every rule file, ``promtool test rules`` on the unit tests of
  serving.yml and alerts.yml (tests/prometheus/*_test.yml: each alert fires on its trouble
  after its ``for`` and stays quiet otherwise; each recording rule's value on known input);
* the compose Prometheus loads them: prometheus.yml's ``rule_files`` is where compose mounts
  docker/prometheus/rules/;
* every alert carries a severity and a summary, and every alert has a unit test;
* every ``eed_`` metric the rules read is one the server declares.

A real Prometheus evaluating the rules against a live server: tests/test_deploy.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from test_deploy import COMPOSE_FILE, PROMETHEUS_CONFIG, PROMTOOL, ROOT

RULES_DIR = ROOT / "docker" / "prometheus" / "rules"
UNIT_TESTS = ROOT / "tests" / "prometheus"
MINE = ["serving.yml", "alerts.yml"]
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")


def rules_of(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


@needs_promtool
@pytest.mark.parametrize("rule_file", sorted(p.name for p in RULES_DIR.glob("*.yml")))
def test_promtool_check_rules(rule_file):
    r = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES_DIR / rule_file)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
@pytest.mark.parametrize("unit_test", ["serving_test.yml", "alerts_test.yml"])
def test_promtool_unit_tests(unit_test):
    r = subprocess.run(
        [PROMTOOL, "test", "rules", unit_test], cwd=UNIT_TESTS, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_compose_prometheus_loads_every_rule_file():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (pattern,) = config["rule_files"]
    directory, _, glob = pattern.rpartition("/")
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounts = {}
    for volume in compose["services"]["prometheus"]["volumes"]:
        source, _, rest = volume.partition(":")
        mounts[rest.split(":")[0]] = source
    assert mounts.get(directory) == "./docker/prometheus/rules", mounts
    assert set(RULES_DIR.glob(glob)) == set(RULES_DIR.glob("*.yml")) and set(RULES_DIR.glob("*.yml")) >= {
        RULES_DIR / name for name in MINE
    }


def test_every_alert_has_severity_summary_and_a_unit_test():
    alerts = [r for r in rules_of(RULES_DIR / "alerts.yml") if "alert" in r]
    names = {r["alert"] for r in alerts}
    assert {
        "EEDServerDown",
        "EEDServerNotReady",
        "EEDServerErrors",
        "EEDOverloaded",
        "EEDHighLatencyP99",
        "EEDDeadlineMisses",
        "EEDLiveAccuracyDrop",
    } <= names
    tested = {
        t["alertname"]
        for case in yaml.safe_load((UNIT_TESTS / "alerts_test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert names <= tested, f"alerts never seen firing in a unit test: {sorted(names - tested)}"
    for r in alerts:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]


def declared_metric_names() -> set[str]:
    """Sample names the server's registry can expose (histograms: _bucket/_sum/_count)."""
    from serving.metrics import ServingMetrics

    names = set()
    for family in ServingMetrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_rules_read_only_metrics_the_server_declares():
    declared = declared_metric_names()
    recorded = {r["record"] for p in RULES_DIR.glob("*.yml") for r in rules_of(p) if "record" in r}
    problems = []
    for name in MINE:
        for r in rules_of(RULES_DIR / name):
            bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', r["expr"])
            for metric in set(re.findall(r"(?<![:\w])(eed_\w+)", bare)):
                if metric not in declared:
                    problems.append(f"{name} {r.get('record') or r.get('alert')}: {metric}")
            for series in set(re.findall(r"\b(\w+:\w+:\w+)\b", bare)):
                if series not in recorded:
                    problems.append(f"{name} {r.get('record') or r.get('alert')}: no rule records {series}")
    assert not problems, "\n".join(problems)
