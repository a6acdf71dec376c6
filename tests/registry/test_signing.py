from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.artifact import SIGNATURE_FILE, build_release
from registry.errors import VerificationError
from registry.keys import KeyPair, TrustStore, generate_keypair
from registry.signing import files_digest, sign_release, verify_release
from server.cli import main
from tests.conftest import PASSPHRASE

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


@pytest.fixture
def release(outputs: list[Path], tmp_path: Path, keypair: KeyPair) -> Path:
    directory = tmp_path / "release"
    build_release(outputs[0], directory, model_name="intents", release=1)
    sign_release(directory, private_key=keypair.private_path, passphrase=PASSPHRASE)
    return directory


def test_a_signed_release_verifies_with_its_key(
    release: Path, trust: TrustStore, keypair: KeyPair
) -> None:
    verified = verify_release(release, trust)

    assert verified.key_id == keypair.key_id
    assert verified.provenance.model_name == "intents"
    assert len(verified.digest) == 64


def test_the_digest_names_the_files_not_the_signature(
    release: Path, trust: TrustStore, keypair: KeyPair
) -> None:
    first = verify_release(release, trust).digest
    sign_release(release, private_key=keypair.private_path, passphrase=PASSPHRASE)
    assert verify_release(release, trust).digest == first  # ECDSA bytes differ, digest not


def test_the_digest_of_the_files_in_memory_is_the_signed_manifest_digest(
    release: Path, trust: TrustStore
) -> None:
    files = {
        p.relative_to(release).as_posix(): p.read_bytes()
        for p in release.rglob("*")
        if p.is_file() and p.name != SIGNATURE_FILE
    }

    assert files_digest(files) == verify_release(release, trust).digest
    files["adapter_config.json"] += b" "
    assert files_digest(files) != verify_release(release, trust).digest


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_changing_any_single_byte_of_any_file_fails_verification(
    release: Path, trust: TrustStore, data: st.DataObject
) -> None:
    files = sorted(p.name for p in release.iterdir() if p.name != SIGNATURE_FILE)
    name = data.draw(st.sampled_from(files), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "release"
        shutil.copytree(release, copy)
        blob = bytearray((copy / name).read_bytes())
        at = data.draw(st.integers(0, len(blob) - 1), label="offset")
        flip = data.draw(st.integers(1, 255), label="xor")
        blob[at] ^= flip
        (copy / name).write_bytes(bytes(blob))

        with pytest.raises(VerificationError) as err:
            verify_release(copy, trust)
        assert err.value.reason == "signature"


@pytest.mark.parametrize("change", ["add", "remove", "garbage-signature", "deep-signature"])
def test_added_removed_files_and_a_broken_signature_fail(
    release: Path, trust: TrustStore, change: str
) -> None:
    if change == "add":
        (release / ".gitattributes").write_text("* binary\n")  # covered like any file
    elif change == "remove":
        (release / "README.md").unlink()
    elif change == "garbage-signature":
        (release / SIGNATURE_FILE).write_text('{"not": "a bundle"}')
    else:  # json.loads raises RecursionError, which is no ValueError
        (release / SIGNATURE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VerificationError) as err:
        verify_release(release, trust)
    assert err.value.reason == "signature"


def test_a_changed_file_is_named_with_both_digests_in_hex(release: Path, trust: TrustStore) -> None:
    signed = hashlib.sha256((release / "README.md").read_bytes()).hexdigest()
    (release / "README.md").write_text("tampered\n")
    changed = hashlib.sha256(b"tampered\n").hexdigest()

    with pytest.raises(VerificationError) as err:
        verify_release(release, trust)

    assert err.value.reason == "signature"
    assert err.value.detail == f"{release}: README.md: sha256 expected {signed}, got {changed}"


def test_added_and_missing_files_are_named(release: Path, trust: TrustStore) -> None:
    (release / "README.md").unlink()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (release / name).write_text(name)

    with pytest.raises(VerificationError) as err:
        verify_release(release, trust)

    assert err.value.detail == (
        f"{release}: not signed: a.txt, b.txt, c.txt and 1 more; signed but missing: README.md"
    )


def test_edge_verify_prints_the_changed_file_readably(
    release: Path, trust: TrustStore, capsys: pytest.CaptureFixture[str]
) -> None:
    (release / "README.md").write_text("tampered\n")

    rc = main(["edge", "verify", str(release), "--trust", str(trust.directory)])

    err = capsys.readouterr().err
    assert rc == 1
    assert "refused (signature):" in err and "README.md: sha256 expected " in err
    assert "Digest(" not in err and "b'" not in err


def test_unsigned_and_untrusted_releases_fail_with_their_own_reason(
    release: Path, tmp_path: Path, make_trust
) -> None:
    stranger = generate_keypair(tmp_path / "stranger")
    with pytest.raises(VerificationError) as err:
        verify_release(release, make_trust("other", stranger))
    assert err.value.reason == "untrusted-key"

    (release / SIGNATURE_FILE).unlink()
    with pytest.raises(VerificationError) as err:
        verify_release(release, make_trust("other2", stranger))
    assert err.value.reason == "unsigned"


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_the_stock_model_signing_cli_verifies_our_signature(
    release: Path, keypair: KeyPair
) -> None:
    cmd = [
        MODEL_SIGNING, "verify", "key", str(release),
        "--signature", str(release / SIGNATURE_FILE),
        "--public_key", str(keypair.public_path),
    ]  # fmt: skip
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    (release / "provenance.json").write_text("{}")
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode != 0


@pytest.mark.parametrize("algorithm", ["sha256", "shake_128"])
def test_a_message_is_never_built_from_a_statement_whose_signature_did_not_verify(
    release: Path, trust: TrustStore, algorithm: str
) -> None:
    # Someone who can write the registry swaps model.sig for a bundle that fails its schema
    # (model-signing raises before checking the signature) and names files of their own.
    bundle = json.loads((release / SIGNATURE_FILE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"] = [
        {"name": "x\n[bold green]signature OK[/]", "algorithm": algorithm, "digest": "00"}
    ]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    bundle["mediaType"] = "application/vnd.dev.sigstore.bundle.v0.2+json"
    (release / SIGNATURE_FILE).write_text(json.dumps(bundle))

    with pytest.raises(VerificationError) as err:
        verify_release(release, trust)

    assert err.value.reason == "signature"
    assert "signature OK" not in err.value.detail and "signed but missing" not in err.value.detail
