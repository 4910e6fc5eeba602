"""Launch specs: every field of each spec survives the command line and the server's real parser."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from bloombee_contract.launch import (
    API_KEY_ENV,
    FlagValueError,
    GatewayLaunch,
    LaunchSpec,
    ProbeLaunch,
    StageLaunch,
    parse_span,
)

# A value other than the default for every field, so each one must travel to be seen.
CHANGED: dict[type[LaunchSpec], dict] = {
    StageLaunch: dict(model="gguf://pkg/m.gguf", layers=(3, 17), dtype="bfloat16", device="cuda:1", host="0.0.0.0",
                      port=9001, name="eu-stage-1", threads=3, codec="auto", link_mbps=87.25,
                      accept_codecs=("raw", "zstd"), kv_budget_gib=0.123456789, kv_owner_share=0.375, micro_batch=4,
                      plan="3f2a9c0d1e",
                      peers=("https://next:8080", "https://gw:8443"),
                      offload_weights=0.25,
                      offload_kv=0.5, offload_tier="host", no_prefetch=True, packed_weights="off", session_timeout=12.5,
                      tls_dir="/etc/bloombee/tls", ready_file="/tmp/ready.json", log_level="DEBUG"),
    GatewayLaunch: dict(model="/models/m", stages=(("http://a:1",), ("http://b1:2", "https://b2:3")),
                        served_model_name="chat", host="0.0.0.0", port=8443, public_url="http://gw:8000",
                        step_timeout=30.5, api_key="secret", relay=True, relay_hops=(True, False), draft="early-exit",
                        draft_max=5, draft_width=3, draft_head="/heads/mine", draft_layers=12,
                        draft_model="/models/small", micro_batch=6, max_in_flight=2,
                        prefix_cache=0, max_sequences=9, max_waiting=3, recovery_wait=7.5, request_timeout=42.5,
                        default_max_tokens=99, internal_port=9443, route_file="/etc/bloombee/route/route.json",
                        tls_dir="/tls", ready_file="/tmp/gw.json", log_level="WARNING"),
    ProbeLaunch: dict(host="127.0.0.1", port=0, tls_dir="/run/tls", ready_file="/tmp/probe.json"),
}
REQUIRED = {
    StageLaunch: dict(model="m", layers=(0, 1)),
    GatewayLaunch: dict(model="m", served_model_name="x"),
    ProbeLaunch: {},
}


@pytest.mark.parametrize("spec_type", list(CHANGED), ids=lambda t: t.__name__)
def test_every_field_is_changed_by_the_table(spec_type: type[LaunchSpec]):
    """The table above must name every field with a non-default value, or the round trip proves nothing."""
    changed = CHANGED[spec_type]
    for field in dataclasses.fields(spec_type):
        assert field.name in changed, f"{spec_type.__name__}.{field.name} is not exercised"
        if field.default is not dataclasses.MISSING:
            assert changed[field.name] != field.default, f"{spec_type.__name__}.{field.name} keeps its default"


@pytest.mark.parametrize("spec_type", list(CHANGED), ids=lambda t: t.__name__)
def test_every_field_round_trips_through_the_servers_parser(spec_type: type[LaunchSpec], monkeypatch):
    spec = spec_type(**CHANGED[spec_type])
    for name, value in spec.environment().items():  # secrets travel in the environment, never in argv
        monkeypatch.setenv(name, value)
    assert spec_type.parse(spec.args()) == spec
    assert "secret" not in spec.command()


@pytest.mark.parametrize("spec_type", list(CHANGED), ids=lambda t: t.__name__)
def test_defaults_render_as_nothing_but_the_required_flags(spec_type: type[LaunchSpec], monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    spec = spec_type(**REQUIRED[spec_type])
    assert spec_type.parse(spec.args()) == spec
    assert len(spec.args()) == 2 * len(REQUIRED[spec_type])


def test_extra_flags_are_read_by_the_same_parser_and_win():
    spec = StageLaunch(model="m", layers=(0, 4), micro_batch=2)
    tweaked = spec.with_flags(["--micro-batch", "8", "--accept-codecs", "raw,zstd"])
    assert tweaked == dataclasses.replace(spec, micro_batch=8, accept_codecs=("raw", "zstd"))
    with pytest.raises(SystemExit):
        spec.with_flags(["--offload-weights", "1.5"])  # a fraction outside [0, 1] is refused, not clamped


def test_bad_flag_values_say_what_is_wrong(capsys):
    with pytest.raises(FlagValueError, match="START:END"):
        parse_span("10")
    with pytest.raises(SystemExit):
        GatewayLaunch.parse(["--model", "m", "--served-model-name", "x", "--stages", "ftp://a"])
    assert "--stages: URL 'ftp://a' must start with http:// or https://" in capsys.readouterr().err


@pytest.mark.parametrize("spec_type", list(CHANGED), ids=lambda t: t.__name__)
def test_the_servers_own_help_is_built_from_the_spec(spec_type: type[LaunchSpec]):
    """`python -m <module> [subcommand] --help` is the parser the spec builds, flag for flag."""
    command = [sys.executable, "-m", spec_type.module, *spec_type.subcommand, "--help"]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for field in dataclasses.fields(spec_type):
        assert "--" + field.name.replace("_", "-") in shown.stdout
