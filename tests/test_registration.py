"""The SuperLink's registered keys follow the federation folder: keep, drop, add."""

from __future__ import annotations

from deploy.federation import Federation
from server.registration import plan, public_key_bytes


def test_plan_keeps_active_drops_revoked_and_unknown_adds_missing(tmp_path):
    fed = Federation.init(tmp_path / "fed", ["127.0.0.1"], 9092, ["a", "b", "c"])
    other = Federation.init(tmp_path / "other", ["127.0.0.1"], 9092, ["x"])
    keys = {n: public_key_bytes(line) for n, line in fed.active_sites().items()}
    fed.revoke_site("c")
    registered = [(1, keys["a"], "online"),            # active: kept under its name
                  (2, keys["c"], "registered"),        # revoked: dropped
                  (3, public_key_bytes(other.active_sites()["x"]), "offline"),  # unknown
                  (4, keys["b"], "unregistered")]      # gone already: ignored, re-added
    keep, drop, add = plan(registered, fed.active_sites())
    assert keep == {1: "a"}
    assert sorted(drop) == [2, 3]
    assert add == {"b": keys["b"]}


def test_plan_never_gives_one_name_two_nodes(tmp_path):
    fed = Federation.init(tmp_path / "fed", ["127.0.0.1"], 9092, ["a"])
    key = public_key_bytes(fed.active_sites()["a"])
    keep, drop, add = plan([(1, key, "online"), (2, key, "online")], fed.active_sites())
    assert keep == {1: "a"} and drop == [2] and add == {}
