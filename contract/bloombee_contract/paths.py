"""URL paths of the data plane: what stage servers, gateways and probes serve, and their peers call."""

from __future__ import annotations

# Every server process.
HEALTHZ_PATH = "/healthz"  # the process answers
READYZ_PATH = "/readyz"  # it can serve (a gateway: every stage is ready)
METRICS_PATH = "/metrics"  # Prometheus text

# Stage servers.
STEP_PATH = "/v1/step"  # POST a wire frame: one step of a micro-batch
CODECS_PATH = "/v1/codecs"  # GET {"codecs": [...]}: what this process decodes, asked once per peer
INFO_PATH = "/info"  # GET span, dtype, memory, measured ms per layer, codec profiles
SESSION_PATH = "/v1/sessions/{session}"  # DELETE closes a session
ROLLBACK_PATH = SESSION_PATH + "/rollback"  # POST {"n": tokens to drop} or {"length": tokens to keep}
PARK_PATH = SESSION_PATH + "/park"  # POST: keep the session only as a fork source
PROFILE_PATH = "/profile"  # POST {"rows": [...], "repeats": N}: a timed run of the span (the operator only)

# Gateways.
RESULT_PATH = "/internal/v1/results"  # POST a result frame: where the last stage delivers tokens

# Link measurement, on every stage server and probe.
PROBE_PATH = "/probe"  # GET: echo (?bytes=N: N bytes down); POST: counts what it was sent
MEASURE_PATH = "/probe/measure"  # POST {"source", "targets": {name: url}}: measure from here


def session_path(template: str, session: str) -> str:
    """A session path with its id filled in, e.g. ``session_path(PARK_PATH, "abc")``."""
    return template.format(session=session)
# A gateway's heartbeats carry its process's lease; a stage closes the sessions of a lease it has
# not heard of for LEASE_TIMEOUT_S (the gateway died or restarted).
LEASE_HEADER = "X-Bloombee-Lease"
LEASE_TIMEOUT_S = 10.0
