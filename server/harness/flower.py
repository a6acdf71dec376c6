"""A Flower Deployment Engine on localhost: one SuperLink, one SuperNode per site, ``flwr run``.

`LocalFederation` starts one ``flower-superlink`` and one ``flower-supernode`` per site as
separate OS processes, exactly as an operator would on separate machines, and points the
``flwr`` CLI at them through a SuperLink connection in ``$FLWR_HOME/config.toml``.
`flwr_run` then submits the app in a directory with ``flwr run``.

Notes on Flower 1.41 that shape this module:

* The SuperLink serves the Fleet, Control and Runtime (ServerAppIo) APIs over HTTP on
  one ``--host``/``--port``; ``--fleet-api-address`` and ``--control-api-address`` are
  deprecated and ignored. So there is one SuperLink address, used by SuperNodes and the
  CLI alike.
* A SuperNode serves its Runtime (ClientAppIo) API on ``--host``/``--port`` (default
  9094); ``--clientappio-api-address`` is refused. Each SuperNode needs its own port.
* Processes find ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` on
  ``PATH``, so the virtualenv's ``bin`` must be on it.
* The SuperLink runs ``uv sync`` for the app's dependencies unless told not to; the
  machine has everything installed and may be offline, so that is disabled.

Usage::

    nodes = [{"data-path": "site-1.jsonl", "site-id": "site-1"}, ...]
    with LocalFederation(work, nodes) as federation:
        result = flwr_run(app_dir, federation, {"num-server-rounds": 2}, timeout=600)
        status = federation.run_info(run_id_of(result))["status"]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from clients.task.files import write_atomic
from server.harness.process import (
    LOCALHOST,
    HarnessError,
    ManagedProcess,
    Pending,
    Service,
    free_port,
    port_open,
    stop_processes,
    wait_all_ready,
)

DEFAULT_CONNECTION = "local-deploy"
# Where the Flower executables live: beside the running interpreter, in its virtualenv.
VENV_BIN = Path(sys.executable).parent
RUN_ID = re.compile(r"Successfully started run (\d+)")

ConfigValue = str | int | float | bool

# Set before any Flower module binds the constant by name (see LocalFederation); then
# the sitecustomize this one shadows, if any, runs too (Python imports only the first).
HEARTBEAT_HOOK = """\
import importlib.machinery
import importlib.util
import os
import sys

try:
    import flwr.common.constant
except ImportError:
    pass
else:
    flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL = {interval}

_here = os.path.dirname(os.path.realpath(__file__))
_rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if (
    _spec is not None
    and _spec.loader is not None
    and _spec.origin
    and os.path.realpath(_spec.origin) != os.path.realpath(__file__)
):
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
"""


def write_heartbeat_hook(directory: Path, interval: int) -> Path:
    """Write `HEARTBEAT_HOOK` as ``directory/sitecustomize.py``; return ``directory``, to
    put first on a Flower process's ``PYTHONPATH``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "sitecustomize.py", HEARTBEAT_HOOK.format(interval=interval).encode())
    return directory


def toml_value(value: ConfigValue) -> str:
    """Render one value as TOML, the syntax Flower's ``--node-config``/``--run-config`` use.

    Strings become literal strings (``'...'``) so Windows paths and backslashes need no
    escaping; Flower splits key=value pairs with a regex that honours either quote.

    Raises:
        ValueError: For a string holding both quote characters, which Flower's
            key=value splitter cannot carry.
    """
    if not isinstance(value, str | int | float | bool):
        raise TypeError(f"cannot pass {value!r} as a Flower config value (not a scalar)")
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'"{value}"'
    raise ValueError(f"cannot pass {value!r} as a Flower config value")


