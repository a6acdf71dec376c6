"""Site identities bound to Flower nodes: each rule of `PinnedIdentities`, by hand."""

from __future__ import annotations

import pytest

from server.identity import IdentityRejected, PinnedIdentities


def test_a_node_keeps_the_first_site_id_it_claims_and_no_other_node_gets_it() -> None:
    ids = PinnedIdentities()
    assert ids.bind(1, "hospital-a") == "hospital-a"
    assert ids.bind(1, "hospital-a") == "hospital-a"  # the same claim again is fine
    assert ids.bind(2, "") == "node-2"  # no claim: named by its node
    with pytest.raises(IdentityRejected, match="which node 1 speaks for"):
        ids.bind(3, "hospital-a")
    with pytest.raises(IdentityRejected, match="spoke for site 'hospital-a' earlier"):
        ids.bind(1, "hospital-b")
    assert ids.name(1) == "hospital-a" and ids.name(9) == "node-9"


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ("node-4", "another node's name"),
        ("a" * 65, "not 1-64 printable characters"),
        ("site a ", "not 1-64 printable characters"),  # a trailing space
        ("site\nb", "not 1-64 printable characters"),  # a forged log line
        ("-site", "not 1-64 printable characters"),  # an option
        ("../site", "not 1-64 printable characters"),
        ("site/a", "not 1-64 printable characters"),
    ],
)
def test_a_claim_that_could_pass_for_something_else_is_refused(claim: str, reason: str) -> None:
    with pytest.raises(IdentityRejected, match=reason):
        PinnedIdentities().bind(3, claim)


@pytest.mark.parametrize("claim", ["Ward 7, Oslo", 'site 0, "quoted"', "hôpital-a", "a.b:1@c+d"])
def test_a_readable_site_id_with_spaces_and_punctuation_is_kept(claim: str) -> None:
    assert PinnedIdentities().bind(3, claim) == claim


@pytest.mark.parametrize("look_alike", ["Site-A", "SITE-A", "ｓｉｔｅ-ａ"])
def test_a_look_alike_of_a_pinned_id_is_that_site(look_alike: str) -> None:
    ids = PinnedIdentities()
    assert ids.bind(1, "site-a") == "site-a"
    with pytest.raises(IdentityRejected, match="which node 1 speaks for as 'site-a'"):
        ids.bind(2, look_alike)
