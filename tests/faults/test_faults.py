"""The fault-injection suite, short form (runs by default, both databases); long form with ``-m slow``.

The same harness runs from the command line with more flows::

    .venv/bin/python -m tests.faults --flows 200 --seed 7 [--postgres URL]
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.harness import FaultRun


def _run(tmp_path: Path, db_url: str, flows: int, seed: int) -> None:
    report = FaultRun(tmp_path / "data", db_url, flows=flows, seed=seed).run()
    print(report.text())
    assert report.flows == flows
    assert sum(report.faults.values()) > 0
    # The home-volume faults fire in every run (armed at the start), and data was checked.
    assert report.faults["kill_after_delivery"] > 0 and report.faults["kill_during_write"] > 0, report.text()
    assert report.final_passes["volume_data_checked"], report.text()
    # A controller killed while making a home volume: the user's next ensure (on the restarted
    # controller) takes the row over once its 6 s lease lapses (no longer a 120 s wait) and gives a
    # CLI VM with one volume (the VM's boot may meet the run's other faults, hence more room).
    assert report.faults["kill_during_volume_create"] > 0, report.text()
    assert report.volume_takeover_s is not None and report.volume_takeover_s < 15, report.text()
    assert report.volume_vm_s is not None and report.volume_vm_s < 60, report.text()
    assert not report.leaks, report.text()
    assert not report.problems, report.text()


def test_faults_short(tmp_path: Path, db_url: str) -> None:
    _run(tmp_path, db_url, flows=int(os.environ.get("REMOTECLI_FAULT_FLOWS", "10")), seed=11)


@pytest.mark.slow
def test_faults_long(tmp_path: Path, db_url: str) -> None:
    _run(tmp_path, db_url, flows=120, seed=int(os.environ.get("REMOTECLI_FAULT_SEED", "3")))
