"""Secrets at rest: AES-256-GCM with a key generated on first run.

The key lives in ``<data_dir>/secret.key`` (mode 0600, created atomically). Ciphertexts carry a
version byte and a random 96-bit nonce; the associated data binds a ciphertext to its purpose and
owner (for example ``b"agent-secret:vm-..."``), so one cannot be swapped for another.
"""

from __future__ import annotations

import base64
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


def load_or_create_key(path: Path) -> bytes:
    """Read the key file, creating it (0600, atomically) when it does not exist yet."""
    try:
        return base64.b64decode(path.read_bytes().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process won the race; then use its key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return base64.b64decode(path.read_bytes().strip())


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        return cls(load_or_create_key(path))

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        if len(ciphertext) < 13 or ciphertext[:1] != _VERSION:
            raise DecryptionFailed()
        try:
            return self._aead.decrypt(ciphertext[1:13], ciphertext[13:], associated_data)
        except InvalidTag as exc:
            raise DecryptionFailed() from exc

    def encrypt_text(self, plaintext: str, associated_data: str) -> bytes:
        return self.encrypt(plaintext.encode(), associated_data.encode())

    def decrypt_text(self, ciphertext: bytes, associated_data: str) -> str:
        return self.decrypt(ciphertext, associated_data.encode()).decode()
