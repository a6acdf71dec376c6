"""`registry.accept.accept`: one refusal reason per step, in the fixed order, and what passes.

Each test starts from a release that passes every step (signed by a trusted key, of model
``intents``, not revoked, ``intents@production`` in a refreshed index, trained on the base
the consumer has, ε=12 under a limit of 20) and breaks what the case names.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from registry.accept import AcceptedRelease, accept
from registry.artifact import SIGNATURE_FILE, build_release
from registry.errors import PromotionRefused, RegistryError, VerificationError
from registry.index import AliasEntry
from registry.index_consumer import IndexClient
from registry.index_publisher import IndexRepository
from registry.keys import KeyPair, TrustStore, generate_keypair
from registry.policy import LocalPolicy, Policy
from registry.signing import sign_release, verify_release
from tests.conftest import PASSPHRASE, record_client_dp
from tests.registry.conftest import FileStore

EPSILON = 16.5  # about: two rounds of z = 0.5 with every site sampled (record_client_dp)


@pytest.fixture
def release(training_outputs: list[Path], tmp_path: Path, keypair: KeyPair) -> Path:
    """A signed release of ``intents`` (accuracy 0.7) trained with client-level DP, ε=16.5."""
    source = tmp_path / "training"
    shutil.copytree(training_outputs[0], source)
    assert record_client_dp(source) == pytest.approx(EPSILON, abs=0.05)
    directory = tmp_path / "release"
    build_release(source, directory, model_name="intents", release=1)
    sign_release(directory, private_key=keypair.private_path, passphrase=PASSPHRASE)
    return directory


@dataclass
class Case:
    """accept's arguments and the index it reads; each break changes one of them."""

    directory: Path
    trust: TrustStore
    base_digest: str
    key_id: str
    digest: str
    model: str = "intents"
    alias: str = "production"
    aliased_digest: str = ""  # what the index says intents@production is
    revoked_keys: set[str] = field(default_factory=set)
    revoked_releases: set[str] = field(default_factory=set)
    policy: LocalPolicy = field(default_factory=lambda: LocalPolicy(max_epsilon=20.0))


@pytest.fixture
def case(release: Path, trust: TrustStore) -> Case:
    verified = verify_release(release, trust)
    return Case(
        directory=release,
        trust=trust,
        base_digest=verified.provenance.base_digest,
        key_id=verified.key_id,
        digest=verified.digest,
        aliased_digest=verified.digest,
    )


def _repository(case: Case, publisher: ec.EllipticCurvePrivateKey) -> IndexRepository:
    repo = IndexRepository.create(publisher)
    entry = AliasEntry(release=1, version="1", digest=case.aliased_digest, key_id=case.key_id)
    repo.set_alias("intents", "production", entry)
    repo.revoke(keys=case.revoked_keys, releases=case.revoked_releases)
    return repo


def _client(repo: IndexRepository, trust: TrustStore, cache: Path) -> IndexClient:
    store = FileStore()
    store.files.update(repo.files())
    client = IndexClient(store.fetch, cache, trust)
    client.refresh()
    return client


def _accept(case: Case, index: IndexClient | IndexRepository) -> AcceptedRelease:
    return accept(
        case.directory,
        trust=case.trust,
        model=case.model,
        index=index,
        alias=case.alias,
        base_digest=case.base_digest,
        policy=case.policy,
    )


# Ways to break a release, each named by the reason accept must give, in the fixed order.
def _unsigned(case: Case, tmp_path: Path) -> None:
    (case.directory / SIGNATURE_FILE).unlink()


def _untrusted(case: Case, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger-trust"
    stranger.mkdir()
    shutil.copy(generate_keypair(tmp_path / "stranger").public_path, stranger / "s.pub")
    case.trust = TrustStore.load(stranger)


def _tampered(case: Case, tmp_path: Path) -> None:
    weights = case.directory / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))


def _other_model(case: Case, tmp_path: Path) -> None:
    case.model = "other"


def _revoked_key(case: Case, tmp_path: Path) -> None:
    case.revoked_keys = {case.key_id}


def _revoked_release(case: Case, tmp_path: Path) -> None:
    case.revoked_releases = {case.digest}


def _alias_missing(case: Case, tmp_path: Path) -> None:
    case.alias = "staging"


def _replayed(case: Case, tmp_path: Path) -> None:
    case.aliased_digest = "0" * 64  # production is another release


def _other_base(case: Case, tmp_path: Path) -> None:
    case.base_digest = "sha256:" + "0" * 64


def _too_much_epsilon(case: Case, tmp_path: Path) -> None:
    case.policy = LocalPolicy(max_epsilon=EPSILON / 2)


Break = Callable[[Case, Path], None]
ONE_FAULT: list[tuple[str, Break, str]] = [
    ("unsigned", _unsigned, "unsigned"),
    ("untrusted-key", _untrusted, "untrusted-key"),
    ("signature", _tampered, "signature"),
    ("model", _other_model, "index"),
    ("revoked-key", _revoked_key, "revoked-key"),
    ("revoked-release", _revoked_release, "revoked-release"),
    ("alias-missing", _alias_missing, "index"),
    ("stale", _replayed, "stale"),
    ("base-mismatch", _other_base, "base-mismatch"),
    ("policy", _too_much_epsilon, "policy"),
]
# One break per step, in the order accept runs them.
STEPS: list[tuple[Break, str]] = [
    (_tampered, "signature"),
    (_other_model, "index"),
    (_revoked_release, "revoked-release"),
    (_replayed, "stale"),
    (_other_base, "base-mismatch"),
    (_too_much_epsilon, "policy"),
]


