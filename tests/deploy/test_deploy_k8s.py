"""The Kubernetes manifests, offline: `kubectl kustomize` renders the base and every overlay, each
object validates strictly against the API schemas of the oldest and newest Kubernetes we support
(kubernetes-validate), and the objects agree with each other and with the server: native gRPC
probes on the server's port, settings the server accepts, a termination grace period that covers
the preStop pause and the drain, a headless Service and an autoscaler that find the Deployment,
the GPU overlay's nvidia.com/gpu and CUDA settings, and bearer tokens mounted from a Secret whose
placeholder the server refuses to start with."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from seqserve.server.auth import TokenFileError, read_tokens

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/model-volume"]
# 1.30: the preStop `sleep` action is on by default from here (native gRPC probes since 1.27).
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
DRAIN_MARGIN_S = 5


def test_every_kustomization_is_tested() -> None:
    found = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


@pytest.fixture(scope="module")
def rendered(tool) -> dict[str, list[dict[str, Any]]]:
    """kustomization -> its objects, as `kubectl kustomize` (kustomize built into kubectl) renders them."""
    out = {}
    for name in KUSTOMIZATIONS:
        result = subprocess.run([tool("kubectl"), "kustomize", str(K8S / name)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"kubectl kustomize {name}: {result.stderr}"
        out[name] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """Literal env values; a value from the downward API (resourceFieldRef) stands in as its unit count."""
    out = {}
    for e in c["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and ref["containerName"] == c["name"]
            out[e["name"]] = str(math.ceil(float(c["resources"]["limits"]["cpu"])))  # divisor 1: whole cores
    return out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_objects_validate_strictly(rendered, name: str, version: str) -> None:
    for obj in rendered[name]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} against {version}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_deployment_probes_ports_settings_and_shutdown(rendered, name: str, config_from_env,
                                                      server_stage, stage_env) -> None:
    deployment = one(rendered[name], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    config = config_from_env(env_of(c))  # the server's own parser accepts the Deployment's settings
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == config.port, f"{probe}: native gRPC probe on the server's port"
    assert c["readinessProbe"]["grpc"]["service"] == "seqserve.v1.SeqServe"
    assert c["startupProbe"]["grpc"]["service"] == "seqserve.v1.SeqServe"
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.grace_period_s, \
        "liveness must not kill a pod that is draining (NOT_SERVING) within its grace period"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config.grace_period_s + DRAIN_MARGIN_S, \
        "terminationGracePeriodSeconds must cover preStop + SEQSERVE_GRACE_PERIOD + a margin"
    assert "replicas" not in deployment["spec"], "replicas belong to the HorizontalPodAutoscaler"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    # The image's user and ports, as the Dockerfile sets them.
    uid = int(server_stage.all("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    image_env = stage_env(server_stage)
    assert int(image_env["SEQSERVE_PORT"]) == config.port and int(image_env["SEQSERVE_METRICS_PORT"]) == config.metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_headless_service_autoscaler_and_budget_find_the_pods(rendered, name: str) -> None:
    objects = rendered[name]
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    hpa, pdb = one(objects, "HorizontalPodAutoscaler"), one(objects, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None", "headless: DNS lists every pod for client-side round-robin"
    assert service["spec"]["selector"] == selector and pdb["spec"]["selector"]["matchLabels"] == selector
    container_ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports and port["port"] == container_ports[port["targetPort"]]
    assert {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}["grpc"] == "grpc"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == ("Deployment", deployment["metadata"]["name"], "apps/v1")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if name == "base":
        assert hpa["spec"]["minReplicas"] >= 2, "two replicas at least, so one can drain while the other serves"


def test_gpu_overlay_asks_for_a_gpu_and_cuda(rendered, config_from_env) -> None:
    cpu, gpu = container(one(rendered["base"], "Deployment")), container(one(rendered["overlays/gpu"], "Deployment"))
    assert cpu["image"] == "seqserve:cpu" and gpu["image"] == "seqserve:gpu"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == gpu["resources"]["limits"]["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert config_from_env(env_of(gpu)).device == "cuda", "--device cuda: fail loudly, never fall back to CPU"
    assert config_from_env(env_of(cpu)).device == "cpu"
    tolerations = one(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    names = [e["name"] for e in gpu["env"]]
    assert len(names) == len(set(names)), "the patch must replace variables, not repeat them"


def test_model_volume_overlay_mounts_the_model_read_only(rendered, config_from_env) -> None:
    objects = rendered["overlays/model-volume"]
    deployment = one(objects, "Deployment")
    c = container(deployment)
    model_dir = str(config_from_env(env_of(c)).model_dir)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == model_dir]
    assert mount["readOnly"] is True
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = one(objects, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_tokens_come_from_a_secret_mounted_for_rotation(rendered, name: str, config_from_env, tmp_path: Path) -> None:
    objects = rendered[name]
    deployment = one(objects, "Deployment")
    c = container(deployment)
    config = config_from_env(env_of(c))
    token_file = PurePosixPath(config.auth_token_file)
    assert token_file.is_absolute(), "every call must carry a bearer token (SEQSERVE_AUTH_TOKEN_FILE)"
    assert config.auth_health == "off", "the native gRPC probes send no token: health must stay open"
    # The file's folder is a read-only mount of a Secret volume, without subPath: the kubelet then
    # updates the file in place when the Secret changes, and a SIGHUP makes the server reread it.
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "the token file must not be readable by everyone"
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert volume["secret"]["defaultMode"] & 0o040 and pod_security["fsGroup"] == pod_security["runAsUser"], \
        "the server's user reads the token file through its group"
    (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == volume["secret"]["secretName"]]
    placeholder = secret["stringData"][token_file.name]
    # The placeholder is not a token: deployed unchanged, the server refuses to start, instead of
    # accepting a token anyone can read here.
    (tmp_path / "tokens").write_text(placeholder)
    with pytest.raises(TokenFileError, match="no tokens"):
        read_tokens(tmp_path / "tokens")
