"""The fault suite (``gossipnode.faults``): its plans and judgement here, fast; the suite itself
(16 nodes through every fault, in virtual time and as real processes in network namespaces)
slow-marked, as ``scripts/faults`` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gossipnode import faults, netns
from gossipnode.faults import Plan, Row

torch.set_num_threads(1)


def _row(**changes: object) -> Row:
    fields: dict[str, object] = {
        "mode": "sim",
        "fault": "kill",
        "finished": True,
        "accuracy_mean": 0.93,
        "accuracy_min": 0.88,
        "exchanges": 1000,
        "lost": 3,
    }
    fields.update(changes)
    return Row(**fields)  # type: ignore[arg-type]


def test_every_fault_has_a_plan_of_its_kind() -> None:
    n, duration = 16, 100.0
    kill = faults.plan("kill", n, duration)
    assert len(kill.downs) == 4
    assert not kill.graceful
    assert all(back - down == pytest.approx(faults.DOWNTIME) for _, down, back in kill.downs)
    assert all(0 < down < duration for _, down, _ in kill.downs)
    churn = faults.plan("churn", n, duration)
    assert len(churn.downs) == n // 2
    assert churn.graceful
    assert faults.plan("partition", n, duration).partition == (
        (frozenset(range(8)), frozenset(range(8, 16))),
        20.0,
        20.0 + faults.PARTITION,
    )
    assert faults.plan("loss", n, duration).loss == faults.LOSS
    straggler = faults.plan("straggler", n, duration).straggler
    assert straggler is not None
    assert straggler[1] == faults.SLOWDOWN
    assert faults.plan("none", n, duration) == Plan("none")
    assert faults.plan("kill", n, duration) == kill  # the same plan for the same seed
    with pytest.raises(ValueError, match="unknown fault 'flood'"):
        faults.plan("flood", n, duration)


def test_a_clean_row_holds_and_each_broken_invariant_is_named() -> None:
    baseline = _row(fault="none", accuracy_mean=0.95)
    assert faults.judge(_row(), baseline) == []
    assert faults.judge(_row(finished=False), baseline) == ["training did not finish on every node"]
    assert faults.judge(_row(checkpoints=(14, 16)), baseline) == ["2 checkpoint(s) unreadable"]
    assert faults.judge(_row(accuracy_min=0.5), baseline) == [
        "a node ended at accuracy 0.500 < 0.75"
    ]
    assert faults.judge(_row(accuracy_mean=0.85), baseline) == [
        "mean accuracy 0.850 is more than 0.05 below the fault-free 0.950"
    ]
    assert faults.judge(_row(accuracy_mean=None, accuracy_min=None), baseline) == [
        "no final accuracy"
    ]
    noted = _row(notes=["node 3 was restarted 1x but did not resume every time"])
    assert faults.judge(noted, baseline) == noted.notes


def test_the_evidence_says_what_the_fault_did() -> None:
    def summaries(gradients: dict[int, int], **extra: object) -> list[dict[str, object]]:
        return [{"gradients": gradients.get(i, 100), **extra} for i in range(16)]

    assert faults.evidence(Plan("straggler", straggler=(5, 5.0)), summaries({5: 20})) == (
        "node 5 did 0.20x the gradients"
    )
    downs = ((2, 10.0, 15.0), (7, 20.0, 25.0))
    assert faults.evidence(Plan("kill", downs), summaries({2: 90, 7: 90})) == (
        "2 killed and restarted, 0.90x the others' gradients"
    )
    loss = summaries({}, exchange_seconds_median=0.25)
    assert faults.evidence(Plan("loss", loss=0.05), loss, dropped=1234) == (
        "exchange median 250 ms; 1,234 packets dropped"
    )
    split = Plan("partition", partition=((frozenset({0}), frozenset({1})), 1.0, 2.0))
    cut = summaries({}, exchanges={"skipped_unreachable": 3})
    assert faults.evidence(split, cut) == "48 exchanges skipped, peer unreachable"
    assert faults.evidence(Plan("none"), summaries({}), dropped=0) == ""


def test_the_table_marks_broken_rows_and_compares_with_the_fault_free_run() -> None:
    rows = [_row(fault="none", accuracy_mean=0.95), _row(broken=["a node crashed"])]
    lines = faults.table(rows)
    assert len(lines) == 4
    assert "| 0.950 (+0.000) |" in lines[2]
    assert "| hold |" in lines[2]
    assert "| 0.930 (-0.020) |" in lines[3]
    assert "BROKEN: a node crashed" in lines[3]


def test_bad_options_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        faults.main(["--mode", "sim", "--nodes", "2"])
    assert exit_.value.code == 2
    assert "--nodes must be at least 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        faults.main(["--mode", "sim", "--real-duration", "30"])
    assert exit_.value.code == 2
    assert "--real-duration must be at least 50 s" in capsys.readouterr().err


@pytest.mark.slow
def test_every_fault_holds_in_virtual_time(tmp_path: Path) -> None:
    rows = faults.run_suite(["sim"], faults.FAULTS, out=tmp_path)
    assert [r.fault for r in rows] == list(faults.FAULTS)
    assert [r.broken for r in rows] == [[]] * len(rows), "\n".join(faults.table(rows))


@pytest.mark.slow
@pytest.mark.integration
def test_every_fault_holds_with_real_processes_in_namespaces(tmp_path: Path) -> None:
    reason = netns.unavailable("nft")
    if reason:
        pytest.skip(f"network namespaces: {reason}")
    rows = faults.run_suite(["real"], faults.FAULTS, out=tmp_path)
    assert [r.broken for r in rows] == [[]] * len(rows), "\n".join(faults.table(rows))
