"""One training round under SecAgg+, through Flower 1.41's `SecAggPlusWorkflow`.

In Flower 1.41 SecAgg+ exists only in the legacy workflow path: the workflow takes a
`LegacyContext` whose legacy `Strategy` chooses the sites (``configure_fit``) and
receives the unmasked aggregate (``aggregate_fit``). fedlora's round loop has already
sampled the sites, so `_Relay` hands the workflow exactly those sites with the round's
FitIns, and keeps what the workflow gives back: the weighted mean of the sites' updates
(``local - global``; sites report weight 1 under client-level DP, their example count
otherwise) and the sites' metrics. The workflow's four stages (setup, share keys,
collect masked vectors, unmask) run on the same `Grid` as plain rounds; `_CountingGrid`
counts their bytes and records the sites whose replies failed.

If too few sites remain at any stage the workflow halts without calling
``aggregate_fit``; `run_secure_round` then returns no aggregate and the round loop treats
the round as failed (the global adapter stays as it was).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from strategies.protocol import (
    NO_REPLY,
    decode_secure_train,
    node_name,
    origin,
    origins,
    secure_fitins,
)
from strategies.secagg import SecAggSettings, expand_masked, mask_generator

# The module whose `pseudo_rand_gen` the workflow calls (the package re-exports the class).
FLOWER_WORKFLOW = importlib.import_module(
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
)

log = logging.getLogger(__name__)


@dataclass
class SecureRound:
    """What a SecAgg+ round revealed to the server.

    Attributes:
        mean_update: The weighted mean of the sites' updates, or None if the round failed.
        sites: (node id, claimed site id, weight, metrics) of every site whose masked
            update was summed.
        failures: One ``{"site", "reason"}`` per site that failed or dropped out.
        bytes_up, bytes_down: Bytes of every reply and request over all four stages.
        weight_total: The sum of the quantized weights the unmasked vector carries (its
            first slot), or None if nothing was unmasked.
        weight_range: What one site's quantized weight is at the plan's max weight.
        max_weight: The plan's max weight (1 when sites weigh alike).
    """

    mean_update: dict[str, np.ndarray] | None
    sites: list[tuple[int, str, int, dict[str, float]]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    weight_total: int | None = None
    weight_range: int = 0
    max_weight: float = 1.0

    def weight_forgery(self) -> str | None:
        """Why the unmasked weight total is not what the sites reported, or None.

        Flower's workflow divides the unmasked sum by the weight total it finds in the
        vector's first slot; a site whose mod was modified can put another weight there
        than the one in its reply and so shrink or inflate everyone else's share unseen.
        Each honest mod puts ``round(weight / max_weight · quantization_range)`` there
        (flwr secaggplus_mod), so the total must be the sum of that over the reported
        weights.
        """
        if self.weight_total is None:
            return None
        expected = sum(round(w / self.max_weight * self.weight_range) for _, _, w, _ in self.sites)
        if self.weight_total == expected:
            return None
        return (
            f"the unmasked weight total is {self.weight_total}, not the {expected} the "
            f"{len(self.sites)} site(s) reported: a site's masked weight slot was forged"
        )


def _message_bytes(message: Message) -> int:
    content = message.content
    records: Iterable[Any] = [
        *content.array_records.values(),
        *content.config_records.values(),
        *content.metric_records.values(),
    ]
    return sum(_record_bytes(r) for r in records)


def _record_bytes(record: Any) -> int:
    try:
        return int(record.count_bytes())
    except IndexError:  # Flower 1.41's ConfigRecord.count_bytes fails on an empty list
        return int(ConfigRecord({k: v for k, v in record.items() if v != []}).count_bytes())


class _CountingGrid:
    """A Grid that counts the bytes it moves and remembers failed replies."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_up = 0
        self.bytes_down = 0
        self.failed: dict[int, str] = {}
        self.silent: set[int] = set()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_down += sum(_message_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sent = origins(messages)
        answered = {origin(r, sent) for r in replies}
        self.silent |= {m.metadata.dst_node_id for m in messages} - answered
        for reply in replies:
            if reply.has_error():
                self.failed.setdefault(origin(reply, sent), reply.error.reason)
                continue
            self.bytes_up += _message_bytes(reply)  # as it travelled: masks as uint32
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and Key.MASKED_PARAMETERS in configs:
                masked = configs[Key.MASKED_PARAMETERS]
                configs[Key.MASKED_PARAMETERS] = expand_masked(masked)  # type: ignore[arg-type]
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _Relay(Strategy):
    """The legacy strategy the workflow needs: fixed sites in, the aggregate out."""

    def __init__(self, grid: Grid, nodes: Sequence[int], fitins: FitIns) -> None:
        self._proxies = [GridClientProxy(node_id=n, grid=grid, run_id=0) for n in nodes]
        self._fitins = fitins
        self.aggregate: Parameters | None = None
        self.results: list[tuple[int, FitRes]] = []  # (node id, reply)

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, self._fitins) for proxy in self._proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = [(proxy.node_id, res) for proxy, res in results]
        if self.results:
            self.aggregate = self.results[0][1].parameters  # the workflow's unmasked mean
        return self.aggregate, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _proxy_failures(grid: _CountingGrid, sampled: Sequence[int]) -> list[dict[str, str]]:
    out = [{"site": node_name(n), "reason": r} for n, r in sorted(grid.failed.items())]
    out += [
        {"site": node_name(n), "reason": NO_REPLY}
        for n in sorted(grid.silent - set(grid.failed))
        if n in sampled
    ]
    return out


