"""A store no server can harm (issue 22, item 1): DP holds for any model the store receives.

The attack of the issue, replayed: a global model with only finite weights, crafted so that
one chosen member's forward pass overflows (an item-vector dimension only that member's
history holds feeds a hidden unit of weight 1e30). Before the fix the member's loss was NaN,
so the clip factor was NaN and the whole noised sum NaN exactly in the rounds that member was
sampled: a membership oracle. Now such a member contributes exactly zero, decided per member.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import client.client_app as client_app
from client.state.ledger import ledger_path, read_events
from client.state.model_store import PREV_INFO_FILE, check_delivery, keep_model, read_info
from common.config import RunConfig
from common.data.dataset import ExampleConfig, ItemIndex, sample_train_examples
from common.data.ingest import prepare_store
from common.data.storefiles import read_catalog
from common.exchange import update_codec, wire
from common.learning import dp_fast
from common.learning.model import BasketLoss, Recommender
from common.learning.training import DPConfig, TrainConfig, batch_tensors, train_local
from common.learning.weights import ArraySpec, ModelFileError, check_array_specs, weights_digest

pytestmark = pytest.mark.usefixtures("task_identity")
F32_MAX = float(torch.finfo(torch.float32).max)


# --- the crafted model and a store with and without its target ---------------------------

@pytest.fixture(scope="module")
def neighbours(small_chain_dir, tmp_path_factory):
    """Two copies of the small chain whose store S001 differ by one member M: in ``with``, M
    also bought item X (sold nowhere else in the store) on every receipt; ``without`` has no M."""
    root = tmp_path_factory.mktemp("neighbours")
    with_dir, without_dir = root / "with", root / "without"
    shutil.copytree(small_chain_dir, with_dir)
    shutil.copytree(small_chain_dir, without_dir)
    tx = pd.read_csv(small_chain_dir / "stores" / "S001" / "transactions.csv", dtype=str, keep_default_na=False)
    members = pd.read_csv(small_chain_dir / "stores" / "S001" / "members.csv", dtype=str, keep_default_na=False)
    consenting = set(members.loc[members["consent_training"] == "true", "member_id"])
    receipts = tx[tx["member_id"].isin(consenting)].groupby("member_id")["receipt_id"].nunique()
    member = str(receipts[receipts >= 6].index[0])
    catalog = read_catalog(small_chain_dir)
    unsold = sorted(set(catalog["item_id"].astype(str)) - set(tx["item_id"]))
    item = unsold[0]
    own = tx[tx["member_id"] == member].drop_duplicates("receipt_id").copy()
    own["item_id"], own["quantity"], own["unit_price"], own["promo"] = item, "1", "1.00", ""
    pd.concat([tx, own]).to_csv(with_dir / "stores" / "S001" / "transactions.csv", index=False)
    tx[tx["member_id"] != member].to_csv(without_dir / "stores" / "S001" / "transactions.csv", index=False)
    members[members["member_id"] != member].to_csv(without_dir / "stores" / "S001" / "members.csv", index=False)
    index = int(np.flatnonzero(ItemIndex.from_catalog(catalog).item_ids == item)[0])
    return {"with": with_dir, "without": without_dir, "member": member, "item": index}


def crafted_state(items: ItemIndex, target_item: int) -> dict[str, torch.Tensor]:
    """Finite weights under which a member whose history holds ``target_item`` overflows.

    Item-vector dimension 0 is 1 for the target item and 0 for every other item, so only that
    member's history vector has a non-zero coordinate 0; hidden unit 0 reads only that
    coordinate, with weight 1e30, and feeds the member vector with weight 1e30 again: their
    forward pass reaches ±inf and their loss NaN. Every other member's hidden unit 0 is 0.
    """
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Recommender(items).state_dict().items()}
    for name in ("item_out.weight", "cat_out.weight", "brand_out.weight"):
        state[name][:, 0] = 0.0
    state["item_out.weight"][target_item, 0] = 1.0
    state["encoder_in.weight"][0, :] = 0.0
    state["encoder_in.weight"][0, 0] = 1e30
    state["encoder_in.bias"][0] = 0.0
    state["encoder_out.weight"][:, 0] = 1e30
    assert all(torch.isfinite(v).all() for v in state.values())
    return state


def _clipped_sum(model: Recommender, examples, rows: list[int]) -> tuple[dict[str, torch.Tensor], dp_fast.ClippedLoss]:
    """Σ_i c_i ∇_i over ``rows`` (no noise): the parameters' .grad after one book-keeping pass."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tapped, noisy, criterion = dp_fast.make_private(model, opt, BasketLoss(), noise_multiplier=0.0,
                                                    clip_norm=1.0, expected_batch_size=1)
    try:
        *inputs, t_items, t_mask = batch_tensors(examples, np.asarray(rows))
        loss = criterion(tapped(*inputs), t_items, t_mask)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, loss
    finally:
        tapped.remove_hooks()


