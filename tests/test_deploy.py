"""
What etc/ ships for running proxygate: the Kubernetes manifests (parsed, and every path,
port, name and INI key they use checked against each other and against proxygate), the
systemd unit (systemd-analyze verify, and its hardening), the logrotate snippet (run by the
real logrotate against a running proxygate), and workers = auto under a CPU quota.
"""

from __future__ import annotations

import configparser
import grp
import os
import posixpath
import pwd
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from gateway.config import cgroupCPULimit, endpointAddress, parseConfig
from tests.support import LOOPBACK_INI, REPO, rawRequest, waitFor

ETC = REPO / "etc"
K8S = ETC / "kubernetes"


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"], path
            found[doc["kind"]] = doc
    return found


def test_manifestsParseAndNameEachOther() -> None:
    m = manifests()
    assert set(m) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Kustomization",
    }
    kustomization = m["Kustomization"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "hpa.yaml" in (K8S / "kustomization.yaml").read_text()  # offered, commented

    deployment, service, hpa = m["Deployment"], m["Service"], m["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/healthz" and check["port"] == "metrics"


def test_manifestsUseRealPathsPortsAndKeys() -> None:
    """The INI in the ConfigMap is valid proxygate configuration, and the Deployment
    mounts what it names where it names it."""
    m = manifests()
    configMap, deployment = m["ConfigMap"], m["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    # --config names the ConfigMap's key, in the ConfigMap's mount.
    args = container["args"]
    assert args[:3] == ["-n", "--pidfile=", "proxygate"]
    configPath = args[args.index("--config") + 1]
    (configVolume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[configVolume]["configMap"]["name"] == configMap["metadata"]["name"]
    assert posixpath.dirname(configPath) == mounts[configVolume]
    (key,) = configMap["data"]
    assert posixpath.basename(configPath) == key

    # Every key exists (parseConfig refuses unknown ones), and the values work.
    config = parseConfig(configMap["data"][key], configPath)
    assert config.proxy.workers >= 1 and "workers = auto" in configMap["data"][key]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (proxyListen,) = config.proxy.listen
    (metricsListen,) = config.metrics.listen
    assert endpointAddress(proxyListen) == (None, ports["proxy"])
    assert endpointAddress(metricsListen) == (None, ports["metrics"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == config.metrics.path
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]

    # The CA files are the Secret's items, in the Secret's mount.
    (caVolume,) = [n for n, v in volumes.items() if "secret" in v]
    items = {i["path"] for i in volumes[caVolume]["secret"]["items"]}
    assert config.mitm.enabled
    for path in (config.mitm.ca_cert, config.mitm.ca_key):
        assert posixpath.dirname(path) == mounts[caVolume]
        assert posixpath.basename(path) in items
    assert all(mount["readOnly"] for mount in container["volumeMounts"])
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert config.log.access_log == "-"  # nothing written in the read-only file system


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(ETC / "systemd" / "proxygate.service")
    return parser


def test_systemdUnitIsHardenedAndConsistent() -> None:
    service = unit()["Service"]
    assert service["Type"] == "simple"
    command = service["ExecStart"].split()
    assert command[1:4] == ["-n", "--pidfile=", "proxygate"]
    config = command[command.index("--config") + 1]
    assert config == "/etc/proxygate/proxygate.ini"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["User"] == "proxygate"
    writable = service["ReadWritePaths"].split()
    assert f"/var/lib/{service['StateDirectory']}" in writable
    assert f"/var/log/{service['LogsDirectory']}" in writable
    # The logrotate snippet rotates a file in the writable log folder.
    rotated = re.search(r"(?m)^(/\S+) \{", (ETC / "logrotate.d" / "proxygate").read_text())
    assert posixpath.dirname(rotated.group(1)) in writable


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemdAnalyzeVerify(tmp_path) -> None:
    """The unit as shipped, with ExecStart pointing at this venv's twistd (verify checks it)."""
    text = (ETC / "systemd" / "proxygate.service").read_text()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    path = tmp_path / "proxygate.service"
    path.write_text(text.replace("/opt/proxygate/bin/twistd", twistd))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if "proxygate.service" in line and "Documentation" not in line
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate not installed")
def test_logrotateSnippetRotatesARunningProxy(startProxy, tmp_path, origin) -> None:
    """The snippet as shipped; only the paths, the owner and the way to signal change."""
    log = tmp_path / "access.log"
    p = startProxy(LOOPBACK_INI + f"[log]\naccess_log = {log}\n")
    get = "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert rawRequest(p.port, get.format(origin.url("/before")).encode()).startswith(b"HTTP/1.1")
    assert waitFor(lambda: "/before" in log.read_text(), 5)

    text = (ETC / "logrotate.d" / "proxygate").read_text()
    text = text.replace("/var/log/proxygate/access.log", str(log))
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    text = text.replace("create 0640 proxygate proxygate", f"create 0640 {user} {group}")
    text, count = re.subn(r"(?m)^(\s+)systemctl kill .*$", rf"\1kill -USR1 {p.pid}", text)
    assert count == 1
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)
    out = subprocess.run(
        ["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rotated = tmp_path / "access.log.1"
    assert "/before" in rotated.read_text()
    assert rawRequest(p.port, get.format(origin.url("/after")).encode()).startswith(b"HTTP/1.1")
    assert waitFor(lambda: "/after" in log.read_text(), 5)
    assert "/after" not in rotated.read_text()


def test_workersAutoFollowsTheCgroupQuota(tmp_path) -> None:
    cgroups = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    cgroups.write_text("0::/kubepods/pod1\n")
    quota = root / "kubepods" / "pod1" / "cpu.max"
    for text, expected in [
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("max 100000\n", None),
    ]:
        quota.write_text(text)
        assert cgroupCPULimit(str(root), str(cgroups)) == expected, text
    assert cgroupCPULimit(str(root), str(tmp_path / "none")) is None
