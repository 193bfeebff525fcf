"""The deployment descriptions (infra/), checked offline: no cluster and no Docker engine
run here (SERVICES.md).

* every kustomize overlay renders (`kubectl kustomize`) and every object in it validates
  strictly (`kubernetes-validate --strict`, unknown fields rejected) against the oldest
  and the newest Kubernetes we claim;
* consistency with the code: every `LOOM_*` variable the manifests and the compose file
  give a Loom container is a real setting of the service in it (pydantic-settings
  ignores unknown variables, so a typo would change nothing, silently); ports, probes
  and Services agree with the port each service listens on; images are the services'
  images; and each service, started as the manifests start it, really answers every
  probe path they use;
* what the deployment promises (issue 10): an Ingress for /api, /hooks and /ws only,
  locked-down pods, grace periods above LOOM_SHUTDOWN_GRACE, PodDisruptionBudgets,
  autoscaled workers and webhooks, two timers, default-deny NetworkPolicies, a migration
  Job, and a Secret that is only an example.
"""

from __future__ import annotations

import importlib
import inspect
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from loom_common import LoomSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
OVERLAYS = sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))
COMPOSE = ROOT / "infra" / "docker-compose.yml"
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
# The oldest Kubernetes infra/README.md claims, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
PREFIX = "LOOM_"
LOOM_DB = ["python", "-m", "loom_db", "upgrade"]
PUBLIC_PATHS = {"/api": "loom-rest", "/hooks": "loom-webhook", "/ws": "loom-websocket"}
AUTOSCALED = {"loom-worker", "loom-webhook"}
WORKLOADS = ("Deployment", "StatefulSet", "Job")

Obj = dict[str, Any]


# --------------------------------------------------------------------------- the services


@dataclass(frozen=True)
class Service:
    """A Loom image: `loom-rest` runs `python -m loom_rest` with `RestSettings`."""

    image: str
    module: str
    settings: type[LoomSettings]

    @property
    def prefix(self) -> str:
        own = [n for n in self.settings.model_fields if n not in LoomSettings.model_fields]
        return own[0].split("_", 1)[0] + "_"

    @property
    def port_variable(self) -> str:
        return f"{PREFIX}{self.prefix.upper()}PORT"

    @property
    def default_port(self) -> int:
        return int(self.settings.model_fields[f"{self.prefix}port"].default)


def _settings_class(module: str) -> type[LoomSettings]:
    settings = importlib.import_module(f"{module}.settings")
    (cls,) = [
        obj
        for _, obj in inspect.getmembers(settings, inspect.isclass)
        if issubclass(obj, LoomSettings) and obj.__module__ == settings.__name__
    ]
    return cls


def _services() -> dict[str, Service]:
    """One per service folder that has a Dockerfile (tests/test_deploy_images.py checks
    that each Dockerfile runs its folder's module under the distribution's name)."""
    found = {}
    for dockerfile in sorted(ROOT.glob("services/*/Dockerfile")):
        (package,) = [p for p in (dockerfile.parent / "src").iterdir() if p.is_dir()]
        module = package.name
        image = module.replace("_", "-")  # loom_rest: the distribution and image loom-rest
        found[image] = Service(image, module, _settings_class(module))
    return found


SERVICES = _services()


def image_name(reference: str) -> str:
    """`registry.example.com/loom/loom-rest:0.1.0` -> `loom-rest`."""
    last = reference.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0]


def settings_for(image: str, command: list[str] | None) -> type[LoomSettings] | None:
    """What a container with this image and command reads; None: not a Loom container."""
    if image not in SERVICES:
        return None
    return LoomSettings if command == LOOM_DB else SERVICES[image].settings


def unknown_variables(names: list[str], settings: type[LoomSettings]) -> list[str]:
    return [
        name
        for name in names
        if name.startswith(PREFIX) and name[len(PREFIX) :].lower() not in settings.model_fields
    ]


# --------------------------------------------------------------------------- rendering


