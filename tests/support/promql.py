"""
Metric names in PromQL expressions and in a Prometheus text scrape, for the tests that
check the dashboard and the alert rules against what proxygate exports.

The extraction is lexical, which is enough for the queries we write: strings, label
matchers, ranges and subqueries, grouping label lists and Grafana variables are blanked
out; what is left that looks like an identifier and is not called like a function nor a
keyword is a metric name. tests/test_dashboard.py pins its behaviour.
"""

from __future__ import annotations

import re

__all__ = ["exportedNames", "grafanaVariableMetric", "metricNames", "substitute"]

#: Words of PromQL that are not metric names where they stand outside parentheses.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan", "start", "end"}
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metricNames(expr: str) -> set[str]:
    """The metric names an expression reads."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name not in _KEYWORDS:
            names.add(name)
    return names


def grafanaVariableMetric(query: str) -> set[str]:
    """The metric of a Grafana query variable (label_values(METRIC, label)), or a PromQL one."""
    match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
    return metricNames(match.group(1)) if match else metricNames(query)


def exportedNames(scrape: str) -> set[str]:
    """
    Every metric name a scrape makes queryable: the families of its # TYPE lines (families
    with labels and no samples yet have one too), with a histogram's _bucket/_sum/_count.
    """
    names = set()
    for line in scrape.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        names.add(name)
        if kind.strip() == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind.strip() == "summary":
            names |= {f"{name}_sum", f"{name}_count"}
    return names


def substitute(expr: str, **values: str) -> str:
    """A Grafana query with its variables replaced, for Prometheus' own API."""
    defaults = {
        "instance": ".*",
        "__rate_interval": "15s",
        "__range": "1m",
        "__interval": "15s",
        "max_connections": "10000",
    }
    defaults.update(values)
    out = _VARIABLE.sub(lambda m: defaults[m.group(0).strip("${}")], expr)
    assert "$" not in out, out
    return out
