"""BD3-LM: block diffusion language models on the lab's one Transformer.

Implements Arriola et al., "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language
Models" (ICLR 2025), from ../shared/papers/block-diffusion-and-dyt.md Part A (paper sections and the authors'
code `kuleshov-group/bd3lms`, cited below as [code]).

- Noise (§4.1): absorbing [MASK] state, linear schedule, mask probability t. The [MASK] id is the tokenizer's
  vocabulary size V, so a BD3 model has V + 1 embeddings (`model.vocab_size` = V + 1), as [code] does for
  GPT-2 (50257 → 50258). SUBS (Suppl. B.3): the [MASK] logit is dropped (the model never predicts [MASK])
  and unmasked tokens are carried over, so they add nothing to the loss.
- Objective (Eq. 8): Σ_b E_t[1/t · Σ_{masked ℓ ∈ b} −log pθ(x^ℓ | x_t^b, x^{<b})] with one t per (sequence,
  block) from the stratified sampler (Suppl. C.4), divided by the number of scored tokens: a per-token NELBO
  with unmasked tokens in the denominator, as [code] reports it. Position 0 of every window is never masked
  and never scored ([code]'s `ignore_bos`): it plays the BOS, and an AR model scored on the same window
  (`ar_nll`) predicts exactly the same L − 1 tokens, so the two numbers compare like for like.
- Vectorized training (§3.2, Suppl. B.6): one forward over x_t ⊕ x (2L tokens) with
  M_full = [[M_BD, M_OBC], [0, M_BC]], both halves at rotary positions 0..L−1, logits for the noisy half only.
  For L′ = L (MDLM) no clean block precedes the single block, so the clean half is skipped (same logits).
- Clipped schedules (§5.2): training mask rates t ~ U[β, ω] with the weight kept at 1/t of the clipped rate
  ([code] does not use a constant 1/(ω−β)), plus [code]'s resampling of blocks whose masked fraction falls
  outside [β, ω]. The data-driven search (§5.3) picks the (β, ω) on [code]'s grid that minimises the variance
  of the per-block loss summed over validation batches. Evaluation always uses U[0.001, 1]: that NELBO is the
  reported upper bound on the NLL ("ppl ≤").
- Sampling (Alg. 2, Suppl. C.5): block by block with a KV cache over clean blocks; inside a block, T denoising
  steps, each unmasking a fixed share of the still-masked positions chosen uniformly at random and sampled
  from pθ with top-p. T = L′ is the first-hitting sampler (one token per step, [code]'s default); T < L′
  unmasks L′/T tokens per step. Stops at end-of-text; past the context the cache slides left one block at a
  time, as in [code] (cached clean blocks keep the keys they were computed with).

Deliberately different from [code], and why:
- The noise for a training step is drawn from a generator seeded by (seed, step, micro-batch), so a resumed
  run redraws exactly the same masks (the trainer's exact-resume guarantee) with no extra checkpoint state.
- The (β, ω) search scores every candidate on the same noise draws (common random numbers), so candidates
  differ only by their interval, not by luck; [code] draws fresh noise per candidate.
- For T < L′ the sampler unmasks an exact count per step (L′/T) instead of [code]'s DDPM update, whose count
  is random with the same mean; the number of model calls per block is then exactly T, which is what the
  speed/quality benchmark needs. T = L′ is the paper's sampler exactly.
- No adaLN / time conditioning: BD3-LM runs with `time_conditioning=False` anyway (Suppl. C.2), so the lab's
  plain Transformer is the same function class (minus the learned constant conditioning vector).
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scalelab.config import Config, parse_widths
from scalelab.errors import CheckpointError, ScalelabError
from scalelab.model import KVCache, Transformer, sample_next

EVAL_CLIP = (1e-3, 1.0)  # the unclipped linear schedule: evaluation always uses it ([code] "elbo" interval)
MAX_RESAMPLE = 100  # cap on [code]'s re-masking loop (some (L′, β, ω) admit no masked fraction inside [β, ω])


def mask_id_of(model: Transformer) -> int:
    """The [MASK] id: the last row of a BD3 model's embedding (tokenizer vocabulary size V)."""
    return model.cfg.vocab_size - 1


