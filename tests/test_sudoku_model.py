"""papers/sudoku_model.py formats against the checker, a tiny end-to-end round (core trainer + engine + search), and
the OpenAI-compatible backend against a local stub server (retries, then a clean stop with calls saved)."""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from scalelab import search
from scalelab.backends import OpenAIBackend, make_backend
from scalelab.papers import sudoku_model as sm
from scalelab.search import tasks


def test_rewrite_verdict_matches_checker():
    rng = random.Random(0)
    probs = tasks.sudoku_problems(20, 0)
    grids = tasks.all_grids(4)
    for p in probs:
        puz = tasks.text_to_grid(p.question, 4)
        for g in rng.sample(grids, 30) + [tuple(tasks.text_to_grid(p.answer, 4))]:
            cand = tasks.grid_to_text(g, 4)
            line, ok = sm.verify_line(p.question, cand)
            assert ok == tasks.sudoku_valid(puz, list(g), 4)
            assert line.endswith(" Y" if ok else " N")
            rw = line.split(" V")[1][:-2]
            # the verdict is Y iff every lemma holds
            assert ok == ("-" not in rw)
    assert sm.verify_line(probs[0].question, "12/34")[0].endswith("V" + sm.ANSWER + "x N")
    direct, ok = sm.verify_line(probs[0].question, probs[0].answer, lemmas="none")
    assert ok and direct.endswith(" V" + sm.ANSWER + " Y")
    mk, ok = sm.verify_line(probs[0].question, probs[0].answer, lemmas="marks")
    assert ok and mk.endswith(" V" + sm.ANSWER + "k++++c++++b++++ Y")
    assert search.SudokuFormat().verdict_query(probs[0], probs[0].answer, " Y").endswith(" V ")
    assert sm.divergences("1234/3412/2143/4321", "1234/3412/2143/4312") == "43:2|1 44:1|2"
    fmt = search.SudokuFormat()
    assert fmt.parse_verdict("r1234+ k+ Y") == 1 and fmt.parse_winner("12:3|4 B") == "B"
    assert fmt.verdict_query(probs[0], "1234/3412/2143/4321", "rxx Y").endswith("V" + "rxx ")


def test_corruptions_are_wrong_and_varied():
    """Oracle: the checker rejects every corruption; the three kinds all occur (a row swap keeps every row valid,
    another valid grid keeps every group valid and breaks the clues)."""
    rng = random.Random(0)
    kinds = set()
    for p in tasks.sudoku_problems(40, 3):
        puz = tasks.text_to_grid(p.question, 4)
        for _ in range(10):
            c = sm.corrupt(p, rng)
            g = tasks.text_to_grid(c, 4)
            assert not tasks.sudoku_valid(puz, g, 4)
            line, ok = sm.verify_line(p.question, c, "rewrite")
            assert not ok and line.endswith(" N")
            rows_ok = all(len(set(g[4 * r:4 * r + 4])) == 4 for r in range(4))
            rw = line.split(sm.ANSWER)[1][:-2]
            kinds.add("k-" if sm.marks(rw).endswith("c++++b++++") and rows_ok else
                      "rows kept" if rows_ok else "row broken")
    assert kinds == {"k-", "rows kept", "row broken"}


def test_tiny_training_round_and_local_search(tmp_path):
    sv = sm.SVConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, batch_size=8, solve_steps=12, rounds=1,
                     round_steps=6, sample_puzzles=4, k_sample=2, lines_per_step=80, threads=1)
    run = sm.train_sudoku_model(tmp_path / "sv", sv)
    state = json.loads((tmp_path / "sv" / "rounds.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [0, 1] and state["rounds"][1]["samples"] == 8
    again = sm.train_sudoku_model(tmp_path / "sv", sv)  # finished rounds are reused
    assert again == run
    cfg = search.SearchConfig(backend=str(run), task="sudoku:4", n_problems=2, prompts="sudoku", k_inf=3,
                              k_verif=2, k_tie=2, max_tokens=24, verify_max_tokens=40, score="prob", seeds=3,
                              threads=1)
    search.run_search(cfg, tmp_path / "s")
    m = search.analyse(tmp_path / "s")
    assert m["problems"] == 2 and m["usage"]["verify"]["calls"] >= 2 * 3
    assert all(0 <= v <= 1 for v in m["accuracy"].values())
    # a problem's verifications and a round's tie-breaks as one continuous batch: the same calls, samples and
    # selections as one call after another (per-sample seeds), on the real engine
    cfg = search.SearchConfig(backend=str(run), task="sudoku:4", n_problems=3, prompts="sudoku", k_inf=4,
                              k_verif=2, k_tie=2, max_tokens=24, verify_max_tokens=40, seeds=3, threads=1,
                              threshold=0.5)
    backend = search.search_backend(str(run))
    runs = {}
    for batched in (False, True):
        recs = search.run_search(cfg, tmp_path / f"b{batched}", gen=backend, ver=backend, batched=batched)
        lines = [json.loads(x) for x in (tmp_path / f"b{batched}" / "transcripts.jsonl").read_text().splitlines()]
        runs[batched] = ({r["key"]: (r["outputs"], r["seed"], r["usage"]["completion"]) for r in lines},
                         [(r.pick, r.scores(), r.played) for r in recs])
    assert runs[True] == runs[False]
    assert any(k.startswith("tie:") for k in runs[True][0]) and sum(k.startswith("ver:") for k in runs[True][0]) == 12


class _Stub(BaseHTTPRequestHandler):
    fail_from = 10**9
    calls = 0

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls >= type(self).fail_from:
            self.send_response(503)
            self.end_headers()
            return
        q = body["messages"][0]["content"]
        if "VERDICT" in q:
            text = "Theorem ... VERDICT: CORRECT"
        else:
            text = "It is 5.\n#### 5"
        out = {"choices": [{"index": i, "message": {"content": text}, "finish_reason": "stop"}
                           for i in range(body.get("n", 1))],
               "usage": {"prompt_tokens": 20, "completion_tokens": 5 * body.get("n", 1)}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    srv = HTTPServer(("127.0.0.1", 0), _Stub)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    _Stub.calls, _Stub.fail_from = 0, 10**9
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_openai_backend_and_failure_midrun(stub, tmp_path):
    spec = f"openai:{stub}#stub-model"
    cfg = search.SearchConfig(backend=spec, task="arithmetic", n_problems=3, k_inf=2, k_verif=2, k_tie=1,
                              seeds=2, retries=1, price="o1")
    _Stub.fail_from = 6  # the 6th request and every later one fail: retried once, then the run stops
    be = make_backend(spec, retries=1)
    be_fast = OpenAIBackend(be.base_url, be.model, max_retries=1, timeout=5)
    with pytest.raises(search.BackendError, match="failed after 2 attempts.*rerun the same command"):
        search.run_search(cfg, tmp_path / "o", gen=be_fast, ver=be_fast)
    saved = (tmp_path / "o" / "transcripts.jsonl").read_text().splitlines()
    assert len(saved) == 5
    _Stub.fail_from = 10**9
    search.run_search(cfg, tmp_path / "o", gen=be_fast, ver=be_fast)
    m = search.analyse(tmp_path / "o")
    assert m["accuracy"]["Pass@1"] in (0.0, 1.0 / 3, 2.0 / 3, 1.0) and m["dollars"]["total"] > 0