def test_a_member_the_model_overflows_contributes_exactly_zero(neighbours):
    data, _ = prepare_store(neighbours["with"] / "stores" / "S001", neighbours["with"])
    examples = sample_train_examples(data, np.random.default_rng(0), ExampleConfig())
    x = neighbours["item"]
    holds = np.flatnonzero(((examples.hist_items == x) & (examples.hist_mask > 0)).any(axis=1))
    assert len(holds) == 1  # only the target member's history holds the item
    target = int(holds[0])
    others = [i for i in range(len(examples)) if i != target][:31]
    model = Recommender(data.items)
    model.load_state_dict(crafted_state(data.items, x))
    model.refresh_item_snapshot()  # as training does at the start of a round
    with_grads, loss = _clipped_sum(model, examples, [target, *others])
    # The attack is real: the target's own loss is not a number ...
    assert not math.isfinite(float(loss.per_member[0]))
    assert torch.isfinite(loss.per_member[1:]).all()
    # ... and its factor is exactly 0, the others' are Opacus' C / (‖g‖ + 1e-6) ≤ 1, not all 0.
    assert loss.factors[0].item() == 0.0 and not loss.finite[0]
    assert loss.finite[1:].all() and (loss.factors[1:] > 0).all()
    without_grads, _ = _clipped_sum(model, examples, others)
    for name, grad in with_grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, without_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # The reported loss is the mean over the finite members only.
    assert float(loss.detach()) == pytest.approx(float(loss.per_member[1:].mean()), rel=1e-6)


def _train_message(state: dict, server_round: int) -> Message:
    content = RecordDict({wire.TRAIN_ARRAYS: ArrayRecord({k: v.clone() for k, v in state.items()}),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(chain_dir, state_dir, run_id=1, **node) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(state_dir), **node}
    run_config = {"data-dir": str(chain_dir), "stores": 3, "rounds": 8, "noise-multiplier": 100.0}
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize("side", ["with", "without"])
def test_the_issue_attack_through_the_client_app_every_round_finite(neighbours, tmp_path, side):
    """The issue's table row: σ = 100, 8 rounds; before, the store with the member sent all-NaN
    arrays in the rounds the member was sampled. Now every reply of both stores is finite."""
    chain = neighbours[side]
    items = ItemIndex.from_catalog(read_catalog(chain))
    state = crafted_state(items, neighbours["item"])
    app = client_app.create_app()
    context = _context(chain, tmp_path)
    for server_round in range(1, 9):
        reply = app(_train_message(state, server_round), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        sent = reply.content[wire.TRAIN_ARRAYS].to_torch_state_dict()
        assert all(torch.isfinite(v).all() for v in sent.values()), f"round {server_round}"
        assert math.isfinite(reply.content["metrics"]["train-loss"])
    assert len(read_events(tmp_path, "S001")) == 8


# --- the property: any finite model, however large ----------------------------------------

SCALES = (1.0, 1e3, 1e10, 1e20, 1e30, F32_MAX)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_finite_model_sends_only_finite_values_and_each_member_adds_only_its_own_clipped_term(small_store, data):
    """For random finite models with huge tensors (scaled weights, float32-max tensors): the
    clipped sum over a batch is the sum of each member's own clipped term (a member's presence
    changes nothing but its own term, of norm ≤ C), and a DP-SGD round leaves only finite weights."""
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="init seed"))
    model = Recommender(small_store.items)
    state = model.state_dict()
    for name in state:
        scale = data.draw(st.sampled_from(SCALES), label=name)
        value = state[name]
        state[name] = torch.sign(value) * F32_MAX if scale == F32_MAX else value * scale
    assert all(torch.isfinite(v).all() for v in state.values())
    model.load_state_dict(state)
    model.refresh_item_snapshot()
    examples = sample_train_examples(small_store, np.random.default_rng(1), ExampleConfig())
    rows = list(range(12))
    together, _ = _clipped_sum(model, examples, rows)
    alone = [_clipped_sum(model, examples, [i])[0] for i in rows]
    # Float32 rounding differs between one batch and twelve singletons (a member's terms are
    # summed in another order); a member's real influence on another would be of the order of
    # a whole clipped term (norm up to C = 1), three orders of magnitude above this bound.
    difference = 0.0
    for name, grad in together.items():
        assert torch.isfinite(grad).all(), name
        difference += float((grad.double() - sum(a[name].double() for a in alone)).pow(2).sum())
    assert math.sqrt(difference) <= 1e-3
    for a in alone:
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in a.values()))
        assert norm <= 1.0 + 1e-4  # C = 1
    model.load_state_dict(state)
    result = train_local(model, small_store, TrainConfig(batch_size=64, lr=2.0, optimizer="sgd", seed=3),
                         DPConfig(1.0, 1.0, small_store.n_train_members))
    assert result.steps > 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert math.isfinite(result.loss)