@contextmanager
def _weight_totals(flower_module: ModuleType) -> Iterator[list[int]]:
    """Record the weight total the workflow extracts from each unmasked vector.

    The workflow calls a module-level ``factor_extract`` on the unmasked sum; like
    `mask_generator`, the function is swapped in the module for the duration.
    """
    seen: list[int] = []
    original = flower_module.factor_extract

    def recording(parameters: list[np.ndarray]) -> tuple[int, list[np.ndarray]]:
        total, rest = original(parameters)
        seen.append(int(total))
        return total, rest

    flower_module.factor_extract = recording
    try:
        yield seen
    finally:
        flower_module.factor_extract = original


def run_secure_round(
    grid: Grid,
    settings: SecAggSettings,
    *,
    nodes: Sequence[int],
    state: Mapping[str, np.ndarray],
    plan: Mapping[str, Any],
    server_round: int,
    timeout: float,
) -> SecureRound:
    """Run SecAgg+ over ``nodes`` and return the unmasked weighted mean update."""
    names = list(state)
    # Under client-level DP every site reports weight 1: a max weight of 1 keeps Flower's
    # weight scaling at 1 and so the full quantization precision.
    max_weight = 1 if plan.get("uniform_weight") else settings.max_weight
    fitins = secure_fitins(state, plan, max_weight=max_weight, prg=settings.prg)
    counting = _CountingGrid(grid)
    relay = _Relay(counting, nodes, fitins)  # type: ignore[arg-type]
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=relay,
        client_manager=SimpleClientManager(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        fitins.parameters, keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=float(max_weight),
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        timeout=timeout,
    )
    with mask_generator(FLOWER_WORKFLOW, settings.prg), _weight_totals(FLOWER_WORKFLOW) as seen:
        workflow(counting, context)  # type: ignore[arg-type]

    outcome = SecureRound(
        mean_update=None,
        failures=_proxy_failures(counting, nodes),
        bytes_up=counting.bytes_up,
        bytes_down=counting.bytes_down,
        weight_total=seen[-1] if seen else None,
        weight_range=settings.quantization_range,
        max_weight=float(max_weight),
    )
    if relay.aggregate is None:
        return outcome
    arrays = [bytes_to_ndarray(t) for t in relay.aggregate.tensors]
    outcome.mean_update = {n: a.astype(np.float64) for n, a in zip(names, arrays, strict=True)}
    outcome.sites = [(node, *decode_secure_train(res)) for node, res in relay.results]
    return outcome
