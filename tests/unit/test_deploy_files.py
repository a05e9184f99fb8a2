"""The deployment files, checked statically: no Docker, no Kubernetes, no Ray started.

They must parse, publish nothing but the two UIs on loopback, turn Ray token authentication
on everywhere, hold no secret, and every `shardprop` command line in them must be accepted by
the real CLI, with a config that loads. The KubeRay clusters autoscale, and their worker
pods are the elastic runs' workers: min / max replicas are the runs' min / max workers.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main
import yaml

from shardprop.service.cli.app import app
from shardprop.service.config import ClusterConfig, Config, load_config
from shardprop.service.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DEPLOY_README = ROOT / "deploy" / "README.md"
K8S_MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
TOKEN_FILE = "deploy/secrets/ray_token"

# Recent typer builds its commands on a copy of click of its own, older typer on click itself:
# the parse below duck-types the commands and takes the error class from typer.
CliError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

RAY_SERVICES = ("ray-head", "ray-worker", "train")
PUBLISHED_PORTS = {"5000", "8265"}
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


def manifests() -> list[dict]:
    return [doc for path in K8S_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def environment(service: dict) -> dict[str, str]:
    """A compose service's environment, in either of its two spellings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_line(command: str | list[str] | None) -> str:
    if command is None:
        return ""
    return command if isinstance(command, str) else shlex.join(command)


def walk(node):
    """Every value of a YAML document, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


# --- where the `shardprop` command lines are -----------------------------------------------


def shardprop_argv(line: str) -> list[str] | None:
    """The `shardprop ...` words of one shell line (after `VAR=value` prefixes, `docker compose
    run ... train`, etc.), up to the first shell operator; None when the line has none."""
    words = shlex.split(line, comments=True)
    for start, word in enumerate(words):
        if Path(word).name == "shardprop":
            argv = []
            for rest in words[start:]:
                if rest in SHELL_OPERATORS:
                    break
                argv.append(rest)
            return argv
    return None


def fenced_code_lines(markdown: str) -> list[str]:
    """The lines of the fenced code blocks, with backslash continuations joined."""
    lines, inside, pending = [], False, ""
    for raw in markdown.splitlines():
        if raw.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        text = pending + raw.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        lines.append(text.removeprefix("$ "))
    return lines


def compose_command_lines() -> list[tuple[str, str]]:
    return [
        (f"docker-compose.yml: {name}", command_line(service.get("command")))
        for name, service in services().items()
    ]


COMMAND_FIELDS = ("entrypoint", "command", "args")  # RayJob, containers, probes


def manifest_command_lines() -> list[tuple[str, str]]:
    found = []
    for path in K8S_MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            for node in walk(doc):
                if isinstance(node, dict):
                    found += [
                        (path.name, command_line(node[field]))
                        for field in COMMAND_FIELDS
                        if isinstance(node.get(field), str | list)
                    ]
    return found


def readme_command_lines() -> list[tuple[str, str]]:
    return [("deploy/README.md", line) for line in fenced_code_lines(DEPLOY_README.read_text())]


def shardprop_lines() -> list[tuple[str, list[str]]]:
    found = []
    for where, line in compose_command_lines() + manifest_command_lines() + readme_command_lines():
        try:
            argv = shardprop_argv(line)
        except ValueError:  # prose that is not a shell line (an unbalanced quote)
            continue
        if argv:
            found.append((f"{where}: {shlex.join(argv)}", argv))
    return found


def is_group(command) -> bool:
    return hasattr(command, "resolve_command")


def parse_with_cli(argv: list[str]):
    """Parse argv with the real `shardprop` CLI, down through nested groups, running nothing:
    the leaf command's context, or CliError naming what did not parse."""
    command = typer.main.get_command(app)
    ctx = command.context_class(command, info_name="shardprop")
    args = argv[1:]
    while is_group(command):
        if not args:
            ctx.fail("missing command")
        name, command, args = command.resolve_command(ctx, args)
        if command is None:
            ctx.fail(f"no such command: {name}")
        if is_group(command):
            ctx = command.context_class(command, info_name=name, parent=ctx)
        else:
            ctx = command.make_context(name, list(args), parent=ctx)
    return ctx


# --- the files parse ------------------------------------------------------------------------


