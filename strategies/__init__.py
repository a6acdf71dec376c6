"""Server-side federated maths and the wire contract with the sites.

- `strategies.strategy`: the `Strategy` protocol the round loop (server/loop.py) calls:
  `client_config`, `aggregate` (plain rounds) and `aggregate_mean` (SecAgg+ rounds).
- `strategies.fedavg`: FedAvg and FedProx; `strategies.dp`: client-level DP, a wrapper
  around any strategy; `strategies.validation`: the checks on one site's update.
- `strategies.sampling`: how many sites a round asks, and which.
- `strategies.secagg`: SecAgg+ settings and mask generators.
- `strategies.protocol`: record keys, metric names, requests, replies and refusals, used
  by both the server and the sites.

Everything but `protocol` and `secagg` is pure numpy; nothing here imports torch, peft or
mlflow (tests/test_architecture.py).

Usage::

    strategy = DifferentiallyPrivate(FedAvg(max_norm=100.0, min_fit_clients=2), dp)
    outcome = strategy.aggregate(server_round, global_state, updates)  # validate, average, noise
"""
