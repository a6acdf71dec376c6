"""Which site a reply speaks for: its claim, bound to the Flower node that sent it.

A reply names its site (strategies/protocol.py, ``site-id``), but the name is the site's
own claim; what the server knows for sure is the Flower node a reply came from (in
simulation and on the Deployment Engine the SuperLink sets ``src_node_id``, and with
SuperNode authentication a node id stands for a registered key). `SiteIdentities` turns
(node, claim) into the name the round records, or refuses the reply:

- `PinnedIdentities` (the default) pins each node to the first site id it claims in this
  run and each site id to the first node that claims it: a node cannot speak for a site
  another node already speaks for, nor change its own name, nor take the name the
  server gives silent nodes (``node-N``) of another node.

A roster of registered node keys (which site each key belongs to) is a second
implementation of the same protocol; the round loop takes whichever it is given.

Usage::

    identities = PinnedIdentities()
    site = identities.bind(reply.metadata.src_node_id, sender(reply))  # or IdentityRejected
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Protocol

from clients.task.errors import FedloraError
from strategies.protocol import SITE_ID_RULE, node_name, valid_site_id

NODE_NAME = re.compile(r"node-\d+")


class IdentityRejected(FedloraError):
    """A reply claims a site identity its node may not use."""


class SiteIdentities(Protocol):
    """How the server names the site behind a reply."""

    def bind(self, node_id: int, claimed: str) -> str:
        """The site name for a reply from ``node_id`` claiming ``claimed``.

        Raises:
            IdentityRejected: If the node may not use that name.
        """
        ...

    def name(self, node_id: int) -> str:
        """How to name ``node_id`` where it sent no claim (an error, a timeout)."""
        ...


@dataclass
class PinnedIdentities:
    """Trust on first use, for one run: node ↔ site id, both ways, never changed.

    Two ids that differ only in case or Unicode compatibility form (``Site-A``,
    ``ｓｉｔｅ-a``) are one site: a second node claiming such a look-alike of a pinned id
    is rejected like a claim of the id itself. Cross-script homoglyphs (a Cyrillic ``а``)
    are not folded.
    """

    by_node: dict[int, str] = field(default_factory=dict)
    by_site: dict[str, int] = field(default_factory=dict)  # keyed by `_folded` id

    def bind(self, node_id: int, claimed: str) -> str:
        own = node_name(node_id)
        if not claimed:
            claimed = own
        if not valid_site_id(claimed):
            raise IdentityRejected(
                f"node {node_id} claims site id {claimed[:80]!r}: not {SITE_ID_RULE}"
            )
        if NODE_NAME.fullmatch(claimed) and claimed != own:
            raise IdentityRejected(f"node {node_id} claims {claimed!r}, another node's name")
        pinned = self.by_node.get(node_id)
        if pinned is not None and pinned != claimed:
            raise IdentityRejected(
                f"node {node_id} spoke for site {pinned!r} earlier in this run and now "
                f"claims {claimed!r}"
            )
        owner = self.by_site.get(_folded(claimed))
        if owner is not None and owner != node_id:
            raise IdentityRejected(
                f"node {node_id} claims site {claimed!r}, which node {owner} speaks for"
                + ("" if self.by_node[owner] == claimed else f" as {self.by_node[owner]!r}")
            )
        self.by_node[node_id] = claimed
        self.by_site[_folded(claimed)] = node_id
        return claimed

    def name(self, node_id: int) -> str:
        return self.by_node.get(node_id, node_name(node_id))


def _folded(site_id: str) -> str:
    """``site_id`` in NFKC, case-folded: the form two look-alike ids share."""
    return unicodedata.normalize("NFKC", site_id).casefold()
