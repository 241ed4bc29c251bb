"""authproxy's own certificate authority, for forward-proxy mode.

A CONNECT to a host a service names is answered with a TLS server certificate
for that host, issued on the spot by this CA: tools that trust the CA
(``authproxy exec`` hands them a bundle that holds it) then talk HTTP/1.1 to
authproxy inside the tunnel. The CA lives in ``ca_dir``: ``ca.pem`` (0644, to
install in trust stores) and ``ca.key`` (0600, never leaves the folder); it is
made on first need, under a file lock so two processes never make two CAs.

Leaves are ECDSA P-256, valid 30 days from an hour ago, and kept in memory per
host (LRU); one leaf key per process serves every host, so issuing a leaf is a
signature and an SSLContext, not a key generation.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import secrets
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authproxy.state import write_atomic

__all__ = ["CertificateAuthority", "default_ca_dir"]

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=30)  # notAfter - notBefore, exactly
BACKDATE = dt.timedelta(hours=1)  # clocks of clients a little behind still accept a fresh leaf
RENEW_BEFORE = dt.timedelta(days=1)  # a cached leaf this close to its end is issued again
CACHE_SIZE = 1024


def default_ca_dir(state_dir: str) -> Path:
    return Path(os.path.expanduser(state_dir)) / "ca"


class CertificateAuthority:
    def __init__(self, ca_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.ca_dir = ca_dir
        self.cert_path = ca_dir / "ca.pem"
        self.key_path = ca_dir / "ca.key"
        self.cert = cert
        self._key = key
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_ski = x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._cache: collections.OrderedDict[str, tuple[ssl.SSLContext, dt.datetime]] = collections.OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the CA itself
    @classmethod
    def load_or_create(cls, ca_dir: str | Path) -> "CertificateAuthority":
        """The CA in ``ca_dir``, made there first if it is not (the folder 0700)."""
        ca_dir = Path(os.path.expanduser(str(ca_dir)))
        loaded = cls._load(ca_dir)
        if loaded is not None:
            return loaded
        _private_dir(ca_dir)
        fd = os.open(ca_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process may be making it right now
            loaded = cls._load(ca_dir)
            if loaded is not None:
                return loaded
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _ca_certificate(key)
            # The key first: a ca.pem never exists without its key.
            write_atomic(ca_dir / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
            write_atomic(ca_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
            return cls(ca_dir, cert, key)
        finally:
            os.close(fd)  # releases the lock

    @classmethod
    def _load(cls, ca_dir: Path) -> "CertificateAuthority | None":
        try:
            cert_pem = (ca_dir / "ca.pem").read_bytes()
            key_pem = (ca_dir / "ca.key").read_bytes()
        except FileNotFoundError:
            return None
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise ValueError(f"{ca_dir}: ca.key is not the key of ca.pem")
        return cls(ca_dir, cert, key)

    # ------------------------------------------------------------------ leaves
    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``host`` (a DNS name or an IP
        address), ALPN ``http/1.1`` only. Cached per host; issued again when the
        cached leaf is within a day of its end."""
        host = host.strip().lower().removeprefix("[").removesuffix("]")
        now = dt.datetime.now(dt.timezone.utc)
        with self._lock:
            entry = self._cache.get(host)
            if entry is not None and entry[1] - now > RENEW_BEFORE:
                self._cache.move_to_end(host)
                return entry[0]
        ctx, not_after = self._issue(host, now)
        with self._lock:
            self._cache[host] = (ctx, not_after)
            self._cache.move_to_end(host)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return ctx

    def issue_leaf(self, host: str, now: dt.datetime | None = None) -> x509.Certificate:
        """The leaf certificate for ``host`` (not cached; :meth:`server_context` caches)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        not_before = now - BACKDATE
        not_after = min(not_before + LEAF_VALIDITY, _not_after(self.cert))
        name = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if 0 < len(host) <= 64 else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(name))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=not name)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(self._leaf_ski, critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def _issue(self, host: str, now: dt.datetime) -> tuple[ssl.SSLContext, dt.datetime]:
        cert = self.issue_leaf(host, now)
        # The leaf alone: the CA is the client's trust anchor (and one PEM object less
        # to decode makes issuing ~15% cheaper).
        chain = cert.public_bytes(serialization.Encoding.PEM)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        _load_chain(ctx, chain + self._leaf_key_pem, self.ca_dir)
        return ctx, _not_after(cert)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "authproxy"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"authproxy local CA {secrets.token_hex(4)}"),
    ])  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc) - BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _not_after(cert: x509.Certificate) -> dt.datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def _key_usage(digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


def _load_chain(ctx: ssl.SSLContext, pem: bytes, private_dir: Path) -> None:
    """``load_cert_chain`` reads files only: an anonymous memory file where there is one
    (Linux), else a 0600 file in the CA's own private folder, removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("authproxy-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, tmp = tempfile.mkstemp(prefix=".leaf.", dir=private_dir)
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
