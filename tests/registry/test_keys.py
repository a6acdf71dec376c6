from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from registry.errors import KeyFileError, VerificationError
from registry.keys import TrustStore, generate_keypair, load_private_key, load_public_key
from tests.conftest import PASSPHRASE


def test_generate_writes_a_private_key_only_the_owner_can_read(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k", passphrase=PASSPHRASE)

    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert b"ENCRYPTED" in pair.private_path.read_bytes()
    der = load_public_key(pair.public_path).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pair.key_id == hashlib.sha256(der).hexdigest()


def test_generate_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(tmp_path)


@pytest.mark.parametrize(
    ("passphrase", "message"),
    [
        (None, "it is encrypted; pass its passphrase .*FEDLORA_KEY_PASSPHRASE"),
        ("wrong", "wrong passphrase"),
    ],
)
def test_locked_key_errors_say_what_is_wrong(
    tmp_path: Path, passphrase: str | None, message: str
) -> None:
    pair = generate_keypair(tmp_path, passphrase=PASSPHRASE)
    with pytest.raises(KeyFileError, match=message):
        load_private_key(pair.private_path, passphrase=passphrase)
    assert load_private_key(pair.private_path, passphrase=PASSPHRASE) is not None


def test_trust_store_holds_several_keys_and_refuses_others(tmp_path: Path) -> None:
    a, b, c = (generate_keypair(tmp_path / n) for n in "abc")
    store_dir = tmp_path / "trust"
    store_dir.mkdir()
    (store_dir / "a.pub").write_bytes(a.public_path.read_bytes())
    (store_dir / "b.pem").write_bytes(b.public_path.read_bytes())
    (store_dir / "notes.txt").write_text("not a key")

    trust = TrustStore.load(store_dir)

    assert set(trust.keys) == {a.key_id, b.key_id}
    with pytest.raises(VerificationError) as err:
        trust.key(c.key_id)
    assert err.value.reason == "untrusted-key"


def test_trust_store_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is not a directory"):
        TrustStore.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match=r"holds no \.pub or \.pem keys"):
        TrustStore.load(tmp_path / "empty")
    (tmp_path / "rsa").mkdir()
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa" / "r.pub").write_bytes(
        rsa_pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="not an EC P-256/384/521 public key"):
        TrustStore.load(tmp_path / "rsa")


@pytest.mark.parametrize("passphrase", [None, "pw"])
def test_keys_generate_says_whether_the_key_is_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, passphrase
) -> None:
    # A key written in the clear because the variable was not set must not pass unnoticed.
    from server.cli import build_parser

    monkeypatch.delenv("FEDLORA_KEY_PASSPHRASE", raising=False)
    if passphrase:
        monkeypatch.setenv("FEDLORA_KEY_PASSPHRASE", passphrase)
    args = build_parser().parse_args(["keys", "generate", "--out", str(tmp_path)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    if passphrase:
        assert "encrypted: $FEDLORA_KEY_PASSPHRASE" in printed
    else:
        assert "NOT encrypted: $FEDLORA_KEY_PASSPHRASE is not set" in printed
