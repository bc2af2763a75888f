"""lm-evaluation-harness against `scalelab serve`: the harness's own `local-completions` model (remote
tokenizer, string requests, batched prompts) scores continuations through a real server subprocess exactly as
the engine does, and its is_greedy equals an argmax check on a full forward. Also: the engine's per-position
top logprobs (what an echoed prompt reports) against the full softmax.

Offline: the harness tokenizes through the server's /tokenize (no Hub), HF_HUB_OFFLINE=1. Every server binds
127.0.0.1 on a free port, every request is bounded in count and time, and every server is stopped.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from scalelab.config import ModelConfig
from scalelab.engine import Engine
from scalelab.errors import ScalelabError
from scalelab.model import Transformer
from scalelab.tokenizer import train_bpe

from conftest import ROOT  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "Paris is the capital of France.", "<|user|>hi<|assistant|>hello"] * 20
PAIRS = [("Paris is the", " capital of France."), ("The quick brown", " fox"), ("The quick brown", " dog"),
         ("def add(a, b):", "\n    return a + b"), ("", "Paris is")]


def tiny_model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, context=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharp distributions: no near-ties for the argmax checks
        model.lm_head.weight.mul_(8)
    return model


@torch.inference_mode()
def full_logp(model: Transformer, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def test_score_top_logprobs_are_the_full_softmax_top_k():
    tok = train_bpe(TEXTS, 300)
    model = tiny_model(tok.get_vocab_size())
    eng = Engine(model)
    prompt, conts = [3, 1, 4, 1, 5], [[9, 2, 6, 5], [3]]
    scores = eng.score(prompt, conts, top_logprobs=3)
    for c, s in zip(conts, scores):
        logp = full_logp(model, prompt + c)
        assert len(s.top_logprobs) == len(c)
        for j, top in enumerate(s.top_logprobs):
            row = logp[len(prompt) - 1 + j]
            ids, vals = zip(*top)
            assert ids[0] == row.argmax().item() and list(ids) == row.topk(3).indices.tolist()
            assert max(abs(a - b) for a, b in zip(vals, row.topk(3).values.tolist())) < 1e-5
            # the token's own logprob equals the top-1's exactly when it is the argmax (what is_greedy compares)
            assert (s.token_logprobs[j] == vals[0]) == (c[j] == ids[0])
    assert eng.score(prompt, conts)[0].top_logprobs is None
    with pytest.raises(ScalelabError, match="top_logprobs"):
        eng.score(prompt, conts, top_logprobs=21)


# ---- the harness against a served model -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def served(request, tmp_path_factory):
    """(url, LocalBackend) of a `scalelab serve` subprocess over a tiny GGUF, without and with a BOS."""
    for mod in ("lm_eval", "tenacity", "starlette", "uvicorn", "gguf"):  # tenacity: lm-eval[api]
        pytest.importorskip(mod)
    from scalelab import gguf as G
    from scalelab.backends import LocalBackend

    tok = train_bpe(TEXTS, 300)
    path = tmp_path_factory.mktemp("lm_eval") / f"tiny-{request.param}.gguf"
    bos = dict(bos_id=tok.token_to_id("<|endoftext|>"), add_bos=True) if request.param == "bos" else {}
    G.save_gguf(tiny_model(tok.get_vocab_size()), tok, path, **bos)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", "serve", "--model", str(path), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "server did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        local = LocalBackend(str(path))
        assert local.add_bos == (request.param == "bos")
        yield f"http://127.0.0.1:{port}", local
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def harness(url: str, batch_size: int):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", tokenized_requests=False, batch_size=batch_size,
                             max_length=64, max_retries=1, timeout=30)
    assert lm.tokenizer_backend == "remote"  # found the server's /tokenize: no tokenizer from the Hub
    return lm


def reference(local, context: str, continuation: str) -> tuple[float, bool]:
    """Our loglikelihood (the engine's score) and an independent argmax check on a full forward, on the tokens
    the harness uses: an empty context is the end-of-text token."""
    if not context:
        context = "<|endoftext|>"
    ours = local.score(context, [continuation])[0]
    ctx, cont = local.encode(context), local.tokens(continuation)
    logp = full_logp(local.model, ctx + cont)
    greedy = all(logp[len(ctx) - 1 + j].argmax().item() == t for j, t in enumerate(cont))
    return ours.logprob, greedy


def greedy_pair(local) -> tuple[str, str]:
    """A (context, continuation) whose continuation is the model's greedy next token (one that reads back as
    itself), so the is_greedy=True side is exercised too."""
    for context in ["Paris is the", "The quick brown", "def add(a, b):", "The lazy", "Paris"]:
        ctx = local.encode(context)
        for t in full_logp(local.model, ctx)[-1].topk(1).indices.tolist():
            s = local.tokenizer.decode([t])
            if s and local.tokens(context + s) == local.tokens(context) + [t]:
                return context, s
    pytest.fail("no context whose greedy token reads back as itself")


def test_lm_eval_local_completions_loglikelihood_equals_the_engine(served, monkeypatch):
    from lm_eval.api.instance import Instance

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url, local = served
    pairs = [*PAIRS, greedy_pair(local)]
    want = [reference(local, c, x) for c, x in pairs]
    assert {g for _, g in want} == {True, False}
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
    for batch_size in (1, 3):  # one prompt per request, then batched prompt lists
        got = harness(url, batch_size).loglikelihood(reqs, disable_tqdm=True)
        assert len(got) == len(pairs)
        for (c, x), (lp, greedy), (ref_lp, ref_greedy) in zip(pairs, got, want):
            assert abs(lp - ref_lp) < 1e-4, (c, x, lp, ref_lp)
            assert greedy == ref_greedy, (c, x)


def test_lm_eval_generate_until_is_the_greedy_answer(served, monkeypatch):
    from lm_eval.api.instance import Instance

    from scalelab.engine import SamplingParams

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url, local = served
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 6}), i)
            for i, p in enumerate(["Paris is the", "The quick"])]
    got = harness(url, 2).generate_until(reqs, disable_tqdm=True)
    ref = [local.generate(p, SamplingParams(max_tokens=6, temperature=0, stop=["\n\n", "<|endoftext|>"]))
           .choices[0].text for p in ["Paris is the", "The quick"]]
    assert got == ref
