"""The residency policy: parsing with errors that name file, line, key and value; verdicts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.edge.residency import BudgetLimits, ResidencyPolicy
from clients.task.errors import ConfigError

POLICY = """\
# a comment
[models.intents]
may_leave = true

[models.secrets]
may_leave = false

[budget]
per_key_per_minute = 5
global_per_day = 100

[[rule]]
name = "email"
pattern = '[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+'
action = "block"

[[rule]]
name = "account"
pattern = '\\b\\d{8,12}\\b'
action = "redact"
replacement = "[account]"
"""


def _load(tmp_path: Path, text: str) -> ResidencyPolicy:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return ResidencyPolicy.load(path)


def test_a_policy_file_is_read_whole(tmp_path: Path) -> None:
    policy = _load(tmp_path, POLICY)

    assert policy.models == {"intents"}
    assert [(r.name, r.action) for r in policy.rules] == [("email", "block"), ("account", "redact")]
    assert policy.budget == BudgetLimits(per_key_per_minute=5, global_per_day=100)
    assert policy.source.endswith("policy.toml") and len(policy.digest or "") == 64
    assert policy.describe()["rules"][1] == {"name": "account", "action": "redact"}


def test_generation_routing_and_upstream_names(tmp_path: Path) -> None:
    policy = ResidencyPolicy.load(Path(__file__).with_name("policy_example.toml"))

    assert policy.generation == {"lm"} and policy.models == {"intents", "lm"}
    assert policy.upstream_models == {"lm": "lm-cloud"}


def test_verdicts_for_every_outcome(tmp_path: Path) -> None:
    policy = _load(tmp_path, POLICY)

    ok = policy.check(model="intents", text="book a flight")
    assert (ok.allowed, ok.reason, ok.text, ok.rules) == (True, "allowed", "book a flight", ())
    local = policy.check(model="intents", text="book a flight", residency="local-only")
    assert (local.allowed, local.reason) == (False, "local-only")
    assert policy.check(model="secrets", text="hi").reason == "policy-model"
    assert policy.check(model="unlisted", text="hi").reason == "policy-model"
    blocked = policy.check(model="intents", text="mail ann@example.org now")
    assert (blocked.allowed, blocked.reason, blocked.rules) == (False, "policy-blocked", ("email",))
    redacted = policy.check(model="intents", text="move 12345678 to 987654321")
    assert redacted.allowed and redacted.redacted and redacted.rules == ("account",)
    assert redacted.text == "move [account] to [account]"


def test_the_default_policy_lets_nothing_leave() -> None:
    policy = ResidencyPolicy()

    assert policy.check(model="intents", text="hello").reason == "policy-model"
    assert policy.describe()["source"] == "default: nothing leaves"


def test_a_redaction_that_would_form_a_match_keeps_the_text_local(tmp_path: Path) -> None:
    # Redacting the digits joins "ab" and "cd" around an "X", which the block rule matches.
    policy = _load(
        tmp_path,
        """\
[models.m]
may_leave = true
[[rule]]
name = "digits"
pattern = '[0-9]+'
action = "redact"
replacement = "X"
[[rule]]
name = "joined"
pattern = 'abXcd'
action = "block"
""",
    )

    verdict = policy.check(model="m", text="ab12cd")

    assert not verdict.allowed
    assert (verdict.reason, verdict.rules) == ("policy-blocked", ("joined",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.m]\nmay_leave = 1\n",
         "policy.toml:2: models.m.may_leave = 1: must be true or false"),
        ("[models.m]\nleave = true\n", "policy.toml:2: models.m.leave = True: unknown key"),
        ("[budget]\nglobal_per_day = -1\n",
         "policy.toml:2: budget.global_per_day = -1: must be in"),
        ("[budget]\n\nper_key = 3\n", "policy.toml:3: budget.per_key = 3: unknown key"),
        ("[budget]\nglobal_per_minute = 1.5\n", "budget.global_per_minute = 1.5: must be a whole"),
        ("[[rule]]\nname = \"a\"\npattern = \"x\"\naction = \"drop\"\n",
         "policy.toml:4: rule[0].action = 'drop': must be one of ['block', 'redact']"),
        ("[[rule]]\nname = \"a\"\npattern = \"x\"\naction = \"block\"\n"
         "[[rule]]\nname = \"b\"\npattern = \"(\"\naction = \"block\"\n",
         "policy.toml:7: rule[1].pattern = '(': not a valid regular expression"),
        ("[[rule]]\nname = \"a\"\npattern = \"x*\"\naction = \"block\"\n",
         "policy.toml:3: rule[0].pattern = 'x*': matches the empty string"),
        ("[[rule]]\nname = \"Bad Name\"\npattern = \"x\"\naction = \"block\"\n",
         "policy.toml:2: rule[0].name = 'Bad Name': must be 1-32"),
        ("[[rule]]\nname = \"a\"\npattern = \"x\"\naction = \"redact\"\nreplacement = \"xx\"\n",
         "policy.toml:5: rule[0].replacement = 'xx': must be a string its own pattern"),
        ("[[rule]]\nname = \"a\"\npattern = \"x\"\n",
         "policy.toml:1: rule[0] = None: has no action"),
        ("[[rule]]\nname = \"a\"\npattern = \"x\"\naction = \"block\"\n"
         "[[rule]]\nname = \"a\"\npattern = \"y\"\naction = \"block\"\n",
         "policy.toml:6: rule[1].name = 'a': is used by an earlier rule"),
        ("residency = \"eu\"\n", "policy.toml:1: residency = 'eu': unknown key"),
        ("[models.m]\nmay_leave = true\ngeneration = \"cloud\"\n",
         "policy.toml:3: models.m.generation = 'cloud': must be one of ['local', 'upstream']"),
        ("[models.m]\ngeneration = \"upstream\"\n",
         "policy.toml:2: models.m.generation = 'upstream': needs may_leave = true"),
        ("[models.m]\nupstream_model = \"\"\n",
         "policy.toml:2: models.m.upstream_model = '': must be 1..256 characters"),
        ("[models.m\n", "policy.toml: not valid TOML"),
        # tomllib raised ValueError (Python's 4,300-digit integer limit) out of load.
        ("[budget]\nper_key_per_day = 1" + "0" * 5000 + "\n", "policy.toml: not valid TOML"),
        ("[budget]\nper_key_per_day = " + "[" * 100_000 + "\n", "policy.toml: not valid TOML"),
    ],
)  # fmt: skip
def test_policy_errors_name_file_line_key_and_value(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(tmp_path, text)


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--policy .*absent\.toml.*cannot read"):
        ResidencyPolicy.load(tmp_path / "absent.toml")


EMAIL = st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", fullmatch=True)
ACCOUNT = st.from_regex(r"[1-9][0-9]{7,11}", fullmatch=True)
WORDS = st.lists(st.sampled_from(["book", "a", "flight", "to", "pay", "card", "#", "-"]),
                 max_size=6).map(" ".join)  # fmt: skip


@given(parts=st.lists(st.one_of(WORDS, EMAIL, ACCOUNT), min_size=1, max_size=6))
def test_what_may_leave_never_matches_a_rule(parts: list[str]) -> None:
    policy = ResidencyPolicy.load(Path(__file__).with_name("policy_example.toml"))
    text = " ".join(parts)

    verdict = policy.check(model="intents", text=text)

    if verdict.allowed:
        assert verdict.text is not None
        assert not any(rule.pattern.search(verdict.text) for rule in policy.rules)
    else:
        assert any(rule.pattern.search(text) for rule in policy.rules)
