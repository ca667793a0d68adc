"""Key rotation: re-encrypt every secret the controller holds under a new AES-256-GCM key."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from remotecli.context import vm_agent_aad
from remotecli.crypto import SecretBox, read_key_ring, write_key_ring
from remotecli.db.models import AuthSession, Vm
from remotecli.db.session import Database
from remotecli.services.transitions import record_event


@dataclass(frozen=True)
class RotationResult:
    agent_secrets: int
    credentials: int


def rotate_keys(db: Database, key_file: object) -> RotationResult:
    """Prepend a new key, re-encrypt agent secrets and held credentials, then drop the old keys.

    Each step leaves every ciphertext readable (the ring decrypts with any of its keys), so a crash
    in the middle loses nothing; run it again to finish.
    """
    from pathlib import Path

    path = Path(str(key_file))
    old_keys = read_key_ring(path)
    new_key = AESGCM.generate_key(bit_length=256)
    write_key_ring(path, [new_key, *old_keys])
    box = SecretBox([new_key, *old_keys])
    agent_secrets = credentials = 0
    with db.transaction() as session:
        for vm in session.scalars(select(Vm)):
            plain = box.decrypt(vm.agent_secret_enc, vm_agent_aad(vm.id).encode())
            vm.agent_secret_enc = box.encrypt(plain, vm_agent_aad(vm.id).encode())
            agent_secrets += 1
        for auth in session.scalars(select(AuthSession).where(AuthSession.credential_enc.is_not(None))):
            aad = f"credential:{auth.id}".encode()
            assert auth.credential_enc is not None
            auth.credential_enc = box.encrypt(box.decrypt(auth.credential_enc, aad), aad)
            credentials += 1
        record_event(session, module="keys", kind="keys.rotated",
                     message=f"Encryption key rotated ({agent_secrets} agent secrets, {credentials} held credentials)")
    write_key_ring(path, [new_key])
    return RotationResult(agent_secrets=agent_secrets, credentials=credentials)
