"""A federation's directory: its CA, the SuperLink's certificate, site keys and the roster.

``fedlora federation init DIR`` makes the directory (mode 0700) with the CA, the
SuperLink's TLS certificate for the names and addresses sites reach it by, and a ``flwr``
CLI connection that trusts the CA. ``enroll`` makes a site's EC P-384 key pair (or takes
a public key the site made itself), registers the public key with the SuperLink through
Flower's Control API (``flwr supernode register``) and writes the node id it got into
``roster.json`` (server/roster.py), which the ServerApp reads (run config ``roster``).
``sites`` lists the roster beside what the SuperLink reports, including registered
nodes that are *not* on the roster; ``revoke`` unregisters a site's node and takes it
off the roster.

A ``flwr`` call that fails without an answer (a timeout, a lost connection) may still
have been done, or be done later: `NoAnswer`. ``enroll`` then looks the key up in the
SuperLink's node list (server/node_list.py, the listing ``sites`` shows), and never
removes a key pair it made: the registration may land after the list was read. A key the
SuperLink holds already, on a node not on the roster, is enrolled as that node; so
``enroll --public-key`` with the kept ``node.pub`` finishes an enrolment whose answer was
lost. A key or node of a
revoked enrolment (the roster's revoked records) is never enrolled again: its node may
still be live, if the unregister that ``revoke`` ran got no answer.

Layout::

    DIR/federation.json       address sites dial, SANs, connection name
    DIR/ca.pem, ca.key        the federation's CA (ca.key 0600; keep it offline)
    DIR/superlink.pem, .key   the SuperLink's TLS certificate and key (0600)
    DIR/roster.json           enrolled sites: site id -> node id, key fingerprint
    DIR/flwr-home/config.toml the ``flwr`` CLI's connection (TLS, trusts ca.pem)
    DIR/sites/SITE/node.key   a site's private key (0600), when enroll made it
    DIR/sites/SITE/node.pub   its public key (OpenSSH)

Nothing here prints or logs a private key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clients.task.errors import ConfigError, FedloraError
from clients.task.files import write_atomic
from server import pki
from server.harness.flower import (
    VENV_BIN,
    flower_env,
    toml_basic_string,
    toml_key,
    write_cli_connection,
)
from server.roster import Enrolment, Roster

log = logging.getLogger(__name__)

CONNECTION = "fedlora"
DEFAULT_PORT = 9092
NODE_LIST = Path(__file__).with_name("node_list.py")
# Flower 1.41's `flwr` reports every transport failure (connection refused or reset,
# read timeout, closed before the answer) in these words
# (flwr.cli.utils.SUPERLINK_UNAVAILABLE_MESSAGE): they do not tell a request never sent
# from an answer lost.
UNAVAILABLE = "Connection to the SuperLink is unavailable"
# httpx's words for an HTTP 5xx without Flower's error body (a proxy's 502 or 504): the
# SuperLink behind it may have done the work.
SERVER_ERROR = "Server error '"
# The SuperLink's refusal of a key it holds already
# (flwr.common.constant.PUBLIC_KEY_ALREADY_IN_USE_MESSAGE).
KEY_IN_USE = "Public key already in use"
# Statuses of a node whose key the SuperLink accepts; the other, "unregistered", is a
# node whose key it never takes again.
LIVE = ("registered", "online", "offline")
# The same rule as site ids in metrics and logs: printable, no spaces, short.
SITE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class FederationError(FedloraError):
    """A federation command failed (the SuperLink refused or could not be reached)."""


class NoAnswer(FederationError):
    """A ``flwr`` call whose outcome is unknown: it timed out, lost its connection or
    ended without an answer, so the SuperLink may have done what it asked."""


@dataclass(frozen=True)
class Node:
    """A node as the SuperLink lists it."""

    node_id: int
    status: str  # registered, online, offline or unregistered
    public_key: str  # fingerprint of the key it stands for ("" if unreadable)
    name: str = ""


def check_site_id(site_id: str) -> str:
    """Raises ConfigError unless ``site_id`` is 1-64 of letters, digits and ``._-``."""
    if not (0 < len(site_id) <= 64) or not set(site_id) <= SITE_ID_CHARS or site_id[0] in ".-":
        raise ConfigError(
            f"site id {site_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(not starting with '.' or '-')"
        )
    return site_id


@dataclass(frozen=True)
class Federation:
    """An initialised federation directory.

    ``directory`` is made absolute: its paths go into the ``flwr`` CLI's config.toml
    (Flower refuses a relative ``root-certificates``) and into printed commands that may
    be run from another directory.
    """

    directory: Path
    address: str  # host:port the SuperNodes and the CLI dial
    sans: tuple[str, ...]
    connection: str = CONNECTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", self.directory.resolve())

    # ------------------------------------------------------------------ paths

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.directory / "superlink.pem"

    @property
    def superlink_key(self) -> Path:
        return self.directory / "superlink.key"

    @property
    def roster_path(self) -> Path:
        return self.directory / "roster.json"

    @property
    def cli_home(self) -> Path:
        return self.directory / "flwr-home"

    def site_dir(self, site_id: str) -> Path:
        return self.directory / "sites" / check_site_id(site_id)

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, directory: Path) -> Federation:
        """Read a directory made by `init_federation`.

        Raises:
            ConfigError: If it is not one, or its ``flwr`` connection is one Flower refuses.
        """
        meta = directory / "federation.json"
        try:
            data = json.loads(meta.read_text())
        except FileNotFoundError as exc:
            if (directory / "ca.key").exists():
                raise ConfigError(_unfinished_init(directory)) from exc
            raise ConfigError(
                f"{directory} is not a federation directory (no federation.json); "
                "run `fedlora federation init` first"
            ) from exc
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"{meta}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            raise ConfigError(f'{meta} has no "address" (HOST:PORT); it is not as init wrote it')
        fed = cls(
            directory=directory,
            address=data["address"],
            sans=tuple(data.get("sans", ())),
            connection=str(data.get("connection", CONNECTION)),
        )
        fed._check_cli_connection()
        return fed

    def _check_cli_connection(self) -> None:
        """Refuse a relative ``root-certificates`` in ``flwr-home/config.toml``.

        ``init`` wrote one when given a relative directory, before it made paths absolute;
        Flower refuses it ("expected absolute path") on every ``flwr`` call, and
        ``init`` does not replace a federation. The path was relative to the directory
        ``init`` ran in, which nothing recorded, so the file is not rewritten here: the
        error gives the line that replaces it, naming this federation's ``ca.pem``.

        Raises:
            ConfigError: Naming the file, the line (the connection's table where no
                line alone sets it), the value and the replacement line.
        """
        path = self.cli_home / "config.toml"
        try:
            text = path.read_text()
            config = tomllib.loads(text)
        except FileNotFoundError:
            return  # flwr's own error names the connection it cannot find
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        superlink = config.get("superlink")
        connection = superlink.get(self.connection) if isinstance(superlink, dict) else None
        value = connection.get("root-certificates") if isinstance(connection, dict) else None
        if not isinstance(value, str) or Path(value).is_absolute():
            return
        line = _line_of(text, ("superlink", self.connection, "root-certificates"), value)
        where = f"line {line}" if line else f"[superlink.{toml_key(self.connection)}]"
        raise ConfigError(
            f"{path}, {where}: root-certificates = {toml_basic_string(value)} is a "
            "relative path, which Flower refuses (an older `fedlora federation init` run "
            f"with a relative directory wrote it); replace that {'line' if line else 'value'} "
            f"with: root-certificates = {toml_basic_string(str(self.ca_cert))}"
        )

    def roster(self) -> Roster:
        return Roster.load(self.roster_path) if self.roster_path.exists() else Roster()

    # ------------------------------------------------------------------ commands to print

    def superlink_command(
        self, *, host: str = "0.0.0.0", port: int | None = None, database: str = "superlink.db"
    ) -> list[str]:
        """The ``flower-superlink`` command: TLS on every API and SuperNode authentication."""
        return [
            "flower-superlink",
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.superlink_cert),
            "--ssl-keyfile",
            str(self.superlink_key),
            "--enable-supernode-auth",
            "--host",
            host,
            "--port",
            str(port or int(self.address.rsplit(":", 1)[1])),
            "--database",
            database,
            "--disable-runtime-dependency-installation",
        ]

    def supernode_command(self, site_id: str, *, key_path: str, ca_path: str) -> list[str]:
        """The site's ``flower-supernode`` command (paths as they are on the site)."""
        return [
            "flower-supernode",
            "--superlink",
            self.address,
            "--root-certificates",
            ca_path,
            "--auth-supernode-private-key",
            key_path,
            "--node-config",
            f"data-path='/data/{site_id}.jsonl' site-id='{site_id}' "
            f"state-dir='/var/lib/fedlora/{site_id}'",
            "--host",
            "127.0.0.1",
            "--port",
            "9094",
        ]

    # ------------------------------------------------------------------ the Control API

    def flwr(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run a ``flwr`` command with ``--format json`` against this federation's SuperLink.

        Raises:
            NoAnswer: If it got no answer (a timeout, a lost connection): what it asked
                for may have been done.
            FederationError: If it failed otherwise; the message holds Flower's own words.
        """
        argv = [str(VENV_BIN / "flwr"), *args, self.connection, "--format", "json"]
        return self._control(argv, what=f"`flwr {' '.join(args[:2])}`", timeout=timeout)

    def nodes(self, *, timeout: float = 60.0) -> list[Node]:
        """The SuperLink's nodes, each with the fingerprint of its key (server/node_list.py).

        Raises:
            NoAnswer: If the SuperLink gave no answer.
            FederationError: If it refused.
        """
        argv = [sys.executable, "-I", str(NODE_LIST), self.connection]
        data = self._control(argv, what="`flwr supernode ls`", timeout=timeout)
        return [
            Node(int(n["node-id"]), str(n["status"]), _fingerprint_pem(n), str(n.get("name") or ""))
            for n in data.get("nodes", [])
        ]

    def _control(self, argv: list[str], *, what: str, timeout: float) -> dict[str, Any]:
        """Run a command that prints Flower's JSON answer; return it if it says success."""
        try:
            result = subprocess.run(
                argv,
                env=flower_env(self.cli_home),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NoAnswer(f"{what} got no answer from {self.address} in {timeout:.0f}s") from exc
        try:
            data = json.loads(result.stdout[result.stdout.find("{") :])
        except json.JSONDecodeError:
            data = {}
        if result.returncode == 0 and data.get("success", False):
            return data
        detail = data.get("error-message") or (result.stderr or result.stdout).strip()[-400:]
        detail = " ".join(detail.split())  # Flower's progress lines and message, on one line
        message = f"{what} against {self.address} failed: {detail}"
        if not data or UNAVAILABLE in detail or SERVER_ERROR in detail:
            raise NoAnswer(message)
        raise FederationError(message)

    def enroll(self, site_id: str, *, public_key: Path | None = None) -> Enrolment:
        """Register a site's public key with the SuperLink and put it on the roster.

        A registration the SuperLink refuses leaves ``sites/SITE/`` as it was: a key pair
        this call made is removed, a ``node.pub`` it replaced is put back, and a key that
        was there before is never removed. One that gets no answer is looked up in the
        SuperLink's node list: found, the site is enrolled as that node; not found, or if
        the list cannot be read, a key pair this call made is kept (the SuperLink may hold
        its public key, or register it after the list was read) and the error names the
        command that finishes the enrolment, ``enroll SITE --public-key
        DIR/sites/SITE/node.pub``: a key the SuperLink holds already, on a node not on the
        roster, is enrolled as that node, and one it does not hold is registered.

        Args:
            site_id: The site's id in the run's records.
            public_key: The site's OpenSSH public key, if the site made its own key pair;
                otherwise one is made in ``sites/SITE/`` (private key 0600).

        Raises:
            ConfigError: If the site is enrolled already, the key is unreadable, another
                site's or a revoked enrolment's (the message names the unregister to
                finish), or ``public_key`` is None and ``sites/SITE/node.key`` exists (the
                message says whether to reuse it with ``--public-key`` or remove it).
            NoAnswer: If the SuperLink may have registered the key and cannot say.
            FederationError: If the SuperLink refuses the registration or cannot be
                reached.
            KeyboardInterrupt: Interrupted; while the registration was in flight, the
                message says what was kept and how to finish.
        """
        roster = self.roster()
        if site_id in roster.sites:
            raise ConfigError(
                f"site {site_id!r} is enrolled already (node {roster.sites[site_id].node_id}); "
                "revoke it first to enroll a new key"
            )
        site_dir = self.site_dir(site_id)
        key_path, pub_path = site_dir / "node.key", site_dir / "node.pub"
        key = None
        if public_key is None:
            if key_path.exists() or key_path.is_symlink():
                raise ConfigError(self._existing_key(site_id, roster))
            key = pki.make_node_key()
            pub = pki.node_public_openssh(key.public_key())
        else:
            pub = _read_public_key(public_key)
            revoked = roster.revocation(public_key=pki.fingerprint(pub))
            if revoked is not None:
                raise ConfigError(
                    self._revoked(
                        f"--public-key {str(public_key)!r}", revoked, then=f"enroll {site_id!r}"
                    )
                )
            if key_path.exists() or key_path.is_symlink():
                # Replacing node.pub beside it would leave a pair that does not match.
                try:
                    beside = pki.fingerprint(pub_path.read_bytes())
                except (OSError, IndexError, ValueError):
                    beside = None
                if beside != pki.fingerprint(pub):
                    raise ConfigError(
                        f"{key_path} exists and --public-key {str(public_key)!r} is not its "
                        f"public key ({pub_path}); enrolling it would leave a mismatched pair: "
                        "remove both files first, or pass that node.pub"
                    )
        # What to put back if the registration fails: the directories and node.pub as
        # they are now (sites/ before sites/SITE/).
        made_dirs = [d for d in (site_dir.parent, site_dir) if not d.exists()]
        old_pub = pub_path.read_bytes() if pub_path.exists() else None
        made_key = sent = False
        try:
            if key is not None:
                pki.write_private_key(key_path, key, openssh=True)
                made_key = True
            pki.write_public(pub_path, pub)
            sent = True
            node_id = self._register(site_id, pub_path, roster)
        except BaseException as exc:
            if not (sent and isinstance(exc, NoAnswer | KeyboardInterrupt)):
                _put_back(made_key, key_path, pub_path, old_pub, made_dirs)
                raise
            # The SuperLink may hold the key: keep a key pair made here, with its node.pub.
            if made_key:
                finish = (
                    f"the key pair is kept in {site_dir}; to finish, once the SuperLink "
                    f"answers, run: {self._enroll_command(site_id, pub_path)}"
                )
            else:
                _put_back(made_key, key_path, pub_path, old_pub, made_dirs)
                finish = "to finish, once the SuperLink answers, run the same command again"
            finish += " (it enrols the key whether or not the SuperLink registered it)"
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM's Terminated
                raise type(exc)(
                    f"while registering {site_id!r}'s key, which the SuperLink may have "
                    f"done; {finish}"
                ) from exc
            raise NoAnswer(f"{exc}; {finish}") from exc
        roster = roster.enrol(site_id, node_id=node_id, public_key=pki.fingerprint(pub))
        try:
            roster.save(self.roster_path)
        except OSError as exc:
            raise FederationError(
                f"the SuperLink registered {site_id!r}'s key as node {node_id}, but "
                f"{self.roster_path} could not be written ({exc}); {pub_path} is kept: once "
                f"it can be, run: {self._enroll_command(site_id, pub_path)} "
                f"(it enrols node {node_id})"
            ) from exc
        return roster.sites[site_id]

    def _register(self, site_id: str, pub_path: Path, roster: Roster) -> int:
        """Register the key in ``pub_path``; return the node id it stands for.

        Where the SuperLink gives no answer, or holds the key already, its node list
        says which node the key stands for, if any.

        Raises:
            NoAnswer: If the registration got no answer and the node list does not hold
                the key or cannot be read: the registration may land yet.
            FederationError: If the SuperLink refuses the key (as a key of an
                unregistered node, say).
            ConfigError: If the key is another site's on the roster, or its node is that
                of a revoked enrolment.
        """
        fingerprint = pki.fingerprint(pub_path.read_bytes())
        try:
            answer = self.flwr("supernode", "register", str(pub_path), "--name", site_id)
            return _node_id(answer)
        except NoAnswer as exc:
            failure: FederationError = exc
        except FederationError as exc:
            if KEY_IN_USE not in str(exc):
                raise
            failure = exc
        try:
            node = next((n for n in self.nodes() if n.public_key == fingerprint), None)
        except FederationError as exc:
            if isinstance(failure, NoAnswer):
                raise NoAnswer(
                    f"{failure}; the SuperLink may have registered the key, and its node "
                    f"list could not be read to tell ({exc})"
                ) from exc
            raise FederationError(
                f"{failure}; its node list could not be read to find the key's node ({exc})"
            ) from exc
        if node is None and isinstance(failure, NoAnswer):
            # A request whose answer was lost may still be on its way: not listed is not
            # "not registered".
            raise NoAnswer(
                f"{failure}; the SuperLink's node list does not hold the key, but may "
                "register it yet"
            ) from failure
        if node is None:
            raise FederationError(
                f"{failure}; the key's node is not in the SuperLink's node list for this "
                "connection's account"
            ) from failure
        if node.status not in LIVE:
            raise FederationError(
                f"{failure}; the key is that of node {node.node_id}, {node.status}, which "
                f"the SuperLink does not take again: {site_id!r} needs a new key pair"
            ) from failure
        revoked = roster.revocation(node_id=node.node_id)
        if revoked is not None:
            raise ConfigError(
                self._revoked(
                    f"{failure}; the key's node",
                    revoked,
                    then=f"enroll {site_id!r}",
                )
            )
        enrolled = [s for s, e in roster.sites.items() if e.node_id == node.node_id]
        if enrolled:
            raise ConfigError(
                f"the key is that of site {enrolled[0]!r} (node {node.node_id}) on the "
                f"roster; {site_id!r} needs a key pair of its own"
            )
        if node.name and node.name != site_id:
            # Registered for another site (``--name``): a roster written before revoked
            # records were kept may have lost that site's record, so its name decides.
            raise ConfigError(
                f"the key's node {node.node_id} was registered for site {node.name!r}, "
                f"not {site_id!r}; {site_id!r} needs a key pair of its own"
            )
        log.warning(
            "%s; the SuperLink's node list holds the key as node %d (not on the roster), "
            "which is enrolled as %r",
            failure,
            node.node_id,
            site_id,
        )
        return node.node_id

    def _existing_key(self, site_id: str, roster: Roster) -> str:
        """Why ``sites/SITE/node.key`` stops an enrol that would make a key pair, and what to do."""
        site_dir = self.site_dir(site_id)
        key_path, pub_path = site_dir / "node.key", site_dir / "node.pub"
        try:
            fingerprint = pki.fingerprint(pub_path.read_bytes())
        except (OSError, IndexError):
            fingerprint = None
        revoked = roster.revocation(public_key=fingerprint) if fingerprint else None
        if revoked is not None:
            return self._revoked(
                f"{key_path} exists: its key",
                revoked,
                then=f"remove {key_path} and {pub_path} and enroll {site_id!r}",
            )
        if fingerprint is None:
            return (
                f"{key_path} exists, from an earlier enrol of {site_id!r}, without its "
                f"node.pub; remove {key_path} to enroll with a new key pair"
            )
        return (
            f"{key_path} exists, from an earlier enrol of {site_id!r} that is not on the "
            "roster; reuse it (whether or not the SuperLink registered it): "
            f"`{self._enroll_command(site_id, pub_path)}`, or remove {key_path} and "
            f"{pub_path} to enroll with a new key pair"
        )

    def _revoked(self, what: str, revoked: tuple[str, dict[str, Any]], *, then: str) -> str:
        """Why a key or node of a revoked enrolment is refused, and what to do."""
        site, record = revoked
        node_id = record["node-id"]
        return (
            f"{what} is that of site {site!r}, revoked as node {node_id}: a revoked key is "
            f"never enrolled again; if the unregister that revoke ran got no answer, node "
            f"{node_id} is still registered at the SuperLink: finish that first, with: "
            f"{self._unregister_command(node_id)}; then {then} with a new key pair"
        )

    def _enroll_command(self, site_id: str, pub_path: Path) -> str:
        """The ``fedlora`` command that enrols ``site_id`` with the key in ``pub_path``."""
        return shell(
            ["fedlora", "federation", "enroll", site_id, "--federation", str(self.directory),
             "--public-key", str(pub_path)]
        )  # fmt: skip

    def _unregister_command(self, node_id: int) -> str:
        """The ``flwr`` command that unregisters ``node_id``, as revoke runs it."""
        return (
            f"FLWR_HOME={shlex.quote(str(self.cli_home))} flwr supernode unregister "
            f"{node_id} {shlex.quote(self.connection)}"
        )

    def revoke(self, site_id: str) -> int:
        """Unregister a site's node at the SuperLink and take it off the roster.

        The roster changes first: even if the SuperLink cannot be reached, the ServerApp
        gives the site no more work from the next run (or resume) on.

        Returns:
            The node id that was revoked.

        Raises:
            ConfigError: If the site is not enrolled.
            FederationError: If the SuperLink refuses (the roster is changed regardless).
        """
        roster = self.roster()
        revoked = roster.revoke(site_id)
        revoked.save(self.roster_path)
        node_id = roster.sites[site_id].node_id
        try:
            self.flwr("supernode", "unregister", str(node_id))
        except (FederationError, KeyboardInterrupt) as exc:
            finish = (
                f"{site_id!r} is off the roster (no more work for it), but node {node_id} may "
                "still be registered; once the SuperLink answers, run: "
                f"{self._unregister_command(node_id)}"
            )
            raise type(exc)(f"{exc}; {finish}" if str(exc) else finish) from exc
        return node_id

    def sites(self) -> list[dict[str, Any]]:
        """The roster beside the SuperLink's nodes: enrolled sites, then nodes not enrolled.

        Returns:
            One row per site or node: ``site`` (None for a node not on the roster),
            ``node-id``, ``public-key`` (its fingerprint), ``status``, and ``finish``: the
            command that finishes a revoke whose unregister is still undone, else None.

        Raises:
            FederationError: If the SuperLink cannot be asked.
        """
        nodes = {node.node_id: node for node in self.nodes()}
        roster = self.roster()
        rows = []
        for site, entry in sorted(roster.sites.items()):
            node = nodes.pop(entry.node_id, None)
            rows.append(
                {
                    "site": site,
                    "node-id": entry.node_id,
                    "public-key": entry.public_key,
                    "status": node.status if node else "not registered",
                    "finish": None,
                }
            )
        for node_id, node in sorted(nodes.items()):
            status, finish = self._off_roster(roster, node)
            rows.append(
                {
                    "site": None,
                    "node-id": node_id,
                    "public-key": node.public_key,
                    "status": status,
                    "finish": finish,
                }
            )
        return rows

    def _off_roster(self, roster: Roster, node: Node) -> tuple[str, str | None]:
        """A listed node that is not on the roster: its status, saying whose it was if a
        revoked site's, and the command that finishes that revoke while it is registered."""
        status = f"{node.status}, NOT ON THE ROSTER (gets no work)"
        found = roster.revocation(public_key=node.public_key, node_id=node.node_id)
        if found is None:
            return status, None
        site, record = found
        when = f" on {record['revoked']}" if record.get("revoked") else ""
        status += f"; held by revoked site {site!r} (revoked{when})"
        if node.status == "unregistered":
            return status, None
        return status, self._unregister_command(node.node_id)


def _fingerprint_pem(node: dict[str, Any]) -> str:
    """The fingerprint of a listed node's key ("" if it is not a PEM EC public key)."""
    try:
        return pki.fingerprint_pem(str(node.get("public-key", "")).encode())
    except ValueError:
        return ""


def _line_of(text: str, key: tuple[str, ...], value: object) -> int | None:
    """The number of the line of TOML ``text`` that sets ``key`` (a dotted path) to ``value``.

    A scan that tracks the table header each line is under; each line is read as TOML on
    its own, so quoted keys, escapes, dotted keys and inline tables are matched as TOML
    reads them, and a value written over several lines is not found (None).
    """
    table: tuple[str, ...] | None = ()  # the current header's path; None: [[array]]
    for number, row in enumerate(text.splitlines(), start=1):
        try:
            parsed: Any = tomllib.loads(row)
        except tomllib.TOMLDecodeError:
            continue
        if row.lstrip().startswith("[["):
            table = None
        elif row.lstrip().startswith("["):
            table = ()
            while isinstance(parsed, dict) and len(parsed) == 1:  # {"a": {"b": {}}}
                ((name, parsed),) = parsed.items()
                table += (name,)
        elif table is not None and key[: len(table)] == table:
            for name in key[len(table) :]:
                parsed = parsed.get(name) if isinstance(parsed, dict) else None
            if parsed == value:
                return number
    return None


def _put_back(
    made_key: bool, key_path: Path, pub_path: Path, old_pub: bytes | None, made_dirs: list[Path]
) -> None:
    """Undo what a failed enrol made: its key pair, its node.pub, its directories."""
    if made_key:
        key_path.unlink(missing_ok=True)
    if old_pub is None:
        pub_path.unlink(missing_ok=True)
    else:
        pki.write_public(pub_path, old_pub)
    for directory in reversed(made_dirs):
        with contextlib.suppress(OSError):  # not empty: someone else's file
            directory.rmdir()


def _node_id(answer: dict[str, Any]) -> int:
    """The node id of a ``flwr supernode register`` success answer.

    Raises:
        NoAnswer: If the answer says success but names no integer node id: the SuperLink
            has probably registered the key, so nothing may be removed on this answer.
    """
    try:
        node_id = answer["node-id"]
        if isinstance(node_id, bool):
            raise TypeError("a bool")
        return int(node_id)
    except (KeyError, TypeError, ValueError) as exc:
        raise NoAnswer(
            f"`flwr supernode register` said success without a node id ({exc!r} in "
            f"{str(answer)[:200]})"
        ) from exc


def _read_public_key(path: Path) -> bytes:
    """A site's OpenSSH public key, as ``enroll --public-key`` takes it, in the one
    canonical spelling `pki.node_public_openssh` writes (no comment, canonical base64).

    The spelling matters: fingerprints (the roster's, the revoked records', the
    SuperLink's node list) are taken over the OpenSSH key blob, and a base64 text that
    decodes to the same key with other padding bits would get another fingerprint.

    Raises:
        ConfigError: If it is unreadable or not an OpenSSH NIST EC public key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--public-key {path}: {exc}") from exc
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"--public-key {path} is not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"--public-key {path} is not an OpenSSH NIST EC public key "
            "(ecdsa-sha2-nistp384 ...), which Flower's node authentication needs"
        )
    return pki.node_public_openssh(key)


def init_federation(
    directory: Path, *, address: str, sans: list[str], connection: str = CONNECTION
) -> Federation:
    """Make a federation directory: CA, SuperLink certificate, CLI connection, empty roster.

    Args:
        directory: Created with mode 0700; must not hold a federation already. A relative
            path is resolved against the working directory: every path written into the
            directory's files is absolute.
        address: ``host:port`` that sites and the CLI dial (the host must be in ``sans``).
        sans: Host names and IP addresses the SuperLink's certificate is valid for.

    Raises:
        ConfigError: For an existing federation, a bad address or SAN.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} must be HOST:PORT")
    host = host.strip("[]")
    if host not in sans:
        sans = [host, *sans]
    directory = directory.resolve()
    if (directory / "federation.json").exists():
        raise ConfigError(f"{directory} holds a federation already; refusing to replace its CA")
    if (directory / "ca.key").exists():
        raise ConfigError(_unfinished_init(directory))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca = pki.make_ca("fedlora federation CA")
    fed = Federation(directory=directory, address=address, sans=tuple(sans), connection=connection)
    pki.write_private_key(fed.ca_key, ca.key)
    pki.write_public(fed.ca_cert, pki.certificate_pem(ca.certificate))
    cert, key = pki.make_server_certificate(ca, sans=list(sans))
    pki.write_private_key(fed.superlink_key, key)
    pki.write_public(fed.superlink_cert, pki.certificate_pem(cert))
    write_cli_connection(
        fed.cli_home, fed.connection, address=address, root_certificates=fed.ca_cert
    )
    Roster().save(fed.roster_path)
    meta = {"address": address, "sans": list(sans), "connection": fed.connection}
    write_atomic(directory / "federation.json", (json.dumps(meta, indent=2) + "\n").encode())
    return fed


def _unfinished_init(directory: Path) -> str:
    """What to do with a directory holding a CA key and no federation.json."""
    return (
        f"{directory} holds a CA key (ca.key) but no federation.json, which `fedlora "
        "federation init` writes last: an init that did not finish, whose CA nothing was "
        f"enrolled with; refusing to replace the key: remove {directory} and run init again"
    )


def shell(command: list[str]) -> str:
    """A command as one copy-pasteable shell line."""
    return " ".join(shlex.quote(part) for part in command)


def private_key_mode_ok(path: Path) -> bool:
    """Whether a key file is readable by its owner only."""
    return (os.stat(path).st_mode & 0o077) == 0