def config_arg(config: Mapping[str, ConfigValue]) -> str:
    """Render a flat config as one ``key=value key=value`` argument."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process whose state lives under `flwr_home`.

    Args:
        flwr_home: Used as ``FLWR_HOME`` so nothing is read from or written to ``~/.flwr``.
        extra: Variables to set on top.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # Processes spawn `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            # No calls home: telemetry and the PyPI update check.
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra or {})
    return env


def write_cli_connection(
    home: Path, name: str, *, address: str, root_certificates: Path | None
) -> None:
    """The ``flwr`` CLI's ``$FLWR_HOME/config.toml`` with one default SuperLink connection.

    Flower 1.41's CLI reads named connections from there; written (atomically) before any
    ``flwr`` call so Flower does not create its default one. ``root_certificates=None``
    writes an ``insecure = true`` connection (no TLS); a relative ``root_certificates`` is
    written resolved against the working directory, as Flower refuses a relative one
    ("expected absolute path") when it reads the file.
    """
    tls = (
        f"root-certificates = {toml_basic_string(str(root_certificates.resolve()))}\n"
        if root_certificates is not None
        else "insecure = true\n"
    )
    text = (
        f"[superlink]\ndefault = {toml_basic_string(name)}\n\n"
        f"[superlink.{toml_key(name)}]\naddress = {toml_basic_string(address)}\n{tls}"
    )
    write_atomic(home / "config.toml", text.encode())


def toml_key(name: str) -> str:
    """``name`` as a TOML key: bare where it can be, else a basic string."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else toml_basic_string(name)


