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
    # Enrolling again (a new key) clears the revocation.
    again = roster.enrol("site-a", node_id=55, public_key="sha256:cc")
    assert "site-a" not in again.revoked and again.members([11, 55]) == [55]


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