def test_compose_file_parses_and_has_the_four_services():
    assert {"ray-head", "ray-worker", "mlflow", "train"} <= set(services())


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_every_kubernetes_manifest_parses(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {doc.get('kind')}"


def test_the_kubernetes_manifests_are_the_mlflow_server_a_rayjob_and_a_raycluster():
    kinds = {doc["kind"] for doc in manifests()}
    assert {"PersistentVolumeClaim", "Deployment", "Service", "RayJob", "RayCluster"} <= kinds


# --- closed by default ----------------------------------------------------------------------


def test_every_published_port_is_bound_to_loopback():
    for name, service in services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as '127.0.0.1:HOST:CONTAINER'"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_only_the_mlflow_ui_and_the_ray_dashboard_are_published():
    published = {
        str(port).rsplit(":", 1)[-1].split("/")[0]
        for service in services().values()
        for port in service.get("ports", [])
    }
    assert published == PUBLISHED_PORTS


def test_scalable_workers_have_no_fixed_name_or_host_port():
    worker = services()["ray-worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")


def test_kubernetes_services_are_cluster_internal():
    for doc in manifests():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]


# --- Ray token authentication everywhere --------------------------------------------------


@pytest.mark.parametrize("name", RAY_SERVICES)
def test_every_ray_process_requires_the_token(name):
    service = services()[name]
    env = environment(service)
    assert env.get("RAY_AUTH_MODE") == "token"
    assert env.get("RAY_AUTH_TOKEN_PATH") == "/run/secrets/ray_token"
    secrets = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
    assert "ray_token" in secrets


def test_the_token_is_a_file_secret_outside_the_compose_file():
    assert compose()["secrets"]["ray_token"] == {"file": "./deploy/secrets/ray_token"}


def ray_clusters() -> list[tuple[str, dict]]:
    """(kind/name, RayClusterSpec) of every KubeRay cluster: a RayCluster's, a RayJob's."""
    specs = {
        "RayCluster": lambda doc: doc["spec"],
        "RayJob": lambda doc: doc["spec"]["rayClusterSpec"],
    }
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", specs[doc["kind"]](doc))
        for doc in manifests()
        if doc["kind"] in specs
    ]


RAY_CLUSTERS = ray_clusters()
CLUSTER_IDS = [name for name, _ in RAY_CLUSTERS]


@pytest.mark.parametrize("name, spec", RAY_CLUSTERS, ids=CLUSTER_IDS)
def test_every_ray_cluster_turns_token_authentication_on(name, spec):
    assert spec["authOptions"] == {"mode": "token"}, name


