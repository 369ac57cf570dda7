"""Failures name where every rank was: the phase board (distributed/comm.PhaseBoard) and the
heartbeat wait for one-rank work (export, evaluation) that may outlast the collective timeout."""
import pytest

from tests.distributed import phase_workers as w
from tests.distributed.harness import ok, run_ranks

pytestmark = pytest.mark.slow


def test_barrier_error_names_both_phases():
    res = ok(run_ranks(w.stuck_peer, 2, timeout=90, env={"XPERT_DIST_TIMEOUT_S": "4"}))
    msg = res[1]
    assert "barrier after final prune failed on rank 1" in msg, msg
    assert "rank 1 in 'waiting after final prune'" in msg, msg
    assert "rank 0 last posted 'export'" in msg, msg


def test_one_rank_work_may_outlast_the_collective_timeout():
    res = ok(run_ranks(w.long_one_rank_work, 2, 7.0, timeout=90, env={"XPERT_DIST_TIMEOUT_S": "3"}))
    assert res[1] >= 7.0  # rank 1 really waited for rank 0's work, past its 3 s collective timeout


def test_peer_death_during_one_rank_work_is_reported_in_time():
    res = run_ranks(w.dies_in_one_rank_work, 2, timeout=90, env={"XPERT_DIST_TIMEOUT_S": "4"},
                    allow_missing={0})
    status, out = res[1]
    assert status == "ok", out
    assert out["error"] is not None, "rank 1 did not notice that rank 0 died"
    assert "waiting for rank 0 to finish export" in out["error"], out["error"]
    assert out["after_s"] <= 4 + 3, out  # within the timeout (plus polling slack)
