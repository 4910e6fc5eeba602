"""Link measurement: the summary of samples (pure), and real probes on loopback, one of them
behind the delaying proxy that bloombee up uses to emulate far-apart clusters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from bloombee_operator.planning_inputs import links_from_entries, parse_links
from bloombee_stage.serving.probe import LinkMeasurementError, Samples, measure, summarise
from pipelines import post_json


def test_summary_takes_the_median_echo_and_the_faster_bulk_transfer_less_a_round_trip():
    samples = Samples("eu", "us", echo_s=(0.050, 0.052, 0.400), bulk_bytes=10_000_000, bulk_s=(0.852, 1.052))
    entry = summarise(samples, measured_at="2026-11-24T00:00:00Z")
    assert entry == {"from": "eu", "to": "us", "rttMs": 52.0, "mbps": 100.0, "measuredAt": "2026-11-24T00:00:00Z"}
    links = links_from_entries(parse_links([entry]), ["eu", "us"])  # the planner reads it as it is
    assert links.get("us", "eu").rtt_s == pytest.approx(0.052) and links.get("eu", "us").bandwidth == 12.5e6
    with pytest.raises(LinkMeasurementError, match="eu -> us: no samples"):
        summarise(Samples("eu", "us", (), 1, ()))


def _start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    ready = tmp_path / f"{name}.json"
    process = subprocess.Popen([sys.executable, "-m", *args, "--port", "0", "--ready-file", str(ready)],
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.is_file():
        assert process.poll() is None and time.monotonic() < deadline, f"{name} did not start"
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["url"]


@pytest.fixture()
def probes(tmp_path):
    started = []
    try:
        probe, url = _start(tmp_path, "probe", "bloombee_stage.probe", "serve", "--host", "127.0.0.1")
        started.append(probe)
        delay, delayed = _start(tmp_path, "delay", "bloombee_operator.backends.link_delay", "--to", url,
                                "--delay-ms", "20")  # fmt: skip
        started.append(delay)
        yield url, delayed
    finally:
        for process in started:
            process.terminate()
            process.wait()


def test_real_probes_measure_the_emulated_wan_delay(probes):
    direct, delayed = probes
    near, far = asyncio.run(measure("here", {"near": direct, "far": delayed}, echoes=5, bulk_bytes=1 << 20))
    assert (near["from"], near["to"], far["to"]) == ("here", "near", "far")
    assert near["rttMs"] < 40 <= far["rttMs"]  # 20 ms each way cannot take less than 40 ms
    assert near["mbps"] > 0 and far["mbps"] > 0


def test_a_probe_measures_on_request_and_refuses_bad_requests(probes):
    direct, delayed = probes

    def post(body: object) -> tuple[int, dict]:
        return post_json(direct + "/probe/measure", body, timeout=60)

    status, reply = post({"source": "eu", "targets": {"us": delayed}, "echoes": 3, "bulkBytes": 65536})
    assert status == 200 and reply["links"][0]["from"] == "eu" and reply["links"][0]["rttMs"] >= 40
    assert post({"targets": {}})[0] == 400
    status, reply = post({"targets": {"us": "ftp://x"}})
    assert status == 400 and "http" in reply["error"]
    status, reply = post({"targets": {"us": "http://127.0.0.1:9"}, "echoes": 1})  # nothing listens there
    assert status == 502 and "link here -> us" in reply["error"]
    with urllib.request.urlopen(direct + "/probe?bytes=1000", timeout=10) as reply:
        assert len(reply.read()) == 1000
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(direct + "/probe?bytes=lots", timeout=10)
    assert bad.value.code == 400
