"""The operator's dashboard without a browser: finding runs, damaged ones, lazy indexing, the
speed at 100 runs × 500 stores, and the store's reply log the privacy page reads."""

from __future__ import annotations

import json
import time

import pytest
from starlette.testclient import TestClient

from client.state import reply_log
from common.exchange import wire
from server.dashboard.app import create_dashboard
from server.dashboard.pages import markdown_html, store_rounds
from server.dashboard.runs import RunIndex, RunsError
from simulations.bench.dashboard import synthetic_run, write_synthetic_runs


def test_a_runs_directory_that_does_not_exist_is_one_clear_line(tmp_path):
    with pytest.raises(RunsError) as err:
        RunIndex([tmp_path / "nowhere"])
    assert str(err.value).count("\n") == 0 and "nowhere: runs directory not found" in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunsError, match="file: not a directory"):
        RunIndex([tmp_path / "file"])


def test_a_damaged_run_is_listed_as_damaged_and_its_page_says_why(tmp_path):
    write_synthetic_runs(tmp_path, runs=2, stores=5, rounds=3)  # and run-damaged: cut in half
    (tmp_path / "not-ours").mkdir()
    (tmp_path / "not-ours" / "results.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "results.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "running" / "checkpoint").mkdir(parents=True)
    index = RunIndex([tmp_path])
    rows = {s.name: s for s in index.list()}
    assert rows["run-damaged"].status.startswith("damaged: results.json is not JSON (line 1, column")
    assert rows["not-ours"].status.startswith("damaged: results.json is not a storefed result")
    assert rows["binary"].status == "damaged: results.json is not UTF-8 text"
    assert rows["running"].kind == "incomplete" and rows["run-0000"].status.startswith("complete")
    client = TestClient(create_dashboard(index))
    page = client.get("/")
    assert page.status_code == 200 and page.text.count("damaged: ") == 3
    damaged = client.get(f"/runs/{rows['run-damaged'].key}")
    assert damaged.status_code == 422 and "is not JSON" in damaged.text
    assert client.get("/runs/000000000000").status_code == 404
    assert client.get(f"/runs/{rows['run-0000'].key}").status_code == 200
    assert client.get(f"/runs/{rows['run-0000'].key}/files/..%2Fresults.json").status_code == 404
    # Nothing is fetched from elsewhere, and the browser is told so.
    assert "default-src 'none'" in page.headers["content-security-policy"] and "<script" not in page.text


def test_results_are_parsed_once_and_again_only_when_they_change(tmp_path):
    write_synthetic_runs(tmp_path, runs=3, stores=5, rounds=2, damaged=False)
    cache = tmp_path / "cache" / "index.json"
    index = RunIndex([tmp_path], cache_file=cache)
    index.list(fresh=True)
    assert index.parsed == 3
    index.list(fresh=True)
    assert index.parsed == 3  # unchanged files: stat only
    path = tmp_path / "run-0001" / "results.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "stopped": "every store declined round 2"}))
    rows = {s.name: s for s in index.list(fresh=True)}
    assert index.parsed == 4 and rows["run-0001"].status.startswith("stopped early: every store declined")
    again = RunIndex([tmp_path], cache_file=cache)  # a restart reads the summaries kept
    again.list(fresh=True)
    assert again.parsed == 0


def test_each_store_and_round_shows_what_the_store_did():
    results = synthetic_run(0, stores=60, rounds=12)
    stores, rounds, cells = store_rounds(results)
    assert len(stores) == 60 and rounds == list(range(1, 13))
    refused = [s for (s, r), (what, _) in cells.items() if what == "refused" and r == 1]
    assert refused and all("required column 'ts'" in cells[(s, 1)][1] for s in refused)
    declined = [(s, r) for (s, r), (what, why) in cells.items() if what == "declined"]
    assert declined and all("over the store's budget" in cells[c][1] for c in declined)


def test_pages_answer_within_a_second_at_100_runs_of_500_stores(tmp_path):
    from common.view import charts

    charts.warm()  # `storefed dashboard` does this at start-up
    write_synthetic_runs(tmp_path, runs=100, stores=500, rounds=10)
    index = RunIndex([tmp_path])
    started = time.perf_counter()
    index.list(fresh=True)  # `storefed dashboard` indexes before it serves: every results.json parsed once
    assert time.perf_counter() - started < 10
    client = TestClient(create_dashboard(index))
    timings = {}
    for _ in range(2):
        started = time.perf_counter()
        listing = client.get("/")
        timings.setdefault("list", []).append(time.perf_counter() - started)
    assert listing.status_code == 200 and listing.text.count('href="/runs/') == 100
    key = next(s.key for s in RunIndex([tmp_path]).list() if s.name == "run-0042")
    for name, path in (("run", f"/runs/{key}"), ("quality", f"/runs/{key}/quality.svg"),
                       ("epsilon", f"/runs/{key}/epsilon.svg")):
        started = time.perf_counter()
        answer = client.get(path)
        timings[name] = [time.perf_counter() - started]
        assert answer.status_code == 200, path
    assert max(max(v) for v in timings.values()) < 1.0, timings


def test_the_reports_markdown_becomes_tables_and_images():
    html = markdown_html("# Title\n\nSome `code` and **bold**.\n\n| a | b |\n|---|---|\n| 1 | <x> |\n\n"
                         "![plot](plot.png)\n\n- one\n- two\n", lambda src: f"/files/{src}")
    assert "<h2>Title</h2>" in html and "<code>code</code>" in html and "<b>bold</b>" in html
    assert "<td>&lt;x&gt;</td>" in html and '<img class="chart" alt="plot" src="/files/plot.png">' in html
    assert "<li>one</li><li>two</li>" in html


def test_the_reply_log_keeps_only_the_listed_values_and_never_creates_the_state(tmp_path, monkeypatch):
    state = tmp_path / "state"
    assert not reply_log.record(state, reply_log.entry(message="train", outcome="sent", run_id="1", server_round=1))
    assert not state.exists()
    state.mkdir()
    sent = reply_log.entry(message="train", outcome="sent", run_id="7", server_round=2, arrays=(12, 660_000),
                           values={"epsilon": 1.5, "num-examples": 500, "store-id": "S1", "secret": "no"},
                           signed_by="abc")
    assert set(sent["values"]) == {"epsilon", "num-examples", "store-id"}
    assert set(sent["values"]) <= set(wire.TRAIN_METRICS) | set(wire.TRAIN_CONFIG)
    reply_log.record(state, sent)
    reply_log.record(state, reply_log.entry(message="train", outcome="declined", run_id="7", server_round=3,
                                            values={"store-id": "S1", "epsilon": float("inf"), "reason": "budget"},
                                            reason="budget"))
    entries = reply_log.read_log(state)
    assert [e["outcome"] for e in entries] == ["sent", "declined"] and entries[1]["values"]["epsilon"] is None
    assert reply_log.refusals(entries) == entries[1:]
    with (state / reply_log.LOG_FILE).open("a") as f:
        f.write("{not json\n")
    assert len(reply_log.read_log(state)) == 2  # a damaged line is skipped
    monkeypatch.setattr(reply_log, "KEEP", 10)
    for i in range(reply_log.KEEP + 5):
        reply_log.record(state, reply_log.entry(message="evaluate", outcome="sent", run_id="8", server_round=i))
    assert len(reply_log.read_log(state)) == reply_log.KEEP
