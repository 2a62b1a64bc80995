"""The reload soak of issue 12, short: ``bench/reload_soak.py`` run for a few dozen reloads.

A real ``python -m lbproxy`` (one process, then a supervisor with two workers) reloaded every
100 ms through server sets that include full swaps, under 16 HTTP clients and 100 talking
WebSocket tunnels: every reload applies, no request fails, no tunnel is lost, no echo is
missing. The long run (1,000 reloads) is ``python -m bench.reload_soak --reloads 1000``.
"""

from __future__ import annotations

import pytest

from bench.reload_soak import SETS, Options, soak


@pytest.mark.parametrize(("workers", "reloads"), [(1, 40), (2, 30)])
async def test_reloads_every_100ms_swapping_server_sets_fail_nothing(tmp_path, workers, reloads):
    report = await soak(Options(reloads=reloads, workers=workers), tmp_path)
    assert report.ok, report
    assert report.reloads_applied == reloads
    assert report.full_swaps >= reloads // 2  # half the steps through SETS are full swaps
    assert set(report.served_by) == {"A", "B", "C", "D", "E", "F"}
    assert report.tunnels == 100 and report.messages > 0
    assert report.lbproxy_exit == 0
    assert len(SETS) == 8