# --- models refused before anything is spent or decoded -----------------------------------

@pytest.fixture
def decoded(monkeypatch):
    """Every array the store decodes (Flower's Array.numpy), by shape."""
    seen: list[tuple] = []
    original = Array.numpy

    def numpy(self):
        seen.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(Array, "numpy", numpy)
    return seen


def _refusal(reply: Message) -> str:
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    return wire.parse_refusal(reply.error.reason)["reason"]


def _initial_state(chain_dir) -> dict:
    torch.manual_seed(0)
    return Recommender(ItemIndex.from_catalog(read_catalog(chain_dir))).state_dict()


def test_a_model_with_one_nan_weight_is_refused_and_spends_nothing(small_chain_dir, tmp_path, decoded):
    state = _initial_state(small_chain_dir)
    state["encoder_in.weight"][3, 5] = float("nan")
    reply = client_app.create_app()(_train_message(state, 1), _context(small_chain_dir, tmp_path))
    assert _refusal(reply) == "tensor 'encoder_in.weight' holds NaN or infinite values"
    assert not ledger_path(tmp_path).exists()


def test_a_foreign_dtype_or_shape_is_refused_before_any_array_is_decoded(small_chain_dir, tmp_path, decoded):
    state = _initial_state(small_chain_dir)
    int8 = dict(state)
    int8["item_out.weight"] = torch.zeros((4096, 4096), dtype=torch.int8)  # 16 MiB as int8, 64 MiB as float32
    reply = client_app.create_app()(_train_message(int8, 1), _context(small_chain_dir, tmp_path))
    assert _refusal(reply) == "tensor 'item_out.weight' is 'int8'; a store takes float32 weights only"
    wide = dict(state)
    wide["item_out.bias"] = torch.zeros(3 * len(state["item_out.bias"]))
    reply = client_app.create_app()(_train_message(wide, 1), _context(small_chain_dir, tmp_path))
    n = len(state["item_out.bias"])
    assert _refusal(reply) == (f"tensor 'item_out.bias' has shape ({3 * n},), the store's catalog needs ({n},); "
                               "the model was trained for another catalog")
    extra = {**state, "member_table": torch.zeros(3)}
    reply = client_app.create_app()(_train_message(extra, 1), _context(small_chain_dir, tmp_path))
    assert _refusal(reply).startswith("the model's tensors do not match this store's model (missing [], "
                                      "unexpected ['member_table'])")
    assert decoded == [] and not ledger_path(tmp_path).exists()


def test_the_array_specs_check_bounds_the_total_and_each_length():
    expected = {"w": (1000, 64), "b": (1000,)}
    good = {"w": ArraySpec("float32", (1000, 64), 256_000 + 128), "b": ArraySpec("float32", (1000,), 4_128)}
    check_array_specs(good, expected)
    with pytest.raises(ModelFileError, match=r"^the model's arrays hold 2,147,487,776 bytes, more than a store "
                                             r"accepts \(1,073,741,824\)$"):
        check_array_specs({"w": ArraySpec("float32", (1000, 64), 1 << 31), "b": good["b"]}, expected)
    with pytest.raises(ModelFileError, match="carries 255,999 bytes of data for 256,000 bytes"):
        check_array_specs({**good, "w": ArraySpec("float32", (1000, 64), 255_999)}, expected)
    with pytest.raises(ModelFileError, match="carries 260,097 bytes"):  # more than the .npy header's 4096
        check_array_specs({**good, "w": ArraySpec("float32", (1000, 64), 256_000 + 4097)}, expected)
    check_array_specs({**good, "w": ArraySpec("float32", (7, 7), 200)}, {"w": None, "b": (1000,)})  # shape unknown yet


def test_a_float16_update_beyond_half_precision_is_clipped_not_infinite():
    weights = {"w": np.array([1e6, -1e6, 0.5], dtype=np.float32)}
    reference = {"w": np.zeros(3, dtype=np.float32)}
    sent = update_codec.encode(weights, reference, "float16", np.random.default_rng(0))
    assert sent["w"].dtype == np.float16 and sent["w"].tolist() == [65504.0, -65504.0, 0.5]


# --- deliveries the store can trust (item 4) ----------------------------------------------

def _prev(state_dir) -> dict:
    return json.loads((state_dir / PREV_INFO_FILE).read_text())


