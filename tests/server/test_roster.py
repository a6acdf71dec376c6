"""The run's roster: membership, identity binding, enrolment and revocation, the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.task.errors import ConfigError
from server.roster import NotOnRoster, Roster


def _roster() -> Roster:
    return (
        Roster()
        .enrol("site-a", node_id=11, public_key="sha256:aa")
        .enrol("site-b", node_id=22, public_key="sha256:bb")
    )


def test_members_are_the_enrolled_connected_nodes() -> None:
    assert _roster().members([33, 22, 11, 44]) == [11, 22]


def test_bind_names_a_node_by_its_enrolment_and_refuses_other_claims() -> None:
    roster = _roster()
    assert roster.bind(11, "site-a") == "site-a"
    assert roster.bind(11, "") == "site-a"  # an error reply claims nothing
    with pytest.raises(NotOnRoster, match="enrolled as 'site-a' but claims 'site-b'"):
        roster.bind(11, "site-b")
    with pytest.raises(NotOnRoster, match="node 33 is not on the run's roster"):
        roster.bind(33, "site-a")


def test_revoke_takes_a_site_off_and_remembers_it(tmp_path: Path) -> None:
    roster = _roster().revoke("site-a")
    assert roster.members([11, 22]) == [22]
    assert roster.revoked["site-a"]["node-id"] == 11
    with pytest.raises(ConfigError, match="'site-a' is not enrolled"):
        roster.revoke("site-a")
    again = roster.enrol("site-a", node_id=55, public_key="sha256:cc")
    assert again.members([11, 55]) == [55]


def test_a_revoked_key_and_node_stay_known_when_the_site_is_enrolled_and_revoked_again() -> None:
    # Arrange: site-a revoked (node 11, key aa), enrolled with a new key (node 55, key cc).
    # Node 11 may still be registered at the SuperLink (an unregister that got no answer).
    again = _roster().revoke("site-a").enrol("site-a", node_id=55, public_key="sha256:cc")
    # Act
    twice = again.revoke("site-a")
    # Assert: both enrolments are found by key and by node; a live one is not.
    for roster in (again, twice):
        site, record = roster.revocation(public_key="sha256:aa") or ("", {})
        assert site == "site-a" and record["node-id"] == 11
        assert roster.revocation(node_id=11) == (site, record)
    assert twice.revocation(public_key="sha256:cc") == twice.revocation(node_id=55)
    assert twice.revocation(node_id=55) == ("site-a", twice.revoked["site-a"])
    assert twice.revocation(public_key="sha256:bb", node_id=22) is None
    assert twice.revocation() is None


def test_a_revoked_record_that_cannot_be_read_is_refused_by_name(tmp_path: Path) -> None:
    # Enrolment refuses the keys and nodes the records name; one it cannot read would
    # let a revoked node in.
    path = tmp_path / "roster.json"
    twice = _roster().revoke("site-a").enrol("site-a", node_id=55, public_key="x").revoke("site-a")
    twice.save(path)
    assert Roster.load(path).revocation(node_id=11) == twice.revocation(node_id=11)
    for bad, says in (
        ({"site-a": {"node-id": "11"}}, "revoked site 'site-a' has node-id='11'"),
        ({"site-a": {"node-id": 11, "earlier": [{}]}}, "has node-id=None"),
        ({"site-a": {"node-id": 11, "earlier": {}}}, "its 'earlier' a list"),
        ({"site-a": "11"}, "revoked site 'site-a' must be an object"),
    ):
        path.write_text(json.dumps({"sites": {}, "revoked": bad}))
        with pytest.raises(ConfigError, match=says):
            Roster.load(path)


def test_the_file_round_trips_and_bad_files_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    _roster().save(path)
    assert Roster.load(path).members([11, 22]) == [11, 22]
    path.write_text(json.dumps({"sites": {"site-a": {"node-id": "11"}}}))
    with pytest.raises(ConfigError, match="site 'site-a' has node-id='11'"):
        Roster.load(path)
    path.write_text(
        json.dumps({"sites": {"a": {"node-id": 1}, "b": {"node-id": 1}}, "revoked": {}})
    )
    with pytest.raises(ConfigError, match="node 1 is enrolled as both 'a' and 'b'"):
        Roster.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        Roster.load(tmp_path / "missing.json")


def test_a_roster_that_is_not_text_or_names_an_impossible_site_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_bytes(b"\xff\xfe{}")  # e.g. a file saved as UTF-16
    with pytest.raises(ConfigError, match="is not readable JSON"):
        Roster.load(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # json.loads: RecursionError
    with pytest.raises(ConfigError, match="is not readable JSON"):
        Roster.load(path)
    path.write_text(json.dumps({"sites": {"../site-a": {"node-id": 1}}}))
    with pytest.raises(ConfigError, match=r"site '\.\./site-a' is not a valid site id"):
        Roster.load(path)
