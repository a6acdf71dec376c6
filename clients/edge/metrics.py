"""Prometheus metrics of one edge node, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedlora_edge_requests",
            "HTTP requests by endpoint, model and status code",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedlora_edge_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.swaps = Counter(
            "fedlora_edge_swaps", "Adapter swaps by model", ["model"], registry=self.registry
        )
        self.verification_failures = Counter(
            "fedlora_edge_verification_failures",
            "Releases refused, by model and reason",
            ["model", "reason"],
            registry=self.registry,
        )
        self.swap_seconds = Histogram(
            "fedlora_edge_swap_seconds",
            "Time of each stage of taking a new release: download, verify, load, total",
            ["stage"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.registry_errors = Counter(
            "fedlora_edge_registry_errors",
            "Refreshes that could not reach the registry",
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "fedlora_edge_batch_rows",
            "Texts or prompts per batched forward (or generate)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_full = Counter(
            "fedlora_edge_queue_full",
            "Requests refused with 503 because their base's queue was full",
            registry=self.registry,
        )
        self.active_release = Gauge(
            "fedlora_edge_active_release",
            "Release number served, by model (0: none)",
            ["model"],
            registry=self.registry,
        )
        self.bases = Gauge(
            "fedlora_edge_bases_loaded",
            "Base models in memory: one per (task, label count, pooling) of a loaded release",
            registry=self.registry,
        )
        # Hybrid routing (clients.edge.hybrid); every label value comes from a fixed set
        # or the operator's policy file, never from a client.
        self.routed = Counter(
            "fedlora_edge_routed",
            "Classifications by who served them and why (escalations by reason)",
            ["served_by", "reason"],
            registry=self.registry,
        )
        self.policy_blocks = Counter(
            "fedlora_edge_policy_blocks",
            "Texts kept local by a residency content rule, by rule",
            ["rule"],
            registry=self.registry,
        )
        self.budget_refusals = Counter(
            "fedlora_edge_budget_refusals",
            "Escalations refused by the burst budget, by ceiling (key or global)",
            ["scope"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "fedlora_edge_upstream_seconds",
            "Upstream call latency by outcome (ok or error)",
            ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "fedlora_edge_upstream_errors",
            "Failed upstream calls by kind (timeout, connect, status, answer)",
            ["kind"],
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "fedlora_edge_upstream_breaker_open",
            "1 while the upstream circuit breaker is open or half-open",
            registry=self.registry,
        )