def test_one_final_model_per_run_and_the_previous_model_is_an_earlier_runs(small_store, tmp_path):
    def state(seed):
        torch.manual_seed(seed)
        return {k: v.numpy() for k, v in Recommender(small_store.items).state_dict().items()}

    first = keep_model(tmp_path, state(1), run_id="a", server_round=3, epsilon=1.0, final=True, delivered_in_run="10")
    assert first["delivered_in_run"] == "10"
    # Run 11 keeps a model mid-run (a store without one), then its final one: the final one
    # replaces the mid-run one, and the previous model stays run 10's.
    keep_model(tmp_path, state(2), run_id="b", server_round=2, epsilon=2.0, final=False, delivered_in_run="11")
    final = keep_model(tmp_path, state(3), run_id="b", server_round=5, epsilon=2.5, final=True, delivered_in_run="11")
    prev = _prev(tmp_path)
    assert prev["hash"] == first["hash"] and prev["delivered_in_run"] == "10"
    assert read_info(tmp_path)["hash"] == final["hash"] == weights_digest(state(3))
    # A second, different final model in run 11 is refused; the same one again is a no-op.
    with pytest.raises(ModelFileError, match="^run 11 already delivered its final model"):
        keep_model(tmp_path, state(4), run_id="b", server_round=6, epsilon=2.6, final=True, delivered_in_run="11")
    check_delivery(tmp_path, final["hash"], "11")
    assert keep_model(tmp_path, state(3), run_id="b", server_round=5, epsilon=2.5, final=True,
                      delivered_in_run="11")["hash"] == final["hash"]
    assert read_info(tmp_path)["hash"] == final["hash"]
    assert _prev(tmp_path)["hash"] == first["hash"]
    # The next run may deliver again; run 11's model becomes the previous one.
    keep_model(tmp_path, state(5), run_id="c", server_round=5, epsilon=3.0, final=True, delivered_in_run="12")
    assert _prev(tmp_path)["hash"] == final["hash"]


# --- bounded evaluation (item 6) ----------------------------------------------------------

def _evaluate_message(chain_dir) -> Message:
    content = RecordDict({wire.TRAIN_ARRAYS: ArrayRecord(_initial_state(chain_dir)),
                          "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.EVALUATE)


def test_evaluations_are_capped_per_run_and_need_enough_members(small_chain_dir, tmp_path):
    app = client_app.create_app()
    context = _context(small_chain_dir, tmp_path, **{"max-evaluations-per-run": 2})
    for _ in range(2):
        assert not app(_evaluate_message(small_chain_dir), context).has_error()
    assert _refusal(app(_evaluate_message(small_chain_dir), context)) == (
        "run 1 has had 2 evaluation answers from this store, its limit (node config max-evaluations-per-run)")
    # Another run has its own count.
    other = _context(small_chain_dir, tmp_path, run_id=2, **{"max-evaluations-per-run": 2})
    assert not app(_evaluate_message(small_chain_dir), other).has_error()
    node = client_app.load_store(other.node_config, RunConfig.from_mapping(other.run_config))
    n = len(node.data.eval_member_ids)
    few = _context(small_chain_dir, tmp_path / "few", **{"min-evaluation-members": n + 1})
    assert _refusal(app(_evaluate_message(small_chain_dir), few)) == (
        f"this store answers evaluations computed on at least {n + 1} members (node config "
        "min-evaluation-members); it has fewer test members")
    enough = _context(small_chain_dir, tmp_path / "enough", **{"min-evaluation-members": n})
    assert not app(_evaluate_message(small_chain_dir), enough).has_error()


def test_deployed_defaults_bound_evaluation():
    from client.state import evaluate_quota

    assert evaluate_quota.limits({}, deployed=True) == (20, 50)
    assert evaluate_quota.limits({}, deployed=False) == (0, 0)
    with pytest.raises(Exception, match="must be a whole number ≥ 0"):
        evaluate_quota.limits({"max-evaluations-per-run": math.nan}, deployed=True)


# --- dependency floors (item 5) -----------------------------------------------------------

def test_torch_is_at_least_2_6_and_the_project_floor_says_so():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    installed = Version(torch.__version__.split("+")[0])
    assert installed >= Version("2.6")  # torch.load(weights_only=True) bypass before 2.6 (CVE-2025-32434)
    deps = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {Requirement(d).name: Requirement(d) for d in deps}
    assert not reqs["torch"].specifier.contains("2.5.1") and reqs["torch"].specifier.contains("2.6.0")
    assert reqs["torch"].specifier.contains(str(installed))
    assert not reqs["pyarrow"].specifier.contains("14.0.0") and reqs["pyarrow"].specifier.contains("14.0.1")