def test_the_rayjob_deletes_its_cluster_when_done():
    (job,) = [doc for doc in manifests() if doc["kind"] == "RayJob"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert isinstance(job["spec"]["ttlSecondsAfterFinished"], int)


# --- MLflow server --------------------------------------------------------------------------


def mlflow_commands() -> list[tuple[str, str]]:
    found = [("docker-compose.yml", command_line(services()["mlflow"].get("command")))]
    for doc in manifests():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                line = command_line([*container.get("command", []), *container.get("args", [])])
                found.append((doc["metadata"]["name"], line))
    return found


MLFLOW_COMMANDS = mlflow_commands()


@pytest.mark.parametrize("where, line", MLFLOW_COMMANDS, ids=[w for w, _ in MLFLOW_COMMANDS])
def test_mlflow_server_serves_artifacts_and_restricts_hosts(where, line):
    words = shlex.split(line)
    assert words[:2] == ["mlflow", "server"], where
    assert "--serve-artifacts" in words, where
    for option in ("--allowed-hosts", "--cors-allowed-origins"):
        assert option in words, f"{where}: {option} missing"
        value = words[words.index(option) + 1]
        assert value and value != "*", f"{where}: {option} {value}"


def test_compose_mlflow_allows_its_service_name_and_loopback():
    words = shlex.split(command_line(services()["mlflow"]["command"]))
    hosts = set(words[words.index("--allowed-hosts") + 1].split(","))
    assert {"mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= hosts


def test_kubernetes_mlflow_runs_as_non_root_with_health_probes():
    (deployment,) = [doc for doc in manifests() if doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    for container in pod["containers"]:
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"


# --- startup order --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ray-head", "ray-worker", "mlflow"])
def test_long_running_services_have_a_healthcheck(name):
    test = services()[name]["healthcheck"]["test"]
    assert test and test[0] in ("CMD", "CMD-SHELL")


@pytest.mark.parametrize(
    "name, needs", [("ray-worker", {"ray-head"}), ("train", {"ray-head", "mlflow"})]
)
def test_dependents_wait_until_their_dependencies_are_healthy(name, needs):
    depends_on = services()[name]["depends_on"]
    assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
    for dependency in needs:
        assert depends_on[dependency]["condition"] == "service_healthy"
    for dependency, how in depends_on.items():
        if how.get("condition") == "service_healthy":
            assert "healthcheck" in services()[dependency], f"{dependency} has no healthcheck"


def test_train_runs_once():
    assert services()["train"]["restart"] == "no"


# --- the image ------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user():
    users = [
        line.split(None, 1)[1].strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip().upper().startswith("USER ")
    ]
    assert users, "the Dockerfile sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


# --- every `shardprop` command line parses ------------------------------------------------


SHARDPROP_LINES = shardprop_lines()


def test_the_deployment_files_hold_shardprop_command_lines():
    wheres = {where.split(":")[0] for where, _ in SHARDPROP_LINES}
    assert {"docker-compose.yml", "rayjob.yaml", "deploy/README.md"} <= wheres


@pytest.mark.parametrize("where, argv", SHARDPROP_LINES, ids=[w for w, _ in SHARDPROP_LINES])
def test_every_shardprop_command_line_parses_with_the_real_cli(where, argv):
    try:
        parse_with_cli(argv)
    except CliError as error:
        pytest.fail(f"{where}\n  does not parse: {error.format_message()}")


def test_the_cli_parser_resolves_nested_commands_and_rejects_unknown_options():
    assert parse_with_cli(["shardprop", "bench", "network"]).info_name == "network"
    with pytest.raises(CliError, match="no-such-option"):
        parse_with_cli(["shardprop", "train", "c.yaml", "--no-such-option"])
    with pytest.raises(CliError):
        parse_with_cli(["shardprop", "no-such-command"])


# --- KubeRay autoscaling, sized for elastic runs -------------------------------------------

UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}  # the CRD's enum


def test_the_raycluster_is_the_rayjobs_cluster():
    """One cluster spec in two files: what the tests below check of one holds for both."""
    specs = {name.split("/")[0]: spec for name, spec in RAY_CLUSTERS}
    assert specs["RayCluster"] == specs["RayJob"]


@pytest.mark.parametrize("name, spec", RAY_CLUSTERS, ids=CLUSTER_IDS)
def test_every_ray_cluster_autoscales_its_workers(name, spec):
    assert spec["enableInTreeAutoscaling"] is True, name
    options = spec["autoscalerOptions"]
    assert options["upscalingMode"] in UPSCALING_MODES
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0
    assert spec["workerGroupSpecs"], f"{name} has no worker group"
    for group in spec["workerGroupSpecs"]:
        low, initial, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 1 <= low <= initial <= high, f"{name}/{group['groupName']}: {low} {initial} {high}"
        assert low < high, f"{name}/{group['groupName']} cannot scale"


def quantity(text: str) -> float:
    """A Kubernetes quantity of CPUs or a count: "2", "500m"."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_resources(group: dict) -> dict[str, float]:
    """What one pod of the group gives Ray: the group's `resources` (KubeRay passes them to
    `ray start`), CPU from the container's limit when they do not name it."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    given = {key: quantity(value) for key, value in group.get("resources", {}).items()}
    return {"CPU": quantity(limits["cpu"]), **given}


@pytest.mark.parametrize("name, spec", RAY_CLUSTERS, ids=CLUSTER_IDS)
def test_ray_sees_the_cpus_a_pod_has_and_the_head_takes_no_worker(name, spec):
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert ray_resources(group)["CPU"] == quantity(limits["cpu"]), group["groupName"]
        assert "resources" not in group["rayStartParams"], "one place: the group's resources"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not head.get("resources"), f"{name}: the head gives Ray a resource workers ask for"


def run_config(argv: list[str]) -> Config:
    """The config a `shardprop train|submit` line runs with: its config file (the image's
    /app/configs is the repository's configs/), then its --set and --workers."""
    params = parse_with_cli(argv).params
    path = params["config"] and ROOT / str(params["config"]).replace("/app/configs/", "configs/")
    flags = {"cluster.workers": params.get("workers")}
    return load_config(path, params.get("set_") or [], flags)


TRAINING_LINES = [(w, argv) for w, argv in SHARDPROP_LINES if argv[1:2] in (["train"], ["submit"])]


@pytest.mark.parametrize("where, argv", TRAINING_LINES, ids=[w for w, _ in TRAINING_LINES])
def test_every_training_command_line_loads_its_config(where, argv):
    try:
        run_config(argv)
    except (CliError, ConfigError) as error:
        pytest.fail(f"{where}\n  {error}")


def elastic_lines() -> list[tuple[str, ClusterConfig]]:
    found = []
    for where, argv in TRAINING_LINES:
        try:
            cluster = run_config(argv).cluster
        except (CliError, ConfigError):
            continue  # failed above
        if cluster.smallest < cluster.largest:
            found.append((where, cluster))
    return found


ELASTIC_LINES = elastic_lines()


def test_the_rayjob_and_the_readme_run_elastic_trainings():
    wheres = {where.split(":")[0] for where, _ in ELASTIC_LINES}
    assert {"rayjob.yaml", "deploy/README.md"} <= wheres


def workers_per_pod(group: dict, cluster: ClusterConfig) -> float:
    """How many of the run's workers one pod of the group holds: the same whole number for
    every resource a worker asks for, or the test fails."""
    given = ray_resources(group)
    asked = {"CPU": float(cluster.cpus_per_worker), **cluster.worker_resources}
    assert set(given) == set(asked), f"pods give {given}, a worker asks for {asked}"
    counts = {key: given[key] / need for key, need in asked.items()}
    per_pod = counts["CPU"]
    assert all(count == per_pod for count in counts.values()), f"a pod holds {counts} workers"
    assert per_pod >= 1 and per_pod.is_integer(), f"a pod holds {per_pod} workers"
    return per_pod


@pytest.mark.parametrize("where, cluster", ELASTIC_LINES, ids=[w for w, _ in ELASTIC_LINES])
def test_the_worker_pods_are_the_elastic_runs_workers(where, cluster):
    """minReplicas / replicas / maxReplicas worker pods hold cluster.min_workers / workers /
    max_workers: the autoscaler adds the pods an elastic run grows into, no more."""
    for name, spec in RAY_CLUSTERS:
        (group,) = spec["workerGroupSpecs"]
        per_pod = workers_per_pod(group, cluster)
        replicas = (group["minReplicas"], group["replicas"], group["maxReplicas"])
        sizes = (cluster.smallest, cluster.workers, cluster.largest)
        assert tuple(per_pod * n for n in replicas) == sizes, f"{where}\n  vs {name}"


# --- no secret committed --------------------------------------------------------------------

SECRET_FILES = [COMPOSE, DOCKERFILE, DEPLOY_README, *K8S_MANIFESTS]
RANDOM_LOOKING = re.compile(r"[A-Za-z0-9_-]{32,}")  # hex and base64url runs


def test_the_token_file_is_git_ignored():
    result = subprocess.run(
        ["git", "check-ignore", "-q", TOKEN_FILE], cwd=ROOT, check=False, capture_output=True
    )
    assert result.returncode == 0, f"{TOKEN_FILE} is not git-ignored"


@pytest.mark.parametrize("path", SECRET_FILES, ids=lambda p: p.name)
def test_no_ray_token_value_is_written_in_the_files(path):
    text = path.read_text()
    for match in re.finditer(r"RAY_AUTH_TOKEN[ \t]*[:=][ \t]*(\S*)", text):
        value = match.group(1)
        inlined = value and not value.startswith("${")  # ${VAR}: taken from the environment
        assert not inlined, f"{path.name}: {match.group(0)!r} inlines a token"
    docs = list(yaml.safe_load_all(text)) if path.suffix == ".yaml" else []
    for doc in docs:
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") == "RAY_AUTH_TOKEN":
                assert "value" not in node, "RAY_AUTH_TOKEN must come from a Secret"
            if isinstance(node, dict) and node.get("kind") == "Secret":
                pytest.fail(f"{path.name} holds a Secret object")


@pytest.mark.parametrize("path", SECRET_FILES, ids=lambda p: p.name)
def test_no_random_looking_string_is_written_in_the_files(path):
    for match in RANDOM_LOOKING.finditer(path.read_text()):
        word = match.group(0)
        looks_random = re.search(r"\d", word) and re.search(r"[A-Za-z]", word)
        assert not looks_random, f"{path.name}: {word!r} looks like a secret"
