"""Engine contracts: KV-cache decoding equals full recomputation, shared-prefix sampling equals independent
sampling with the same seeds, prefix cache reuse, logprobs and continuation scores equal a full forward's
log-softmax, stop ids/strings, token accounting, bad parameters."""

import pytest
import torch

from scalelab.config import ModelConfig
from scalelab.engine import Engine, SamplingParams, _safe_text_end, sample_seed
from scalelab.errors import ScalelabError
from scalelab.model import Transformer, sample_next
from scalelab.tokenizer import train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.getcwd())\n", "Paris is the capital of France."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context=96, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      tie_embeddings=False)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # sharper distributions than N(0, 0.02) weights give, so greedy has no near-ties
        m.lm_head.weight.mul_(8)
    return m


def full_logp(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).float(), -1)[0]


def test_kv_decode_equals_full_recomputation(model):
    eng = Engine(model, prefix_cache=0)
    prompt = [5, 17, 42, 7, 99, 3]
    c = eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, logprobs=True)).completions[0]
    seq = list(prompt)
    for t, lp in zip(c.tokens, c.logprobs):
        logp = full_logp(model, seq)[-1]
        assert t == int(logp.argmax())
        assert abs(lp - logp[t].item()) < 1e-4
        seq.append(t)
    assert len(c.tokens) == 40 and c.finish_reason == "length"


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.9)])
def test_shared_prefix_sampling_equals_independent(model, top_k, top_p):
    prompt = [11, 12, 13, 14, 15, 16, 17]
    # frequent stop ids make rows finish at different steps, which exercises dropping finished rows
    params = dict(max_tokens=25, temperature=1.0, top_k=top_k, top_p=top_p, logprobs=True,
                  stop_ids=list(range(0, 300, 12)))
    batch = Engine(model).generate(prompt, SamplingParams(n=8, seed=123, **params))
    lengths = {len(c.tokens) for c in batch.completions}
    assert len(lengths) > 1
    for i, c in enumerate(batch.completions):
        alone = Engine(model, prefix_cache=0).generate(
            prompt, SamplingParams(n=1, seed=sample_seed(123, i), **params)).completions[0]
        assert c.tokens == alone.tokens and c.finish_reason == alone.finish_reason
        assert max(abs(a - b) for a, b in zip(c.logprobs, alone.logprobs)) < 1e-4
    assert sample_seed(123, 0) == 123
    again = Engine(model).generate(prompt, SamplingParams(n=8, seed=123, **params))
    assert [c.tokens for c in again.completions] == [c.tokens for c in batch.completions]


def test_prefix_cache_reuse(model):
    eng = Engine(model, prefix_cache=4)
    fresh = Engine(model, prefix_cache=0)
    base = list(range(20, 50))
    p = SamplingParams(max_tokens=12, temperature=0, logprobs=True)
    first = eng.generate(base, p)
    assert first.cached_tokens == 0
    longer = base + [7, 8, 9]
    second = eng.generate(longer, p)
    assert second.cached_tokens == len(base)
    ref = fresh.generate(longer, p)
    assert second.completions[0].tokens == ref.completions[0].tokens
    assert max(abs(a - b) for a, b in zip(second.completions[0].logprobs, ref.completions[0].logprobs)) < 1e-4
    same = eng.generate(base, p)  # the same prompt again: all but its last token come from the cache
    assert same.cached_tokens == len(base) - 1
    assert same.completions[0].tokens == first.completions[0].tokens


def test_score_equals_full_forward(model):
    eng = Engine(model)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    conts = [[5], [3, 5, 8, 9, 7], [9, 3], [2, 3, 8, 4, 6, 2, 6, 4]]
    for _ in range(2):  # cold, then with the prompt in the prefix cache
        scores = eng.score(prompt, conts)
        for c, s in zip(conts, scores):
            logp = full_logp(model, prompt + c)
            ref = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(c)]
            assert abs(s.logprob - sum(ref)) < 1e-4
            assert all(abs(a - b) < 1e-5 for a, b in zip(s.token_logprobs, ref))
    one = eng.score([7], [[1, 2]])[0]  # a one-token prompt has no shared prefix to prefill
    logp = full_logp(model, [7, 1, 2])
    assert abs(one.logprob - (logp[0, 1] + logp[1, 2]).item()) < 1e-4


