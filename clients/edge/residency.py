"""The residency policy of an edge node: what may leave it for the upstream, and in what form.

A TOML file, loaded once at start and validated; every error names the file, the line, the
key and the value. Without a file nothing leaves. A request that says
``"residency": "local-only"`` never leaves, whatever the file allows. Content rules match
each text that would leave: a ``block`` rule keeps it local, a ``redact`` rule replaces each
match before it leaves. Both are checked on the original text and again on the text as it
would be sent, so a redaction can never assemble a match; anything still matching stays
local (fail closed)::

    [models.intents]            # a model not listed here never leaves
    may_leave = true

    [models.assistant]          # a causal LM: its generation requests go upstream
    may_leave = true
    generation = "upstream"     # default "local"
    upstream_model = "assistant-large"  # its name upstream (default: --upstream-model,
                                        # else the same name)

    [budget]                    # escalations allowed (clients.edge.budget)
    per_key_per_minute = 30
    per_key_per_day = 1000
    global_per_minute = 120
    global_per_day = 10000

    [[rule]]
    name = "email"
    pattern = '[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+'
    action = "block"

    [[rule]]
    name = "account"
    pattern = '\\b\\d{8,12}\\b'
    action = "redact"
    replacement = "[account]"

Patterns are Python regular expressions written by the operator (trusted input).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.task.errors import ConfigError
from clients.task.numbers import is_integer

LOCAL_ONLY = "local-only"
ACTIONS = ("block", "redact")
# Rule names become metric labels: short and from a fixed alphabet keeps them bounded.
RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
BUDGET_KEYS = ("per_key_per_minute", "per_key_per_day", "global_per_minute", "global_per_day")
DEFAULT_BUDGET = {
    "per_key_per_minute": 30,
    "per_key_per_day": 1000,
    "global_per_minute": 120,
    "global_per_day": 10000,
}
TOP_KEYS = ("models", "budget", "rule")
RULE_KEYS = ("name", "pattern", "action", "replacement", "ignore_case")
MODEL_KEYS = ("may_leave", "generation", "upstream_model")
GENERATION = ("local", "upstream")
MAX_BUDGET = 10**9


@dataclass(frozen=True)
class BudgetLimits:
    """Escalations allowed per API key and in total, per minute and per (UTC) day."""

    per_key_per_minute: int = DEFAULT_BUDGET["per_key_per_minute"]
    per_key_per_day: int = DEFAULT_BUDGET["per_key_per_day"]
    global_per_minute: int = DEFAULT_BUDGET["global_per_minute"]
    global_per_day: int = DEFAULT_BUDGET["global_per_day"]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    action: str  # block | redact
    replacement: str = "[redacted]"


@dataclass(frozen=True)
class Verdict:
    """Whether one text may leave, why not, and the text as it would be sent.

    ``reason`` is ``allowed``, ``local-only`` (the client said so), ``policy-model`` (the
    model may not leave) or ``policy-blocked`` (a content rule, named in ``rules``).
    """

    allowed: bool
    reason: str
    text: str | None = None
    rules: tuple[str, ...] = ()

    @property
    def redacted(self) -> bool:
        return self.allowed and bool(self.rules)


@dataclass(frozen=True)
class ResidencyPolicy:
    """What may leave the node. The default instance lets nothing leave."""

    models: frozenset[str] = frozenset()
    rules: tuple[Rule, ...] = ()
    generation: frozenset[str] = frozenset()  # models whose generation requests go upstream
    upstream_models: dict[str, str] = field(default_factory=dict)  # local -> upstream name
    budget: BudgetLimits = field(default_factory=BudgetLimits)
    source: str = "default: nothing leaves"
    digest: str | None = None

    @classmethod
    def load(cls, path: Path) -> ResidencyPolicy:
        """Read and validate a policy file.

        Raises:
            ConfigError: With ``FILE:LINE: key = value: what is wrong``.
        """
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--policy {str(path)!r}: cannot read it ({exc.strerror})") from None
        text = raw.decode("utf-8", errors="replace")
        try:
            data = tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError, an int of over 4,300
            # digits, arrays nested past the parser's recursion limit
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return _Parser(path, text).parse(data, digest=hashlib.sha256(raw).hexdigest())

    def check(self, *, model: str, text: str, residency: str | None = None) -> Verdict:
        """May ``text``, asked of ``model``, leave the node; if so, in what form."""
        if residency == LOCAL_ONLY:
            return Verdict(False, LOCAL_ONLY)
        if model not in self.models:
            return Verdict(False, "policy-model")
        blocked = tuple(
            r.name for r in self.rules if r.action == "block" and r.pattern.search(text)
        )
        if blocked:
            return Verdict(False, "policy-blocked", rules=blocked)
        sent, redacted = text, []
        for rule in self.rules:
            if rule.action == "redact":
                sent, count = rule.pattern.subn(lambda _, r=rule: r.replacement, sent)
                if count:
                    redacted.append(rule.name)
        # The text as sent must match no rule at all: a replacement, or text joined around
        # it, could form a new match.
        still = self.matching(sent)
        if still:
            return Verdict(False, "policy-blocked", rules=still)
        return Verdict(True, "allowed", text=sent, rules=tuple(redacted))

    def matching(self, text: str) -> tuple[str, ...]:
        """The rules, block or redact, that match anywhere in ``text``."""
        return tuple(r.name for r in self.rules if r.pattern.search(text))

    def describe(self) -> dict[str, Any]:
        """What ``/healthz`` shows: the file, its digest, the models and rules."""
        return {
            "source": self.source,
            "sha256": self.digest,
            "models": sorted(self.models),
            "generation_upstream": sorted(self.generation),
            "upstream_models": dict(sorted(self.upstream_models.items())),
            "rules": [{"name": r.name, "action": r.action} for r in self.rules],
            "budget": vars(self.budget),
        }


class _Parser:
    """Turns the decoded TOML into a `ResidencyPolicy`, naming the line of each bad key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None = None, nth: int = 0) -> int:
        """The 1-based line of ``key`` in ``[table]`` (the ``nth`` ``[[table]]``), or of
        the table's header when ``key`` is None; 0 when it cannot be found."""
        header = re.compile(rf"^\s*\[\[?\s*{re.escape(table)}\s*\]\]?\s*(#.*)?$")
        assignment = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=") if key is not None else None
        inside, seen = (True, 0) if not table else (False, -1)  # "": the top level
        for number, line in enumerate(self.lines, start=1):
            if re.match(r"^\s*\[", line):
                inside = bool(table) and bool(header.match(line))
                if inside:
                    seen += 1
                    if assignment is None and seen == nth:
                        return number
                continue
            if inside and seen == nth and assignment is not None and assignment.match(line):
                return number
        if key is not None and "." in table:  # a dotted key: [models] intents.may_leave = …
            return self.line_of(table.split(".", 1)[0], key=table.split(".", 1)[1])
        return 0

    def fail(self, where: str, value: Any, problem: str, *, line: int) -> ConfigError:
        at = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{at}: {where} = {value!r}: {problem}")

    def parse(self, data: dict[str, Any], *, digest: str) -> ResidencyPolicy:
        for key, value in data.items():
            if key not in TOP_KEYS:
                raise self.fail(
                    key,
                    value,
                    f"unknown key; expected one of {list(TOP_KEYS)}",
                    line=self.line_of(key) or self.line_of("", key),
                )
        models, generation, names = self.models(data.get("models", {}))
        return ResidencyPolicy(
            models=models,
            generation=generation,
            upstream_models=names,
            rules=self.rules(data.get("rule", [])),
            budget=self.budget(data.get("budget", {})),
            source=str(self.path),
            digest=digest,
        )

    def models(self, table: Any) -> tuple[frozenset[str], frozenset[str], dict[str, str]]:
        """The models that may leave, those whose generation requests go upstream, and
        the upstream's name for each model that names one."""
        if not isinstance(table, dict):
            raise self.fail("models", table, "must be a table of [models.NAME]", line=0)
        allowed, generation, names = set(), set(), {}
        for name, entry in table.items():
            where = f"models.{name}"
            if not isinstance(entry, dict):
                raise self.fail(where, entry, "must be a table", line=self.line_of("models", name))
            for key, value in entry.items():
                line = self.line_of(where, key)
                if key not in MODEL_KEYS:
                    raise self.fail(
                        f"{where}.{key}",
                        value,
                        f"unknown key; expected one of {list(MODEL_KEYS)}",
                        line=line,
                    )
                if key == "may_leave" and not isinstance(value, bool):
                    raise self.fail(f"{where}.{key}", value, "must be true or false", line=line)
                if key == "generation" and value not in GENERATION:
                    raise self.fail(
                        f"{where}.{key}", value, f"must be one of {list(GENERATION)}", line=line
                    )
                if key == "upstream_model":
                    if not isinstance(value, str) or not 0 < len(value) <= 256:
                        raise self.fail(
                            f"{where}.{key}", value, "must be 1..256 characters", line=line
                        )
                    names[name] = value
            if entry.get("may_leave", False):
                allowed.add(name)
            if entry.get("generation") == "upstream":
                if name not in allowed:
                    raise self.fail(
                        f"{where}.generation",
                        "upstream",
                        "needs may_leave = true",
                        line=self.line_of(where, "generation"),
                    )
                generation.add(name)
        return frozenset(allowed), frozenset(generation), names

    def budget(self, table: Any) -> BudgetLimits:
        if not isinstance(table, dict):
            raise self.fail("budget", table, "must be a table", line=self.line_of("", "budget"))
        values = dict(DEFAULT_BUDGET)
        for key, value in table.items():
            line = self.line_of("budget", key)
            if key not in BUDGET_KEYS:
                raise self.fail(
                    f"budget.{key}",
                    value,
                    f"unknown key; expected one of {list(BUDGET_KEYS)}",
                    line=line,
                )
            if not is_integer(value):
                raise self.fail(f"budget.{key}", value, "must be a whole number", line=line)
            if not 0 <= value <= MAX_BUDGET:
                raise self.fail(f"budget.{key}", value, f"must be in 0..{MAX_BUDGET}", line=line)
            values[key] = value
        return BudgetLimits(**values)

    def rules(self, entries: Any) -> tuple[Rule, ...]:
        if not isinstance(entries, list):
            raise self.fail(
                "rule",
                entries,
                "must be an array of [[rule]] tables",
                line=self.line_of("", "rule"),
            )
        rules: list[Rule] = []
        for i, entry in enumerate(entries):
            where = f"rule[{i}]"
            if not isinstance(entry, dict):
                raise self.fail(where, entry, "must be a table", line=0)

            def line(key: str | None, i: int = i) -> int:
                return self.line_of("rule", key, nth=i) or self.line_of("rule", None, nth=i)

            for key, value in entry.items():
                if key not in RULE_KEYS:
                    raise self.fail(
                        f"{where}.{key}",
                        value,
                        f"unknown key; expected one of {list(RULE_KEYS)}",
                        line=line(key),
                    )
            for key in ("name", "pattern", "action"):
                if key not in entry:
                    raise self.fail(where, None, f"has no {key}", line=line(None))
            name, pattern, action = entry["name"], entry["pattern"], entry["action"]
            if not isinstance(name, str) or not RULE_NAME.fullmatch(name):
                raise self.fail(
                    f"{where}.name",
                    name,
                    "must be 1-32 of a-z 0-9 _ - (it is a metric label)",
                    line=line("name"),
                )
            if name in {r.name for r in rules}:
                raise self.fail(
                    f"{where}.name", name, "is used by an earlier rule", line=line("name")
                )
            if action not in ACTIONS:
                raise self.fail(
                    f"{where}.action",
                    action,
                    f"must be one of {list(ACTIONS)}",
                    line=line("action"),
                )
            ignore_case = entry.get("ignore_case", False)
            if not isinstance(ignore_case, bool):
                raise self.fail(
                    f"{where}.ignore_case",
                    ignore_case,
                    "must be true or false",
                    line=line("ignore_case"),
                )
            if not isinstance(pattern, str) or not pattern:
                raise self.fail(
                    f"{where}.pattern", pattern, "must be a non-empty string", line=line("pattern")
                )
            try:
                compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
            except re.error as exc:
                raise self.fail(
                    f"{where}.pattern",
                    pattern,
                    f"not a valid regular expression ({exc})",
                    line=line("pattern"),
                ) from None
            if compiled.fullmatch(""):
                # It would match between any two characters: every text would be blocked
                # or redacted everywhere, which is never what was meant.
                raise self.fail(
                    f"{where}.pattern", pattern, "matches the empty string", line=line("pattern")
                )
            replacement = entry.get("replacement", "[redacted]")
            if "replacement" in entry and action != "redact":
                raise self.fail(
                    f"{where}.replacement",
                    replacement,
                    "only a redact rule has a replacement",
                    line=line("replacement"),
                )
            if not isinstance(replacement, str) or compiled.search(replacement):
                raise self.fail(
                    f"{where}.replacement",
                    replacement,
                    "must be a string its own pattern does not match",
                    line=line("replacement"),
                )
            rules.append(Rule(name, compiled, action, replacement))
        return tuple(rules)
