"""The Helm chart: its values against values.schema.json, every rendered object against the
official Kubernetes schemas (or the CRD's own for the example), its CRD the generated one, and its
RBAC enough for what the operator does and no wider."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from bloombee_operator.backends.kubernetes.backend import CHILD_KINDS
from helm_subset import TemplateError, render
from test_crd import KUBERNETES, crd_accepts, pydantic_accepts

CHART = Path(__file__).resolve().parent.parent / "charts" / "bloombee"


def values(**overrides: dict) -> dict:
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in overrides.items():
        merged[key] = {**merged[key], **value}
    return merged


def rendered(chart_values: dict) -> list[dict]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    context = {"Values": chart_values, "Release": {"Name": "bb", "Namespace": "bloombee-system"},
               "Chart": {"AppVersion": chart["appVersion"], "Version": chart["version"]}}  # fmt: skip
    objects = []
    for template in sorted((CHART / "templates").rglob("*.yaml")):
        text = render(template.read_text(), context)
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def test_values_match_their_schema_and_bad_values_are_refused():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(values(), schema)
    bad = values()
    bad["operator"]["recheckSeconds"] = 0
    with pytest.raises(jsonschema.ValidationError, match="less than the minimum"):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**values(), "typo": 1}, schema)


@pytest.mark.parametrize("example", [False, True])
def test_every_rendered_object_is_valid(example):
    objects = rendered(values(example={"enabled": example}))
    kinds = sorted(obj["kind"] for obj in objects)
    # the operator's identity and the uninstall hook's; the operator, the hook's Job, helm test's pod(s)
    expected = ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"] * 2 + ["Deployment", "Job", "Pod"]
    assert kinds == sorted(expected + (["DistributedLLM", "Pod"] if example else []))
    for obj in objects:
        if obj["kind"] == "DistributedLLM":
            assert crd_accepts(obj) and pydantic_accepts(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    operator = next(obj for obj in objects if obj["kind"] == "Deployment")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "bloombee_operator.handlers"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _tests(objects: list[dict]) -> dict[str, list[str]]:
    """`helm test`'s pods by name: their commands."""
    return {obj["metadata"]["name"]: obj["spec"]["containers"][0]["command"] for obj in objects
            if obj["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"}  # fmt: skip


@pytest.mark.parametrize(("example", "test", "chat"), [
    (False, {}, None),
    (True, {}, "bloombee-system/smollm2"),
    (False, {"resource": "mine"}, "bloombee-system/mine"),
    (True, {"resource": "mine", "namespace": "team-a"}, "team-a/mine"),
])  # fmt: skip
def test_helm_test_checks_the_operator_always_and_a_resource_when_there_is_one(example, test, chat):
    objects = rendered(values(example={"enabled": example}, test=test))
    tests = _tests(objects)
    assert tests.pop("bb-test-operator") == ["bloombee", "check", "--operator", "bloombee-system/bb-operator",
                                             "--wait-s", "60"]  # fmt: skip
    if chat is None:
        assert not tests
    else:
        assert tests == {"bb-test-chat": ["bloombee", "check", "--wait-s", "600", "--resource", chat]}
    for pod in (obj for obj in objects if obj["kind"] == "Pod"):  # as the operator: what it may read, they read
        assert pod["spec"]["serviceAccountName"] == "bb-operator"
        assert pod["spec"]["containers"][0]["image"] == "ghcr.io/bloombee/operator:0.1.0"


def test_helm_test_passes_the_gateway_key_where_the_chart_sets_one():
    objects = rendered({**values(example={"enabled": True}), "apiKeySecret": "gateway-key"})
    chat = next(obj for obj in objects if obj["metadata"]["name"] == "bb-test-chat")
    (env,) = chat["spec"]["containers"][0]["env"]
    assert env["name"] == "BLOOMBEE_API_KEY" and env["valueFrom"]["secretKeyRef"]["name"] == "gateway-key"


def _granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip


@pytest.mark.parametrize("everything", [False, True])
def test_uninstall_first_deletes_the_resources_while_the_operator_runs(everything):
    """A pre-delete hook: its ServiceAccount and role made before its Job, all removed once it
    succeeded; the Job deletes the release's DistributedLLMs (every one with allResources), bounded."""
    objects = rendered(values(uninstall={"allResources": everything, "waitSeconds": 45}))
    hooks = {(obj["kind"], obj["metadata"]["name"]): obj["metadata"].get("annotations", {}) for obj in objects
             if obj["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"}  # fmt: skip
    assert set(hooks) == {("ServiceAccount", "bb-uninstall"), ("ClusterRole", "bb-uninstall"),
                          ("ClusterRoleBinding", "bb-uninstall"), ("Job", "bb-uninstall")}  # fmt: skip
    job = hooks.pop(("Job", "bb-uninstall"))
    assert all(int(a["helm.sh/hook-weight"]) < int(job["helm.sh/hook-weight"]) for a in hooks.values())
    assert all(a["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
               for a in [job, *hooks.values()])  # fmt: skip
    spec = next(obj for obj in objects if obj["kind"] == "Job")["spec"]
    pod = spec["template"]["spec"]
    assert spec["backoffLimit"] == 0 and pod["serviceAccountName"] == "bb-uninstall"
    selected = ["--all", "--all-namespaces"] if everything else ["--namespace", "bloombee-system", "--selector",
                                                                 "app.kubernetes.io/instance=bb"]  # fmt: skip
    assert pod["containers"][0]["command"] == ["bloombee", "delete", *selected, "--wait-s", "45"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_uninstall_hook_may_do_what_the_finalizer_does_and_nothing_more():
    """What `bloombee delete` needs where no operator runs: delete the resource and drop its
    finalizer, list and delete every kind of child, read remote kubeconfig Secrets and delete TLS
    Secrets by name, list pods; it never creates or updates anything."""
    role = next(obj for obj in rendered(values()) if obj["kind"] == "ClusterRole"
                and obj["metadata"]["name"] == "bb-uninstall")  # fmt: skip
    granted = _granted(role)
    plural = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
              "NetworkPolicy": "networkpolicies", "ServiceExport": "serviceexports"}  # fmt: skip
    needed = {("bloombee.ai", "distributedllms", verb) for verb in ("get", "list", "delete", "patch")}
    needed |= {(api_version.rpartition("/")[0], plural[kind], verb) for api_version, kind in CHILD_KINDS
               for verb in ("list", "delete")}  # fmt: skip
    needed |= {("", "pods", "list"), ("", "secrets", "get"), ("", "secrets", "delete")}
    assert granted == needed


def test_without_rbac_the_user_makes_the_service_accounts():
    objects = rendered(values(rbac={"create": False}))
    assert sorted((obj["kind"], obj["metadata"]["name"]) for obj in objects) == [
        ("Deployment", "bb-operator"), ("Job", "bb-uninstall"), ("Pod", "bb-test-operator")]  # fmt: skip


def test_the_chart_crd_is_the_generated_one():
    chart_crd = (CHART / "crds" / "distributedllm.yaml").read_text()
    assert chart_crd == (CHART.parent.parent / "crds" / "distributedllm.yaml").read_text(), (
        "after regenerating crds/distributedllm.yaml, copy it to charts/bloombee/crds/"
    )


def test_rbac_covers_what_the_operator_does_and_is_not_a_wildcard():
    role = next(obj for obj in rendered(values()) if obj["kind"] == "ClusterRole"
                and obj["metadata"]["name"] == "bb-operator")  # fmt: skip
    granted = _granted(role)
    assert not any("*" in entry for entry in granted)
    plural = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
              "NetworkPolicy": "networkpolicies", "ServiceExport": "serviceexports"}  # fmt: skip
    for api_version, kind in CHILD_KINDS:  # what the backend applies, lists and deletes
        group = api_version.rpartition("/")[0]
        for verb in ("get", "list", "create", "patch", "delete"):
            assert (group, plural[kind], verb) in granted, (kind, verb)
    needed = {("bloombee.ai", "distributedllms", "watch"), ("bloombee.ai", "distributedllms/status", "patch"),
              ("", "events", "create"), ("", "secrets", "get"), ("", "secrets", "create"), ("", "secrets", "delete"),
              ("", "services/proxy", "create"), ("", "pods", "list"), ("", "pods/proxy", "get")}  # fmt: skip
    assert needed <= granted
    assert ("", "secrets", "list") not in granted  # Secrets are read, minted and deleted by name only


def test_notes_render_and_the_renderer_refuses_what_it_does_not_know():
    context = {"Values": values(), "Release": {"Name": "bb", "Namespace": "ns"}, "Chart": {"AppVersion": "0.1.0"}}
    notes = render((CHART / "templates" / "NOTES.txt").read_text(), context)
    assert "kubectl get dllm" in notes and "bb-operator" in notes
    with pytest.raises(TemplateError):
        render('{{ include "x" . }}', context)
    with pytest.raises(TemplateError):
        render("{{ .Values.missing }}", copy.deepcopy(context))


@pytest.mark.parametrize("name", ["Dockerfile.operator", "Dockerfile.stage"])
def test_images_run_as_non_root_with_a_health_check(name):
    text = (CHART.parent.parent / name).read_text()
    final_stage = text.rsplit("\nFROM ", 1)[-1]
    assert "\nUSER 10001" in final_stage and "\nHEALTHCHECK " in final_stage
    if name == "Dockerfile.stage":
        assert '"torch==2.13.0"' in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    else:
        installs = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not any("torch" in line for line in installs)


def test_the_operator_image_needs_no_torch():
    """What Dockerfile.operator runs imports without torch (its image has none)."""
    import subprocess
    import sys

    code = "import sys, bloombee_operator.handlers, bloombee_operator.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