def test_stop_strings_streaming_and_accounting(model, tok):
    decode = tok.decode
    eng = Engine(model, decode=decode)
    prompt = tok.encode("def add(a, b):").ids
    free = eng.generate(prompt, SamplingParams(max_tokens=30, temperature=0)).completions[0]
    assert free.text == decode(free.tokens)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert stop and stop in free.text
    p = SamplingParams(n=3, max_tokens=30, temperature=0, stop=[stop])
    g = eng.generate(prompt, p)
    for c in g.completions:
        assert c.text == free.text[:free.text.index(stop)] and c.finish_reason == "stop"
    streamed = [""] * 3
    finished = [None] * 3
    for deltas in eng.stream(prompt, p):
        for d in deltas:
            streamed[d.index] += d.text
            finished[d.index] = d.finish_reason or finished[d.index]
    assert streamed == [c.text for c in g.completions] and finished == ["stop"] * 3
    assert g.prompt_tokens == len(prompt)
    assert g.completion_tokens == sum(len(c.tokens) for c in g.completions)
    first = free.tokens[0]  # a stop id that is sampled at once: no tokens, counted as one completion token
    s = eng.generate(prompt, SamplingParams(n=2, max_tokens=5, temperature=0, stop_ids=[first]))
    assert [c.tokens for c in s.completions] == [[], []] and s.completion_tokens == 2
    assert all(c.finish_reason == "stop" for c in s.completions)


def test_text_decoded_once_equals_streamed_text(model, tok):
    """detokenize=False (answers read whole) gives the same tokens, text and finish reasons as per-step text
    deltas; with stop strings it is refused (they need the text)."""
    eng = Engine(model, decode=tok.decode)
    prompt = tok.encode("Paris is").ids
    for temperature in (0.0, 1.0):
        p = SamplingParams(n=4, max_tokens=25, temperature=temperature, seed=3)
        streamed = eng.generate(prompt, p).completions
        once = eng.generate(prompt, SamplingParams(**{**p.__dict__, "detokenize": False})).completions
        assert [(c.tokens, c.text, c.finish_reason) for c in once] == \
            [(c.tokens, c.text, c.finish_reason) for c in streamed]
        assert all(c.text for c in once)
    deltas = [d for ds in eng.stream(prompt, SamplingParams(max_tokens=5, detokenize=False)) for d in ds]
    assert len(deltas) == 5 and all(d.text == "" for d in deltas)
    with pytest.raises(ScalelabError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False).validate()


def test_safe_text_end():
    assert _safe_text_end("hello wor", ["world"]) == 6
    assert _safe_text_end("hello", ["xyz"]) == 5
    assert _safe_text_end("ab\ufffd", []) == 2


