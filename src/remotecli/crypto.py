"""Secrets at rest: AES-256-GCM with a key generated on first run.

The key lives in ``<data_dir>/secret.key`` (mode 0600, created atomically). Ciphertexts carry a
version byte and a random 96-bit nonce; the associated data binds a ciphertext to its purpose and
owner (for example ``b"agent-secret:vm-..."``), so one cannot be swapped for another.

The key file is a key ring: one base64 key per line, the first encrypts, all decrypt. Rotation
(``remotecli keys rotate``) prepends a new key, re-encrypts every stored secret, then drops the old
keys; a crash at any step leaves every ciphertext readable. A process whose key ring is stale
reloads the file once when a decryption fails.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remotecli.errors import RemotecliError

_VERSION = b"\x01"


class DecryptionFailed(RemotecliError):
    code = "decryption_failed"
    default_message = "A stored secret could not be decrypted (wrong key file?); see 'remotecli doctor'."


def read_key_ring(path: Path) -> list[bytes]:
    keys = [base64.b64decode(line) for line in path.read_bytes().split() if line.strip()]
    if not keys or any(len(key) != 32 for key in keys):
        raise DecryptionFailed("The key file is damaged; restore it from a backup.")
    return keys


def _write_new_file(path: Path, keys: list[bytes], *, replace: bool) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"".join(base64.b64encode(key) + b"\n" for key in keys))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            # link() fails if another process won the race; then use its key.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        if tmp.exists():
            os.unlink(tmp)


def write_key_ring(path: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically (mode 0600)."""
    _write_new_file(path, keys, replace=True)


def load_or_create_key(path: Path) -> bytes:
    """The primary key, creating the key file (0600, atomically) when it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_new_file(path, [AESGCM.generate_key(bit_length=256)], replace=False)
    return read_key_ring(path)[0]


class SecretBox:
    """AES-256-GCM with a key ring: the first key encrypts, every key decrypts."""

    def __init__(self, key: bytes | list[bytes], key_file: Path | None = None) -> None:
        keys = [key] if isinstance(key, bytes) else list(key)
        if not keys or any(len(k) != 32 for k in keys):
            raise ValueError("keys must be 32 bytes")
        self._aeads = [AESGCM(k) for k in keys]
        self._key_file = key_file

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        load_or_create_key(path)
        return cls(read_key_ring(path), key_file=path)

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aeads[0].encrypt(nonce, plaintext, associated_data)

    def _try_decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes | None:
        for aead in self._aeads:
            try:
                return aead.decrypt(ciphertext[1:13], ciphertext[13:], associated_data)
            except InvalidTag:
                continue
        return None

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        if len(ciphertext) < 13 or ciphertext[:1] != _VERSION:
            raise DecryptionFailed()
        plaintext = self._try_decrypt(ciphertext, associated_data)
        if plaintext is None and self._key_file is not None:
            # The keys may have been rotated by another process: reload the ring once.
            self._aeads = [AESGCM(k) for k in read_key_ring(self._key_file)]
            plaintext = self._try_decrypt(ciphertext, associated_data)
        if plaintext is None:
            raise DecryptionFailed()
        return plaintext

    def encrypt_text(self, plaintext: str, associated_data: str) -> bytes:
        return self.encrypt(plaintext.encode(), associated_data.encode())

    def decrypt_text(self, ciphertext: bytes, associated_data: str) -> str:
        return self.decrypt(ciphertext, associated_data.encode()).decode()
