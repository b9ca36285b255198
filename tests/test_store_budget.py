"""A store's privacy budget: the server's run config may lower it, never raise it."""

from __future__ import annotations

from client.store_policy import own_settings, resolved_values


def _budget(run_budget: float, *, simulated: bool, node_config: dict | None = None, meta: dict | None = None) -> float:
    """The budget the store uses (client.policy.store_settings decides it with these two)."""
    own = own_settings(node_config or {}, {"store_id": "S001", **(meta or {})}, "store.json")
    return resolved_values({"epsilon-budget": run_budget, "delta": 1e-6}, own, deployed=not simulated)["epsilon-budget"]


def test_a_deployed_store_without_its_own_budget_keeps_the_default_whatever_the_server_asks():
    assert _budget(100.0, simulated=False) == 8.0
    assert _budget(2.0, simulated=False) == 2.0  # lowering is allowed


def test_a_store_s_own_setting_is_its_ceiling():
    assert _budget(100.0, simulated=False, node_config={"epsilon-budget": 12.0}) == 12.0
    assert _budget(100.0, simulated=False, meta={"epsilon_budget": 3.0}) == 3.0
    assert _budget(5.0, simulated=False, node_config={"epsilon-budget": 12.0}) == 5.0


def test_a_simulation_takes_the_run_s_budget():
    assert _budget(100.0, simulated=True) == 100.0
