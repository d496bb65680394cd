"""The shared Ray Train plumbing that needs no cluster: the progress line of long epochs."""

from __future__ import annotations

from qarm_dist.training import Progress


def test_progress_prints_from_rank_0_only_and_says_how_far_the_epoch_is(capsys):
    lead, other = Progress("rank", 0, 256, 4096, every_s=0), Progress("rank", 1, 256, 4096, every_s=0)
    lead.start(1)
    other.start(1)
    lead.step(4, 2.0)
    other.step(4, 2.0)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("[rank] epoch 1: step 4, 1,024 rows of 4,096 (25 %), ")
    assert out[0].endswith("mean loss 0.5000")


def test_progress_waits_for_its_interval(capsys):
    p = Progress("align", 0, 10, every_s=3600)
    p.start(0)
    p.step(1, 1.0)  # not due for an hour
    assert capsys.readouterr().out == ""
