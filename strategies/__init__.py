"""Server-side federated maths: update validation and aggregation of adapter tensors.

Pure numpy; no torch, peft, mlflow or flwr (tests/test_architecture.py). The server's
round loop (server/loop.py) feeds it decoded updates and gets back the new global state.

Usage::

    strategy = FedAvg(max_norm=100.0, min_fit_clients=2)
    outcome = strategy.aggregate(global_state, updates)   # validates, then averages
"""
