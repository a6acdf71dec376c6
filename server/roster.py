"""The run's roster: which Flower nodes are the federation's sites, and under which name.

With SuperNode authentication (``flower-superlink --enable-supernode-auth``) a Flower node
id stands for one registered public key: the SuperLink assigns the id when the key is
registered (``flwr supernode register``) and a SuperNode gets that id only by signing with
the matching private key. ``fedlora federation enroll`` registers each site's key and
writes the id it got into the federation's roster file. The ServerApp then

- samples, and asks to evaluate, only nodes on the roster (`Roster.members`), so a node
  someone else registered through the Control API never receives work or the global
  adapter, and
- names each reply by the roster, not by the site id the reply claims (`Roster.bind`); a
  reply that claims another site's id is rejected.

Without a roster (local simulation, or an ``--insecure`` rehearsal where node ids are
handed out to whoever connects) every connected node is a member under its own claim.

The file (``roster.json``)::

    {"sites": {"hospital-a": {"node-id": 2144869105770604849,
                              "public-key": "sha256:...", "enrolled": "2026-11-30T..."}},
     "revoked": {"hospital-b": {"node-id": ..., "public-key": "sha256:...",
                                "revoked": "2026-...", "earlier": [...]}}}

A revoked record stays when its site is enrolled again (with a new key), and a site
revoked again keeps its earlier records under ``earlier``: the node of a revoked key may
still be live at the SuperLink (its unregister got no answer), and
``fedlora federation enroll`` refuses every key and node the records name
(`Roster.revocation`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clients.task.errors import ConfigError
from clients.task.files import write_atomic
from clients.task.numbers import is_integer
from server.identity import IdentityRejected
from strategies.protocol import SITE_ID_RULE, node_name, valid_site_id


class NotOnRoster(IdentityRejected):
    """A reply came from a node that is not, or not for that site, on the run's roster."""


@dataclass(frozen=True)
class Enrolment:
    site_id: str
    node_id: int
    public_key: str  # fingerprint of the registered key
    enrolled: str = ""


