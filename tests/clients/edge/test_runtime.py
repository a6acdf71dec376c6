"""The runtime: one base, releases as adapters on it, per-request routing, verified bytes."""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from clients.edge.generation import Sampling
from clients.edge.runtime import SPARES, ReleaseRetired, Runtime
from clients.task.errors import ConfigError, ModelError
from clients.task.model import ModelSpec, build_model, save_adapter
from registry.accept import AcceptedRelease, accept
from registry.artifact import build_release, read_provenance
from registry.errors import VerificationError
from registry.keys import KeyPair, TrustStore
from registry.signing import VerifiedRelease, sign_release
from tests.conftest import PASSPHRASE

LABELS = ("greet", "bye")


def trained(
    base: Path,
    out: Path,
    *,
    seed: int,
    task: str = "sequence-classification",
    labels: tuple[str, ...] = LABELS,
) -> Path:
    """A training output whose LoRA B matrices are not zero, so every adapter matters."""
    spec = ModelSpec(base=str(base), task=task, labels=labels if task != "causal-lm" else (),
                     lora_r=4, seed=seed)  # fmt: skip
    loaded = build_model(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    save_adapter(loaded, out / "adapter")
    return out


def signed(
    source: Path,
    directory: Path,
    *,
    keypair: KeyPair,
    trust: TrustStore,
    release: int = 1,
    edit: Callable[[Path], None] | None = None,
) -> AcceptedRelease:
    """Build, (edit,) sign and accept a release of model ``m`` offline."""
    build_release(source, directory, model_name="m", release=release)
    if edit is not None:
        edit(directory)
    sign_release(directory, private_key=keypair.private_path, passphrase=PASSPHRASE)
    return accept(directory, trust=trust, model="m", index=None, alias=None)


def stock_scores(base: Path, release: Path, texts: list[str]) -> torch.Tensor:
    """What stock peft answers for one release on its own fresh base."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    model.config.pad_token_id = tokenizer.pad_token_id
    peft = PeftModel.from_pretrained(model, str(release)).eval()
    with torch.inference_mode():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        return torch.softmax(peft(**inputs).logits, dim=-1)


@pytest.fixture
def two_releases(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> list[AcceptedRelease]:
    return [
        signed(
            trained(tiny_llama, tmp_path / f"t{i}", seed=i),
            tmp_path / f"r{i}",
            keypair=keypair,
            trust=trust,
            release=i + 1,
        )
        for i in range(2)
    ]


@pytest.mark.integration
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_releases_are_adapters_on_one_shared_base(
    tiny_llama: Path, two_releases: list[AcceptedRelease], tmp_path: Path, quantization: str
) -> None:
    runtime = Runtime(base=str(tiny_llama), quantization=quantization)
    releases = [runtime.load("m", str(i + 1), a) for i, a in enumerate(two_releases)]

    a, b = (r.predict(["hello there"])[0]["scores"] for r in releases)

    assert releases[0].base is releases[1].base  # one base in memory, not one per release
    assert releases[0].slot.name != releases[1].slot.name
    assert a != b  # different adapters, different answers: nothing shared but the base
    peft = releases[0].base.model
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if quantization == "4bit" else "Linear")
    with pytest.raises(TypeError, match="VerifiedRelease"):
        runtime.load("m", "3", tmp_path / "r0")  # type: ignore[arg-type]
    runtime.close()


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


@pytest.mark.integration
def test_one_batch_routes_each_row_to_its_release_and_head(
    tiny_llama: Path, two_releases: list[AcceptedRelease]
) -> None:
    runtime = Runtime(base=str(tiny_llama))
    one, two = (runtime.load("m", str(i + 1), a) for i, a in enumerate(two_releases))
    base = one.base
    forwards: list[int] = []
    handle = base.model.register_forward_hook(lambda m, a, kw: forwards.append(1))
    texts = ["hello there", "see you later"]
    # Hold the batcher so both requests are waiting when it next takes a batch.
    gate = threading.Event()
    base.batcher.call(gate.wait, wait=False)
    futures = [one.submit_predict(texts), two.submit_predict(texts)]
    gate.set()
    answers = [f.result(timeout=60) for f in futures]
    handle.remove()

    assert len(forwards) == 1  # both releases answered by one forward
    for release, answer in zip(two_releases, answers, strict=True):
        expected = stock_scores(tiny_llama, release.directory, texts)
        got = torch.tensor([[row["scores"][label] for label in LABELS] for row in answer])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert answers[0] != answers[1]  # different heads and LoRA weights in one batch
    runtime.close()


@pytest.mark.integration
def test_one_release_batches_switch_the_active_adapter_and_match_stock_peft(
    tiny_llama: Path, two_releases: list[AcceptedRelease]
) -> None:
    # A batch of one release skips PEFT's mixed-batch path; switching back and forth, and
    # mixing again, must still give every request exactly its own release's answer.
    runtime = Runtime(base=str(tiny_llama))
    one, two = (runtime.load("m", str(i + 1), a) for i, a in enumerate(two_releases))
    base = one.base
    routes: list[list[str] | None] = []
    # What the first LoRA layer's forward receives, after any routing hook of the batch.
    handle = base._routed[0].register_forward_hook(
        lambda m, a, kwargs, out: routes.append(kwargs.get("adapter_names")), with_kwargs=True
    )
    texts = ["hello there", "see you later"]
    expected = [stock_scores(tiny_llama, r.directory, texts) for r in two_releases]
    for release, want in ((one, 0), (two, 1), (one, 0), (two, 1)):
        answer = release.predict(texts)
        got = torch.tensor([[row["scores"][label] for label in LABELS] for row in answer])
        torch.testing.assert_close(got, expected[want], atol=1e-4, rtol=0)
    gate = threading.Event()
    base.batcher.call(gate.wait, wait=False)
    futures = [one.submit_predict(texts), two.submit_predict(texts)]
    gate.set()
    for future, want in zip(futures, expected, strict=True):
        got = torch.tensor([[row["scores"][lab] for lab in LABELS] for row in future.result()])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    handle.remove()

    assert routes[:4] == [None] * 4  # one release per batch: no per-row routing
    assert routes[4] == [one.slot.name] * 2 + [two.slot.name] * 2  # the mixed batch
    runtime.close()


@pytest.mark.integration
def test_a_switch_that_fails_half_way_routes_per_row_and_claims_no_active_adapter(
    tiny_llama: Path, two_releases: list[AcceptedRelease], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A layer refusing the switch (in the field: a release whose modules_to_save another
    # lacks) is caused here by patching the last routed layer: the earlier layers have
    # already switched, so the batch must fall back to per-row routing and no later batch
    # may trust the half-done switch.
    runtime = Runtime(base=str(tiny_llama))
    one, two = (runtime.load("m", str(i + 1), a) for i, a in enumerate(two_releases))
    base = one.base
    texts = ["hello there"]
    expected = [stock_scores(tiny_llama, r.directory, texts) for r in two_releases]
    one.predict(texts)  # `one` is active

    def refuse(*_: object, **__: object) -> None:
        raise ValueError("adapter not found")

    monkeypatch.setattr(base._routed[-1], "set_adapter", refuse)
    for _ in range(2):
        answer = two.predict(texts)
        got = torch.tensor([[row["scores"][label] for label in LABELS] for row in answer])
        torch.testing.assert_close(got, expected[1], atol=1e-4, rtol=0)
        assert base._active is None
    monkeypatch.undo()
    answer = one.predict(texts)
    got = torch.tensor([[row["scores"][label] for label in LABELS] for row in answer])
    torch.testing.assert_close(got, expected[0], atol=1e-4, rtol=0)
    runtime.close()


@pytest.mark.integration
def test_a_swap_reuses_a_spare_slot_and_frees_the_old_one_after_its_requests(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    runtime = Runtime(base=str(tiny_llama))
    sources = [trained(tiny_llama, tmp_path / f"t{i}", seed=i) for i in range(3)]
    first = runtime.load("m", "1", signed(sources[0], tmp_path / "r0", keypair=keypair,
                                          trust=trust))  # fmt: skip
    base = first.base
    base.batcher.call(lambda: None)  # the spares are made on the batcher's thread
    adapters_before = set(base.model.peft_config)
    assert len(adapters_before) == 1 + SPARES
    second = runtime.load("m", "2", signed(sources[1], tmp_path / "r1", keypair=keypair,
                                           trust=trust, release=2))  # fmt: skip

    # A swap only copied tensors into a spare: PEFT added no adapter.
    assert set(base.model.peft_config) == adapters_before
    assert second.slot.name in adapters_before - {first.slot.name}

    gate = threading.Event()
    base.batcher.call(gate.wait, wait=False)
    queued = first.submit_predict(["still on the old release"])
    first.retire()  # the node stopped serving it while a request holds it
    with pytest.raises(ReleaseRetired):
        first.submit_predict(["too late"])
    assert first.slot not in base._spares[first.slot.shape]  # still held
    gate.set()
    assert queued.result(timeout=60)[0]["label"] in LABELS
    base.batcher.call(lambda: None)
    assert first.slot in base._spares[first.slot.shape]  # freed after its last request
    runtime.close()


@pytest.mark.integration
def test_a_base_is_closed_once_its_last_release_is_freed(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    runtime = Runtime(base=str(tiny_llama))
    two = runtime.load("m", "1", signed(trained(tiny_llama, tmp_path / "t2", seed=0),
                                        tmp_path / "r2", keypair=keypair, trust=trust))  # fmt: skip
    old_base = two.base
    weights = weakref.ref(old_base._base)  # the transformers model under the adapters
    three = runtime.load("m", "2", signed(
        trained(tiny_llama, tmp_path / "t3", seed=1, labels=("a", "b", "c")),
        tmp_path / "r3", keypair=keypair, trust=trust, release=2,
    ))  # fmt: skip
    assert runtime.bases == [("sequence-classification", 2, "model"),
                             ("sequence-classification", 3, "model")]  # fmt: skip

    gate = threading.Event()
    old_base.batcher.call(gate.wait, wait=False)
    queued = two.submit_predict(["still on the two-label release"])
    two.retire()  # the node moved to the three-label release while a request holds this one
    assert len(runtime.bases) == 2  # held: the base stays
    gate.set()
    assert queued.result(timeout=60)[0]["label"] in LABELS
    deadline = time.monotonic() + 30
    while old_base.model is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # closed on a thread of its own, after the batch in progress

    assert runtime.bases == [("sequence-classification", 3, "model")]
    assert old_base.model is None and old_base.batcher.closed
    gc.collect()
    assert weights() is None  # freed, though the retired release still names its base
    assert three.predict(["hello"])[0]["label"] in ("a", "b", "c")
    again = runtime.load("m", "1", signed(trained(tiny_llama, tmp_path / "t4", seed=2),
                                          tmp_path / "r4", keypair=keypair, trust=trust,
                                          release=3))  # fmt: skip
    assert again.base is not old_base  # loaded again when a release needs it
    assert again.predict(["hello"])[0]["label"] in LABELS
    runtime.close()


@pytest.mark.integration
def test_a_refused_release_keeps_its_base_idle_until_the_node_moves_on(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    # The node retries a refused release at every poll: its base must not be loaded from
    # disk again each time, nor kept once another release has been freed.
    runtime = Runtime(base=str(tiny_llama))
    source = trained(tiny_llama, tmp_path / "t1", seed=1)
    first = runtime.load("m", "1", signed(source, tmp_path / "r1", keypair=keypair, trust=trust))
    bad = signed(trained(tiny_llama, tmp_path / "t3", seed=3, labels=("a", "b", "c")),
                 tmp_path / "r3", keypair=keypair, trust=trust, release=2)  # fmt: skip
    with pytest.raises(VerificationError):
        runtime.load("m", "2", _tampered(bad))
    idle = runtime.shared_base("sequence-classification", 3)
    with pytest.raises(VerificationError):
        runtime.load("m", "2", bad)
    assert runtime.shared_base("sequence-classification", 3) is idle  # not loaded again
    assert len(runtime.bases) == 2

    second = runtime.load("m", "3", signed(trained(tiny_llama, tmp_path / "t2", seed=2),
                                           tmp_path / "r2", keypair=keypair, trust=trust,
                                           release=3))  # fmt: skip
    first.retire()  # a swap on the two-label base: the idle base goes
    deadline = time.monotonic() + 30
    while idle.model is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.bases == [("sequence-classification", 2, "model")]
    assert idle.model is None
    assert second.predict(["hello"])[0]["label"] in LABELS
    runtime.close()


def _tampered(accepted: AcceptedRelease) -> AcceptedRelease:
    weights = accepted.directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # changed after it was accepted
    return accepted


@pytest.mark.integration
def test_idle_bases_never_close_under_a_live_release(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    def release(n: int, labels: tuple[str, ...] = LABELS) -> AcceptedRelease:
        return signed(trained(tiny_llama, tmp_path / f"t{n}", seed=n, labels=labels),
                      tmp_path / f"r{n}", keypair=keypair, trust=trust, release=n)  # fmt: skip

    three, four = ("a", "b", "c"), ("a", "b", "c", "d")
    runtime = Runtime(base=str(tiny_llama))
    live = runtime.load("m", "1", release(1))
    with pytest.raises(VerificationError):  # refused on the base `live` is on
        runtime.load("m", "2", _tampered(release(2)))
    other = runtime.load("m", "3", release(3, three))
    with pytest.raises(VerificationError):  # refused on a base of its own: kept idle
        runtime.load("m", "4", _tampered(release(4, four)))
    good = runtime.load("m", "5", release(5, four))  # takes the idle base
    other.retire()  # a free anywhere closes idle bases, and the three-label one

    deadline = time.monotonic() + 30
    while len(runtime.bases) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.bases == [("sequence-classification", 2, "model"),
                             ("sequence-classification", 4, "model")]  # fmt: skip
    assert live.predict(["hello"])[0]["label"] in LABELS
    assert good.predict(["hello"])[0]["label"] in four

    cycle = time.monotonic()  # a refresh of every model starts
    with pytest.raises(VerificationError):
        runtime.load("m", "6", _tampered(release(6, three)))
    runtime.trim_idle(before=cycle)  # retried in this refresh: kept
    assert len(runtime.bases) == 3
    runtime.trim_idle(before=time.monotonic())  # the next refresh did not retry it
    assert len(runtime.bases) == 2
    runtime.close()


@pytest.mark.integration
def test_close_fails_queued_requests_of_retired_releases_and_refuses_later_loads(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    runtime = Runtime(base=str(tiny_llama))
    accepted = signed(trained(tiny_llama, tmp_path / "t", seed=1), tmp_path / "r",
                      keypair=keypair, trust=trust)  # fmt: skip
    release = runtime.load("m", "1", accepted)
    gate = threading.Event()
    release.base.batcher.call(gate.wait, wait=False)
    dropped = release.submit_predict(["its client went away"])
    assert dropped.cancel()  # as asyncio does when the HTTP request is cancelled
    queued = release.submit_predict(["waiting"])  # failed after the cancelled one
    release.retire()  # its slot is freed by the queued request's callback, during close

    closing = threading.Thread(target=runtime.close)
    closing.start()
    deadline = time.monotonic() + 30
    while not release.base.batcher.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    closing.join(timeout=60)

    assert not closing.is_alive()  # no deadlock between close and the freeing callback
    with pytest.raises(RuntimeError, match="shutting down"):
        queued.result(timeout=10)
    assert runtime.bases == []
    with pytest.raises(ModelError, match="runtime is closed"):
        runtime.load("m", "1", accepted)


@pytest.mark.integration
def test_load_refuses_bytes_changed_after_they_were_verified(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    accepted = signed(trained(tiny_llama, tmp_path / "t", seed=1), tmp_path / "r",
                      keypair=keypair, trust=trust)  # fmt: skip
    weights = accepted.directory / "adapter_model.safetensors"
    other = trained(tiny_llama, tmp_path / "t2", seed=2) / "adapter" / weights.name
    weights.write_bytes(other.read_bytes())  # swapped between accept and load

    with pytest.raises(VerificationError) as err:
        Runtime(base=str(tiny_llama)).load("m", "1", accepted)

    assert err.value.reason == "signature"
    assert "differ from those verified" in str(err.value)


def _retarget(directory: Path) -> None:
    """The signed config names modules the weights were not trained for."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = ["k_proj"]  # the tensors are for q_proj and v_proj
    path.write_text(json.dumps(config))


def _dora(directory: Path) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"use_dora": True}))


