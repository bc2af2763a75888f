import math

import pytest
import torch

from scalelab.config import ModelConfig
from scalelab.model import (DyT, KVCache, Transformer, apply_rope, dyt_alpha_init, rope_tables,
                            sample_next, sampling_probs)


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context=32, d_model=64, n_layer=2, n_head=4, n_kv_head=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt"])
def test_shapes_and_tying(norm):
    torch.manual_seed(0)
    m = Transformer(cfg(norm=norm))
    x = torch.randint(0, 97, (3, 17))
    assert m(x).shape == (3, 17, 97)
    assert m.lm_head.weight is m.tok_emb.weight
    untied = Transformer(cfg(norm=norm, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_no_biases():
    m = Transformer(cfg(norm="rmsnorm"))
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.bias is None, name


@pytest.mark.parametrize("norm", ["rmsnorm", "dyt"])
def test_causal_masking(norm):
    """Changing tokens at positions >= t must not change logits before t."""
    torch.manual_seed(0)
    m = Transformer(cfg(norm=norm)).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def reference_forward(m: Transformer, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """An independent forward pass: KV heads copied per query head, explicit softmax attention."""
    c = m.cfg
    B, T = idx.shape
    hd = c.d_model // c.n_head
    cos, sin = rope_tables(torch.arange(T), hd, c.rope_theta)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()
    x = m.tok_emb(idx)
    if m.embed_scale is not None:
        x = x * m.embed_scale
    for blk in m.blocks:
        h = blk.attn_norm(x)
        a = blk.attn
        q = a.wq(h).view(B, T, c.n_head, hd).transpose(1, 2)
        k = a.wk(h).view(B, T, c.n_kv_head, hd).transpose(1, 2)
        v = a.wv(h).view(B, T, c.n_kv_head, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.softmax(scores, -1) @ v
        x = x + a.wo(y.transpose(1, 2).reshape(B, T, -1))
        x = x + blk.mlp(blk.mlp_norm(x))
    return m.lm_head(m.norm(x))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt"])
def test_gqa_attention_matches_explicit_reference(norm):
    torch.manual_seed(1)
    m = Transformer(cfg(norm=norm)).eval()
    x = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_forward(m, x), atol=1e-5, rtol=1e-5)


def test_arbitrary_boolean_mask_and_positions():
    """A caller's mask (here: bidirectional within blocks of 4, block-causal across) is honoured exactly."""
    torch.manual_seed(2)
    m = Transformer(cfg()).eval()
    T = 16
    blk = torch.arange(T) // 4
    mask = blk[:, None] >= blk[None, :]
    x = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask=mask), reference_forward(m, x, mask), atol=1e-5, rtol=1e-5)
        # Same tokens twice with shared positions 0..T-1: the second copy, masked to itself, matches the first.
        xx = torch.cat([x, x], 1)
        pos = torch.cat([torch.arange(T), torch.arange(T)])
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        m2 = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
        m2[:T, :T] = causal
        m2[T:, T:] = causal
        out = m(xx, positions=pos, mask=m2)
        torch.testing.assert_close(out[:, T:], m(x), atol=1e-5, rtol=1e-5)


def test_rope_depends_only_on_relative_position():
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(i, j):
        cq, sq = rope_tables(torch.tensor([i]), hd, 10000.0)
        ck, sk = rope_tables(torch.tensor([j]), hd, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)


@pytest.mark.parametrize("norm", ["rmsnorm", "dyt"])
def test_kv_cache_equals_full_recomputation(norm):
    torch.manual_seed(3)
    c = cfg(norm=norm)
    m = Transformer(c).eval()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(c, 2, 32)
        parts = [m(x[:, :10], cache=cache)]  # prefill
        parts += [m(x[:, t:t + 1], cache=cache) for t in range(10, 16)]  # decode one at a time
        parts.append(m(x[:, 16:], cache=cache))  # chunked prefill after decoding
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 24


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0, 0.7, g).item() for _ in range(300)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, 1, 1.0, g).item() for _ in range(50)}
    assert draws == {0}


@pytest.mark.parametrize("top_k,top_p,scale", [(0, 0.7, 1.5), (0, 0.95, 0.3), (6, 0.8, 1.0), (5, 1.0, 2.0)])
def test_sampling_follows_the_sorted_nucleus(top_k, top_p, scale):
    """Oracle: the textbook filter (sort the vocabulary, keep the smallest prefix with mass ≥ top_p)."""
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(2, 24, generator=g, dtype=torch.float64) * scale
    x = logits / 0.7
    if top_k:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    p = torch.softmax(x, -1)
    sp, order = p.sort(-1, descending=True)
    sp = sp.masked_fill(sp.cumsum(-1) - sp > top_p, 0.0)
    ref = torch.zeros_like(p).scatter(-1, order, sp)
    ref /= ref.sum(-1, keepdim=True)
    got = sampling_probs(logits, 0.7, top_k, top_p).double()
    assert torch.allclose(got / got.sum(-1, keepdim=True), ref, atol=1e-6)
    n = 40_000
    draws = sample_next(logits.repeat(n, 1), 0.7, top_k, top_p, g).view(n, 2)
    for r in range(2):
        freq = torch.bincount(draws[:, r], minlength=24).double() / n
        assert bool((freq[ref[r] == 0] == 0).all())  # never outside the nucleus
        assert (freq - ref[r]).abs().max() < 0.012  # 4.8 standard errors at p = 0.5


