"""BD3-LM oracles: the 2L mask from the paper's definition, vectorized == two-pass loss, L′=1 full masking ==
AR NLL, KV-cached == uncached sampling; the (β, ω) search; exact resume of a BD3 run; bad inputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, cli, fails, run_cli, tiny_overrides
from scalelab import diffusion as bd
from scalelab.config import ModelConfig
from scalelab.model import KVCache, Transformer


def tiny_model(L=16, vocab=41, dtype=torch.float32, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, context=L, d_model=32, n_layer=2, n_head=4, n_kv_head=2, init_std=0.2)
    return Transformer(cfg).to(dtype).eval()


# ------------------------------------------------------------------------------------------------ mask
def brute_force_mask(L: int, Lb: int) -> torch.Tensor:
    """Written from §3.2 / B.6: x_full = x_t ⊕ x; M_full = [[M_BD, M_OBC], [0, M_BC]]."""
    M = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_noisy, k_noisy = q < L, k < L
            bq, bk = (q % L) // Lb, (k % L) // Lb
            if q_noisy and k_noisy:
                M[q, k] = bq == bk  # M_BD: bidirectional inside the noisy block
            elif q_noisy and not k_noisy:
                M[q, k] = bk < bq  # M_OBC: clean blocks strictly before
            elif not q_noisy and not k_noisy:
                M[q, k] = bk <= bq  # M_BC: block-causal on the clean half
            else:
                M[q, k] = False  # clean never sees noisy
    return M


@pytest.mark.parametrize("L,Lb", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (12, 4), (6, 6), (16, 16)])
def test_mask_equals_brute_force(L, Lb):
    assert torch.equal(bd.block_diff_mask(L, Lb), brute_force_mask(L, Lb))


# ------------------------------------------------------------------------------------------------ loss
def two_pass_logits(model: Transformer, xt: torch.Tensor, x: torch.Tensor, Lb: int) -> torch.Tensor:
    """Alg. 1: a clean block-causal pass fills the KV cache, then each noisy block attends to the cached
    clean blocks before it plus itself."""
    B, L = x.shape
    out = []
    for b in range(L // Lb):
        cache = KVCache(model.cfg, B, L, dtype=next(model.parameters()).dtype)
        if b:
            model(x[:, :b * Lb], mask=bd.block_causal_mask(b * Lb, Lb), cache=cache)
        out.append(model(xt[:, b * Lb:(b + 1) * Lb], positions=torch.arange(b * Lb, (b + 1) * Lb),
                         mask=torch.ones(Lb, (b + 1) * Lb, dtype=torch.bool), cache=cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("Lb", [1, 2, 4, 8, 16])
def test_vectorized_loss_equals_two_pass(Lb):
    model = tiny_model()
    V = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(Lb)
    x = torch.randint(0, V - 1, (3, 16), generator=gen)
    t = bd.sample_t(3, 16 // Lb, 1e-3, 1.0, gen)
    xt, moved = bd.q_xt(x, t, Lb, V - 1, gen)
    assert moved.any() and not moved[:, 0].any()
    with torch.no_grad():
        fast = bd.denoiser_logits(model, xt, x, Lb)
        slow = two_pass_logits(model, xt, x, Lb)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    lf = bd.token_losses(fast, x, t, moved, Lb, V - 1, 1e-3).sum() / (3 * 15)
    ls = bd.token_losses(slow, x, t, moved, Lb, V - 1, 1e-3).sum() / (3 * 15)
    assert abs(lf.item() - ls.item()) < 1e-5


def test_block_size_one_full_masking_equals_ar_nll():
    """L′ = 1, t = 1: every token but position 0 masked, weight 1. The NELBO is then exactly the AR NLL of
    the same weights: token ℓ predicted from the clean x_<ℓ plus a [MASK] at ℓ, i.e. a plain causal forward of
    (x_0 … x_{ℓ−1}, [MASK]) read at its last position."""
    model = tiny_model()
    V, mask = model.cfg.vocab_size, model.cfg.vocab_size - 1
    x = torch.randint(0, V - 1, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = bd.nelbo(model, x, 1, (1.0, 1.0), torch.Generator().manual_seed(0)).item()
        nll = []
        for ell in range(1, 16):
            inp = torch.cat([x[:, :ell], torch.full((2, 1), mask)], dim=1)
            logits = model(inp)[:, -1, :mask]  # default causal attention, SUBS drops [MASK]
            nll.append(F.cross_entropy(logits, x[:, ell], reduction="none"))
    assert abs(loss - torch.stack(nll).mean().item()) < 1e-5


def test_sample_t_is_stratified_and_clipped():
    t = bd.sample_t(4, 8, 0.3, 0.8, torch.Generator().manual_seed(0))
    u = (t.flatten() - 0.3) / 0.5
    assert ((u * 32).floor() == torch.arange(32)).all()  # one draw per stratum, in order
    assert bd.sample_t(2, 3, 1.0, 1.0, torch.Generator()).eq(1).all()


def test_resample_keeps_masked_fraction_inside_the_clip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (64, 32), generator=gen)
    t = bd.sample_t(64, 8, 0.45, 0.95, gen)
    _, moved = bd.q_xt(x, t, 4, 99, gen, (0.45, 0.95), resample=True)
    frac = moved.view(64, 8, 4).float().mean(-1)[:, 1:]  # block 0 holds the never-masked position 0
    assert (frac >= 0.45).all() and (frac <= 0.95).all()


def test_clip_candidates_and_search():
    cands = bd.clip_candidates([0.5, 0.9], 0.05)
    assert cands[0] == (1e-3, 1.0) and (1e-3, 0.5) in cands and (0.5, 1.0) in cands and (0.1, 1.0) in cands
    assert all(hi <= 1.0 and hi - max(lo, 0) <= 0.9 + 1e-9 for lo, hi in cands[1:])
    model = tiny_model()
    x = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    var = bd.clip_variances(model, [(x, x)], 4, [(1e-3, 1.0), (0.5, 1.0)])
    again = bd.clip_variances(model, [(x, x)], 4, [(1e-3, 1.0), (0.5, 1.0)])
    assert var == again and all(v > 0 for v in var)
    assert var[1] < var[0]  # clipping away the small-t (large 1/t) draws lowers the variance


# -------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("Lb,steps,prompt_len", [(4, 4, 1), (4, 2, 3), (8, 3, 5), (16, 4, 1)])
def test_cached_sampling_equals_uncached(Lb, steps, prompt_len):
    model = tiny_model(L=32, dtype=torch.float64)
    prompt = torch.randint(0, 40, (3, prompt_len), generator=torch.Generator().manual_seed(2))
    n = 32 - prompt_len  # within the context (past it the cached path keeps stale keys by design, as [code])
    a = bd.bd3_generate(model, prompt, n, Lb, steps, top_p=0.9, seed=7, use_cache=True)
    b = bd.bd3_generate(model, prompt, n, Lb, steps, top_p=0.9, seed=7, use_cache=False)
    assert a.shape == (3, 32)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :prompt_len], prompt) and (a < 40).all()  # never emits [MASK]


def test_sampling_past_the_context_and_stop():
    model = tiny_model(L=16)
    out = bd.bd3_generate(model, torch.zeros(2, 1, dtype=torch.long), 50, 4, seed=1)
    assert out.shape == (2, 51) and (out < 40).all()
    assert torch.equal(out, bd.bd3_generate(model, torch.zeros(2, 1, dtype=torch.long), 50, 4, seed=1))
    common = torch.bincount(out[:, 1:].flatten()).argmax().item()
    stopped = bd.bd3_generate(model, torch.zeros(2, 1, dtype=torch.long), 200, 4, seed=1, stop_id=common)
    assert stopped.shape[1] < 201 and all((row[1:] == common).any() for row in stopped)
    mdlm = bd.bd3_generate(model, torch.zeros(2, 1, dtype=torch.long), 40, 16, 4, seed=1)  # L′ = context
    assert mdlm.shape == (2, 41) and (mdlm < 40).all()


def test_generative_ppl_of_uniform_scorer():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    # zero weights -> uniform logits over all V ids -> ppl = V exactly
    assert abs(bd.generative_ppl(model, [[0, 5, 6, 7], [0] + list(range(1, 40))], stop_id=0) - 41) < 1e-3


# ------------------------------------------------------------------------------------------------- CLI
BD3 = {"diffusion.block_size": 4, "diffusion.search_batches": 1, "diffusion.search_widths": "0.5,0.9",
       "diffusion.search_delta": 0.25}


@pytest.fixture(scope="module")
def bd3_run(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bd3") / "run"
    run_cli("train", "--quiet", "--out", str(out),
            *tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 20}, **BD3), check=True)
    return out


def test_bd3_run_trains_searches_and_samples(bd3_run):
    rows = [json.loads(x) for x in (bd3_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all("clip_lo" in r and r["clip_var"] <= r["linear_var"] for r in evals)
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    p = run_cli("sample", "--run", str(bd3_run), "--prompt", "def ", "-n", "2", "--max-tokens", "20", check=True)
    assert p.stdout.count("--- sample") == 2
    q = run_cli("sample", "--run", str(bd3_run), "--prompt", "def ", "-n", "2", "--max-tokens", "20",
                "--steps", "2", check=True)
    assert q.stdout.count("def ") >= 2


def test_bd3_resume_after_sigkill_is_bitwise_exact(bd3_run, corpus_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--quiet", "--resume", "--out", str(out),
            *tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 20}, **BD3)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, killed, deadline = out / "metrics.jsonl", False, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()
                 if x.endswith("}")] if metrics.exists() else []
        if steps and max(steps) >= 13:  # past the first (β, ω) search at step 10
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed, "the training finished before it could be killed"
    run_cli(*args, check=True)
    last = lambda d: sorted((d / "checkpoints").glob("step_*"))[-1]  # noqa: E731
    want, got = load_file(str(last(bd3_run) / "model.safetensors")), load_file(str(last(out) / "model.safetensors"))
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert json.loads((last(out) / "state.json").read_text())["diffusion"] == \
        json.loads((last(bd3_run) / "state.json").read_text())["diffusion"]


def test_bd3_bad_inputs_exit_2_with_one_line(bd3_run, corpus_dir, cache_dir, tmp_path):
    cases = [
        ({"diffusion.block_size": 64}, "is longer than model.context"),
        ({"diffusion.block_size": 5}, "must divide model.context"),
        ({"diffusion.block_size": 4, "diffusion.sample_steps": 5}, "diffusion.sample_steps must be in [1, block_size"),
        ({"diffusion.block_size": 4, "diffusion.sample_steps": -1}, "diffusion.sample_steps must be in [1, block_size"),
        ({"diffusion.block_size": 4, "diffusion.clip_lo": 0.9, "diffusion.clip_hi": 0.5}, "clip_lo <= "),
        ({"diffusion.block_size": 4, "diffusion.search_widths": "0.5,x"}, "search_widths"),
        ({"diffusion.block_size": 4, "diffusion.init_from": str(tmp_path)}, "not a run directory"),
    ]
    for extra, msg in cases:
        fails(["train", "--quiet", "--out", tmp_path / "o", *tiny_overrides(corpus_dir, cache_dir, **extra)], msg)
    for args, msg in [(["--mode", "ar"], "is a BD3-LM run"), (["--steps", "0"], "--steps must be in [1, block size"),
                      (["--steps", "5"], "--steps must be in [1, block size"), (["--mode", "x"], "--mode must be")]:
        fails(["sample", "--run", bd3_run, *args], msg)


def test_sampling_an_ar_run_as_bd3_is_refused(corpus_dir, cache_dir, tmp_path):
    out = tmp_path / "ar"
    code, _, err = cli("train", "--quiet", "--out", out,
                       *tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 2, "train.warmup_steps": 1}))
    assert code == 0, err
    for args, msg in [(["--mode", "bd3"], "is an autoregressive run"), (["--steps", "2"], "for BD3-LM runs only")]:
        fails(["sample", "--run", out, *args], msg)
    fails(["train", "--quiet", "--out", tmp_path / "ft",
           *tiny_overrides(corpus_dir, cache_dir, **{"diffusion.block_size": 4, "diffusion.init_from": str(out)})],
          "is an autoregressive run")


def test_sampling_frontier_report_and_plot(tmp_path):
    """The report's speed/quality frontier end to end on tiny models: rows for every sampler and stream count,
    speeds relative to AR measured in the same call, a positive ceiling, and the Markdown/PNG it feeds."""
    from scalelab import config as configmod
    from scalelab.papers import bd3lm as dr

    ar, l16 = tiny_model(L=32, seed=1), tiny_model(L=32, seed=2)
    rows = dr.sampling_frontier(ar, l16, 16, (1, 2), 32, 1, 0, ar)
    assert [(r["n"], r["tokens_per_step"]) for r in rows] == [(n, t) for n in (1, 2) for t in (1, 1, 2, 4)]
    assert all(r["speedup"] > 0 and r["ceiling"] > 0 and r["gen_ppl"] > 1 for r in rows)
    assert [r["speedup"] for r in rows if r["name"] == "AR"] == [1.0, 1.0]
    res = {k: {"nll": 3.0 + i / 10, "se": 0.01, "block": b} for i, (k, b) in
           enumerate([("ar", 0), ("l4", 4), ("l16", 16), ("mdlm", 32)])}
    ppl = {k: math.exp(v["nll"]) for k, v in res.items()}
    dr._plot(tmp_path, res, ppl, 32, rows)
    assert (tmp_path / "bd3lm.png").is_file()
    r = {"res": res, "ppl": ppl, "gen": {k: 100.0 for k in res}, "clips": {}, "frontier": rows, "holds": True,
         "order": ["ar", "l4", "l16", "mdlm"], "ctx": 32, "steps": 10, "pre_steps": 7,
         "cfg": configmod.Config(), "reps": 1, "n_samples": 2, "val_windows": 4}
    measured, text = dr.report_body(r)
    assert "ceiling" in measured and "| 1 | BD3 L′=16 T=4 | 4 |" in text


def test_bd3_order_verdict_over_seeds():
    """The ordering claim per adjacent pair, paired by seed: clear gaps hold, a reversed pair does not hold, a
    gap whose seeds disagree is inconclusive (with the seeds that would separate it), an untrained arm gives
    did not train, and the per-pair verdicts validate as verdicts.json entries."""
    from scalelab.papers import bd3lm as dr
    from scalelab.papers import verdict as V

    order = ["ar", "l4", "l16", "mdlm"]
    ok = {k: False for k in order}
    clear = {"ar": [3.0, 3.02], "l4": [3.2, 3.21], "l16": [3.4, 3.43], "mdlm": [3.6, 3.63]}
    v, parts, pair_v, cis = dr.order_verdicts(clear, order, ok, {"seeds": 2})
    assert v == V.HOLDS and list(pair_v.values()) == [V.HOLDS] * 3 and len(parts) == 3
    assert abs(cis[("ar", "l4")].mean - (-0.195)) < 1e-12  # the paired mean of (3.0-3.2, 3.02-3.21)
    V.validate_verdicts([p.to_json() for p in parts])
    flipped = dict(clear, l16=[3.1, 3.12])  # L′=16 clearly below L′=4
    v, _, pair_v, _ = dr.order_verdicts(flipped, order, ok, {})
    assert pair_v[("l4", "l16")] == V.DOES_NOT_HOLD and v == V.DOES_NOT_HOLD
    noisy = dict(clear, l16=[3.15, 3.3])  # one seed above L′=4, one below
    v, parts, pair_v, _ = dr.order_verdicts(noisy, order, ok, {})
    assert pair_v[("l4", "l16")] == V.INCONCLUSIVE and v == V.INCONCLUSIVE
    assert parts[1].figures["seeds_to_separate"] is None or parts[1].figures["seeds_to_separate"] > 2
    v, _, pair_v, _ = dr.order_verdicts(flipped, order, dict(ok, mdlm=True), {})
    assert v == V.DID_NOT_TRAIN and pair_v[("l16", "mdlm")] == V.DID_NOT_TRAIN
