"""Encryption of what authproxy keeps in a shared store (Redis).

A Redis server is run, backed up and dumped by other people than the ones who
own the credentials in it, so nothing usable is written there in clear: every
document is sealed with AES-256-GCM under a key derived from ``store.key_file``
(the same file on every replica). The file holds any random bytes, e.g.::

    head -c 32 /dev/urandom | base64 > store.key

Two keys are derived from it with HKDF-SHA256 (separate ``info``), one to
encrypt, one to make the fingerprints that tag a credential for
compare-and-delete: a tag is an HMAC, so it says nothing about the secret to
someone reading the dump, and a key used for one purpose is never used for the
other. The additional authenticated data of each document is its Redis key,
so a ciphertext copied under another name does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authproxy.store.base import StoreError

NONCE_BYTES = 12  # AES-GCM's standard nonce; random per seal (2^-32 collision risk only after ~2^32 seals)
MIN_KEY_BYTES = 16  # shorter key material is a typo or an empty-ish file, not a key
FINGERPRINT_CHARS = 24  # 96 bits of HMAC: plenty to tell two tokens apart, not a secret
_INFO_SEAL = b"authproxy store v1 aes-256-gcm"
_INFO_TAG = b"authproxy store v1 fingerprint"


def _derive(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def read_key_file(path: str) -> bytes:
    """The key material in ``path``: its bytes less a trailing newline. An empty or
    short file is refused with a message saying how to make one — a replica that
    started with a blank key would seal what no other replica can open."""
    try:
        with open(path, "rb") as f:
            material = f.read()
    except OSError as e:
        raise StoreError(f"cannot read store.key_file {path}: {e.strerror or e}") from None
    material = material.rstrip(b"\r\n")
    if len(material) < MIN_KEY_BYTES:
        what = "is empty" if not material else f"holds {len(material)} bytes, fewer than {MIN_KEY_BYTES}"
        raise StoreError(
            f"store.key_file {path} {what}: make one with 'head -c 32 /dev/urandom | base64 > {path}'"
            " and give every replica the same file"
        )
    return material


class StoreCipher:
    """Seals and opens documents, and fingerprints secrets, under keys derived from
    ``key_material``. The material and the keys never appear in ``repr``."""

    __slots__ = ("_aead", "_tag_key")

    def __init__(self, key_material: bytes) -> None:
        if len(key_material) < MIN_KEY_BYTES:
            raise StoreError(f"store key material must be at least {MIN_KEY_BYTES} bytes")
        self._aead = AESGCM(_derive(key_material, _INFO_SEAL))
        self._tag_key = _derive(key_material, _INFO_TAG)

    @classmethod
    def from_file(cls, path: str) -> "StoreCipher":
        return cls(read_key_file(path))

    def __repr__(self) -> str:
        return "StoreCipher(<key hidden>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce || AES-GCM(plaintext)``, authenticated together with ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of ``blob``; StoreError when it was sealed under another key,
        for another ``aad``, or changed since (GCM cannot tell these apart)."""
        if len(blob) < NONCE_BYTES + 16:
            raise StoreError(f"cannot decrypt {aad.decode(errors='replace')}: too short to be a sealed document")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise StoreError(
                f"cannot decrypt {aad.decode(errors='replace')} (a different store.key_file? every replica needs the same one)"
            ) from None

    def fingerprint(self, value: str) -> str:
        """A non-secret tag of ``value``: equal values give equal tags under one key file."""
        return hmac.new(self._tag_key, value.encode(), hashlib.sha256).hexdigest()[:FINGERPRINT_CHARS]