def _bias(directory: Path) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"bias": "all"}))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_retarget, "tensors the model would not use"),
        (_dora, "use_dora=True is not servable"),
        (_bias, "bias='all' is not servable"),
    ],
)
def test_a_signed_release_the_model_would_not_use_as_signed_is_refused(
    tiny_llama: Path,
    tmp_path: Path,
    keypair: KeyPair,
    trust: TrustStore,
    edit: Callable[[Path], None],
    message: str,
) -> None:
    accepted = signed(trained(tiny_llama, tmp_path / "t", seed=1), tmp_path / "r",
                      keypair=keypair, trust=trust, edit=edit)  # fmt: skip
    runtime = Runtime(base=str(tiny_llama))

    with pytest.raises(VerificationError) as err:
        runtime.load("m", "1", accepted)

    assert err.value.reason == "unloadable"
    assert message in str(err.value)
    runtime.close()


@pytest.mark.integration
def test_max_new_tokens_that_fill_the_context_are_refused_naming_the_flag(
    tiny_llama: Path,
) -> None:
    # Every prompt would be refused as too long (the room left for it: 0 tokens).
    runtime = Runtime(base=str(tiny_llama), max_new_tokens=128)  # the tiny context: 128
    with pytest.raises(ConfigError, match=r"--max-new-tokens=128 .* context of 128 tokens"):
        runtime.shared_base("causal-lm", 0)
    assert Runtime(base=str(tiny_llama), max_new_tokens=127).shared_base("causal-lm", 0)


