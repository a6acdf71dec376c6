"""4-bit QLoRA end to end on CPU for both tasks: a simulated federated run, then the edge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.edge.runtime import Runtime
from registry.accept import accept
from registry.artifact import build_release
from registry.keys import KeyPair, TrustStore
from registry.signing import sign_release
from server.settings import RunSettings
from server.simulation import SimSite, simulate
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration


def _sites(root: Path, task: str) -> list[SimSite]:
    root.mkdir(parents=True, exist_ok=True)
    sites = []
    for i in range(2):
        if task == "sequence-classification":
            rows = [{"text": f"please book {j}", "label": "book"} for j in range(4)]
            rows += [{"text": f"cancel order {j}", "label": "cancel"} for j in range(4)]
        else:
            rows = [{"prompt": f"Q{j}: colour? ", "response": "blue"} for j in range(8)]
        path = root / f"site-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sites.append(SimSite(f"site-{i}", path))
    return sites


@pytest.mark.parametrize(
    ("task", "base_fixture"),
    [("sequence-classification", "tiny_bert"), ("causal-lm", "tiny_llama")],
)
@pytest.mark.timeout(600)
def test_four_bit_trains_federated_and_serves_at_the_edge(
    task: str,
    base_fixture: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    keypair: KeyPair,
    trust: TrustStore,
) -> None:
    base = request.getfixturevalue(base_fixture)
    settings = RunSettings.from_config(
        {
            "task": task,
            "labels": ["book", "cancel"] if task == "sequence-classification" else "",
            "base-model": str(base),
            "quantization": "4bit",
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 4,
            "max-length": 16,
            "lora.r": 2,
            "min-available-clients": 2,
            "out-dir": str(tmp_path / "out"),
        }
    )

    result = simulate(settings, _sites(tmp_path / "sites", task))

    (row,) = result.history
    assert row["sites"] == 2 and row["failed"] == 0, row["failures"]
    # The edge loads the trained release on a 4-bit base and answers with it.
    directory = tmp_path / "release"
    build_release(result.out_dir, directory, model_name="m", release=1)
    sign_release(directory, private_key=keypair.private_path, passphrase=PASSPHRASE)
    accepted = accept(directory, trust=trust, model="m", index=None, alias=None)
    release = Runtime(base=str(base), quantization="4bit").load("m", "1", accepted)
    kinds = {type(m).__name__ for m in release.base.model.modules()}
    assert "Linear4bit" in kinds
    if task == "sequence-classification":
        (prediction,) = release.predict(["please book a table"])
        assert prediction["label"] in ("book", "cancel")
        head = [m for n, m in release.base.model.named_modules() if n.endswith("classifier")]
        assert head and all("4bit" not in type(m).__name__ for m in head)
    else:
        assert isinstance(release.generate("Q1: colour? ", max_new_tokens=2), str)