def noise_generator(*key: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a hash of `key` (e.g. seed, step, micro-batch): noise that resume can redraw."""
    h = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


# ------------------------------------------------------------------------------------------------ masks
def block_diff_mask(L: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """M_full for x_t ⊕ x (§3.2, Suppl. B.6; [code] `block_diff_mask`): (2L, 2L) bool, True = may attend.

    Query/key i in [0, 2L): the clean-half flag is i ≥ L, the block is (i − L·flag) // L′.
    M_BD: same block and same half; M_OBC: noisy query, clean key in a strictly earlier block;
    M_BC: clean query and key, key block ≤ query block. Clean queries never see noisy keys.
    """
    return _block_diff_mask(L, block_size, str(device or "cpu"))


@functools.lru_cache(maxsize=32)
def _block_diff_mask(L: int, block_size: int, device: str) -> torch.Tensor:
    idx = torch.arange(2 * L, device=device)
    clean = idx >= L
    blk = (idx - L * clean.long()) // block_size
    qc, kc, qb, kb = clean[:, None], clean[None, :], blk[:, None], blk[None, :]
    bd = (qb == kb) & (qc == kc)
    obc = (qb > kb) & ~qc & kc
    bc = (qb >= kb) & qc & kc
    return bd | obc | bc


def block_causal_mask(n: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """M_BC for n clean tokens whose blocks start at 0: (n, n) bool, key block ≤ query block."""
    blk = torch.arange(n, device=device) // block_size
    return blk[None, :] <= blk[:, None]


# --------------------------------------------------------------------------------------- noise and loss
def sample_t(batch: int, n_blocks: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """One mask rate per (sequence, block) -> (batch, n_blocks) (Suppl. C.4; [code] `_sample_t`).

    Stratified ("antithetic") draw: entry k of the n = batch·n_blocks entries falls in stratum [k/n, (k+1)/n),
    then is mapped linearly to [lo, hi]. lo = hi = 1 is full masking.
    """
    n = batch * n_blocks
    u = torch.rand(batch, n_blocks, generator=gen, device=gen.device)
    offset = torch.arange(n, device=gen.device).view(batch, n_blocks) / n
    u = (u / n + offset) % 1
    if lo >= 1:
        return torch.ones_like(u)
    return lo + (hi - lo) * u


def q_xt(x: torch.Tensor, t: torch.Tensor, block_size: int, mask_id: int, gen: torch.Generator,
         clip: tuple[float, float] = EVAL_CLIP, resample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing forward process: each token becomes [MASK] with probability t of its block.

    x: (B, L) clean ids; t: (B, L/L′) rates -> (x_t (B, L), moved (B, L) bool). Position 0 is never masked.
    With `resample`, blocks whose masked fraction is outside [β, ω] are redrawn ([code] `_resample_q_xt`): only
    the bounds that are not the defaults (β = 0.001, ω = 1) are enforced, at most MAX_RESAMPLE times.
    """
    B, L = x.shape
    nb = L // block_size
    t_tok = t.repeat_interleave(block_size, dim=1)  # (B, L)
    moved = torch.rand(B, L, generator=gen, device=gen.device) < t_tok
    moved[:, 0] = False
    lo, hi = clip
    check_lo, check_hi = lo > EVAL_CLIP[0], hi < 1.0
    if resample and (check_lo or check_hi):
        for _ in range(MAX_RESAMPLE):
            frac = moved.view(B, nb, block_size).float().mean(-1)
            bad = torch.zeros_like(frac, dtype=torch.bool)
            if check_lo:
                bad |= frac < lo - 1e-9
            if check_hi:
                bad |= frac > hi + 1e-9
            if not bool(bad.any()):
                break
            redo = bad.repeat_interleave(block_size, dim=1)
            fresh = torch.rand(B, L, generator=gen, device=gen.device) < t_tok
            fresh[:, 0] = False
            moved = torch.where(redo, fresh, moved)
    return torch.where(moved, torch.full_like(x, mask_id), x), moved


def denoiser_logits(model: Transformer, xt: torch.Tensor, x: torch.Tensor, block_size: int) -> torch.Tensor:
    """xθ(x_t^b, x^{<b}) for every block in one vectorized pass (§3.2). xt, x: (B, L) -> logits (B, L, V)."""
    L = x.shape[1]
    if block_size == L:  # MDLM: one bidirectional block, no clean context
        return model(xt, mask=torch.ones(L, L, dtype=torch.bool, device=x.device))
    pos = torch.arange(L, device=x.device).repeat(2)  # both halves at positions 0..L−1
    return model(torch.cat([xt, x], dim=1), positions=pos, mask=block_diff_mask(L, block_size, x.device),
                 head_slice=slice(0, L))


def subs_nll(logits: torch.Tensor, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """−log pθ(x) under SUBS (the [MASK] logit removed). logits: (B, L, V), x: (B, L) -> (B, L) nats."""
    assert mask_id == logits.size(-1) - 1, "the [MASK] id must be the last vocabulary entry"
    lg = logits[..., :mask_id].float()
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)), x.reshape(-1), reduction="none").view_as(x)