def toml_basic_string(value: str) -> str:
    """``value`` as a TOML basic string (``"..."``), any quote or backslash escaped.

    JSON's string escapes are TOML's; TOML also wants DEL (U+007F) escaped.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


class LocalFederation(Service):
    """One SuperLink and N SuperNodes on localhost, plus a ``flwr`` CLI connection to them.

    Use as a context manager, or call `start` and `stop` (e.g. from a fixture finalizer).
    Every process gets its own ``FLWR_HOME`` under `workdir`, as separate machines would.

    Args:
        workdir: Holds logs, the SuperLink database and each process's ``FLWR_HOME``.
        node_configs: One ``--node-config`` mapping per SuperNode; its ``site-id``, when
            present, names the process and its log.
        connection: Name of the SuperLink connection written to the CLI's config.toml.
        site_env: Extra environment of the SuperNodes (and so of their ClientApps).
        startup_timeout: Seconds to wait for the SuperLink's port to open, then for every
            worker and SuperNode together (`wait_all_ready`), then for the SuperNodes to
            register.
        secure: TLS on every API and SuperNode authentication, as ``fedlora federation``
            sets them up (server/federation.py): a CA and SuperLink certificate, one key
            pair per site registered with the SuperLink, and the run's roster
            (`roster_path`). False: ``--insecure`` everywhere and no roster.
        workers: Start a warm site worker (``fedlora site worker``) beside each SuperNode
            and name its socket in the node config, so ClientApps hand work to it.
        worker_pool: With `workers`, this many workers shared round-robin by the sites
            instead of one each: on one small machine 20 workers would each hold torch
            and the model (about 0.5 GB) while only as many sites as cores train at once.
            Across machines every site runs its own. None: one per site.
        heartbeat_interval: Seconds between the heartbeats of SuperNodes, ServerApps and
            ClientApps, which then count as gone after twice that (Flower's patience).
            Flower 1.41 fixes it at 30 s and offers no option, so this sets the constant
            in every Flower process started here (a ``sitecustomize`` on their
            ``PYTHONPATH``): failure drills then see a lost site in 20 s, not 60. At
            least 10, the least the SuperLink accepts. None: Flower's own.
    """

    def __init__(
        self,
        workdir: Path,
        node_configs: Sequence[Mapping[str, ConfigValue]],
        *,
        connection: str = DEFAULT_CONNECTION,
        site_env: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
        secure: bool = False,
        workers: bool = False,
        worker_pool: int | None = None,
        heartbeat_interval: int | None = None,
    ) -> None:
        if heartbeat_interval is not None and not 10 <= heartbeat_interval <= 1800:
            raise ValueError(f"heartbeat_interval={heartbeat_interval} is not in [10, 1800]")
        self.workdir = workdir
        self.heartbeat_interval = heartbeat_interval
        self._heartbeat_hook = workdir / "heartbeat-hook"
        self.secure = secure
        self.workers = workers
        self.worker_pool = worker_pool
        self.federation: Any = None  # server.federation.Federation when secure
        self.node_configs = list(node_configs)
        self.connection = connection
        self.site_env = dict(site_env or {})
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self._ports = {self.port}
        self.processes: list[ManagedProcess] = []
        self.superlink: ManagedProcess | None = None
        self.cli_env = flower_env(self.home("cli"))

    @property
    def address(self) -> str:
        """The SuperLink's one address: Fleet API for SuperNodes, Control API for the CLI."""
        return f"{LOCALHOST}:{self.port}"

    control_address = address

    @property
    def roster_path(self) -> Path | None:
        """The run's roster (secure federations only): pass it as run config ``roster``."""
        return self.federation.roster_path if self.federation is not None else None

    def home(self, name: str) -> Path:
        return self.workdir / "flwr-home" / name

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def start(self) -> LocalFederation:
        """Start the SuperLink, then the SuperNodes; return when all SuperNodes are online.

        Raises:
            HarnessError: If a process dies or is not ready in time; the message holds
                the tail of every log. All processes are stopped first.
        """
        try:
            self._write_cli_config()
            if self.heartbeat_interval is not None:
                write_heartbeat_hook(self._heartbeat_hook, self.heartbeat_interval)
            self.start_superlink()
            # Every worker and SuperNode is spawned before any is waited for: each spends
            # seconds importing (torch, Flower), and those start-ups overlap. The workers
            # (at most one per CPU core with a pool) import while the sites are enrolled,
            # one `flwr` call at a time; the SuperNodes are spawned only then, so no
            # enrolment competes with a crowd of them for the CPU and the SuperLink.
            pending: list[Pending] = []
            sites = []
            for index, node_config in enumerate(self.node_configs, start=1):
                worker, site = self._prepare_site(index, node_config)
                pending += worker
                sites.append(site)
            for name, config, key in sites:
                pending.append(self._spawn_supernode(name, config, key=key))
            wait_all_ready(pending, timeout=self.startup_timeout)
            self.wait_for_nodes(len(self.node_configs))
        except BaseException as exc:
            report = self.log_tails()
            self.stop()
            if isinstance(exc, Exception):
                raise HarnessError(f"local federation failed to start: {exc}\n{report}") from exc
            raise
        return self

    def _write_cli_config(self) -> None:
        if not self.secure:
            write_cli_connection(
                self.home("cli"), self.connection, address=self.address, root_certificates=None
            )
            return
        from server.federation import init_federation  # it builds on this module

        self.federation = init_federation(
            self.workdir / "federation",
            address=self.address,
            sans=[LOCALHOST, "localhost"],
            connection=self.connection,
        )
        self.cli_env = flower_env(self.federation.cli_home)

    @property
    def database(self) -> Path:
        # Runs, nodes and messages in a file, not memory: inspectable after a failure and
        # what a restarted SuperLink resumes from.
        return self.workdir / "superlink" / "state.db"

    def start_superlink(self) -> ManagedProcess:
        """Start (or restart, on the same database) the SuperLink; return once it listens."""
        self.database.parent.mkdir(parents=True, exist_ok=True)
        # A restart replaces the SuperLink that died (its log is appended to, not lost).
        self.processes = [p for p in self.processes if p.name != "superlink" or p.alive]
        if self.federation is not None:
            args = self.federation.superlink_command(
                host=LOCALHOST, port=self.port, database=str(self.database)
            )
        else:
            args = [
                "flower-superlink",
                "--insecure",
                "--host",
                LOCALHOST,
                "--port",
                str(self.port),
                "--database",
                str(self.database),
                "--disable-runtime-dependency-installation",
            ]
        args[0] = str(VENV_BIN / args[0])
        superlink = self._spawn("superlink", args, self._flower_env("superlink"))
        self.superlink = superlink
        superlink.wait_ready(
            lambda: port_open(self.port),
            timeout=self.startup_timeout,
            what=f"listening on {self.address}",
        )
        return superlink

    def worker_socket(self, name: str) -> Path:
        """Where site `name`'s warm worker listens: a 0700 directory of its own."""
        return self.workdir / "workers" / name / "worker.sock"

    def _prepare_site(
        self, index: int, node_config: Mapping[str, ConfigValue]
    ) -> tuple[list[Pending], tuple[str, dict[str, ConfigValue], Path | None]]:
        """Spawn site `index`'s worker (if any, and not yet spawned) and enrol the site.

        Returns:
            (the worker spawned, with its readiness check, not yet waited for; the
            site's SuperNode to spawn: name, node config, private key or None).
        """
        name = str(node_config.get("site-id") or f"supernode-{index}")
        config = dict(node_config)
        pending: list[Pending] = []
        if self.workers:
            owner = name
            if self.worker_pool:
                owner = f"pool-{(index - 1) % self.worker_pool + 1}"
            socket_path = self.worker_socket(owner)
            if not any(p.name == f"{owner}-worker" for p in self.processes):
                worker = self._spawn(
                    f"{owner}-worker",
                    [str(VENV_BIN / "fedlora"), "site", "worker", "--socket", str(socket_path)],
                    flower_env(self.home(owner), self.site_env),
                )
                pending.append((worker, socket_path.exists, f"listening on {socket_path}"))
            config["worker-socket"] = str(socket_path)
        key = None
        if self.federation is not None:
            self.federation.enroll(name)
            key = self.federation.site_dir(name) / "node.key"
        return pending, (name, config, key)

    def start_supernode(
        self, name: str, node_config: Mapping[str, ConfigValue], *, key: Path | None = None
    ) -> ManagedProcess:
        """Start one SuperNode; with `key`, it authenticates with that private key over TLS.

        A secure federation's SuperNodes dial with TLS whether or not they have a key;
        the SuperLink refuses those whose key is not registered.
        """
        process, ready, what = self._spawn_supernode(name, node_config, key=key)
        process.wait_ready(ready, timeout=self.startup_timeout, what=what)
        return process

    def _spawn_supernode(
        self, name: str, node_config: Mapping[str, ConfigValue], *, key: Path | None
    ) -> Pending:
        """Spawn one SuperNode; return it with its readiness check, not yet waited for."""
        # Not one handed to a SuperNode spawned before, which may not be listening yet.
        runtime_port = free_port()
        while runtime_port in self._ports:
            runtime_port = free_port()
        self._ports.add(runtime_port)
        if self.federation is not None:
            tls = ["--root-certificates", str(self.federation.ca_cert)]
            tls += ["--auth-supernode-private-key", str(key)] if key is not None else []
        else:
            tls = ["--insecure"]
        args = [
            str(VENV_BIN / "flower-supernode"),
            *tls,
            "--superlink",
            self.address,
            "--node-config",
            config_arg(node_config),
            # The Runtime (ClientAppIo) API; the default 9094 would clash between nodes.
            "--host",
            LOCALHOST,
            "--port",
            str(runtime_port),
        ]
        process = self._spawn(name, args, self._flower_env(name, self.site_env))
        return process, lambda: port_open(runtime_port), f"listening on {LOCALHOST}:{runtime_port}"

    def _flower_env(self, name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """`flower_env` for the SuperLink or a SuperNode (and so their children)."""
        env = flower_env(self.home(name), extra)
        if self.heartbeat_interval is not None:  # the hook `start` wrote
            hook = str(self._heartbeat_hook)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [hook, env.get("PYTHONPATH")]))
        return env

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to process `name`, its descendants and its group (failure drills).

        SIGKILL is a crash of that machine's process; SIGSTOP freezes it (SIGCONT thaws).
        """
        for process in self.processes:
            if process.name != name or not process.alive:
                continue
            for proc in process.tree():
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signum)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.popen.pid, signum)

    def _spawn(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> ManagedProcess:
        process = ManagedProcess.start(name, args, env=env, log_path=self.log_path(name))
        self.processes.append(process)
        return process

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this federation (output captured)."""
        return subprocess.run(
            [str(VENV_BIN / "flwr"), *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink reports online (0 if it cannot tell yet)."""
        result = self.flwr("supernode", "ls", self.connection, "--format", "json")
        try:
            nodes = json.loads(result.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_nodes(self, count: int) -> None:
        """Block until `count` SuperNodes are online, so a run need not wait for them.

        Raises:
            HarnessError: If a process exits or fewer are online after `startup_timeout`.
        """
        deadline = time.monotonic() + self.startup_timeout
        while True:
            dead = [p.name for p in self.processes if not p.alive]
            if dead:
                raise HarnessError(f"process(es) exited during startup: {', '.join(dead)}")
            online = self.online_nodes()
            if online >= count:
                return
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"only {online} of {count} SuperNodes online after {self.startup_timeout:.0f} s"
                )
            time.sleep(1.0)

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The SuperLink's record of one run (``flwr ls --run-id``), e.g. its ``status``.

        Raises:
            LookupError: If the SuperLink does not know the run.
        """
        result = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        runs = json.loads(result.stdout).get("runs", [])
        if not runs:
            raise LookupError(f"run {run_id} unknown: {result.stdout}{result.stderr}")
        return dict(runs[0])

    def log_tails(self, lines: int = 60) -> str:
        """The last lines of every process's log, headed by name and exit state."""
        parts = []
        for process in self.processes:
            state = "running" if process.alive else f"exited {process.popen.returncode}"
            header = f"===== {process.name} ({state}) {process.log_path} ====="
            parts.append(f"{header}\n{process.tail(lines)}")
        return "\n".join(parts)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process; SuperNodes are signalled before the SuperLink they poll."""
        stop_processes(list(reversed(self.processes)), timeout)


def flwr_run(
    app_dir: Path,
    federation: LocalFederation,
    run_config: Mapping[str, ConfigValue],
    *,
    timeout: float,
    log_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Submit the Flower app in `app_dir` and stream its logs until the run ends.

    ``flwr run`` builds a FAB from `app_dir` (honouring its .gitignore), sends it to the
    SuperLink and, with ``--stream``, returns once the run has finished. Its exit code is
    0 even when the ServerApp failed: check `run_id_of`'s status with
    `LocalFederation.run_info`.

    Args:
        app_dir: The Flower app (the directory holding pyproject.toml).
        federation: A started federation.
        run_config: Overrides of ``[tool.flwr.app.config]``.
        timeout: Seconds before the CLI is killed (the run itself goes on until the
            federation is stopped).
        log_path: Where to also write the CLI's output.
        on_line: Called with every output line as it arrives (live progress).

    Raises:
        subprocess.TimeoutExpired: After `timeout`, with the output so far.
    """
    args = [
        str(VENV_BIN / "flwr"),
        "run",
        str(app_dir),
        federation.connection,
        "--stream",
        "--run-config",
        config_arg(run_config),
    ]
    lines: list[str] = []
    process = subprocess.Popen(
        args,
        env=federation.cli_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=timeout)
    except BaseException as exc:  # a timeout, or Ctrl-C: the CLI must not outlive us
        process.kill()
        process.wait()
        reader.join(timeout=5.0)
        if log_path is not None:
            _write_log(log_path, "".join(lines))
        if isinstance(exc, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(args, timeout, output="".join(lines)) from None
        raise
    reader.join(timeout=10.0)
    output = "".join(lines)
    if log_path is not None:
        _write_log(log_path, output)
    return subprocess.CompletedProcess(args, returncode, stdout=output, stderr="")


def _write_log(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run_id_of(result: subprocess.CompletedProcess[str]) -> int:
    """The run id that ``flwr run`` printed.

    Raises:
        LookupError: If the run was not started.
    """
    match = RUN_ID.search(result.stdout + result.stderr)
    if match is None:
        raise LookupError("flwr run printed no run id")
    return int(match.group(1))
