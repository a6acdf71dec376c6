"""Fixtures shared by the registry tests: the publisher's key and an in-memory index store."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from registry.errors import VerificationError
from registry.keys import KeyPair, load_private_key
from tests.conftest import PASSPHRASE


class FileStore:
    """The registry's role for these tests: hold bytes by name, trust nothing."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def fetch(self, name: str, max_length: int | None = None) -> bytes | None:
        data = self.files.get(name)
        if data is not None and max_length is not None and len(data) > max_length:
            raise VerificationError("fetch", f"{name} is over {max_length} bytes")
        return data


@pytest.fixture
def publisher(keypair: KeyPair) -> ec.EllipticCurvePrivateKey:
    return load_private_key(keypair.private_path, passphrase=PASSPHRASE)