@pytest.mark.parametrize(("fault", "reason"), [(b, r) for _, b, r in ONE_FAULT],
                         ids=[name for name, _, _ in ONE_FAULT])  # fmt: skip
def test_each_check_refuses_with_its_own_reason(
    case: Case, publisher: ec.EllipticCurvePrivateKey, trust: TrustStore, tmp_path: Path,
    fault: Break, reason: str,
) -> None:  # fmt: skip
    fault(case, tmp_path)
    index = _client(_repository(case, publisher), trust, tmp_path / "tuf")

    with pytest.raises(VerificationError) as err:
        _accept(case, index)

    assert err.value.reason == reason


@pytest.mark.parametrize("first", range(len(STEPS)), ids=[r for _, r in STEPS])
def test_a_release_failing_several_checks_is_refused_by_the_earliest(
    case: Case, publisher: ec.EllipticCurvePrivateKey, trust: TrustStore, tmp_path: Path,
    first: int,
) -> None:  # fmt: skip
    for fault, _ in STEPS[first:]:  # this step and every later one fail
        fault(case, tmp_path)
    index = _client(_repository(case, publisher), trust, tmp_path / "tuf")

    with pytest.raises(VerificationError) as err:
        _accept(case, index)

    assert err.value.reason == STEPS[first][1]


def test_a_release_that_passes_every_check_comes_back_loadable(
    case: Case, publisher: ec.EllipticCurvePrivateKey, trust: TrustStore, keypair: KeyPair,
    tmp_path: Path,
) -> None:  # fmt: skip
    index = _client(_repository(case, publisher), trust, tmp_path / "tuf")

    accepted = _accept(case, index)

    assert type(accepted) is AcceptedRelease
    assert accepted.directory == case.directory
    assert accepted.key_id == keypair.key_id
    assert accepted.digest == case.digest
    assert accepted.provenance.model_name == "intents"
    assert accepted.provenance.epsilon() == pytest.approx(EPSILON, abs=0.05)


def test_the_publishers_index_gives_the_same_reasons(
    case: Case, publisher: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    _revoked_key(case, tmp_path)
    with pytest.raises(VerificationError) as err:
        _accept(case, _repository(case, publisher))  # publish and promote read it directly
    assert err.value.reason == "revoked-key"


def test_promotion_gates_run_as_the_last_step(
    case: Case, publisher: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    gates = Policy(min_metric=0.8)  # the release has accuracy 0.7

    def promote(c: Case) -> AcceptedRelease:  # the arguments `lifecycle.promote` passes
        index = _repository(c, publisher)
        return accept(c.directory, trust=c.trust, model="intents", index=index, alias=None,
                      policy=gates)  # fmt: skip

    with pytest.raises(PromotionRefused) as err:
        promote(case)
    assert err.value.gate == "min-metric"

    _revoked_release(case, tmp_path)  # a revoked release never reaches the gates
    with pytest.raises(VerificationError) as err:
        promote(case)
    assert err.value.reason == "revoked-release"


def test_a_restart_from_the_cached_index_skips_only_the_alias(
    case: Case, publisher: ec.EllipticCurvePrivateKey, trust: TrustStore, tmp_path: Path
) -> None:
    _replayed(case, tmp_path)  # the node last served a release the alias has moved away from
    _client(_repository(case, publisher), trust, tmp_path / "tuf")
    cached = IndexClient(lambda name: None, tmp_path / "tuf", trust)  # the registry is down
    cached.load_cached()

    accepted = accept(case.directory, trust=case.trust, model="intents", index=cached,
                      alias=None, base_digest=case.base_digest, policy=case.policy)  # fmt: skip
    assert accepted.digest == case.digest

    _revoked_release(case, tmp_path)
    _client(_repository(case, publisher), trust, tmp_path / "tuf2")
    cached = IndexClient(lambda name: None, tmp_path / "tuf2", trust)
    cached.load_cached()
    with pytest.raises(VerificationError) as err:
        accept(case.directory, trust=case.trust, model="intents", index=cached, alias=None)
    assert err.value.reason == "revoked-release"


def test_offline_verification_without_an_index_still_checks_signature_base_and_policy(
    case: Case, tmp_path: Path
) -> None:
    def offline(c: Case) -> AcceptedRelease:
        return accept(c.directory, trust=c.trust, model=None, index=None, alias=None,
                      base_digest=c.base_digest, policy=c.policy)  # fmt: skip

    assert offline(case).digest == case.digest
    # Each fault adds to the ones before; the earliest failing step names the refusal.
    for fault, reason in [(_too_much_epsilon, "policy"), (_other_base, "base-mismatch"),
                          (_tampered, "signature")]:  # fmt: skip
        fault(case, tmp_path)
        with pytest.raises(VerificationError) as err:
            offline(case)
        assert err.value.reason == reason


def test_an_alias_without_an_index_is_refused_before_anything_is_read(
    case: Case, tmp_path: Path
) -> None:
    _unsigned(case, tmp_path)  # would be "unsigned" if accept looked at the files first
    with pytest.raises(RegistryError, match="only be checked with a model and an index") as err:
        accept(case.directory, trust=case.trust, model="intents", index=None, alias="production")
    assert not isinstance(err.value, VerificationError)
