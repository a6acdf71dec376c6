"""Loopback process harnesses: real Flower, MLflow and edge-node processes on 127.0.0.1.

Tests, benchmarks and the demo start the same processes an operator runs on separate
machines, through one place:

- `process`: `ManagedProcess` (start with output to a log, wait until ready with a
  timeout and the log's tail in the error, stop that also kills the process group),
  `free_port`, `HarnessError`.
- `flower`: `LocalFederation`, one ``flower-superlink`` and a ``flower-supernode`` per
  site, and `flwr_run`, which submits an app with ``flwr run``.
- `mlflow_server`: `MlflowServer`, an ``mlflow server`` with SQLite, artifact proxy and
  optionally basic auth.
- `edge`: `EdgeNodeProcess`, ``fedlora edge serve``.

Every one is a context manager that stops what it started::

    with MlflowServer(work / "mlflow") as registry, LocalFederation(work, nodes) as fed:
        flwr_run(app_dir, fed, {"tracking-uri": registry.uri}, timeout=600)
"""
