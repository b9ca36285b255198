"""The explore prior (DESIGN §5.3): the store's one DP release, its accounting, the server's
prior and the model's use of it, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client import dp_round
from client.client_app import handle_explore
from client.explore_release import member_sum, noised_release, release_length
from client.state.ledger import read_events
from client.store import load_store
from client.store_policy import PolicyError
from common.config import HEAD_FROZEN, RunConfig
from common.data.dataset import ItemIndex, MemberLog
from common.exchange import wire
from common.learning.model import PRIOR_LIMIT, Recommender
from common.learning.training import DPConfig, TrainConfig, train_local
from common.privacy import accountant
from server.explore_prior import prior_arrays, shrunk_popularity, total_from_replies

pytestmark = pytest.mark.usefixtures("task_identity")

# Four items in two categories (0, 0, 1, 1).
ITEMS = ItemIndex(item_ids=np.array(["a", "b", "c", "d"]), category=np.array([0, 0, 1, 1]),
                  brand=np.zeros(4, np.int64), n_categories=2, n_brands=1)


def _log(baskets_per_member: list[list[list[int]]]) -> MemberLog:
    """A MemberLog of members → receipts → item lines (quantity 1, one day apart)."""
    receipt_ptr, line_ptr, items, days = [0], [0], [], []
    for receipts in baskets_per_member:
        for r in receipts:
            items += r
            line_ptr.append(len(items))
            days.append(float(len(days)))
        receipt_ptr.append(len(line_ptr) - 1)
    return MemberLog(np.array(receipt_ptr), np.array(days), np.array(line_ptr), np.array(items, np.int64),
                     np.ones(len(items)))


def test_each_member_adds_a_vector_of_norm_one_and_the_sum_is_the_hand_computed_one():
    # Member 1 bought a twice and c once (distinct: a, c); member 2 bought b, c, d.
    log = _log([[[0, 2], [0]], [[1], [2, 3]]])
    total = member_sum(log, ITEMS)
    h = 1 / math.sqrt(2)
    # Item part: 1/√2 · 1/√k per distinct item bought.
    expected_items = np.array([h / math.sqrt(2), h / math.sqrt(3), h / math.sqrt(2) + h / math.sqrt(3),
                               h / math.sqrt(3)])
    # Category part: member 1 has categories (1, 1) → c = (1, 1)/√2, c cᵀ = ½ everywhere;
    # member 2 has (1, 2) → c = (1, 2)/√5, c cᵀ = [[1, 2], [2, 4]] / 5.
    expected_cat = h * (np.full((2, 2), 0.5) + np.array([[1, 2], [2, 4]]) / 5)
    np.testing.assert_allclose(total[:4], expected_items)
    np.testing.assert_allclose(total[4:].reshape(2, 2), expected_cat)
    assert len(total) == release_length(ITEMS) == 4 + 4
    # Sensitivity: removing any one member moves the sum by exactly 1 (L2).
    for alone in ([[[0, 2], [0]]], [[[1], [2, 3]]]):
        assert np.linalg.norm(total - member_sum(_log(alone), ITEMS)) == pytest.approx(1.0)
    # A member without lines adds nothing.
    np.testing.assert_allclose(member_sum(_log([[[0, 2], [0]], [[1], [2, 3]], []]), ITEMS), total)


def test_the_noise_is_the_given_gaussian_and_a_non_finite_sigma_is_refused():
    log = _log([[[0]]])
    out = noised_release(log, ITEMS, 3.0, lambda n, std: np.full(n, std))
    np.testing.assert_allclose(out - member_sum(log, ITEMS), 3.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            noised_release(log, ITEMS, bad, lambda n, std: np.zeros(n))


def test_the_server_prior_is_log_popularity_and_a_smoothed_conditional():
    total = np.array([3.0, -2.0, 0.0, 8.0,  # item part: negative noise is cut at 0
                      4.0, 1.0, 3.0, -5.0])  # category part, not symmetric (noise)
    prior_item, prior_cat = prior_arrays(total, 4, 2, smoothing=1.0)
    np.testing.assert_allclose(prior_item, np.log1p([3.0, 0.0, 0.0, 8.0]), rtol=1e-6)
    # Cut at 0: [[4, 1], [3, 0]]; symmetric mean [[4, 2], [2, 0]]; +1: [[5, 3], [3, 1]].
    np.testing.assert_allclose(prior_cat, np.log([[5 / 8, 3 / 8], [3 / 4, 1 / 4]]), rtol=1e-6)
    # A soft threshold (a research option, off by default) subtracts before the cut at 0.
    cut_item, cut_cat = prior_arrays(total, 4, 2, cut=2.0)
    np.testing.assert_allclose(cut_item, np.log1p([1.0, 0.0, 0.0, 6.0]), rtol=1e-6)
    # [[2, 0], [1, 0]] → symmetric [[2, .5], [.5, 0]] → +1: [[3, 1.5], [1.5, 1]].
    np.testing.assert_allclose(cut_cat, np.log([[3 / 4.5, 1.5 / 4.5], [1.5 / 2.5, 1 / 2.5]]), rtol=1e-6)


def test_noisy_popularity_shrinks_toward_its_category_by_hand():
    # Category 0: values 10, 20, 30 (mean 20, sample variance 100); noise σ = 5 → τ² = 75,
    # w = 75 / 100 = 0.75: 20 ± 0.75·10. Category 1: 4, 6, 8 (variance 4 < 25): τ² = 0,
    # everything to the mean 6. Category 2 has 2 items: the catalog's mean and spread
    # (all 8 values: mean 13.5, squared deviations 900, sample variance 900 / 7, w = (900/7 − 25) / (900/7)).
    noisy = np.array([10.0, 20.0, 30.0, 4.0, 6.0, 8.0, 1.0, 29.0])
    category = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    got = shrunk_popularity(noisy, 5.0, category)
    np.testing.assert_allclose(got[:6], [12.5, 20.0, 27.5, 6.0, 6.0, 6.0], rtol=1e-12)
    var = np.var(noisy, ddof=1)
    assert var == pytest.approx(900 / 7)
    w = (var - 25.0) / var
    np.testing.assert_allclose(got[6:], 13.5 + w * (noisy[6:] - 13.5), rtol=1e-12)
    # No noise: nothing changes; and prior_arrays applies it to the item part only.
    np.testing.assert_array_equal(shrunk_popularity(noisy, 0.0, category), noisy)
    total = np.concatenate([noisy, np.ones(4)])
    item, cat = prior_arrays(total, 8, 2, noise_std=5.0, item_category=category)
    np.testing.assert_allclose(item, np.log1p(got), rtol=1e-6)
    np.testing.assert_array_equal(cat, prior_arrays(total, 8, 2)[1])


def test_replies_that_fail_or_are_malformed_add_nothing():
    good = np.arange(8.0)
    total, noise_std, released, failed = total_from_replies(
        [("S1", good, 3.0, ""), ("S2", None, 0.0, "declined: over budget"), ("S3", np.ones(7), 1.0, ""),
         ("S4", np.array([np.nan] + [0.0] * 7), 1.0, ""), ("S5", good, 4.0, ""), ("S6", good, float("nan"), "")], 8)
    np.testing.assert_allclose(total, 2 * good)
    assert noise_std == pytest.approx(5.0)  # √(3² + 4²): the two releases summed
    assert released == ["S1", "S5"]
    assert [f["store"] for f in failed] == ["S2", "S3", "S4", "S6"]


def _model_with_prior(items: ItemIndex) -> Recommender:
    torch.manual_seed(3)
    model = Recommender(items)
    with torch.no_grad():
        model.item_out.weight.normal_(0, 0.2)
        model.prior_item.normal_(0, 1.0)
        model.prior_cat.normal_(0, 1.0)
    model.refresh_item_snapshot()
    return model


def test_the_prior_enters_the_explore_logits_as_the_design_says(small_store):
    model = _model_with_prior(small_store.items)
    ex = small_store.eval_examples
    rows = slice(0, 16)
    inputs = [torch.as_tensor(a[rows]) for a in (ex.hist_items, ex.hist_feat, ex.hist_mask, ex.profile)]
    with torch.no_grad():
        with_prior = model(*inputs)
        aff = model.category_affinity(*inputs[:3]).numpy()
        saved = model.prior_item.clone(), model.prior_cat.clone()
        model.prior_item.zero_()
        model.prior_cat.zero_()
        without = model(*inputs)
        model.prior_item.copy_(saved[0])
        model.prior_cat.copy_(saved[1])
    # The member term by hand: the history's weight share per category, mixed through exp(prior_cat).
    items, feat, mask = ex.hist_items[rows], ex.hist_feat[rows], ex.hist_mask[rows]
    cat = small_store.items.category
    for m in range(16):
        w = feat[m, :, 0] * mask[m]
        if w.sum() == 0:
            np.testing.assert_allclose(aff[m], 0.0)
            continue
        share = np.bincount(cat[items[m]], weights=w / w.sum(), minlength=small_store.items.n_categories)
        np.testing.assert_allclose(aff[m], np.log(share @ np.exp(saved[1].numpy().astype(np.float64))), rtol=1e-4,
                                   atol=1e-5)
    # A member with history whose gate is 0 (π = 0): the model is a softmax over the catalog,
    # so the prior shifts log-probability differences by exactly prior_item + aff[category].
    with torch.no_grad():
        gate = (model.gate.weight.clone(), model.gate.bias.clone())
        model.gate.weight.zero_()
        model.gate.bias.fill_(-1e4)
        a, b = model(*inputs), None
        model.prior_item.zero_()
        model.prior_cat.zero_()
        b = model(*inputs)
        model.gate.weight.copy_(gate[0])
        model.gate.bias.copy_(gate[1])
    shift = saved[0].numpy()[None, :] + aff[:, cat]
    diff = (a - b).numpy()
    np.testing.assert_allclose(diff - diff[:, :1], shift - shift[:, :1], atol=2e-3)
    assert not np.allclose(with_prior.numpy(), without.numpy())
    assert torch.isfinite(with_prior).all()


def test_a_hostile_prior_cannot_overflow_the_scores(small_store):
    model = Recommender(small_store.items)
    with torch.no_grad():
        model.prior_item.fill_(3e38)
        model.prior_cat.fill_(-3e38)
        model.prior_cat[0, 0] = 3e38
    ex = small_store.eval_examples
    with torch.no_grad():
        out = model(*(torch.as_tensor(a[:8]) for a in (ex.hist_items, ex.hist_feat, ex.hist_mask, ex.profile)))
    assert torch.isfinite(out).all()
    assert PRIOR_LIMIT == 30.0


def test_frozen_layers_keep_their_values_and_train_again_afterwards(small_store):
    torch.manual_seed(0)
    model = Recommender(small_store.items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, small_store, TrainConfig(local_epochs=1, lr=0.5, optimizer="sgd", frozen=HEAD_FROZEN),
                DPConfig(1.0, 1.0))
    after = model.state_dict()
    for name in HEAD_FROZEN:
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            if key in before:
                assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["gate.bias"], after["gate.bias"])  # a head trained (and took noise)
    assert all(p.requires_grad for p in model.parameters())


def _explore_context(chain_dir, state_dir, **run):
    node_config = {"store-dir": str(chain_dir / "stores" / "S002"), "catalog": str(chain_dir),
                   "state-dir": str(state_dir)}
    return Context(run_id=41, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={"data-dir": str(chain_dir), "rounds": 2, "stores": 3, **run})


def _explore_message():
    from flwr.app import ConfigRecord

    return Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=7,
                   message_type=wire.EXPLORE_MESSAGE)


def test_the_release_is_charged_once_as_round_0_and_the_rounds_are_calibrated_for_the_rest(small_chain_dir, tmp_path):
    context = _explore_context(small_chain_dir, tmp_path)
    cfg = RunConfig.from_mapping(context.run_config)
    reply = handle_explore(_explore_message(), context, cfg)
    assert not reply.has_error()
    assert set(reply.content.array_records) == {wire.EXPLORE_ARRAYS}
    assert set(reply.content["metrics"]) == set(wire.EXPLORE_METRICS)
    assert set(reply.content["store"]) == set(wire.EXPLORE_CONFIG)
    node = load_store(context.node_config, cfg)
    vector = reply.content[wire.EXPLORE_ARRAYS]["release"].numpy()
    assert vector.shape == (release_length(node.data.items),)
    events = read_events(tmp_path, "S002")
    assert [(e.run_id, e.round, e.sample_rate, e.steps) for e in events] == [("41", 0, 1.0, 1)]
    delta, share = node.delta(cfg), cfg["explore-prior-share"]
    # The release alone costs its share of the target (calibrated to within the bisection's 0.5 %).
    alone = accountant.epsilon([events[0].mechanism()], delta)
    assert 0.99 * share * cfg["target-epsilon"] <= alone <= share * cfg["target-epsilon"]
    # The noise is what the ledger says: the reply minus the exact sum has that spread.
    noise = vector - member_sum(node.data.train_log, node.data.items)
    assert np.std(noise) == pytest.approx(events[0].noise_multiplier, rel=0.1)
    # DP-SGD's σ is calibrated so that the release and every planned round end at the target.
    plan = dp_round.dp_plan(node, cfg)
    total = accountant.epsilon([events[0].mechanism(), (plan.noise_multiplier, plan.sample_rate,
                                                        cfg["rounds"] * plan.steps)], delta)
    assert 0.97 * cfg["target-epsilon"] <= total <= cfg["target-epsilon"]
    # The rounds take more noise than without the release (composition is sub-additive: the
    # release's ε 0.8 alone costs far less on top of the rounds, which is why it is cheap).
    no_release = RunConfig.from_mapping({**context.run_config, "explore-prior-share": 0.0})
    assert plan.noise_multiplier > dp_round.dp_plan(node, no_release).noise_multiplier
    # A second release in the same run is refused and spends nothing.
    with pytest.raises(PolicyError, match="once per run"):
        handle_explore(_explore_message(), context, cfg)
    assert len(read_events(tmp_path, "S002")) == 1


def test_a_run_without_the_release_is_refused_it_and_calibrates_as_before(small_chain_dir, tmp_path):
    context = _explore_context(small_chain_dir, tmp_path, **{"explore-prior-share": 0.0})
    cfg = RunConfig.from_mapping(context.run_config)
    with pytest.raises(PolicyError, match="no explore release"):
        handle_explore(_explore_message(), context, cfg)
    assert read_events(tmp_path, "S002") == []
    node = load_store(context.node_config, cfg)
    plan = dp_round.dp_plan(node, cfg)
    eps = accountant.epsilon([(plan.noise_multiplier, plan.sample_rate, cfg["rounds"] * plan.steps)], node.delta(cfg))
    assert 0.97 * cfg["target-epsilon"] <= eps <= cfg["target-epsilon"]


def test_over_budget_the_release_is_declined(small_chain_dir, tmp_path):
    context = _explore_context(small_chain_dir, tmp_path, **{"epsilon-budget": 0.1})
    reply = handle_explore(_explore_message(), context, RunConfig.from_mapping(context.run_config))
    assert reply.has_error() and reply.error.code == wire.DECLINE_CODE
    assert read_events(tmp_path, "S002") == []


def test_dp_train_auto_freezes_the_item_side_and_encoder_below_epsilon_2():
    assert RunConfig.from_mapping({"target-epsilon": 1.0}).frozen_layers() == HEAD_FROZEN
    assert RunConfig.from_mapping({"target-epsilon": 8.0}).frozen_layers() == ()
    assert RunConfig.from_mapping({"target-epsilon": 8.0, "dp-train": "heads"}).frozen_layers() == HEAD_FROZEN
    assert RunConfig.from_mapping({"target-epsilon": 1.0, "dp-train": "all"}).frozen_layers() == ()
    assert RunConfig.from_mapping({"target-epsilon": 1.0, "dp": False}).frozen_layers() == ()
