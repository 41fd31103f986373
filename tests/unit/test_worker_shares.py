"""Shares (worker/shares.py): which backends each of several workers listing the same ones
claims for at once."""

from __future__ import annotations

from a1111_proxy.jobs import WorkerRecord
from worker.shares import Shares

BACKENDS = [f"http://a1111-{n}:7860" for n in range(64)]


def heartbeat(worker_id: str, backends: list[str]) -> WorkerRecord:
    return WorkerRecord(worker_id, 0.0, 0.0, [{"backend": name} for name in backends])


def shares_of(workers: list[str], backends: list[str]) -> dict[str, set[str]]:
    live = [heartbeat(worker, backends) for worker in workers]
    owned = {}
    for worker in workers:
        shares = Shares(worker)
        shares.update(backends, live)
        owned[worker] = {name for name in backends if shares.owns(name)}
    return owned


def test_every_shared_backend_has_exactly_one_owner_and_the_shares_are_even() -> None:
    owned = shares_of(["w1", "w2", "w3", "w4"], BACKENDS)
    assert sorted(name for share in owned.values() for name in share) == sorted(BACKENDS)
    assert {len(share) for share in owned.values()} == {16}


def test_when_a_worker_leaves_the_others_share_all_its_backends_evenly() -> None:
    after = shares_of(["w1", "w2", "w3"], BACKENDS)
    assert sorted(name for share in after.values() for name in share) == sorted(BACKENDS)
    assert {len(share) for share in after.values()} <= {21, 22}


def test_workers_listing_different_backends_share_only_what_they_both_list() -> None:
    live = [heartbeat("w1", BACKENDS[:40]), heartbeat("w2", BACKENDS[20:])]
    shares = {worker: Shares(worker) for worker in ("w1", "w2")}
    shares["w1"].update(BACKENDS[:40], live)
    shares["w2"].update(BACKENDS[20:], live)
    for name in BACKENDS:
        assert shares["w1"].owns(name) + shares["w2"].owns(name) == 1, name
    assert all(shares["w1"].owns(name) for name in BACKENDS[:20])
    assert all(shares["w2"].owns(name) for name in BACKENDS[40:])


def test_a_worker_owns_what_no_other_lists_and_everything_before_it_knows_the_others() -> None:
    shares = Shares("w1")
    assert shares.owns(BACKENDS[0]) and shares.owns("http://anything:7860")
    mine = [*BACKENDS[:4], "http://only-mine:7860"]
    shares.update(mine, [heartbeat("w1", mine), heartbeat("w2", BACKENDS[:4])])
    assert shares.owns("http://only-mine:7860")
    # A URL with credentials is the same backend as its name in the heartbeats.
    assert shares.owns("http://user:secret@only-mine:7860/")
