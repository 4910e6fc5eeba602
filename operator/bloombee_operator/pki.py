"""Each deployment's own certificate authority, and the certificates of its parts.

A deployment (one DistributedLLM, or one ``bloombee up``) gets a CA of its own; every part gets a
certificate from it whose common name says who it is (``bloombee_contract.tls``) and whose
subject alternative names are the addresses its peers dial. Keys are ECDSA P-256: small, and
fast to make (a deployment mints a handful at start).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bloombee_contract.tls import CA_FILE, CERT_FILE, KEY_FILE, TlsFiles
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 365
LEAF_DAYS = 90


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, PEM-encoded."""

    cert: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(name: str, days: int = CA_DAYS) -> Identity:
    """A self-signed CA for one deployment."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bloombee CA {name}")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5)).not_valid_after(_now() + datetime.timedelta(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return Identity(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(ca: Identity, common_name: str, hosts: Iterable[str], days: int = LEAF_DAYS,
          now: datetime.datetime | None = None) -> Identity:  # fmt: skip
    """A certificate for one part: ``common_name`` says who it is, ``hosts`` where it is dialled.
    It serves and calls (server and client auth), as every part does both. ``now``: issued as at
    that time (an earlier one makes a certificate already part-way through its lifetime)."""
    now = now or _now()
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    names = sorted(set(hosts))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )  # fmt: skip
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return Identity(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def due_for_renewal(cert_pem: bytes, now: datetime.datetime | None = None) -> bool:
    """Whether a certificate has less than a third of its lifetime left (or cannot be read): time
    to issue the next one, which the parts load without a restart (``bloombee_contract.tls``)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    now = now or _now()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime / 3


def write_identity(directory: Path, ca: Identity, identity: Identity) -> TlsFiles:
    """The files a part reads (``bloombee_contract.tls`` layout); the key readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CA_FILE).write_bytes(ca.cert)
    (directory / CERT_FILE).write_bytes(identity.cert)
    key = directory / KEY_FILE
    key.touch(mode=0o600)
    key.chmod(0o600)
    key.write_bytes(identity.key)
    return TlsFiles.at(directory)


HOSTS_FILE = "hosts"  # beside a part's certificate: the names it was issued for


class DeploymentCA:
    """One deployment's CA kept in a directory (``ca/``), and a TLS directory per part beside it.

    ``bloombee up`` keeps it in its run directory: a restarted part gets its identity back, and a
    new run directory is a new CA (nothing from an earlier run is trusted)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        ca_dir = directory / "ca"
        if (ca_dir / CERT_FILE).is_file() and (ca_dir / KEY_FILE).is_file():
            self.ca = Identity((ca_dir / CERT_FILE).read_bytes(), (ca_dir / KEY_FILE).read_bytes())
        else:
            self.ca = new_ca(name)
            write_identity(ca_dir, self.ca, self.ca)

    def identity(self, common_name: str, hosts: Iterable[str]) -> TlsFiles:
        """The TLS directory of the part ``common_name`` (``stage/eu-0``), made on first use."""
        directory = self.directory / common_name.replace("/", "-")
        hosts = sorted(set(hosts))
        issued_for = directory / HOSTS_FILE
        try:
            files = TlsFiles.at(directory)
            # a part that moved (another address, e.g. another network namespace) needs a certificate for it
            if set(hosts) <= set(issued_for.read_text().split()):
                return files
        except (ValueError, OSError):
            pass
        files = write_identity(directory, self.ca, issue(self.ca, common_name, hosts))
        issued_for.write_text("\n".join(hosts) + "\n")
        return files