def test_dyt_alpha_table_and_interpolation():
    assert dyt_alpha_init(1024) == (1.0, 1.0)
    assert dyt_alpha_init(2048) == (1.0, 0.5)
    assert dyt_alpha_init(4096) == (0.8, 0.2)
    assert dyt_alpha_init(8192) == (0.2, 0.05)
    assert dyt_alpha_init(128) == (1.0, 1.0)  # below the table: held at the smallest entry
    assert dyt_alpha_init(16384) == (0.2, 0.05)
    a, o = dyt_alpha_init(5120)  # LLaMA 13B, Table 11: 0.6 / 0.15
    assert a == pytest.approx(0.6, abs=0.01) and o == pytest.approx(0.15, abs=0.01)


def test_dyt_replaces_every_norm_with_right_init():
    c = cfg(norm="dyt", d_model=64)
    m = Transformer(c)
    dyts = [mod for mod in m.modules() if isinstance(mod, DyT)]
    assert len(dyts) == 2 * c.n_layer + 1
    assert not any(isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)) for mod in m.modules())
    for blk in m.blocks:
        assert blk.attn_norm.alpha.shape == (1,) and blk.attn_norm.alpha.item() == 1.0
    assert m.embed_scale.item() == pytest.approx(8.0)
    wide = Transformer(cfg(norm="dyt", d_model=4096, n_head=32, n_kv_head=8, n_layer=1, vocab_size=8))
    assert wide.blocks[0].attn_norm.alpha.item() == pytest.approx(0.8)
    assert wide.blocks[0].mlp_norm.alpha.item() == pytest.approx(0.2)
    assert wide.norm.alpha.item() == pytest.approx(0.2)
    custom = Transformer(cfg(norm="dyt", dyt_alpha_attn=0.3, dyt_alpha_other=0.7))
    assert custom.blocks[1].attn_norm.alpha.item() == pytest.approx(0.3)
    assert custom.norm.alpha.item() == pytest.approx(0.7)


def test_dyt_formula():
    d = DyT(8, 0.7)
    with torch.no_grad():
        d.weight.copy_(torch.linspace(0.5, 2, 8))
        d.bias.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(d(x), d.weight * torch.tanh(0.7 * x) + d.bias)
    assert sum(p.numel() for p in d.parameters()) == 1 + 8 + 8


def test_flops_per_token_counts_matmuls():
    c = cfg(n_layer=1, d_model=64, n_head=4, n_kv_head=4, ffn_hidden=128)
    m = Transformer(c)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128  # q,k,v,o + gate,up,down
    head = 64 * 97
    assert m.flops_per_token(32) == 6 * (per_layer + head + 3 * 64) + 6 * 1 * 32 * 64  # + norm weights


def test_norm_probe_against_a_manual_forward():
    """Oracle: the residual stream computed block by block by hand, then its RMS and DyT's saturated share."""
    from scalelab.model import norm_probe

    torch.manual_seed(3)
    m = Transformer(cfg(norm="dyt")).eval()
    x = torch.randint(0, 97, (2, 12))
    p = norm_probe(m, x)
    assert [r["name"] for r in p["layers"]] == ["blocks.0.attn_norm", "blocks.0.mlp_norm", "blocks.1.attn_norm",
                                                "blocks.1.mlp_norm", "final"]
    with torch.no_grad():
        h = m.tok_emb(x) * m.embed_scale
        cos, sin = rope_tables(torch.arange(12), 64 // 4, m.cfg.rope_theta)
        for b in m.blocks:
            h = b(h, cos, sin, None, None, 0)
    assert abs(p["final_rms"] - float(h.pow(2).mean().sqrt())) < 1e-5
    assert abs(p["final_saturated"] - float((m.norm.alpha * h).abs().gt(2).float().mean())) < 1e-9
    with torch.no_grad():
        m.norm.alpha.fill_(1e6)  # every nonzero input saturates
    assert norm_probe(m, x)["final_saturated"] == 1.0
    r = norm_probe(Transformer(cfg(norm="rmsnorm", final_norm="dyt")).eval(), x)
    assert r["layers"][0]["saturated"] is None and r["final_saturated"] is not None  # the final norm is DyT


def test_final_norm_override():
    m = Transformer(cfg(norm="dyt", final_norm="rmsnorm"))
    assert isinstance(m.norm, torch.nn.RMSNorm) and isinstance(m.blocks[0].attn_norm, DyT)
    assert m.embed_scale is not None  # DyT everywhere else keeps its embedding scale