def test_mixed_generation_batch_matches_each_release_alone(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runtime = Runtime(base=str(tiny_llama))
    accepted = [
        signed(
            trained(tiny_llama, tmp_path / f"t{i}", seed=i, task="causal-lm"),
            tmp_path / f"r{i}",
            keypair=keypair,
            trust=trust,
            release=i + 1,
        )
        for i in range(2)
    ]
    releases = [runtime.load("m", str(i + 1), a) for i, a in enumerate(accepted)]
    gate = threading.Event()
    releases[0].base.batcher.call(gate.wait, wait=False)
    streamed: list[str] = []
    sampling = Sampling(max_tokens=6)
    futures = [
        releases[0].submit_generate(["hello world"], sampling, lambda i, t: streamed.append(t))[0],
        releases[1].submit_generate(["hello world"], sampling)[0],
    ]
    gate.set()
    texts = [f.result(timeout=120)[0] for f in futures]

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for release, got in zip(accepted, texts, strict=True):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                          str(release.directory)).eval()  # fmt: skip
        inputs = tokenizer("hello world", return_tensors="pt")
        inputs.pop("token_type_ids", None)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert got.text == tokenizer.decode(new, skip_special_tokens=True)
        assert got.completion_tokens == len(new) and got.finish_reason == "length"
    assert "".join(streamed) == texts[0].text
    assert texts[0].text != texts[1].text
    runtime.close()


