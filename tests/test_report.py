"""The demo report's files: report.json is strict JSON that any reader parses."""

from __future__ import annotations

import json

import numpy as np

from qarm_dist.report import write_report


def _refuse(constant: str) -> None:
    raise ValueError(f"report.json holds {constant}, which strict JSON readers reject")


def test_report_json_writes_a_figure_with_nothing_to_measure_as_null(tmp_path):
    report = {
        "run_id": "r1",
        "tables": {"items": {"version": 2, "rows": 7}},
        "figures": {"auc": 0.75, "auc_cold": float("nan"), "by_seed": [np.float64("nan"), 0.5]},
    }
    json_path, md_path = write_report(report, tmp_path)
    got = json.loads(json_path.read_text(), parse_constant=_refuse)
    assert got["figures"] == {"auc": 0.75, "auc_cold": None, "by_seed": [None, 0.5]}
    assert got["tables"] == report["tables"]
    assert "| items | 2 | 7 |" in md_path.read_text()
    assert report["figures"]["auc_cold"] != report["figures"]["auc_cold"]  # the caller's dict is untouched