def tool(name: str) -> str:
    """A dev-group tool: next to this interpreter (uv sync puts it there), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} not found: `uv sync --all-packages` installs it (dev group)"
    return str(found)


def render(overlay: Path) -> list[Obj]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    with ThreadPoolExecutor() as pool:
        objects = list(pool.map(render, OVERLAYS))
    return {overlay.name: objs for overlay, objs in zip(OVERLAYS, objects, strict=True)}


@pytest.fixture(params=[p.name for p in OVERLAYS])
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[request.param]


def secret_example() -> Obj:
    loaded = yaml.safe_load(SECRET_EXAMPLE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def loom_containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj, Service]]:
    """(workload, container, service) for every container running a Loom image."""
    for workload in objects:
        if workload["kind"] not in WORKLOADS:
            continue
        for container in pod_spec(workload)["containers"]:
            service = SERVICES.get(image_name(container["image"]))
            if service is not None:
                yield workload, container, service


def environment(container: Obj, objects: list[Obj]) -> dict[str, str | None]:
    """The variables a container gets, by name (None: from a field or resource): its
    ConfigMaps' and Secrets' keys (the `loom-secrets` an operator creates: the example's
    keys), then its `env`, which wins."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            (config,) = find(objects, "ConfigMap", source["configMapRef"]["name"])
            env.update(config.get("data", {}))
        else:
            name = source["secretRef"]["name"]
            (secret,) = find(objects, "Secret", name) or [secret_example()]
            assert secret["metadata"]["name"] == name, f"no Secret {name}"
            env.update(dict.fromkeys(secret.get("data", {}) | secret.get("stringData", {})))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def k8s_variable_problems(objects: list[Obj]) -> list[str]:
    """`LOOM_*` variables given to a Loom container that its settings do not have."""
    problems = []
    for workload, container, _ in loom_containers(objects):
        settings = settings_for(image_name(container["image"]), container.get("command"))
        assert settings is not None
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        for name in unknown_variables(list(environment(container, objects)), settings):
            problems.append(f"{where}: {name} is not a setting of {settings.__name__}")
    return problems


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_overlay_validates_strictly(
    version: str, rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    files = [SECRET_EXAMPLE]
    for name, objects in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        files.append(path)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The validator can fail: a misspelt field is an error, not ignored."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {ports: [{port: 80, targetPorts: 80}]}\n"
    )
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "targetPorts" in result.stdout + result.stderr


def test_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} >= {"dev", "prod"}


# --------------------------------------------------------------------------- settings


def test_every_loom_variable_in_the_manifests_is_a_setting(overlay: list[Obj]) -> None:
    assert k8s_variable_problems(overlay) == []


def test_a_made_up_variable_is_reported(rendered: dict[str, list[Obj]]) -> None:
    """The check can fail: LOOM_REST_PROT (a typo) in the REST Deployment is caught, and
    LOOM_WORKER_SLOTS is a setting of every service but LOOM_WORKER_ID only the worker's."""
    objects = [dict(o) for o in yaml.safe_load_all(yaml.safe_dump_all(rendered["prod"]))]
    (rest,) = find(objects, "Deployment", "loom-rest")
    pod_spec(rest)["containers"][0]["env"].append({"name": "LOOM_REST_PROT", "value": "1"})
    pod_spec(rest)["containers"][0]["env"].append({"name": "LOOM_WORKER_ID", "value": "x"})
    pod_spec(rest)["containers"][0]["env"].append({"name": "LOOM_WORKER_SLOTS", "value": "2"})
    assert k8s_variable_problems(objects) == [
        "Deployment/loom-rest: LOOM_REST_PROT is not a setting of RestSettings",
        "Deployment/loom-rest: LOOM_WORKER_ID is not a setting of RestSettings",
    ]


def test_the_secret_is_an_example_that_is_never_applied(overlay: list[Obj]) -> None:
    example = secret_example()
    assert example["metadata"]["name"] == "loom-secrets"
    assert find(overlay, "Secret", "loom-secrets") == []
    assert unknown_variables(list(example["stringData"]), LoomSettings) == []
    assert "LOOM_SECRET_KEY" in example["stringData"]
    for _, container, _ in loom_containers(overlay):
        refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        assert "loom-secrets" in refs


# --------------------------------------------------------------------------- the workloads


def test_each_service_runs_once_with_its_own_image(overlay: list[Obj]) -> None:
    deployed = sorted(
        (w["metadata"]["name"], s.image)
        for w, _, s in loom_containers(overlay)
        if w["kind"] == "Deployment"
    )
    assert deployed == sorted((image, image) for image in SERVICES)


def test_migration_job_runs_loom_db_upgrade_from_the_rest_image(overlay: list[Obj]) -> None:
    (job,) = find(overlay, "Job")
    (container,) = pod_spec(job)["containers"]
    assert image_name(container["image"]) == "loom-rest"
    assert container["command"] == LOOM_DB
    assert "ttlSecondsAfterFinished" in job["spec"]  # the next release's Job can be applied


def test_ports_services_and_probes_agree_with_the_service(overlay: list[Obj]) -> None:
    for workload, container, service in loom_containers(overlay):
        if workload["kind"] != "Deployment":
            continue
        env = environment(container, overlay)
        port = int(env.get(service.port_variable) or service.default_port)
        assert env.get(f"{PREFIX}{service.prefix.upper()}HOST") == "0.0.0.0"
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] == "http", probe
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)
        (svc,) = find(overlay, "Service", workload["metadata"]["name"])
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]


