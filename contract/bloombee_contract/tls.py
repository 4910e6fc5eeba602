"""Mutual TLS between the parts of one deployment: the files each part holds, and the contexts.

Every part (stage, gateway, probe, operator) holds a directory with the deployment's CA
certificate (``ca.crt``), its own certificate signed by that CA (``tls.crt``, whose common name
says who it is: ``stage/<name>``, ``gateway/<name>``, ``probe/<cluster>``, ``operator``) and its
key (``tls.key``): the layout of a Kubernetes TLS Secret plus ``ca.crt``. A server asks every
caller for a certificate; only the liveness and readiness paths answer a caller without one
(kubelets and load balancers probe without certificates). A client checks the server's
certificate against the CA and its address. Standard library only: minting certificates is the
operator's (``bloombee_operator.pki``).

Certificates rotate without a restart: every context made here is remembered with its directory,
and ``reload_changed`` (which servers call every few seconds) loads the files again into those
same contexts when they changed, as a Kubernetes Secret volume changes when the operator renews
it. New connections use the new certificate; connections already open keep theirs, so no
generation in flight is dropped. A new CA adds to the trusted ones (both verify during a CA
rotation) until the process restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import weakref
from dataclasses import dataclass
from pathlib import Path

from bloombee_contract.paths import HEALTHZ_PATH, READYZ_PATH

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
OPEN_PATHS = frozenset({HEALTHZ_PATH, READYZ_PATH})  # answered without a client certificate


log = logging.getLogger("bloombee.tls")


class TlsError(ValueError):
    """The TLS files cannot be used; the message names the file."""


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_FILE

    @property
    def cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / KEY_FILE

    def measure_key(self) -> bytes | None:
        """The deployment's key for signed measurement requests, where it was given one."""
        path = self.directory / MEASURE_KEY_FILE
        return path.read_bytes().strip() if path.is_file() else None

    @classmethod
    def at(cls, directory: str | Path) -> TlsFiles:
        files = cls(Path(directory))
        missing = [str(path) for path in (files.ca, files.cert, files.key) if not path.is_file()]
        if missing:
            raise TlsError(f"TLS directory {directory}: missing {', '.join(missing)}")
        return files


def _load(context: ssl.SSLContext, files: TlsFiles, identify: bool) -> None:
    try:
        if identify:
            context.load_cert_chain(files.cert, files.key)
        context.load_verify_locations(files.ca)
    except (ssl.SSLError, OSError) as error:
        raise TlsError(f"TLS directory {files.directory}: {error}") from None


# Every context made here, by directory, with whether it presents our certificate and the state
# of the files when they were last loaded: what reload_changed refreshes.
_made: dict[Path, tuple[tuple, weakref.WeakKeyDictionary[ssl.SSLContext, bool]]] = {}


def _stamp(files: TlsFiles) -> tuple:
    """What changes when any of the three files is replaced (a Secret volume swaps a symlink)."""
    stats = [path.stat() for path in (files.ca, files.cert, files.key)]
    return tuple((stat.st_mtime_ns, stat.st_ino, stat.st_size) for stat in stats)


def _remember(context: ssl.SSLContext, files: TlsFiles, identify: bool) -> ssl.SSLContext:
    directory = files.directory.resolve()
    if directory not in _made:
        _made[directory] = (_stamp(files), weakref.WeakKeyDictionary())
    _made[directory][1][context] = identify
    return context


def reload_changed() -> list[Path]:
    """Load the files again into every context made from a directory whose files changed; the
    directories reloaded. A half-written set (a key that does not match its certificate yet) is
    left for the next call."""
    reloaded = []
    for directory, (stamp, contexts) in list(_made.items()):
        files = TlsFiles(directory)
        try:
            now = _stamp(files)
            if now == stamp:
                continue
            for context, identify in list(contexts.items()):
                _load(context, files, identify)
        except (OSError, TlsError) as error:
            log.warning("TLS files in %s changed but cannot be loaded yet: %s", directory, error)
            continue
        _made[directory] = (now, contexts)
        reloaded.append(directory)
        log.info("TLS files in %s reloaded: new connections use the new certificate", directory)
    return reloaded


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """Serve with our certificate; ask callers for theirs and verify it against the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load(context, files, identify=True)
    # Optional at the handshake so probes without certificates reach /healthz and /readyz;
    # every other path refuses a caller without one (serving.process.require_peer).
    context.verify_mode = ssl.CERT_OPTIONAL
    return _remember(context, files, identify=True)


def client_context(files: TlsFiles, *, identify: bool = True) -> ssl.SSLContext:
    """Call servers of the deployment: their certificate must be the CA's, for the address called;
    ``identify`` presents our own certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, certificate required; no system CAs
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load(context, files, identify)
    return _remember(context, files, identify)


def common_name(peercert: dict | None) -> str | None:
    """The verified peer's common name (``ssl.SSLSocket.getpeercert()``), or None without one."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


# A request relayed by a Kubernetes API server's service proxy reaches its pod without the
# caller's certificate (the proxy does not present one). The one such request, the operator
# asking a probe to measure its links, is signed instead: HMAC-SHA256 with the deployment's
# measure key (a file beside the certificates) over a timestamp and the body.
OPERATOR_IDENTITY = "operator"  # the operator's certificate's common name
SIGNED_OPERATOR = "operator (signed request)"  # the caller of a signed request
MEASURE_KEY_FILE = "measure.key"
SIGNATURE_HEADER = "X-Bloombee-Signature"
SIGNATURE_MAX_AGE_S = 120.0


def sign(key: bytes, body: bytes, at: float) -> str:
    """The header value: ``<unix time>:<hex HMAC-SHA256 of "<time>\\n" + body>``."""
    stamp = f"{at:.0f}"
    digest = hmac.new(key, stamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()
    return f"{stamp}:{digest}"


def signature_ok(key: bytes, header: str, body: bytes, now: float, max_age_s: float = SIGNATURE_MAX_AGE_S) -> bool:
    """Whether ``header`` signs ``body`` with ``key``, made within ``max_age_s`` of ``now``."""
    stamp, _, _ = header.partition(":")
    try:
        at = float(stamp)
    except ValueError:
        return False
    return abs(now - at) <= max_age_s and hmac.compare_digest(header, sign(key, body, at))