@dataclass
class Roster:
    """Site id ↔ registered node id, both ways unique.

    The round loop's `SiteIdentities` for a federation with enrolled sites: a reply is
    named by its node's enrolment, never by what it claims.
    """

    sites: dict[str, Enrolment] = field(default_factory=dict)
    revoked: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for site, entry in self.sites.items():
            if entry.node_id in seen:
                raise ConfigError(
                    f"roster: node {entry.node_id} is enrolled as both {seen[entry.node_id]!r} "
                    f"and {site!r}"
                )
            seen[entry.node_id] = site
        self._by_node = seen

    # ------------------------------------------------------------------ the round loop

    def members(self, nodes: Iterable[int]) -> list[int]:
        """The connected ``nodes`` that are enrolled sites, sorted."""
        return sorted(n for n in nodes if n in self._by_node)

    def bind(self, node_id: int, claimed: str) -> str:
        """The enrolled site id of ``node_id``; its reply's claim must be that id (or none).

        Raises:
            NotOnRoster: If the node is not enrolled or claims another site's id.
        """
        site = self._by_node.get(node_id)
        if site is None:
            raise NotOnRoster(f"node {node_id} is not on the run's roster")
        if claimed and claimed != site and claimed != node_name(node_id):
            raise NotOnRoster(f"node {node_id} is enrolled as {site!r} but claims {claimed!r}")
        return site

    def name(self, node_id: int) -> str:
        """How the round's record names ``node_id`` where it sent no claim."""
        return self._by_node.get(node_id, node_name(node_id))

    # ------------------------------------------------------------------ the file

    def enrol(self, site_id: str, *, node_id: int, public_key: str) -> Roster:
        """A roster with ``site_id`` (re-)enrolled under ``node_id``; its revoked records stay."""
        sites = {k: v for k, v in self.sites.items() if k != site_id}
        sites[site_id] = Enrolment(
            site_id, node_id, public_key, datetime.now(UTC).isoformat(timespec="seconds")
        )
        return Roster(sites=sites, revoked=dict(self.revoked))

    def revoke(self, site_id: str) -> Roster:
        """A roster without ``site_id``, which is remembered as revoked.

        Raises:
            ConfigError: If the site is not enrolled.
        """
        if site_id not in self.sites:
            raise ConfigError(f"site {site_id!r} is not enrolled (enrolled: {sorted(self.sites)})")
        entry = self.sites[site_id]
        sites = {k: v for k, v in self.sites.items() if k != site_id}
        record: dict[str, Any] = {
            "node-id": entry.node_id,
            "public-key": entry.public_key,
            "revoked": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        before = self.revoked.get(site_id)
        if before is not None:  # revoked before, then enrolled with another key
            last = {k: v for k, v in before.items() if k != "earlier"}
            record["earlier"] = [*before.get("earlier", []), last]
        return Roster(sites=sites, revoked={**self.revoked, site_id: record})

    def revocation(
        self, *, public_key: str = "", node_id: int | None = None
    ) -> tuple[str, dict[str, Any]] | None:
        """The revoked enrolment of the key fingerprint ``public_key`` or of ``node_id``.

        Returns:
            (site id, its record: ``node-id``, ``public-key``, ``revoked``), or None.
        """
        for site, record in self.revoked.items():
            for each in (record, *record.get("earlier", [])):
                if (public_key and each.get("public-key") == public_key) or (
                    node_id is not None and each.get("node-id") == node_id
                ):
                    return site, each
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": {
                s: {"node-id": e.node_id, "public-key": e.public_key, "enrolled": e.enrolled}
                for s, e in sorted(self.sites.items())
            },
            "revoked": dict(sorted(self.revoked.items())),
        }

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "roster") -> Roster:
        """Parse a roster document.

        Raises:
            ConfigError: For a malformed document, naming the site and field.
        """
        sites = data.get("sites")
        if not isinstance(sites, dict):
            raise ConfigError(f"{source}: 'sites' must be an object")
        out: dict[str, Enrolment] = {}
        for site, entry in sites.items():
            if not valid_site_id(site):  # no site could ever claim it
                raise ConfigError(
                    f"{source}: site {site!r} is not a valid site id ({SITE_ID_RULE})"
                )
            node = entry.get("node-id") if isinstance(entry, dict) else None
            if not is_integer(node):
                raise ConfigError(f"{source}: site {site!r} has node-id={node!r}, not an integer")
            out[site] = Enrolment(
                site, node, str(entry.get("public-key", "")), str(entry.get("enrolled", ""))
            )
        revoked = data.get("revoked", {})
        if not isinstance(revoked, dict):
            raise ConfigError(f"{source}: 'revoked' must be an object")
        for site, record in revoked.items():
            # Enrolment refuses the keys and nodes these name: a record it could not
            # read would let one through.
            earlier = record.get("earlier", []) if isinstance(record, dict) else None
            if not isinstance(earlier, list):
                raise ConfigError(
                    f"{source}: revoked site {site!r} must be an object, its 'earlier' a list"
                )
            for each in (record, *earlier):
                node = each.get("node-id") if isinstance(each, dict) else None
                if not is_integer(node):
                    raise ConfigError(
                        f"{source}: revoked site {site!r} has node-id={node!r}, not an integer"
                    )
        return cls(sites=out, revoked=revoked)

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Read a roster file.

        Raises:
            ConfigError: If the file is missing, not JSON, or malformed.
        """
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"roster={str(path)!r} does not exist") from exc
        except (OSError, ValueError, RecursionError) as exc:  # JSONDecode, UnicodeDecode
            raise ConfigError(f"roster={str(path)!r} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"roster={str(path)!r} must hold a JSON object")
        return cls.from_json(data, source=f"roster {path}")