def test_pods_are_locked_down(overlay: list[Obj]) -> None:
    """Non-root, read-only root filesystem (writable /tmp; the worker's node workspaces
    on their own emptyDir), no privilege escalation, no capabilities, and no service
    links (a Service named loom-rest would set LOOM_REST_PORT=tcp://...)."""
    for workload, container, service in loom_containers(overlay):
        spec = pod_spec(workload)
        assert spec["enableServiceLinks"] is False
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in empty_dirs
        assert set(mounts.values()) <= empty_dirs
        if service.image == "loom-worker":
            env = environment(container, overlay)
            assert mounts.get(str(env["TMPDIR"])) in empty_dirs  # node workspaces
            assert mounts.get(str(env["HOME"])) in empty_dirs
            assert any(e.get("valueFrom", {}).get("resourceFieldRef") for e in container["env"])


def test_grace_period_outlasts_the_shutdown_grace(overlay: list[Obj]) -> None:
    for workload, container, _ in loom_containers(overlay):
        if workload["kind"] != "Deployment":
            continue
        env = environment(container, overlay)
        grace = float(env.get("LOOM_SHUTDOWN_GRACE") or LoomSettings().shutdown_grace)
        pause = 0
        if command := container.get("lifecycle", {}).get("preStop", {}).get("exec"):
            assert command["command"][0] == "sleep"
            pause = int(command["command"][1])
        # 5 s more to close the runtime and, for a worker, hand executions back.
        assert pod_spec(workload)["terminationGracePeriodSeconds"] >= grace + pause + 5


def test_disruption_budgets_and_autoscalers(overlay: list[Obj]) -> None:
    deployments = {d["metadata"]["name"]: d for d in find(overlay, "Deployment")}
    budgets = find(overlay, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in find(overlay, "HorizontalPodAutoscaler")}
    assert scaled == AUTOSCALED
    for name in AUTOSCALED:
        # A `replicas` here would reset the autoscaler's count at every apply.
        assert "replicas" not in deployments[name]["spec"]
    assert deployments["loom-timer"]["spec"]["replicas"] == 2
    assert deployments["loom-websocket"]["spec"]["replicas"] >= 2


def test_ingress_routes_only_the_api_the_hooks_and_the_websockets(overlay: list[Obj]) -> None:
    (ingress,) = find(overlay, "Ingress")
    routes = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            (svc,) = find(overlay, "Service", backend["name"])
            assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
            routes[path["path"]] = backend["name"]
    assert routes == PUBLIC_PATHS  # /metrics, /healthz and /readyz stay inside


