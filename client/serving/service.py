"""What `storefed serve` knows about its store: members, histories, the model, the journal.

The HTTP layer (:mod:`client.serving.api`) only calls :class:`StoreServing`. Loading does the
costly work once (DESIGN §5.2): the store's files are validated as `storefed validate` does
(the receipts journal included), every consenting member's history features are built, and
with a model the member states (:class:`common.learning.recommend.MemberState`) of all of
them are precomputed, so a request is one matrix-vector product and a top-k.

* A receipt taken through the API is validated with the contract's row rules and the
  intake's own (printable, length-limited text; a receipt id already used is refused unless
  the receipt is the same; a return only of what that member bought here), committed to the
  journal (:mod:`client.state.receipts_journal`, one SQLite transaction) and then folded into that
  member's history and state at once.
* A newly delivered model (``model.json`` changed) is loaded by a watcher thread, built
  completely aside and swapped in as one reference: requests never see half a model.
* The store-local layer (DESIGN §5.1) kept for that model (:mod:`client.serving.layers`; fitted
  here and kept when there is none, e.g. a model kept from a train message) goes into the
  same reference: with it, every consenting member's scores of every catalog item are
  precomputed (global log-probability → the layer's scores), so a recommendation is a row
  and an audience a column of that matrix; without it, the global model's as before.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from client.serving import layers as layer_store
from client.state.model_store import INFO_FILE, MODEL_FILE, read_model
from client.state.paths import StorePaths
from client.state.receipts_journal import Journal, JournalError, journal_sources, read_journal, text_problem
from common.data.dataset import ExampleConfig, ItemIndex, MemberLog, build_store_data, days_since_epoch, \
    history_arrays, member_log, profile_matrix
from common.data import contract
from common.data.ingest import read_chunks, sniff, validate_store
from common.data.storefiles import DataError, locate, read_catalog, read_store_meta
from common.data.validation import FileReport, check_transaction_chunk, parse_timestamps
from common.learning import recommend
from common.learning.local_layer import Histories, LocalLayer, adapt, member_histories
from common.learning.model import ModelConfig, Recommender
from common.learning.weights import ModelFileError

ASSORTMENT_FILE = "assortment.csv"  # optional: item_id per row, the store's current assortment
_ENCODE_BATCH = 512  # members per batch when states are built (bounds a [batch, n_items] matrix)


class ReceiptRejected(Exception):
    """A receipt not taken; ``reasons`` lists each problem, ``status`` the HTTP answer (422: it
    breaks the data contract, 409: its id is taken by another receipt, 503: no journal)."""

    def __init__(self, reasons: list[dict], status: int = 422) -> None:
        super().__init__("; ".join(f"{r.get('field', '')}: {r['reason']}" for r in reasons))
        self.reasons = reasons
        self.status = status


@dataclass
class Bundle:
    """One model and everything precomputed from it; replaced as a whole on a new model."""

    info: dict
    side: recommend.ItemSide
    states: recommend.MemberState  # one row per consenting member
    cand_v: np.ndarray
    cand_b: np.ndarray
    item_v: np.ndarray  # [n_items, d]: every catalog item's vector as served (cold items: category + brand)
    item_b: np.ndarray  # [n_items]
    layer: LocalLayer | None = None  # the store-local layer fitted on this model, if any
    layer_meta: dict | None = None  # its file's description (model hash, when, by whom, members)
    served: np.ndarray | None = None  # [members, n_items] float32: the layer's scores (None: no layer)
    weights: dict | None = None  # the model's weights and (dim, hidden): what a layer fitted later needs
    dims: tuple[int, int] | None = None


class StoreServing:
    """A store's serving state; see the module docstring."""

    def __init__(self, store_dir: Path, catalog: Path | None = None, state_dir: Path | None = None) -> None:
        self.paths = StorePaths.at(store_dir, catalog, state_dir)
        self.store_dir, self.catalog_path, self.state_dir = self.paths.store_dir, self.paths.catalog_dir, self.paths.state_dir
        self.meta = read_store_meta(self.store_dir)
        self.store_id = str(self.meta["store_id"])
        self.tz = str(self.meta.get("timezone", "UTC"))
        self.cfg = ExampleConfig()
        self._lock = threading.Lock()  # receipts and model swaps; reads take no lock
        self._load_data()
        self.bundle: Bundle | None = None
        self._model_stamp: tuple | None = None
        self.model_error: str | None = None
        self.layer_error: str | None = None  # why the model in use has no layer (or it was not kept)
        self.layer_pending = False  # the model in use waits for its layer to be fitted (by the watcher)
        # Start-up reads a kept layer but leaves a fit to the watcher: the API answers meanwhile.
        self.reload_model(fit_layer=False)

    # -- data ---------------------------------------------------------------------------
    def _load_data(self) -> None:
        journal = read_journal(self.state_dir)
        checked = validate_store(self.store_dir, self.catalog_path, keep_data=True,
                                 journal=journal_sources(self.state_dir, journal))
        if not checked.usable:
            raise DataError(f"store {self.store_id} cannot be served: " + "; ".join(checked.fatal))
        # The privacy page shows this validation's row counts per file (counts only, no rows).
        self.validation = {"at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"), "by": "storefed serve",
                           "files": {name: report.as_dict() for name, report in checked.files.items()}}
        catalog = read_catalog(self.catalog_path)
        self.items = ItemIndex.from_catalog(catalog)
        self.catalog_ids = pd.Index(catalog["item_id"].astype(str).str.strip())
        self.item_pos = {item: i for i, item in enumerate(self.items.item_ids)}
        members = checked.members.assign(member_id=checked.members["member_id"].astype(str).str.strip())
        self.member_frame = members.drop_duplicates("member_id").set_index("member_id", drop=False)
        consent = checked.consent
        self.consenting = set(consent.index[consent.to_numpy(dtype=bool)])
        self.known_members = set(self.member_frame.index)
        lines, anon = checked.lines, checked.anonymous
        self.counts = np.bincount(np.concatenate([lines["item"].to_numpy(), anon["item"].to_numpy()]).astype(np.int64),
                                  weights=np.concatenate([lines["qty"].to_numpy(), anon["qty"].to_numpy()]),
                                  minlength=self.items.n_items)
        sold = self.counts > 0
        listed = self._listed_assortment()
        self.cold = listed & ~sold  # listed but never sold here: scored by category and brand
        self.candidates = np.flatnonzero(sold | listed)
        self.cand_pos = np.full(self.items.n_items, -1, dtype=np.int64)
        self.cand_pos[self.candidates] = np.arange(len(self.candidates))
        self.cand_cold = self.cold[self.candidates]  # the discovery places' items, by candidate position
        days = np.concatenate([lines["day"].to_numpy(), anon["day"].to_numpy()])
        # Features are seen at the store's last day of data (the same clock for every member).
        self.now_day = float(np.floor(np.nanmax(days)) + 1) if len(days) else 0.0
        self.member_ids = np.array(sorted(self.consenting), dtype=object)
        self.member_row = {m: i for i, m in enumerate(self.member_ids)}
        self.lines = lines[["member", "item", "day", "qty", "receipt"]]
        # Coupon lines (promo names a coupon): the member's coupon history of a campaign audience (DESIGN §5.4).
        self.coupon_lines = (lines["coupon"].to_numpy(dtype=bool) if "coupon" in lines.columns
                             else np.zeros(len(lines), dtype=bool))
        homes = self.member_frame["home_store"] if "home_store" in self.member_frame.columns else None
        # Campaign audiences rank the store's home members only: a member is listed by one store.
        self.home_rows = np.array([i for i, m in enumerate(self.member_ids)
                                   if homes is None or contract.trains_here(homes.get(m, ""), self.store_id)],
                                  dtype=np.int64)
        # What the store-local layer is fitted on when this process fits it (build_store_data).
        self.anonymous = anon[["item", "day", "qty"]]
        self.member_rows = checked.members
        log = member_log(self.lines, self.member_ids)
        # The layer's view of each member's history (distinct items, receipts, last day) at now_day.
        self.layer_hist = member_histories(log, np.arange(len(self.member_ids)), log.n_receipts(), self.now_day)
        self.hist_items, self.hist_feat, self.hist_mask = history_arrays(
            log, log.n_receipts(), np.full(len(self.member_ids), self.now_day), self.cfg)
        self.profile = profile_matrix(self.member_frame.loc[self.member_ids], self.now_day) \
            if len(self.member_ids) else np.zeros((0, 0), np.float32)
        self.bought = {m: set(g.tolist()) for m, g in self.lines.groupby("member")["item"]}
        self.extra: dict[str, list[dict]] = {}  # receipts taken since loading, per member
        self.net_taken: dict[str, dict[int, float]] = {}  # quantities taken since loading, per member and item
        # Every receipt id the store knows (transactions.csv and the journal): an id is used once.
        self.known_receipts = set(checked.receipt_ids.tolist())
        self.legacy_receipts = journal.legacy_receipts
        self.journal_warnings = [w for w in checked.warnings if "receipts.journal" in w]
        try:
            self.journal: Journal | None = Journal(self.state_dir)
            self.journal_error: str | None = None
        except JournalError as exc:  # serve all the same; receipts are refused until it is fixed
            self.journal, self.journal_error = None, str(exc)
        self._refresh_popular()

    def _listed_assortment(self) -> np.ndarray:
        listed = np.zeros(self.items.n_items, dtype=bool)
        path = self.store_dir / ASSORTMENT_FILE
        if path.exists():
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            if "item_id" not in frame.columns:
                raise DataError(f"{path}: no 'item_id' column; list the store's items one per row under item_id")
            pos = self.catalog_ids.get_indexer(frame["item_id"].str.strip())
            listed[pos[pos >= 0]] = True
        return listed

    def _refresh_popular(self) -> None:
        counts = self.counts[self.candidates]
        order = np.lexsort((self.candidates, -counts))
        self.popular = self.candidates[order]
        self.popular_share = counts[order] / max(float(counts.sum()), 1e-12)

    # -- model --------------------------------------------------------------------------
    def _expected_shapes(self, weights_dims: tuple[int, int]) -> dict:
        dim, hidden = weights_dims
        return {k: tuple(v.shape) for k, v in Recommender(self.items, ModelConfig(dim=dim, hidden=hidden))
                .state_dict().items()}

    def _stamp(self) -> tuple | None:
        try:
            st = (self.state_dir / INFO_FILE).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_model(self, fit_layer: bool = True) -> bool:
        """Load the store's model when it changed, with its layer (kept for it, else fitted
        here when ``fit_layer``); or fit the layer the model in use was left waiting for.
        True when what answers changed."""
        stamp = self._stamp()
        if stamp is None:
            return False
        if stamp == self._model_stamp:
            return self._fit_pending_layer() if fit_layer else False
        try:
            dims = _dims_of(self.state_dir)
            weights, info = read_model(self.state_dir, self._expected_shapes(dims))
        except ModelFileError as exc:
            self.model_error = str(exc)  # keep serving with the model in use; retried later
            return False
        found, layer_error = self._layer_for(info["hash"], weights, dims, fit_layer)
        with self._lock:
            side = recommend.item_side({k: v.numpy() for k, v in weights.items()}, self.items.category,
                                       self.items.brand)
            states = self._encode_all(side)
            # Requests compute in float32 (half the memory traffic; scores are ranked, and
            # float32 keeps their differences to ~1e-6); states are built in float64.
            states.u, states.log_z = states.u.astype(np.float32), states.log_z.astype(np.float32)
            states.gate, states.rep_prob = states.gate.astype(np.float32), states.rep_prob.astype(np.float32)
            states.aff = states.aff.astype(np.float32)
            item_v = np.where(self.cold[:, None], side.cat_brand, side.V).astype(np.float32)
            # A never-sold item: the catalog's mean trained bias, plus its own explore prior (the chain's demand).
            trained_b = side.b - side.prior_item
            item_b = (np.where(self.cold, float(trained_b.mean()), trained_b) + side.prior_item).astype(np.float32)
            bundle = Bundle(info, side, states, item_v[self.candidates], item_b[self.candidates], item_v, item_b,
                            weights=weights, dims=dims)
            if found is not None:
                bundle.layer, bundle.layer_meta = found
                bundle.served = self._served_all(bundle)
            self.bundle = bundle  # model and layer swap as one reference
            self._model_stamp = stamp
            self.model_error = None
            self.layer_pending = found is None and not fit_layer
            self.layer_error = ("the store-local layer of this model is being fitted; the global model answers "
                                "meanwhile") if self.layer_pending else layer_error
        return True

    def _fit_pending_layer(self) -> bool:
        """Fit the layer of the model in use (left for later at start-up) and swap it in with it."""
        bundle = self.bundle
        if bundle is None or not self.layer_pending:
            return False
        self.layer_pending = False  # one attempt per model: a store that cannot have one keeps the global model
        found, note = self._layer_for(bundle.info["hash"], bundle.weights, bundle.dims, True)
        with self._lock:
            if found is not None and self.bundle is bundle:
                with_layer = dataclasses.replace(bundle, layer=found[0], layer_meta=found[1])
                with_layer.served = self._served_all(with_layer)
                self.bundle = with_layer
            self.layer_error = note
        return found is not None

    def _layer_for(self, model_hash: str, weights: dict, dims: tuple[int, int],
                   fit: bool) -> tuple[tuple | None, str | None]:
        """((layer, meta) for the model of ``model_hash``, None) — read from the state directory,
        else (``fit``) fitted here on the store's data and kept there; (None, why) otherwise."""
        def fitted() -> LocalLayer:
            model = Recommender(self.items, ModelConfig(dim=dims[0], hidden=dims[1]))
            model.load_state_dict(weights)
            return adapt(model, build_store_data(self.store_id, self.lines, self.anonymous, self.member_rows,
                                                 self.items, self.cfg))

        return layer_store.obtain(self.state_dir, model_hash, fitted if fit else None, "serve", self._usable)

    def _usable(self, layer: LocalLayer) -> bool:
        """Whether a kept layer scores this catalog (one member without history): a file that
        does not fit it (another catalog, a damaged field) is fitted again, never served."""
        n = self.items.n_items
        empty = Histories([np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)], self.now_day)
        try:
            out = np.asarray(layer.scores(np.zeros((1, n), np.float32), empty))
        except (ValueError, IndexError, RuntimeError, TypeError):
            return False
        return out.shape == (1, n) and bool(np.isfinite(out).all())

    def _served_all(self, bundle: Bundle) -> np.ndarray:
        """The layer's scores of every catalog item for every consenting member, [members, n_items]."""
        out = np.empty((len(self.member_ids), self.items.n_items), dtype=np.float32)
        for a in range(0, len(self.member_ids), _ENCODE_BATCH):
            rows = np.arange(a, min(a + _ENCODE_BATCH, len(self.member_ids)))
            out[rows] = self._served_rows(bundle, rows)
        return out

    def _served_rows(self, bundle: Bundle, rows: np.ndarray) -> np.ndarray:
        g = recommend.scores_for_members(bundle.states, rows, bundle.item_v, bundle.item_b, self.items.category)
        return bundle.layer.scores(g, self.layer_hist.subset(rows))

    def _encode_all(self, side: recommend.ItemSide) -> recommend.MemberState:
        parts = [recommend.encode_members(side, self.hist_items[a:a + _ENCODE_BATCH],
                                          self.hist_feat[a:a + _ENCODE_BATCH], self.hist_mask[a:a + _ENCODE_BATCH],
                                          self.profile[a:a + _ENCODE_BATCH])
                 for a in range(0, len(self.member_ids), _ENCODE_BATCH)]
        if not parts:
            d = side.V.shape[1]
            return recommend.MemberState(np.zeros((0, d)), np.zeros(0), np.zeros(0),
                                         np.zeros((0, self.cfg.history_len), np.int64),
                                         np.zeros((0, self.cfg.history_len)), np.zeros((0, side.exp_prior_cat.shape[0])))
        return recommend.MemberState(*(np.concatenate([getattr(p, f) for p in parts])
                                       for f in ("u", "log_z", "gate", "rep_items", "rep_prob", "aff")))

    def model_info(self) -> dict | None:
        b = self.bundle
        if b is None:
            return None
        return {"run_id": b.info.get("run_id"), "round": b.info.get("round"), "hash": b.info.get("hash"),
                "epsilon": b.info.get("epsilon")}

    def layer_info(self) -> dict | None:
        """The store-local layer in use (None: the global model alone): when, by whom, on how many members."""
        b = self.bundle
        if b is None or b.layer is None:
            return None
        meta = b.layer_meta or {}
        return {"model_hash": meta.get("model_hash"), "fitted_by": meta.get("fitted_by"),
                "fitted_at": meta.get("fitted_at"), "fitted_on": meta.get("fitted_on")}

    # -- answers ------------------------------------------------------------------------
    def recommendations(self, member_id: str, k: int) -> list[dict] | None:
        """Top-k items for a member (None: unknown member)."""
        if member_id not in self.known_members:
            return None
        bundle = self.bundle
        row = self.member_row.get(member_id)
        if bundle is None or row is None:  # no model yet, or no consent: the store's best sellers
            top = self.popular[:k]
            return [{"item_id": str(self.items.item_ids[i]), "score": float(s), "reason": "popular_here"}
                    for i, s in zip(top, self.popular_share[:k])]
        if bundle.served is not None:  # the store-local layer's scores, over the assortment
            scores = bundle.served[row, self.candidates]
        else:
            scores = recommend.scores_for_member(bundle.states, row, bundle.cand_v, bundle.cand_b,
                                                 self.items.category[self.candidates], self.cand_pos)
        bought = self.bought.get(member_id, set())
        out = []
        # Stocked but never sold here: the list keeps places for them (recommend.with_discovery).
        for pos in recommend.with_discovery(scores, k, self.cand_cold):
            item = int(self.candidates[pos])
            out.append({"item_id": str(self.items.item_ids[item]), "score": float(scores[pos]),
                        "reason": recommend.reason_for(item, bought, True, bool(self.cold[item]))})
        return out

    def audience(self, item_id: str, k: int) -> list[dict] | None:
        """The k consenting members most likely to buy the item (None: not in the catalog)."""
        item = self.item_pos.get(item_id)
        if item is None:
            return None
        bundle = self.bundle
        if bundle is None or len(self.member_ids) == 0:
            return []
        if bundle.served is not None:
            scores = bundle.served[:, item]
        else:
            scores = recommend.scores_for_item(bundle.states, bundle.item_v[item], float(bundle.item_b[item]),
                                               int(self.items.category[item]), item)
        return [{"member_id": str(self.member_ids[m]), "score": float(scores[m])} for m in recommend.top_k(scores, k)]

    def campaign_audience(self, items: list[str], objective: str, k: int,
                          candidates: list[str] | None = None) -> dict | None:
        """The k home members (consenting) most likely to buy — or, ``redeem``, buy with a
        coupon — any of ``items``, with calibrated probabilities (DESIGN §5.4). None: no model.

        Unknown item ids are left out and counted; so are candidates that are not consenting
        home members here. A ValueError names a request this store cannot answer."""
        from common.learning import audience_score as aud

        bundle = self.bundle
        if bundle is None:
            return None
        cols = np.array(sorted({self.item_pos[i] for i in items if i in self.item_pos}), dtype=np.int64)
        unknown = [i for i in items if i not in self.item_pos]
        if len(cols) == 0:
            raise ValueError("none of the items is in the catalog")
        rows = self.home_rows
        if candidates is not None:
            wanted = {self.member_row.get(m, -1) for m in candidates}
            rows = rows[np.isin(rows, list(wanted))]
        cal, info = self._campaign_calibration(bundle, cols, objective)
        if len(rows) == 0:
            return {"members": [], "unknown_items": unknown, "candidates_scored": 0, "calibration": info}
        every = np.arange(len(self.member_ids))
        rel = aud.relative_model_score(aud.set_log_share(self._set_scores(bundle, every), cols))[rows]
        hist = aud.history_features(self._feature_lines(), rows, set(cols.tolist()), self.now_day)
        prob = cal.probability(aud.combined_score(rel, hist, objective)[:, None])
        top = recommend.top_k(prob, k)
        return {"members": [{"member_id": str(self.member_ids[rows[t]]), "score": float(prob[t])} for t in top],
                "unknown_items": unknown, "candidates_scored": int(len(rows)), "calibration": info}

    def _feature_lines(self) -> pd.DataFrame:
        """The consenting members' lines in the audience module's columns (member = row number)."""
        row = pd.Index(self.member_ids).get_indexer(self.lines["member"])
        keep = row >= 0
        return pd.DataFrame({"member": row[keep], "day": self.lines["day"].to_numpy()[keep],
                             "basket": self.lines["receipt"].to_numpy()[keep],
                             "item": self.lines["item"].to_numpy()[keep], "coupon": self.coupon_lines[keep]})

    def _set_scores(self, bundle: Bundle, rows: np.ndarray) -> np.ndarray:
        if bundle.served is not None:
            return bundle.served[rows]
        return recommend.scores_for_members(bundle.states, rows, bundle.item_v, bundle.item_b, self.items.category)

    def _calibration_scores(self, bundle: Bundle, start: float) -> np.ndarray:
        """Every consenting member's served scores from their history before ``start`` (kept
        for this model: a campaign's calibration must not see its label days)."""
        cache = getattr(self, "_calib_cache", None)
        if cache is not None and cache[0] is bundle and cache[1] == start:
            return cache[2]
        past = self.lines[self.lines["day"] < start]
        log = member_log(past, self.member_ids)
        n = len(self.member_ids)
        h_items, h_feat, h_mask = history_arrays(log, log.n_receipts(), np.full(n, start), self.cfg)
        state = recommend.encode_members(bundle.side, h_items, h_feat, h_mask, self.profile)
        g = recommend.scores_for_members(state, np.arange(n), bundle.item_v, bundle.item_b, self.items.category)
        if bundle.layer is not None:
            g = bundle.layer.scores(g, member_histories(log, np.arange(n), log.n_receipts(), start))
        g = np.asarray(g, dtype=np.float32)  # as the served matrix: one [members, n_items] float32 kept per model
        self._calib_cache = (bundle, start, g)
        return g

    def _campaign_calibration(self, bundle: Bundle, cols: np.ndarray, objective: str):
        """Platt scaling of the campaign score at this store (DESIGN §5.4): fitted on every
        consenting member here, the score as of 28 days before now (the model's part from
        histories cut at that day, so the label days reach no feature), the label in those 28
        days: buy — an item of the set; redeem — any coupon line."""
        from common.learning import audience_score as aud

        start = self.now_day - aud.CALIBRATION_DAYS
        every = np.arange(len(self.member_ids))
        lines = self._feature_lines()
        pset = set(cols.tolist())
        rel = aud.relative_model_score(aud.set_log_share(self._calibration_scores(bundle, start), cols))
        score = aud.combined_score(rel, aud.history_features(lines, every, pset, start), objective)
        window = lines[(lines["day"] >= start) & (lines["day"] < self.now_day)]
        window = window[window["coupon"]] if objective == "redeem" else window[window["item"].isin(pset)]
        y = np.isin(every, window["member"].unique())
        cal = aud.fit_logistic(score[:, None], y)
        return cal, {"members": cal.members, "positives": cal.positives, "days": aud.CALIBRATION_DAYS,
                     "features": list(aud.FEATURES)}

    # -- receipts -----------------------------------------------------------------------
    def check_receipt(self, body: object) -> dict:
        """The receipt, normalised; :class:`ReceiptRejected` with every reason otherwise."""
        reasons: list[dict] = []
        if not isinstance(body, dict):
            raise ReceiptRejected([{"field": "", "reason": "the body must be a JSON object"}])
        for key in ("receipt_id", "ts", "member_id"):
            if not isinstance(body.get(key), str):
                reasons.append({"field": key, "reason": "missing or not a string"})
            elif text_problem(key, body[key].strip()):
                reasons.append(_text_reason(key, key, body[key].strip()))
        lines = body.get("lines")
        if not isinstance(lines, list) or not lines:
            reasons.append({"field": "lines", "reason": "must be a non-empty list"})
        elif len(lines) > 1000:
            reasons.append({"field": "lines", "reason": "more than 1000 lines in one receipt"})
        else:
            for n, line in enumerate(lines, 1):
                if not isinstance(line, dict) or not isinstance(line.get("item_id"), str):
                    reasons.append({"field": f"lines[{n}].item_id", "reason": "missing or not a string"})
                    continue
                if text_problem("item_id", line["item_id"].strip()):
                    reasons.append(_text_reason(f"lines[{n}].item_id", "item_id", line["item_id"].strip()))
                promo = line.get("promo")
                if promo is not None and not isinstance(promo, str):
                    reasons.append({"field": f"lines[{n}].promo", "reason": "not a string"})
                elif promo and text_problem("promo", promo.strip()):
                    reasons.append(_text_reason(f"lines[{n}].promo", "promo", promo.strip()))
                for key in ("quantity", "unit_price"):
                    value = line.get(key)
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                        reasons.append({"field": f"lines[{n}].{key}", "reason": "missing or not a finite number"})
        if reasons:
            raise ReceiptRejected(reasons)
        member = body["member_id"].strip()
        if member and member not in self.known_members:
            reasons.append({"field": "member_id", "reason": "unknown_member"})
        frame = pd.DataFrame({
            "receipt_id": body["receipt_id"], "ts": body["ts"], "member_id": member,
            "item_id": [str(line["item_id"]) for line in lines],
            "quantity": [repr(float(line["quantity"])) for line in lines],
            "unit_price": [repr(float(line["unit_price"])) for line in lines],
        })
        result = check_transaction_chunk(frame, self.catalog_ids, pd.Timestamp.now(tz="UTC"), "receipt",
                                         FileReport(), 0, self.tz)
        for p in result.problems:
            reasons.append({"field": f"lines[{p['row']}].{p['column']}", "value": p["value"], "reason": p["reason"]})
        if reasons:
            raise ReceiptRejected(reasons)
        return {"receipt_id": body["receipt_id"].strip(), "ts": body["ts"].strip(), "member_id": member,
                "lines": [{"item_id": str(line["item_id"]).strip(), "quantity": float(line["quantity"]),
                           "unit_price": float(line["unit_price"]), "promo": str(line.get("promo") or "").strip()}
                          for line in lines],
                "_day": float(days_since_epoch(result.lines["ts"] if len(result.lines) else result.anonymous["ts"])[0])}

    def take_receipt(self, body: object) -> tuple[dict, bool]:
        """Validate, journal durably, then reflect; returns (receipt, newly recorded).

        A receipt id already used (transactions.csv or the journal) is a retry when the
        receipt is the same (member, time, lines: recorded once) and a conflict (409) otherwise."""
        receipt = self.check_receipt(body)
        with self._lock:
            existing, where = self._existing(receipt["receipt_id"])
            if where is not None:
                if existing is not None and self._same(existing, receipt):
                    return receipt, False  # a client's retry: recorded once
                raise ReceiptRejected([{"field": "receipt_id", "value": receipt["receipt_id"],
                                        "reason": "duplicate_receipt_id",
                                        "detail": f"this id is another receipt's, in {where}; a receipt id is "
                                                  "used once (the same receipt again is answered 200)"}], 409)
            self._check_returns(receipt)
            if self.journal is None:
                raise ReceiptRejected([{"field": "", "reason": "journal_unavailable",
                                        "detail": str(self.journal_error)}], 503)
            try:
                recorded = self.journal.record(receipt)
            except JournalError as exc:
                raise ReceiptRejected([{"field": "", "reason": "journal_unavailable", "detail": str(exc)}], 503) \
                    from None
            if not recorded:  # taken meanwhile by another process writing the same journal
                raise ReceiptRejected([{"field": "receipt_id", "value": receipt["receipt_id"],
                                        "reason": "duplicate_receipt_id", "detail": "recorded meanwhile"}], 409)
            self.known_receipts.add(receipt["receipt_id"])
            self._reflect(receipt)
        return receipt, True

    def _existing(self, receipt_id: str) -> tuple[dict | None, str | None]:
        """(the receipt recorded under this id, where) — (None, None) when the id is free."""
        if self.journal is not None:
            found = self.journal.find(receipt_id)
            if found is not None:
                return found, "the receipts journal"
        if receipt_id in self.legacy_receipts:
            return self.legacy_receipts[receipt_id], "the receipts journal"
        if receipt_id not in self.known_receipts:
            return None, None
        path = locate(self.store_dir, contract.TRANSACTIONS_FILE)
        try:  # rare (an id reused): read the file's lines of that receipt
            parts = [c[c["receipt_id"].str.strip() == receipt_id] for c in read_chunks(sniff(path))]
        except (DataError, OSError, KeyError):
            return None, contract.TRANSACTIONS_FILE
        rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if rows.empty:
            return None, "the receipts journal"
        return {"receipt_id": receipt_id, "ts": rows["ts"].iloc[0], "member_id": rows["member_id"].iloc[0],
                "ts_all": set(rows["ts"].str.strip()),
                "lines": [{"item_id": i, "quantity": q, "unit_price": p}
                          for i, q, p in zip(rows["item_id"], rows["quantity"], rows["unit_price"])]}, \
            contract.TRANSACTIONS_FILE

    def _same(self, existing: dict, receipt: dict) -> bool:
        """Whether a recorded receipt is this one: the same member, time and lines (in any order)."""
        try:
            if len(existing.get("ts_all", ())) > 1:
                return False
            day = days_since_epoch(parse_timestamps(pd.Series([str(existing["ts"]).strip()]), self.tz))[0]
            mine = sorted((str(x["item_id"]).strip(), float(x["quantity"]), float(x["unit_price"]))
                          for x in existing["lines"])
        except (ValueError, TypeError, KeyError):
            return False
        theirs = sorted((x["item_id"], x["quantity"], x["unit_price"]) for x in receipt["lines"])
        return (str(existing["member_id"]).strip() == receipt["member_id"] and bool(np.isfinite(day))
                and abs(float(day) - receipt["_day"]) < 1e-9 and mine == theirs)

    def _check_returns(self, receipt: dict) -> None:
        """A return (negative quantity) only of what the member bought here: per item, the
        member's net quantity (their lines here, receipts taken since, this receipt) stays ≥ 0.

        Checked for the members whose lines the store trains on (consenting); another
        member's lines are excluded from training and popularity, so their returns change
        nothing but are journaled as the POS sends them."""
        member = receipt["member_id"]
        if member not in self.consenting or not any(line["quantity"] < 0 for line in receipt["lines"]):
            return
        mine = self.lines[self.lines["member"] == member]
        net = mine.groupby("item")["qty"].sum().to_dict()
        for item, qty in self.net_taken.get(member, {}).items():
            net[item] = net.get(item, 0.0) + qty
        change: dict[int, float] = {}
        for line in receipt["lines"]:
            item = self.item_pos[line["item_id"]]
            change[item] = change.get(item, 0.0) + line["quantity"]
        reasons = []
        for n, line in enumerate(receipt["lines"], 1):
            item = self.item_pos[line["item_id"]]
            if line["quantity"] < 0 and net.get(item, 0.0) + change[item] < -1e-9:
                reasons.append({"field": f"lines[{n}].quantity", "value": line["quantity"],
                                "reason": "return_exceeds_purchases",
                                "detail": f"member {member} bought a net {float(net.get(item, 0.0)):g} of item "
                                          f"{line['item_id']} at store {self.store_id}; this receipt's net is "
                                          f"{change[item]:g}"})
        if reasons:
            raise ReceiptRejected(reasons)

    def _reflect(self, receipt: dict) -> None:
        """Fold an accepted receipt into popularity and, for a consenting member, their state."""
        member = receipt["member_id"]
        taken = self.net_taken.setdefault(member, {})
        for line in receipt["lines"]:
            item = self.item_pos[line["item_id"]]
            taken[item] = taken.get(item, 0.0) + line["quantity"]
        for line in receipt["lines"]:
            if line["quantity"] > 0:
                self.counts[self.item_pos[line["item_id"]]] += line["quantity"]
        self._refresh_popular()
        row = self.member_row.get(member)
        if row is None:
            return
        self.extra.setdefault(member, []).extend(
            {"member": member, "item": self.item_pos[line["item_id"]], "day": receipt["_day"],
             "qty": line["quantity"], "receipt": -len(self.known_receipts)}
            for line in receipt["lines"] if line["quantity"] > 0)  # returns are netted at training
        self.bought.setdefault(member, set()).update(self.item_pos[line["item_id"]] for line in receipt["lines"]
                                                     if line["quantity"] > 0)
        mine = pd.concat([self.lines[self.lines["member"] == member], pd.DataFrame(self.extra[member])],
                         ignore_index=True)
        log: MemberLog = member_log(mine, np.array([member], dtype=object))
        items, feat, mask = history_arrays(log, log.n_receipts(), np.array([max(self.now_day, receipt["_day"])]),
                                           self.cfg)
        self.hist_items[row], self.hist_feat[row], self.hist_mask[row] = items[0], feat[0], mask[0]
        h = member_histories(log, np.array([0]), log.n_receipts(), self.now_day)
        self.layer_hist.items[row], self.layer_hist.counts[row], self.layer_hist.last_day[row] = \
            h.items[0], h.counts[0], h.last_day[0]
        bundle = self.bundle
        if bundle is not None:
            one = recommend.encode_members(bundle.side, items, feat, mask, self.profile[row:row + 1])
            for f in ("u", "log_z", "gate", "rep_items", "rep_prob"):
                getattr(bundle.states, f)[row] = getattr(one, f)[0]
            if bundle.served is not None:
                bundle.served[row] = self._served_rows(bundle, np.array([row]))[0]


def _text_reason(field: str, name: str, value: str) -> dict:
    problem = text_problem(name, value)
    from client.state.receipts_journal import LIMITS

    why = {"control_character": "holds a control character (e.g. NUL, a line end): text must be printable",
           "field_too_long": f"longer than {LIMITS.get(name, 64)} characters"}[problem]
    return {"field": field, "value": value.encode("unicode_escape").decode("ascii")[:80], "reason": problem,
            "detail": why}


def _dims_of(state_dir: Path) -> tuple[int, int]:
    """(dim, hidden) of the stored model, read from its tensor shapes (then checked in full)."""
    import torch

    try:
        state = torch.load(Path(state_dir) / MODEL_FILE, weights_only=True, map_location="cpu")
        return int(state["item_out.weight"].shape[1]), int(state["encoder_in.weight"].shape[0])
    except Exception as exc:  # damaged or foreign file: the full check reports it
        raise ModelFileError(f"{Path(state_dir) / MODEL_FILE}: not a storefed model ({exc.__class__.__name__})") from None
