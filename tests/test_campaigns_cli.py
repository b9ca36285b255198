"""`storefed bench campaigns`: the targets' PASS/FAIL on hand-made means, the printed table and
the --json contract (the benchmark itself replaced by a stub: its real run is the committed report)."""

from __future__ import annotations

import json

import pytest

from simulations.bench import campaigns as cb
from simulations.cli import main


def _summary() -> dict:
    m = lambda auc, lift=2.0: {"auc": auc, "lift10": lift, "campaigns": 11}  # noqa: E731
    return {
        "rec_red": {"fed_dp_eps8": m(0.84), "fed_dp_eps1": m(0.80), "local_dp_eps8": m(0.85)},
        "rec_buy": {"fed_dp_eps8": m(0.70), "fed_dp_eps1": m(0.71), "local_dp_eps8": m(0.69)},
        "all_buy": {"fed_dp_eps8": m(0.86, 3.1), "fed_dp_eps1": m(0.85, 3.0), "local_dp_eps8": m(0.86)},
    }


def test_targets_by_hand():
    t = cb.evaluate_targets(_summary(), 1799.0)
    got = {k: v["pass"] for k, v in t.items()}
    assert got == {"all_buy_auc": True, "all_buy_lift10": True, "rec_buy_auc": False, "rec_red_auc": True,
                   "rec_red_fed_ge_local": False, "rec_red_eps1_within": False,
                   "rec_buy_fed_ge_local": True, "rec_buy_eps1_within": True,
                   "all_buy_fed_ge_local": True, "all_buy_eps1_within": True, "elapsed_s": True}
    assert t["rec_red_eps1_within"]["value"] == pytest.approx(-0.04)
    assert not cb.evaluate_targets(_summary(), 1801.0)["elapsed_s"]["pass"]


def _results() -> dict:
    summary = _summary()
    return {"tasks": summary, "per_campaign": [{"campaign": 8}], "targets": cb.evaluate_targets(summary, 10.0),
            "elapsed_s": 10.0, "settings": {"methods": ["fed_dp_eps8", "fed_dp_eps1", "local_dp_eps8"]}}


def test_cli_prints_the_table_and_the_json_contract(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake(settings, out):
        seen["settings"] = settings
        return _results()

    monkeypatch.setattr(cb, "run_campaigns_bench", fake)
    assert main(["bench", "campaigns", "--out", str(tmp_path), "--quick"]) == 0
    text = capsys.readouterr().out
    assert "FAIL  rec_buy_auc" in text and "PASS  all_buy_auc" in text
    assert "0.860 / 3.10" in text
    assert seen["settings"].quick is True
    assert main(["bench", "campaigns", "--json", "--dataset", "completejourney", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"tasks", "per_campaign", "targets"}
    assert set(out["tasks"]) == {"rec_red", "rec_buy", "all_buy"}
    assert set(out["tasks"]["rec_red"]["fed_dp_eps8"]) >= {"auc", "lift10"}


def test_cli_refuses_another_dataset(capsys):
    assert main(["bench", "campaigns", "--dataset", "instacart"]) != 0