def test_texts_are_truncated_before_the_tokenizer_sees_their_full_length(
    tiny_llama: Path,
) -> None:
    from clients.edge.runtime import CHARS_PER_TOKEN, SharedBase

    class Spy:
        """Records the longest text the tokenizer was given (a unit seam)."""

        def __init__(self, tokenizer: object) -> None:
            self.tokenizer, self.longest = tokenizer, 0

        def __call__(self, texts: list[str], **kwargs: object) -> object:
            self.longest = max(self.longest, *map(len, texts))
            return self.tokenizer(texts, **kwargs)  # type: ignore[operator]

    runtime = Runtime(base=str(tiny_llama), max_length=32)
    base: SharedBase = runtime.shared_base("sequence-classification", 2)
    original = base.tokenizer
    base.tokenizer = Spy(original)
    huge = "book a table for two " * 50_000  # about a million characters
    spaced = "a" + " " * 5_000 + "b c d"  # a prefix of 16 characters per token is too short

    encoded = base._encode([huge, spaced])

    assert base.tokenizer.longest <= 4 * 32 * CHARS_PER_TOKEN * 4
    full = original([huge, spaced], padding=True, truncation=True, max_length=32,
                    return_tensors="pt")  # fmt: skip
    assert torch.equal(encoded["input_ids"], full["input_ids"])
    runtime.close()


