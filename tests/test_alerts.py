"""
The Prometheus alert rules (etc/prometheus/proxygate-alerts.yml) with Debian's promtool:
`promtool check rules` is clean, `promtool test rules` passes, and every alert of the rules
file has a unit test in which it fires and one in which it stays silent.

The live side (a real Prometheus scraping a real proxygate evaluates every rule) is in
tests/test_observability_live.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.support import REPO

RULES = REPO / "etc" / "prometheus" / "proxygate-alerts.yml"
TESTS = REPO / "etc" / "prometheus" / "proxygate-alerts.test.yml"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool (Debian package prometheus: tests/run.sh installs it)"
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def alertNames() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_checkRulesClean():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alertNames())} rules found" in done.stdout


def test_unitTestsPass():
    done = promtool("test", "rules", str(TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_everyAlertFiresAndStaysSilentInATest():
    tests = yaml.safe_load(TESTS.read_text())
    firing, silent = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alertNames())
    assert len(names) >= 8
    assert names - firing == set(), "alerts without a test in which they fire"
    assert names - silent == set(), "alerts without a test in which they stay silent"
    assert {
        "ProxygateDown",
        "ProxygateHigh5xxRatio",
        "ProxygateUpstreamErrorsRising",
        "ProxygateConnectionsNearLimit",
        "ProxygateDenialsSpiking",
        "ProxygateOriginTLSFailures",
        "ProxygateWorkerRestarts",
        "ProxygateBackendDown",
    } <= names


def test_unitTestsCatchABrokenRule(tmp_path):
    """The tests can fail: a threshold moved by a typo makes promtool report it."""
    (tmp_path / "proxygate-alerts.yml").write_text(
        RULES.read_text().replace("> 0.8 * 10000", "> 0.9 * 10000")
    )
    (tmp_path / "proxygate-alerts.test.yml").write_text(TESTS.read_text())
    done = promtool("test", "rules", str(tmp_path / "proxygate-alerts.test.yml"))
    assert done.returncode != 0
    assert "ProxygateConnectionsNearLimit" in done.stdout + done.stderr
