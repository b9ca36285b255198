"""The results object and its human summary."""

from __future__ import annotations

from server.report import build_results, summary_table

CFG = {"rounds": 3, "seed": 0, "dp": True, "target-epsilon": 8.0}


def test_a_run_where_every_store_declined_reports_no_model():
    results = build_results(cfg=CFG, stores=2, rounds=[{"round": 1, "participated": 0, "declined": 2}],
                            privacy={"S1": {"epsilon": 8.0, "delta": 1e-6, "budget": 8.0, "declined_rounds": 1,
                                            "accountant": "prv"}},
                            final_metrics={}, elapsed_s=1.0, failures=[], out_dir="o", data_dir="d",
                            stopped="every store declined round 1")
    text = summary_table(results)
    assert "no round was trained and evaluated" in text and "served model" not in text
    assert "σ" not in text and "declined store-rounds (budget): 1" in text
    assert results["privacy"]["S1"] == {"epsilon": 8.0, "delta": 1e-6, "noise_multiplier": 0.0, "rounds_trained": 0,
                                        "budget": 8.0, "declined_rounds": 1, "accountant": "prv"}


def test_a_trained_run_shows_model_and_baselines_and_no_infinity_in_json():
    metrics = {"ndcg@10": 0.4, "global_model.ndcg@10": 0.39, "store_pop.ndcg@10": 0.1, "p_topfreq.ndcg@10": 0.38}
    results = build_results(cfg={**CFG, "dp": False}, stores=1, rounds=[{"round": 1, "participated": 1, "ndcg@10": 0.4}],
                            privacy={"S1": {"epsilon": float("inf"), "delta": 0.0, "noise_multiplier": 0.0,
                                            "rounds_trained": 1, "budget": float("inf")}},
                            final_metrics=metrics, elapsed_s=2.0, failures=[], out_dir="o", data_dir="d")
    text = summary_table(results)
    assert "served model       0.4000" in text and "global model       0.3900" in text
    assert "p_topfreq          0.3800" in text
    assert results["model"]["ndcg@10"] == 0.4 and results["global_model"]["ndcg@10"] == 0.39
    assert results["privacy"]["S1"]["epsilon"] is None and results["privacy"]["S1"]["budget"] is None
