from __future__ import annotations

from pathlib import Path

import pytest

from clients.edge.runtime import Runtime
from registry.accept import AcceptedRelease
from registry.artifact import build_release, read_provenance
from registry.signing import VerifiedRelease


@pytest.mark.integration
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_each_release_gets_its_own_model_on_the_shared_base(
    tiny_llama: Path, training_outputs: list[Path], tmp_path: Path, quantization: str
) -> None:
    runtime = Runtime(base=str(tiny_llama), quantization=quantization)
    releases = []
    for i, source in enumerate(training_outputs[:2]):
        build_release(source, tmp_path / f"r{i}", model_name="m", release=i + 1)
        # Built by hand: this test is about loading, `accept` has its own tests.
        accepted = AcceptedRelease(
            tmp_path / f"r{i}", "k", f"d{i}", read_provenance(tmp_path / f"r{i}")
        )
        releases.append(runtime.load("m", str(i + 1), accepted))

    a, b = (r.predict(["hello there"])[0]["scores"] for r in releases)

    assert releases[0].model is not releases[1].model
    assert a != b  # different adapters, different answers: nothing shared but the base
    layer = releases[0].model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if quantization == "4bit" else "Linear")
    with pytest.raises(TypeError, match="VerifiedRelease"):
        runtime.load("m", "3", tmp_path / "r0")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["path", "signature-only"])
def test_load_takes_only_an_accepted_release(
    tiny_llama: Path, training_outputs: list[Path], tmp_path: Path, kind: str
) -> None:
    runtime = Runtime(base=str(tiny_llama))
    directory = tmp_path / "release"
    build_release(training_outputs[0], directory, model_name="m", release=1)
    # A release whose signature alone was checked has the same fields, but skipped
    # revocation, freshness, base and policy: the runtime must not take it either.
    given = directory if kind == "path" else VerifiedRelease(
        directory, "k", "d", read_provenance(directory)
    )  # fmt: skip

    with pytest.raises(TypeError, match="takes an AcceptedRelease") as err:
        runtime.load("m", "1", given)  # type: ignore[arg-type]

    assert type(given).__name__ in str(err.value)