def token_losses(logits: torch.Tensor, x: torch.Tensor, t: torch.Tensor, moved: torch.Tensor,
                 block_size: int, mask_id: int, lo: float) -> torch.Tensor:
    """Per-token NELBO terms (Eq. 8, linear schedule): 1/t · −log pθ(x^ℓ) at masked tokens, 0 elsewhere.

    [code] forces the weight to 1 when β > 0.5 (only the full-masking L′ = 1 case in practice). -> (B, L).
    """
    w = torch.ones_like(t) if lo > 0.5 else 1.0 / t
    w_tok = w.repeat_interleave(block_size, dim=1)
    return torch.where(moved, subs_nll(logits, x, mask_id) * w_tok, torch.zeros_like(w_tok))


def nelbo_terms(model: torch.nn.Module, x: torch.Tensor, block_size: int, clip: tuple[float, float],
                gen: torch.Generator, resample: bool = False, mask_id: int | None = None) -> torch.Tensor:
    """Draw t and x_t, run the vectorized pass, return the per-token terms (B, L) (position 0 is 0).

    `model` may be a wrapper (compiled, DDP) when `mask_id` is given."""
    B, L = x.shape
    mask_id = mask_id_of(model) if mask_id is None else mask_id
    t = sample_t(B, L // block_size, clip[0], clip[1], gen)
    xt, moved = q_xt(x, t, block_size, mask_id, gen, clip, resample)
    return token_losses(denoiser_logits(model, xt, x, block_size), x, t, moved, block_size, mask_id, clip[0])


def nelbo(model: torch.nn.Module, x: torch.Tensor, block_size: int, clip: tuple[float, float],
          gen: torch.Generator, resample: bool = False, mask_id: int | None = None) -> torch.Tensor:
    """The per-token NELBO (nats) of a batch x: (B, L): sum of the terms over the L − 1 scored tokens."""
    terms = nelbo_terms(model, x, block_size, clip, gen, resample, mask_id)
    return terms.sum() / (x.shape[0] * (x.shape[1] - 1))


@torch.no_grad()
def evaluate_nelbo(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                   repeats: int = 1, seed: int = 0) -> float:
    """Mean per-token NELBO over fixed validation batches with the full U[0.001, 1] range and fixed noise.

    An upper bound on the NLL per token; exp() of it is the reported "ppl ≤". `repeats` averages independent
    noise draws (the estimator's variance is what the clipped schedules fight).
    """
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    vals = [nelbo(model, x.to(dev), block_size, EVAL_CLIP, noise_generator(seed, "eval", r, i, device=dev)).item()
            for r in range(repeats) for i, (x, _) in enumerate(batches)]
    model.train(was)
    return sum(vals) / len(vals)


@torch.no_grad()
def ar_nll(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """An AR model's NLL per token on exactly the tokens a BD3 NELBO scores: x[1:] of each window given x[0:]."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    vals = []
    for x, _ in batches:
        x = x.to(dev)
        logits = model(x)[:, :-1].float()
        vals.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).item())
    model.train(was)
    return sum(vals) / len(vals)


# ------------------------------------------------------------------------------- clipped schedule search
def clip_candidates(widths: list[float], delta: float) -> list[tuple[float, float]]:
    """[code]'s grid: for each width w, β = 0, δ, …, 1 − w (clamped to ≥ 0.001), ω = β + w; plus (0.001, 1)."""
    out = [EVAL_CLIP]
    for w in widths:
        for i in range(int(math.floor((1 - w) / delta + 1e-9)) + 1):
            lo = round(i * delta, 6)
            cand = (max(lo, EVAL_CLIP[0]), min(round(lo + w, 6), 1.0))
            if cand not in out:
                out.append(cand)
    return out


@torch.no_grad()
def clip_variances(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                   candidates: list[tuple[float, float]], key: Any = 0, resample: bool = True) -> list[float]:
    """For each (β, ω): Σ over batches of Var[per-block mean loss] (§5.3; [code] `_clipped_schedule_search`).

    The per-block statistic is the token terms reshaped to (B, L/L′, L′) and averaged over L′; the variance
    is over all its entries in a batch. Every candidate sees the same noise (common random numbers).
    """
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for clip in candidates:
        total = 0.0
        for i, (x, _) in enumerate(batches):
            x = x.to(dev)
            terms = nelbo_terms(model, x, block_size, clip, noise_generator(key, "search", i, device=dev),
                                resample)
            total += terms.view(x.shape[0], -1, block_size).mean(-1).var().item()
        out.append(total)
    model.train(was)
    return out


# ------------------------------------------------------------------------------------------ trainer hook
class BD3Objective:
    """What the trainer calls when `diffusion.block_size > 0`: the loss, the evaluation, the (β, ω) search.

    Its only state is the current clip interval, saved in every checkpoint (`state()` / `load_state()`).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.block_size = cfg.diffusion.block_size
        self.clip = (cfg.diffusion.clip_lo, cfg.diffusion.clip_hi)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        gen = noise_generator(self.cfg.train.seed, step, micro, device=x.device)
        return nelbo(model, x, self.block_size, self.clip, gen, self.cfg.diffusion.resample,
                     mask_id=self.cfg.model.vocab_size - 1)

    def evaluate(self, model: Transformer, batches: list) -> float:
        return evaluate_nelbo(model, batches, self.block_size)

    def search(self, model: Transformer, batches: list, step: int) -> dict | None:
        """Run the (β, ω) search if due at this step; adopt the winner; return a metrics record."""
        d = self.cfg.diffusion
        if not d.clip_search or step < d.search_after:
            return None
        n = d.search_batches or len(batches)
        cands = clip_candidates(parse_widths(d.search_widths), d.search_delta)
        var = clip_variances(model, batches[:n], self.block_size, cands, (self.cfg.train.seed, step), d.resample)
        best = min(range(len(cands)), key=var.__getitem__)
        self.clip = cands[best]
        return {"step": step, "clip_lo": self.clip[0], "clip_hi": self.clip[1], "clip_var": var[best],
                "linear_var": var[0], "candidates": len(cands)}

    def state(self) -> dict:
        return {"clip": list(self.clip)}

    def load_state(self, s: dict | None) -> None:
        if s:
            self.clip = (float(s["clip"][0]), float(s["clip"][1]))

    def init_weights(self, model: Transformer) -> None:
        """Start from another BD3/MDLM run's newest weights (the paper's MDLM pre-train → BD3 fine-tune, §6)."""
        src = self.cfg.diffusion.init_from
        if not src:
            return
        from scalelab import checkpoint
        from scalelab import config as configmod

        src_dir = Path(src)
        if not (src_dir / "config.toml").is_file():
            raise ScalelabError(f"diffusion.init_from: {src_dir} is not a run directory (no config.toml)")
        if not configmod.load(src_dir / "config.toml").diffusion.block_size:
            raise ScalelabError(f"diffusion.init_from: {src_dir} is an autoregressive run; start from a BD3/MDLM "
                                "run (its vocabulary has the [MASK] token)")
        ck = checkpoint.latest(src_dir / "checkpoints")
        if ck is None:
            raise CheckpointError(f"diffusion.init_from: run {src_dir} has no checkpoint yet")
        checkpoint.load_weights(ck, model)


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def bd3_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, block_size: int, steps: int = 0,
                 temperature: float = 1.0, top_p: float = 0.9, seed: int = 0, stop_id: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
    """Block-by-block sampling (Alg. 2). prompt: (B, P ≥ 1) -> (B, P + n) ids, n ≤ max_new_tokens.

    Blocks are aligned to multiples of L′ from the start of the sequence, as in training; a prompt that ends
    mid-block leaves its tail as the clean part of the first block. Each block starts fully masked and takes
    `steps` (T, default L′) denoising steps; step i unmasks the masked positions down to ⌊M·(T−i−1)/T⌋ left,
    chosen uniformly, each sampled from pθ (top-p). With the cache, each step runs only the current block
    against the cached clean blocks; a finished block enters the cache in the next block's first forward
    ([finished ‖ noisy], the finished half blind to the noisy one), so a block costs T forwards, not T + 1.
    Without the cache, every step runs the whole window under the block-causal mask. Generation ends when every row has produced
    `stop_id` or after max_new_tokens; the window slides one block at a time past the context.
    """
    # prompt: (B, P); seq: (B, n_blocks·L′)
    if block_size < 1 or model.cfg.context % block_size:
        raise ScalelabError(f"block size {block_size} must divide the model's context {model.cfg.context}")
    T = steps or block_size
    if not 1 <= T <= block_size:
        raise ScalelabError(f"steps per block must be in [1, {block_size}], got {T}")
    if prompt.shape[1] < 1:
        raise ScalelabError("bd3_generate needs a prompt of at least one token (e.g. end-of-text)")
    model.eval()
    dev = next(model.parameters()).device
    Lb, ctx, mask_id = block_size, model.cfg.context, mask_id_of(model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    B, P = prompt.shape
    n_blocks = math.ceil((P + max_new_tokens) / Lb)
    seq = torch.full((B, n_blocks * Lb), mask_id, dtype=torch.long, device=dev)
    seq[:, :P] = prompt.to(dev)
    first = P // Lb
    win = max(0, (first + 1) * Lb - ctx)  # window start (a block boundary): the window holds ≤ ctx tokens
    cache = None
    if use_cache:
        cache = KVCache(model.cfg, B, ctx, dtype=next(model.parameters()).dtype, device=dev)
        if first * Lb > win:
            n = first * Lb - win
            model(seq[:, win:first * Lb], positions=torch.arange(win, first * Lb, device=dev),
                  mask=block_causal_mask(n, Lb, dev), cache=cache, head_slice=slice(0, 0))
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    end = n_blocks
    pending = None  # the last finished block: its keys enter the cache in the next block's first forward
    for b in range(first, n_blocks):
        s = b * Lb
        if s + Lb - win > ctx:  # slide the window by one block
            if cache is not None:
                n = s + Lb - ctx - win
                if n > cache.length:  # the pending block itself falls out of the window (L′ > context/2)
                    pending, n = None, cache.length
                cache.slide(n)  # [code]: the cache shifts left by L′ at the context limit
            win = s + Lb - ctx
        blk = seq[:, s:s + Lb].clone()
        masked = blk == mask_id
        left = int(masked[0].sum())
        M = left
        for i in range(T):
            k = left - (M * (T - i - 1)) // T
            if k <= 0:
                continue
            # which positions to unmask is uniform and independent of pθ, so pick them first and run the
            # output head only there
            scores = torch.rand(B, Lb, generator=gen, device=dev).masked_fill(~masked, -1.0)
            pick = scores.topk(k, dim=-1).indices  # (B, k): k uniformly chosen masked positions
            if cache is not None:
                past = cache.length
                if pending is None:
                    logits = model(blk, positions=torch.arange(s, s + Lb, device=dev),
                                   mask=torch.ones(Lb, past + Lb, dtype=torch.bool, device=dev), cache=cache,
                                   head_slice=pick)
                else:  # [finished block ‖ noisy block] in one forward; the finished block does not see the noisy
                    mask = torch.ones(2 * Lb, past + 2 * Lb, dtype=torch.bool, device=dev)
                    mask[:Lb, past + Lb:] = False
                    logits = model(torch.cat([pending, blk], dim=1), positions=torch.arange(s - Lb, s + Lb, device=dev),
                                   mask=mask, cache=cache, head_slice=pick + Lb)
                    past, pending = past + Lb, None
                cache.truncate(past)  # the noisy block's keys are scratch, not part of the cache
            else:
                window = torch.cat([seq[:, win:s], blk], dim=1)
                n = window.shape[1]
                logits = model(window, mask=block_causal_mask(n, Lb, dev), head_slice=pick + (n - Lb))
            lg = logits[..., :mask_id]  # (B, k, V − 1): SUBS never samples [MASK]
            tok = sample_next(lg.reshape(B * k, -1), temperature, 0, top_p, gen).view(B, k)
            blk.scatter_(1, pick, tok)
            masked.scatter_(1, pick, False)
            left -= k
        seq[:, s:s + Lb] = blk
        if stop_id is not None:
            done |= (blk[:, max(0, P - s):] == stop_id).any(dim=1)
            if bool(done.all()):
                end = b + 1
                break
        if cache is not None:
            pending = blk  # every block has a masked position, so its first step always runs and takes this
    return seq[:, :min(end * Lb, P + max_new_tokens)].cpu()


@torch.no_grad()
def generative_ppl(scorer: Transformer, samples: list[list[int]], stop_id: int) -> float:
    """exp(mean NLL) of generated tokens under an AR scorer (Suppl. C.5: end-of-text tokens excluded).

    samples: token lists, each starting with one conditioning token (the end-of-text that begins a
    document), then the generated tokens. Longer than the scorer's context: sliding windows, stride ctx/2.
    """
    scorer.eval()
    dev = next(scorer.parameters()).device
    ctx = scorer.cfg.context
    stride = max(1, ctx // 2)
    total, count = 0.0, 0
    for ids in samples:
        ids_t = torch.tensor(ids, device=dev)
        pos = 1
        while pos < len(ids):
            stop = min(len(ids), pos + stride)
            begin = max(0, stop - 1 - ctx)
            logits = scorer(ids_t[None, begin:stop - 1])[0].float()  # predicts ids[begin+1 : stop]
            tgt = ids_t[pos:stop]
            nll = F.cross_entropy(logits[pos - 1 - begin:], tgt, reduction="none")
            keep = tgt != stop_id
            total += float(nll[keep].sum())
            count += int(keep.sum())
            pos = stop
    if count == 0:
        raise ScalelabError("no generated tokens to score")
    return math.exp(total / count)