def test_context_and_bad_params(model):
    eng = Engine(model)
    with pytest.raises(ScalelabError, match="context is 96"):
        eng.generate(list(range(1, 97)), SamplingParams())
    with pytest.raises(ScalelabError, match="empty"):
        eng.generate([], SamplingParams())
    with pytest.raises(ScalelabError, match="outside the vocabulary"):
        eng.generate([10 ** 6], SamplingParams())
    g = eng.generate(list(range(1, 91)), SamplingParams(max_tokens=50, temperature=0))
    assert len(g.completions[0].tokens) == 6 and g.completions[0].finish_reason == "length"  # capped at context
    for bad in [dict(n=0), dict(max_tokens=0), dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                dict(top_p=1.5), dict(top_k=-1), dict(top_logprobs=21), dict(seed=1.5), dict(stop=[""])]:
        with pytest.raises(ScalelabError):
            eng.generate([1, 2], SamplingParams(**bad))
    with pytest.raises(ScalelabError, match="decode callback"):
        eng.generate([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ScalelabError):
        eng.score([1, 2], [[]])


def test_top_logprobs(model):
    eng = Engine(model)
    c = eng.generate([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, top_logprobs=5)).completions[0]
    logp = full_logp(model, [1, 2, 3])[-1]
    ids, vals = zip(*c.top_logprobs[0])
    assert list(ids) == logp.topk(5).indices.tolist()
    assert ids[0] == c.tokens[0] and abs(vals[0] - logp.max().item()) < 1e-5


# ---- the one sampling path: the engine against a plain loop (these replace model.generate's tests) ----------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_equals_a_plain_loop_without_cache(model, temperature):
    """Oracle: per sample, a full forward over the whole sequence at every step, then the same token draw with
    the sample's own generator. The engine (shared prefill, KV cache, batched rows) must give the same tokens."""
    prompt, n, steps = [7, 8, 9, 10, 11], 3, 20
    params = SamplingParams(n=n, max_tokens=steps, temperature=temperature, top_k=20, top_p=0.9, seed=7)
    got = Engine(model, prefix_cache=0).generate(prompt, params).completions
    for i, c in enumerate(got):
        gen = torch.Generator().manual_seed(sample_seed(7, i))
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                logits = model(torch.tensor([seq]))[:, -1]
                seq.append(int(sample_next(logits, temperature, 20, 0.9, [gen])[0]))
        assert c.tokens == seq[len(prompt):] and c.finish_reason == "length"


def test_generation_past_context_slides_window(model):
    eng = Engine(model, prefix_cache=0)
    ctx = model.cfg.context
    prompt = list(range(1, 11))
    long = eng.generate(prompt, SamplingParams(max_tokens=3 * ctx, temperature=1.0, seed=0, slide=True))
    assert len(long.completions[0].tokens) == 3 * ctx  # past the context, as a sliding window
    short = eng.generate(prompt, SamplingParams(max_tokens=3 * ctx, temperature=1.0, seed=0))
    assert len(short.completions[0].tokens) == ctx - len(prompt) and short.completions[0].finish_reason == "length"
    assert long.completions[0].tokens[:ctx - len(prompt)] == short.completions[0].tokens  # same until the slide
    # after a slide the next token is the model's own prediction from the last context/2 tokens
    greedy = eng.generate(prompt, SamplingParams(max_tokens=ctx, temperature=0, slide=True)).completions[0].tokens
    seq, P = prompt + greedy, len(prompt)
    cut = ctx - P  # token `cut` fills the context; token cut + 1 is the first decoded from the rebuilt cache
    with torch.no_grad():
        assert greedy[cut] == int(model(torch.tensor([seq[:P + cut]]))[0, -1].argmax())
        for t in (cut + 1, cut + 2):  # the window: the last context/2 tokens at the rebuild, then growing
            window = seq[P + cut + 1 - ctx // 2:P + t]
            assert greedy[t] == int(model(torch.tensor([window]))[0, -1].argmax())


def test_stop_id_ends_rows(model):
    with torch.no_grad():
        first = model(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()
    c = Engine(model, stop_ids=[first]).generate([1, 2, 3], SamplingParams(max_tokens=10, temperature=0)).completions[0]
    assert c.tokens == [] and c.finish_reason == "stop"


def test_continuous_batch_matches_each_request_alone():
    """Requests that join a shared batch at different steps (shorter and longer prompts than the rows already
    there, so the cache is realigned, compacted and grown), and one removed midway, give each request exactly
    the tokens it gives alone (per-sample seeds), with logprobs equal to float rounding."""
    import random

    from scalelab.engine import Batch, Collector

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, context=128, d_model=64, n_layer=2, n_head=4, n_kv_head=2, tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    e = Engine(model, stop_ids=[5])
    rng = random.Random(0)
    reqs = []
    for i in range(8):
        P = rng.choice([1, 3, 20, 90]) + rng.randint(0, 5)
        reqs.append(([rng.randrange(300) for _ in range(P)],
                     SamplingParams(n=rng.randint(1, 3), max_tokens=rng.randint(5, 40), temperature=rng.choice([0, 1.0]),
                                    seed=i, logprobs=True, top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]))))
    alone = [e.generate(p, sp) for p, sp in reqs]
    batch, got, handles = Batch(e), {}, {}
    joins = {0: [0, 1], 2: [2], 5: [3, 4], 9: [5, 6], 30: [7]}
    for step in range(300):
        for i in joins.get(step, []):
            handles[batch.add(*reqs[i])] = i
            got[i] = Collector(reqs[i][1], set(e.stop_ids))
        if step == 12:
            victim = next(h for h, i in handles.items() if i == 5)
            batch.remove(victim)
        if not len(batch) and step > 30:
            break
        for h, deltas in batch.step().items():
            got[handles[h]].add(deltas)
    assert not len(batch)
    for i in range(8):
        if i == 5:
            continue
        g = got[i].result(len(reqs[i][0]), 0)
        assert [c.tokens for c in g.completions] == [c.tokens for c in alone[i].completions], i
        assert [c.finish_reason for c in g.completions] == [c.finish_reason for c in alone[i].completions]
        for a, b in zip(g.completions, alone[i].completions):
            assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0) < 1e-4