@pytest.mark.integration
def test_retired_adapters_beyond_the_spares_are_deleted_and_the_rest_still_answer(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    runtime = Runtime(base=str(tiny_llama))
    releases = [
        runtime.load("m", str(i + 1), signed(trained(tiny_llama, tmp_path / f"t{i}", seed=i),
                                             tmp_path / f"r{i}", keypair=keypair, trust=trust,
                                             release=i + 1))
        for i in range(6)
    ]  # fmt: skip
    base = releases[0].base
    kept = releases[-1]
    expected = kept.predict(["hello there"])

    for release in releases[:-1]:
        release.retire()
    base.batcher.call(lambda: None)  # deletions run on the batcher's thread

    assert set(base.model.peft_config) == {kept.slot.name} | {
        s.name for s in base._spares[kept.slot.shape]
    }
    assert len(base._spares[kept.slot.shape]) == SPARES
    assert kept.predict(["hello there"]) == expected
    runtime.close()


def trained_with_head(
    base: Path, out: Path, *, seed: int, modules_to_save: list[str] | None
) -> Path:
    """A causal-LM training output whose LoRA B matrices and ``modules_to_save`` copies moved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clients.task.model import LoadedModel

    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, modules_to_save=modules_to_save)
    peft = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    spec = ModelSpec(base=str(base), task="causal-lm", labels=(), lora_r=4, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    save_adapter(LoadedModel(spec=spec, model=peft, tokenizer=tokenizer,
                             device=torch.device("cpu")), out / "adapter")  # fmt: skip
    return out


def releases_with_heads(
    base: Path,
    tmp_path: Path,
    heads: list[list[str] | None],
    *,
    keypair: KeyPair,
    trust: TrustStore,
) -> list[AcceptedRelease]:
    """Signed causal-LM releases 1, 2, … whose adapters save these ``modules_to_save``."""
    return [
        signed(trained_with_head(base, tmp_path / f"t{i}", seed=i, modules_to_save=mts),
               tmp_path / f"r{i}", keypair=keypair, trust=trust, release=i + 1)
        for i, mts in enumerate(heads)
    ]  # fmt: skip


@pytest.mark.integration
def test_a_release_without_another_releases_modules_to_save_answers_alone_and_mixed(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    # Release 2 trains lm_head (modules_to_save), release 1 does not: release 1's rows must
    # use the base lm_head, alone (where PEFT's wrapper refuses to switch to an adapter it
    # lacks) and in a batch with release 2 (where it looks every row's adapter up).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accepted = releases_with_heads(tiny_llama, tmp_path, [None, ["lm_head"]],
                                   keypair=keypair, trust=trust)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    inputs = tokenizer("hello world", return_tensors="pt")
    inputs.pop("token_type_ids", None)
    expected = []
    for release in accepted:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                          str(release.directory)).eval()  # fmt: skip
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        expected.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :].tolist(),
                                         skip_special_tokens=True))  # fmt: skip
    runtime = Runtime(base=str(tiny_llama))
    one, two = (runtime.load("m", str(i + 1), a) for i, a in enumerate(accepted))
    base = one.base

    alone = [r.generate("hello world", max_new_tokens=6) for r in (one, two, one)]
    gate = threading.Event()
    base.batcher.call(gate.wait, wait=False)
    sampling = Sampling(max_tokens=6)
    futures = [r.submit_generate(["hello world"], sampling)[0] for r in (one, two)]
    gate.set()
    mixed = [f.result(timeout=120)[0].text for f in futures]

    assert expected[0] != expected[1]
    assert alone == [expected[0], expected[1], expected[0]]
    assert mixed == expected
    assert all(not m._forward_pre_hooks for m in base._routed)  # none outlive their batch
    runtime.close()


@pytest.mark.integration
def test_a_release_whose_modules_to_save_peft_cannot_mix_is_refused_and_the_rest_still_mix(
    tiny_llama: Path, tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    # A copy of the RMSNorm layers per adapter: PEFT's mixed batch raises for such modules,
    # so once loaded every mixed batch on the base would fail, whichever releases it holds.
    accepted = releases_with_heads(tiny_llama, tmp_path, [None, ["norm"], None],
                                   keypair=keypair, trust=trust)  # fmt: skip
    runtime = Runtime(base=str(tiny_llama))
    one = runtime.load("m", "1", accepted[0])

    with pytest.raises(VerificationError, match=r"release 2: .*norm.*\(LlamaRMSNorm\)") as err:
        runtime.load("m", "2", accepted[1])

    assert err.value.reason == "unloadable"
    three = runtime.load("m", "3", accepted[2])
    alone = [r.generate("hello world", max_new_tokens=4) for r in (one, three)]
    gate = threading.Event()
    one.base.batcher.call(gate.wait, wait=False)
    futures = [r.submit_generate(["hello world"], Sampling(max_tokens=4))[0] for r in (one, three)]
    gate.set()
    assert [f.result(timeout=120)[0].text for f in futures] == alone
    runtime.close()