def _selects(policy: Obj, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy's podSelector selects pods with these labels."""
    selector = policy["spec"]["podSelector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _admitted_from(policy: Obj) -> list[Obj]:
    return [peer for rule in policy["spec"].get("ingress", []) for peer in rule["from"]]


def test_network_policies_deny_by_default_and_admit_only_whom_they_must(
    overlay: list[Obj],
) -> None:
    """Everything is denied, then: the ingress controller reaches the three public
    services and nothing else, and whatever other server runs in the namespace (dev's
    PostgreSQL, RabbitMQ, Kafka) is reachable from Loom's pods."""
    policies = find(overlay, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)
    controller = {"kubernetes.io/metadata.name": "ingress-nginx"}
    for workload in overlay:
        if workload["kind"] not in WORKLOADS or workload["kind"] == "Job":
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        admitting = [p for p in policies if _selects(p, labels)]
        peers = [peer for p in admitting for peer in _admitted_from(p)]
        from_controller = any(
            peer.get("namespaceSelector", {}).get("matchLabels") == controller for peer in peers
        )
        public = workload["metadata"]["name"] in PUBLIC_PATHS.values()
        assert from_controller == public, workload["metadata"]["name"]
        if labels.get("app.kubernetes.io/part-of") != "loom":
            loom_pods = {"app.kubernetes.io/part-of": "loom"}
            assert any(
                peer.get("podSelector", {}).get("matchLabels") == loom_pods for peer in peers
            )


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> Obj:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_variable_problems(compose: Obj) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        image = image_name(service["image"])
        entry = service.get("entrypoint")
        settings = settings_for(image, entry)
        if settings is None:
            continue
        for variable in unknown_variables(list(service.get("environment", {})), settings):
            problems.append(f"{name}: {variable} is not a setting of {settings.__name__}")
    return problems


def test_every_loom_variable_in_compose_is_a_setting(compose: Obj) -> None:
    assert compose_variable_problems(compose) == []
    bad = yaml.safe_load(COMPOSE.read_text())
    bad["services"]["timer"]["environment"] = {"LOOM_TIMER_RESYNC_SECS": "5"}
    assert compose_variable_problems(bad) == [
        "timer: LOOM_TIMER_RESYNC_SECS is not a setting of TimerSettings"
    ]


def test_compose_runs_every_service_after_the_migrations(compose: Obj) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert image_name(migrate["image"]) == "loom-rest" and migrate["entrypoint"] == LOOM_DB
    assert {"postgres", "rabbitmq", "kafka"} <= set(services)
    for server in ("postgres", "rabbitmq", "kafka"):
        assert "healthcheck" in services[server]
    grace = float(services["rest"]["environment"]["LOOM_SHUTDOWN_GRACE"])
    started = {}
    for name, service in services.items():
        image = image_name(service["image"])
        if image not in SERVICES or name == "migrate":
            continue
        started[image] = service.get("deploy", {}).get("replicas", 1)
        build = service["build"]
        dockerfile = (ROOT / "infra" / build["context"] / build["dockerfile"]).resolve()
        assert (dockerfile.parent / "src" / SERVICES[image].module).is_dir(), dockerfile
        conditions = {dep: c["condition"] for dep, c in service["depends_on"].items()}
        assert conditions["migrate"] == "service_completed_successfully"
        assert conditions["postgres"] == "service_healthy"
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        assert float(service["stop_grace_period"].removesuffix("s")) > grace + 5
        port = int(
            service["environment"].get(SERVICES[image].port_variable)
            or SERVICES[image].default_port
        )
        for published in service.get("ports", []):
            assert int(published.rsplit(":", 1)[1]) == port
    assert started == {
        "loom-rest": 1,
        "loom-webhook": 1,
        "loom-websocket": 1,
        "loom-timer": 2,
        "loom-worker": 2,
    }


# --------------------------------------------------------------------------- live probes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def probe_paths(objects: list[Obj], image: str) -> set[str]:
    """Every path the manifests ask `image` for: probes and the metrics annotation."""
    paths = set()
    for workload, container, service in loom_containers(objects):
        if service.image != image or workload["kind"] != "Deployment":
            continue
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                paths.add(container[probe]["httpGet"]["path"])
        paths.add(workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    return paths


@dataclass
class Probed:
    """What a started service answered: each path's status (-1: it had exited), then its
    exit status after SIGTERM, and its log's end."""

    statuses: dict[str, int]
    exit: int | None = None
    log: str = ""


def _start_and_probe(service: Service, paths: set[str], database: Path, home: Path) -> Probed:
    """Start the service as its image does (`python -m loom_<x>`, settings from the
    environment only), on SQLite and memory brokers, and GET each path."""
    port = _free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LOOM_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "LOOM_SECRET_KEY": secrets.token_urlsafe(48),
        "LOOM_ADMIN_PASSWORD": secrets.token_urlsafe(12),
        f"{PREFIX}{service.prefix.upper()}HOST": "127.0.0.1",
        service.port_variable: str(port),
        "LOOM_SHUTDOWN_GRACE": "2",
    }
    log = home / "service.log"
    probed = Probed({})
    with (
        log.open("w") as log_file,
        subprocess.Popen(
            [sys.executable, "-m", service.module],
            cwd=home,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        ) as process,
    ):
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    _get(f"http://127.0.0.1:{port}/healthz")
                    break
                except OSError:  # not listening yet
                    time.sleep(0.2)
            for path in sorted(paths):
                alive = process.poll() is None
                probed.statuses[path] = _get(f"http://127.0.0.1:{port}{path}") if alive else -1
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                probed.exit = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    probed.log = log.read_text()[-3000:]
    return probed


@pytest.fixture(scope="module")
def probed(
    rendered: dict[str, list[Obj]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Probed]:
    """Every service started at once, each on its own copy of a migrated database."""
    from loom_db.migrate import upgrade_sync

    work = tmp_path_factory.mktemp("probes")
    template = work / "template.db"
    upgrade_sync(f"sqlite+aiosqlite:///{template}")
    jobs = {}
    with ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
        for image, service in SERVICES.items():
            paths = set().union(*(probe_paths(objs, image) for objs in rendered.values()))
            assert paths >= {"/healthz", "/readyz", "/metrics"}
            home = work / image
            home.mkdir()
            shutil.copyfile(template, home / "loom.db")
            jobs[image] = pool.submit(_start_and_probe, service, paths, home / "loom.db", home)
    return {image: job.result() for image, job in jobs.items()}


@pytest.mark.parametrize("image", sorted(SERVICES))
def test_service_answers_every_path_the_manifests_probe(
    image: str, probed: dict[str, Probed]
) -> None:
    """Started as the manifests start it, the service answers 200 on each probe path and
    on /metrics, and SIGTERM ends it with exit 0."""
    result = probed[image]
    assert result.statuses and set(result.statuses.values()) == {200}, (result.statuses, result.log)
    assert result.exit == 0, result.log
