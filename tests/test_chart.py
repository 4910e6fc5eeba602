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
    expected = ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
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
    if example:
        test_pod = next(obj for obj in objects if obj["kind"] == "Pod")
        assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert "http://smollm2-gateway.bloombee-system.svc:8000/v1" in test_pod["spec"]["containers"][0]["command"]


def test_without_rbac_only_the_operator_is_installed():
    objects = rendered(values(rbac={"create": False}))
    assert [obj["kind"] for obj in objects] == ["Deployment"]


def test_the_chart_crd_is_the_generated_one():
    chart_crd = (CHART / "crds" / "distributedllm.yaml").read_text()
    assert chart_crd == (CHART.parent.parent / "crds" / "distributedllm.yaml").read_text(), (
        "after regenerating crds/distributedllm.yaml, copy it to charts/bloombee/crds/"
    )


def test_rbac_covers_what_the_operator_does_and_is_not_a_wildcard():
    role = next(obj for obj in rendered(values()) if obj["kind"] == "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip
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
