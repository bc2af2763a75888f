"""Sampling-based search with self-verification (Zhao et al. 2025, "Sample, Scrutinize and Scale"), its
baselines from one primary run, subsampled scaling curves, transcripts, resume and re-scoring.

Algorithm 1 (§1, with §3.1's description):
1. Sample k_inf candidate responses at temperature σ_inf.
2. Score each with k_verif verifications at σ_verif. Each is one conversation that rewrites the candidate as a
   theorem with lemmas and proofs, scans it for errors and ends in a binary verdict; the score is the mean
   verdict. For local models the score can instead be P("Yes") read from the model's logprobs at the end of
   each verification conversation (`score = "prob"`), which removes the verdict-sampling noise.
3. Shortlist S_best = {i : score_i ≥ max_j score_j − 0.05}. If it holds one candidate, return it.
4. Otherwise every pair in S_best plays k_tie comparisons; each is one conversation that locates where the two
   responses diverge and decides which side is right. The candidate with the most matchups won is returned.

The paper states two tie-break triggers (the ambiguity is noted in the reference notes, §1.2):
- `trigger = "alg1"` (default): Algorithm 1's, |S_best| > 1.
- `trigger = "s31"`: §3.1's, the three highest-scoring candidates are within 0.05 of one another *and*
  disagree on the final answer. The tournament then runs over S_best as Algorithm 1 defines it.

"Most wins" is ambiguous too (matchups or votes): a matchup is won by the side with more of its k_tie votes
(a tie is half a win each); the most matchups won wins; equal wins fall back to total votes, then to the
verification score, then to the lower index. Two notable choices of ours: a matchup between responses with
identical text is a draw without a model call (there is no divergence to locate), and each matchup shows
the pair in both orders (ceil(k_tie/2) as (A=i, B=j), the rest swapped) so position bias cancels.

Preliminary scoring (§5, every dataset but AIME), optional: k_prelim verifications per candidate, drop those
averaging below 0.2, keep at most 15 candidates per final answer (best preliminary scores, random ties),
then complete k_verif verifications for the survivors (the preliminary ones count towards them).

Baselines from the same samples and scores (§2, §5): Pass@1 (mean sample accuracy), Pass@k, Consistency@k
(majority over extracted final answers), Verification@k with and without tie-break, and, as an extra
selector, score-weighted voting (sum of scores per final answer). Scaling curves subsample k of the k_inf
candidates (and their scores) without replacement, averaged over `seeds` seeds (the paper uses 20); ties in
a selector count as the expected accuracy of a uniform pick among the tied. As in the paper's figures, the
curves omit tie-breaking; the tie-break result is reported at k = k_inf.

Runs: a directory with `search.json` (the config), `problems.jsonl`, and `transcripts.jsonl`: every model call
appended as one JSON line (prompt, parameters, seed, outputs, token usage). Every call has a key and a seed
derived from it, so an interrupted run resumes by skipping keys already present, and `rescore` recomputes
every metric from the transcripts with no model call. Verifiers: the same backend (self-verification),
another backend, or the task's programmatic checker (`verifier = "checker"`, for analysis).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scalelab import cost as costmod, tasks as tasksmod
from scalelab.errors import ScalelabError

log = logging.getLogger("scalelab")
Prompt = str | list[dict]  # raw text, or chat messages


class BackendError(ScalelabError):
    """A model backend that failed (after retries) or cannot do what was asked."""


# =========================================================================================== backends
@dataclass
class Output:
    text: str
    tokens: int
    finish: str = "stop"


@dataclass
class CallResult:
    outputs: list[Output]
    prompt_tokens: int  # as billed: the prompt once per call
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from a prefix cache
    naive_prompt_tokens: int = 0  # every sample's prompt prefilled from scratch (n × prompt)
    p_yes: float | None = None


class Backend(Protocol):
    """What search needs from a model: n samples of a prompt, and P(yes) vs P(no) after a prompt."""

    name: str
    price: str
    logprobs: bool

    def generate(self, prompt: Prompt, n: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> CallResult: ...

    def prob_yes(self, prompt: Prompt, yes: str, no: str) -> CallResult: ...


class LocalBackend:
    """The lab's engine (`engine.Engine`) over a GGUF model (e.g. the embedded SmolLM2) or a trained run."""

    logprobs = True

    def __init__(self, model, tokenizer, name: str, chat_template: str | None = None, prefix_ids=(),
                 stop_ids=(), bos: str = ""):
        from scalelab.engine import Engine

        self.tok, self.name, self.price = tokenizer, name, "local"
        self.chat_template, self.prefix_ids, self.bos = chat_template, list(prefix_ids), bos
        self.engine = Engine(model, decode=lambda ids: tokenizer.decode(ids), stop_ids=list(stop_ids))
        # Stop strings that are one token each are passed as stop ids to an engine without a decode callback:
        # for a small model, decoding every row's text at every step costs more than the model itself.
        self.fast = Engine(model, stop_ids=list(stop_ids))
        self.fast.prefix = self.engine.prefix  # one prefix cache for both

    @classmethod
    def from_spec(cls, spec: str) -> LocalBackend:
        """`smollm2` / a .gguf path (chat models), or `run:DIR` (a model trained here; raw prompts)."""
        if spec.startswith("run:"):
            from scalelab import tokenizer as tokmod, train as trainmod

            run = Path(spec[4:])
            _, model = trainmod.load_run(run)
            tok = tokmod.load(run / "tokenizer.json")
            eot = tokmod.eot_id(tok)
            return cls(model, tok, f"run:{run.name}", prefix_ids=[eot], stop_ids=[eot])
        from scalelab import gguf

        g = gguf.load(spec)
        bos = g.tokenizer.id_to_token(g.bos_id) if g.bos_id is not None else ""
        return cls(g.model, g.tokenizer, g.name or spec, chat_template=g.chat_template, stop_ids=g.stop_ids,
                   bos=bos or "")

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list):
            if not self.chat_template:
                raise BackendError(f"{self.name} has no chat template: use raw-text prompts (--prompts fewshot)")
            from scalelab.gguf import render_chat

            text = render_chat(self.chat_template, prompt, bos_token=self.bos)
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.prefix_ids + self.tok.encode(prompt, add_special_tokens=False).ids

    def fit(self, ids: list[int], reserve: int) -> list[int]:
        """Keep the last tokens of a prompt too long for the model's context, leaving `reserve` free (a
        degenerate candidate can make a verification conversation longer than a small model's context)."""
        room = self.engine.cfg.context - reserve
        return ids if len(ids) <= room else ids[-room:]

    def generate(self, prompt, n, temperature, max_tokens, stop, seed) -> CallResult:
        from scalelab.engine import SamplingParams

        ids = self.fit(self.encode(prompt), 1)
        stop_ids = [self.tok.encode(s, add_special_tokens=False).ids for s in stop]
        if all(len(t) == 1 for t in stop_ids):
            g = self.fast.generate(ids, SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature,
                                                       seed=seed, stop_ids=[t[0] for t in stop_ids]))
            for c in g.completions:
                c.text = self.tok.decode(c.tokens)
        else:
            g = self.engine.generate(ids, SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature,
                                                         seed=seed, stop=list(stop)))
        outs = [Output(c.text, len(c.tokens) + (c.finish_reason == "stop"), c.finish_reason) for c in g.completions]
        return CallResult(outs, g.prompt_tokens, g.completion_tokens, g.cached_tokens, n * len(ids))

    def prob_yes(self, prompt, yes, no) -> CallResult:
        cy = self.tok.encode(yes, add_special_tokens=False).ids
        cn = self.tok.encode(no, add_special_tokens=False).ids
        ids = self.fit(self.encode(prompt), max(len(cy), len(cn)))
        before = self.engine.prompt_tokens
        sy, sn = self.engine.score(ids, [cy, cn])  # one forward over both continuations, prompt KV shared
        m = max(sy.logprob, sn.logprob)
        p = math.exp(sy.logprob - m) / (math.exp(sy.logprob - m) + math.exp(sn.logprob - m))
        used = self.engine.prompt_tokens - before
        return CallResult([], used, 0, 0, used, p_yes=p)


class OpenAIBackend:
    """An OpenAI-compatible server (vLLM, llama.cpp, scalelab serve, a provider): chat messages go to
    /v1/chat/completions, raw text to /v1/completions. Failures are retried with backoff, then raised."""

    def __init__(self, url: str, model: str, api_key: str = "", retries: int = 3, timeout: float = 600,
                 price: str = ""):
        self.url, self.model, self.key = url.rstrip("/"), model, api_key
        self.retries, self.timeout = retries, timeout
        self.name, self.price, self.logprobs = f"{model}@{self.url}", price or model, True

    @classmethod
    def from_spec(cls, spec: str, retries: int = 3) -> OpenAIBackend:
        import os

        if "#" not in spec:
            raise ScalelabError(f"backend openai:{spec} needs a model name: openai:<url>#<model>")
        url, model = spec.split("#", 1)
        if not url.endswith("/v1"):
            url = url.rstrip("/") + "/v1"
        return cls(url, model, os.environ.get("OPENAI_API_KEY", ""), retries)

    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        err = ""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url + path, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                err = f"HTTP {e.code} from {self.url}{path}"
                if e.code < 500 and e.code != 429:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
        raise BackendError(f"backend {self.name} failed after {self.retries + 1} attempts ({err})")

    def _body(self, prompt: Prompt) -> tuple[str, dict]:
        if isinstance(prompt, list):
            return "/chat/completions", {"model": self.model, "messages": prompt}
        return "/completions", {"model": self.model, "prompt": prompt}

    @staticmethod
    def _usage(r: dict) -> tuple[int, int, int]:
        u = r.get("usage") or {}
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)), int(cached)

    def generate(self, prompt, n, temperature, max_tokens, stop, seed) -> CallResult:
        path, body = self._body(prompt)
        body.update(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed, **({"stop": stop} if stop else {}))
        r = self._post(path, body)
        try:
            choices = sorted(r["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
        except (KeyError, TypeError):
            raise BackendError(f"backend {self.name} returned an unexpected response (no choices)") from None
        pt, ct, cached = self._usage(r)
        outs = [Output(t or "", 0, c.get("finish_reason") or "stop") for t, c in zip(texts, choices)]
        for o in outs:  # per-sample counts are not reported: share the total evenly
            o.tokens = ct // max(1, len(outs))
        return CallResult(outs, pt, ct, cached, n * pt)

    def prob_yes(self, prompt, yes, no) -> CallResult:
        path, body = self._body(prompt)
        if path == "/chat/completions":
            body.update(max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
        else:
            body.update(max_tokens=1, temperature=0, logprobs=20)
        r = self._post(path, body)
        try:
            lp = r["choices"][0]["logprobs"]
            if "content" in lp:
                top = {t["token"]: t["logprob"] for t in lp["content"][0]["top_logprobs"]}
            else:
                top = lp["top_logprobs"][0]
        except (KeyError, TypeError, IndexError):
            raise BackendError(f"backend {self.name} returned no logprobs: use --score verdict") from None
        py = sum(math.exp(v) for k, v in top.items() if k.strip().lower() == yes.strip().lower())
        pn = sum(math.exp(v) for k, v in top.items() if k.strip().lower() == no.strip().lower())
        pt, ct, cached = self._usage(r)
        return CallResult([], pt, ct, cached, pt, p_yes=py / (py + pn) if py + pn > 0 else 0.5)


def make_backend(spec: str, retries: int = 3) -> Backend:
    """`local:smollm2`, `local:PATH.gguf`, `run:RUN_DIR` (a model trained here) or `openai:<url>#<model>`."""
    if spec.startswith("openai:"):
        return OpenAIBackend.from_spec(spec[len("openai:"):], retries)
    if spec.startswith("local:"):
        return LocalBackend.from_spec(spec[len("local:"):])
    if spec.startswith("run:"):
        return LocalBackend.from_spec(spec)
    raise ScalelabError(f"unknown backend {spec!r}: use local:smollm2, local:FILE.gguf, run:DIR or openai:<url>#<model>")


# =========================================================================================== prompts
def prompt_file(name: str) -> str:
    return resources.files("scalelab").joinpath(f"prompts/{name}").read_text()


class ChatFormat:
    """Our prompts (versioned files under `scalelab/prompts/`), written from the paper's description since
    its own prompts are not reproduced in our notes: the verifier rewrites the response as theorem, lemmas
    and proofs and ends in a verdict; the comparator finds divergences and names a winner."""

    yes, no = "Yes", "No"

    def __init__(self, fewshot: bool = False):
        self.fewshot = fewshot
        self.files = ["sss-solve-fewshot-v1.txt" if fewshot else "sss-solve-v1.txt", "sss-verify-v1.txt",
                      "sss-verify-ask-v1.txt", "sss-compare-v1.txt"]
        self.stop = ["\n\nQuestion:"] if fewshot else []

    def solve(self, p: tasksmod.Problem) -> Prompt:
        text = prompt_file(self.files[0]).format(question=p.question)
        return text if self.fewshot else [{"role": "user", "content": text}]

    def verify(self, p, response: str) -> Prompt:
        return [{"role": "user", "content": prompt_file("sss-verify-v1.txt").format(question=p.question,
                                                                                    response=response.strip())}]

    def parse_verdict(self, text: str) -> int | None:
        up = text.upper()
        i, j = up.rfind("VERDICT: CORRECT"), up.rfind("VERDICT: INCORRECT")
        if i >= 0 or j >= 0:
            return 1 if i > j else 0
        b = tasksmod.last_boxed(text)
        return {"1": 1, "0": 0}.get(b.strip()) if b else None

    def verdict_query(self, p, response: str, verification: str) -> Prompt:
        return self.verify(p, response) + [{"role": "assistant", "content": verification.strip()},
                                           {"role": "user", "content": prompt_file("sss-verify-ask-v1.txt").strip()}]

    def compare(self, p, a: str, b: str) -> Prompt:
        return [{"role": "user", "content": prompt_file("sss-compare-v1.txt").format(
            question=p.question, response_a=a.strip(), response_b=b.strip())}]

    def parse_winner(self, text: str) -> str | None:
        up = text.upper()
        i, j = up.rfind("WINNER: A"), up.rfind("WINNER: B")
        return None if i < 0 and j < 0 else ("A" if i > j else "B")


class SudokuFormat:
    """The one-line formats of the Sudoku model trained here (`prompts/sudoku-model-v3.txt`, built by
    `sudoku_model.py`): solve, verify (rewrite as clue, row, column and box lemmas with their checks, then
    Y/N) and compare (the cells where the two diverge, then A/B). A newline ends every answer."""

    yes, no = "Y", "N"
    files = ["sudoku-model-v3.txt"]
    stop = ["\n"]

    @staticmethod
    def cand(response: str) -> str:
        return (response.strip().split("\n") or [""])[0].split(" ")[0][:24]

    def solve(self, p) -> Prompt:
        return f"\nQ{p.question} S"

    def verify(self, p, response) -> Prompt:
        return f"\nQ{p.question} C{self.cand(response)} V"

    def parse_verdict(self, text: str) -> int | None:
        t = text.strip().split("\n")[0].strip()
        return {"Y": 1, "N": 0}.get(t[-1:]) if t else None

    def verdict_query(self, p, response, verification) -> Prompt:
        t = verification.strip().split("\n")[0].rstrip()
        if t[-1:] in ("Y", "N"):
            t = t[:-1]
        return self.verify(p, response) + t.rstrip() + " "

    def compare(self, p, a, b) -> Prompt:
        return f"\nQ{p.question} A{self.cand(a)} B{self.cand(b)} W"

    def parse_winner(self, text: str) -> str | None:
        t = text.strip().split("\n")[0].strip()
        return t[-1] if t[-1:] in ("A", "B") else None


def make_format(style: str):
    if style in ("chat", "fewshot"):
        return ChatFormat(fewshot=style == "fewshot")
    if style == "sudoku":
        return SudokuFormat()
    raise ScalelabError(f"unknown prompt style {style!r}: chat, fewshot or sudoku")


# =========================================================================================== config
@dataclass
class SearchConfig:
    backend: str = "local:smollm2"
    verifier: str = "same"  # same | checker | a backend spec (e.g. a larger model over HTTP)
    task: str = "arithmetic"  # arithmetic[:LEVEL] | sudoku[:CLUES] | FILE.jsonl
    n_problems: int = 20
    task_seed: int = 0
    prompts: str = "chat"  # chat | fewshot | sudoku
    k_inf: int = 16
    k_verif: int = 4
    k_tie: int = 4
    temperature: float = 1.0  # σ_inf (the paper: 1.5 with Gemini)
    verify_temperature: float = 1.0  # σ_verif
    tie_temperature: float = 1.0
    max_tokens: int = 256
    verify_max_tokens: int = 256
    score: str = "verdict"  # verdict (mean sampled verdict) | prob (P(Yes) from logprobs)
    trigger: str = "alg1"  # alg1 | s31
    threshold: float = 0.05
    tiebreak: bool = True
    prelim: bool = False
    prelim_k: int = 10
    prelim_min: float = 0.2
    prelim_cap: int = 15
    seeds: int = 20
    seed: int = 0
    price: str = ""  # price-table entry for the generator ("" = local for local backends, else the model)
    verifier_price: str = ""
    prices_file: str = ""
    retries: int = 3
    threads: int = 0  # torch threads for local backends (0 = torch's default; 1 is best on a busy CPU)
    # An LLM judge (a backend spec) for MATH-style free-form answers that the programmatic comparison rejects,
    # as the paper grades with one (§5, App. A.2). Grading, not the method: its calls go to judge.jsonl and
    # are left out of the method's token and dollar costs. "" = programmatic comparison only.
    judge: str = ""

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ScalelabError(msg)

        for name in ("k_inf", "k_verif", "k_tie", "n_problems", "seeds", "max_tokens", "verify_max_tokens"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        need(self.score in ("verdict", "prob"), f"score must be verdict or prob, got {self.score!r}")
        need(self.trigger in ("alg1", "s31"), f"trigger must be alg1 or s31, got {self.trigger!r}")
        need(self.prompts in ("chat", "fewshot", "sudoku"), f"prompts must be chat, fewshot or sudoku, got {self.prompts!r}")
        need(0 <= self.threshold < 1, f"threshold must be in [0, 1), got {self.threshold}")
        need(min(self.temperature, self.verify_temperature, self.tie_temperature) >= 0, "temperatures must be >= 0")
        need(not self.prelim or 1 <= self.prelim_k < self.k_verif,
             f"preliminary scoring needs 1 <= prelim-k < k-verif (got {self.prelim_k} and {self.k_verif})")
        need(self.prelim_cap >= 1 and 0 <= self.prelim_min <= 1, "prelim-cap must be >= 1, prelim-min in [0, 1]")

    CALL_FIELDS = ("backend", "verifier", "task", "n_problems", "task_seed", "prompts", "k_inf", "k_verif", "k_tie",
                   "temperature", "verify_temperature", "tie_temperature", "max_tokens", "verify_max_tokens",
                   "score", "prelim", "prelim_k", "prelim_min", "prelim_cap", "seed", "judge")


def derive_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


# =========================================================================================== transcripts
class Transcripts:
    """Append-only `transcripts.jsonl`: one JSON line per model call, keyed. A line cut short by a crash is
    ignored (and its call redone)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        self.records[r["key"]] = r
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
        self.new_calls = 0

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, rec: dict) -> dict:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.records[rec["key"]] = rec
        self.new_calls += 1
        return rec


# =========================================================================================== selection
def shortlist(scores: list[float], threshold: float = 0.05) -> list[int]:
    """Algorithm 1 step 3: indices scoring within `threshold` of the best."""
    best = max(scores)
    return [i for i, s in enumerate(scores) if s >= best - threshold - 1e-12]


def needs_tiebreak(scores: list[float], keys: list, trigger: str, threshold: float = 0.05) -> bool:
    """alg1: more than one candidate in the shortlist. s31: the top three are within `threshold` of one
    another and do not all share a final answer."""
    if trigger == "alg1":
        return len(shortlist(scores, threshold)) > 1
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
    if len(order) < 2:
        return False
    close = scores[order[0]] - scores[order[-1]] <= threshold + 1e-12
    return close and len({keys[i] for i in order}) > 1


def tournament(cands: list[int], votes: Callable[[int, int], tuple[float, float]],
               scores: list[float]) -> tuple[int, dict[int, float]]:
    """Round robin over `cands`; votes(i, j) -> (votes for i, votes for j). Returns the winner and wins."""
    wins = {i: 0.0 for i in cands}
    tally = {i: 0.0 for i in cands}
    for a_pos, i in enumerate(cands):
        for j in cands[a_pos + 1:]:
            vi, vj = votes(i, j)
            tally[i] += vi
            tally[j] += vj
            if vi > vj:
                wins[i] += 1
            elif vj > vi:
                wins[j] += 1
            else:
                wins[i] += 0.5
                wins[j] += 0.5
    best = max(cands, key=lambda i: (wins[i], tally[i], scores[i], -i))
    return best, wins


def select(scores: list[float], keys: list, trigger: str, threshold: float,
           votes: Callable[[int, int], tuple[float, float]] | None) -> tuple[int, list[int]]:
    """Algorithm 1's pick (first index among maxima without a tie-break). Returns (pick, shortlist played)."""
    sl = shortlist(scores, threshold)
    if votes is not None and needs_tiebreak(scores, keys, trigger, threshold):
        return tournament(sl, votes, scores)[0], sl
    return max(range(len(scores)), key=lambda i: (scores[i], -i)), []


def expected_pick_accuracy(values: np.ndarray, correct: np.ndarray) -> float:
    """Accuracy of picking uniformly among the arg-max of `values` (NaN = not selectable)."""
    ok = ~np.isnan(values)
    if not ok.any():
        return 0.0
    m = np.nanmax(values)
    tied = ok & (values >= m - 1e-12)
    return float(correct[tied].mean())


def vote_accuracy(keys: list, correct: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Consistency@k (weights None) or weighted voting: the answer with the largest (weighted) count wins;
    a tie counts as a uniform pick among the tied answers. Unextracted answers (None) do not vote."""
    tot: dict[Any, float] = defaultdict(float)
    ok: dict[Any, bool] = {}
    for i, k in enumerate(keys):
        if k is None:
            continue
        tot[k] += 1.0 if weights is None else float(weights[i])
        ok[k] = bool(correct[i])
    if not tot:
        return 0.0
    m = max(tot.values())
    tied = [k for k, v in tot.items() if v >= m - 1e-12]
    return sum(ok[k] for k in tied) / len(tied)


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k) (Chen et al. 2021): the exact expectation the subsampled curve estimates."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability a correct sample outscores a wrong one (ties count half). NaN without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    a, b = np.array(pos)[:, None], np.array(neg)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


# =========================================================================================== the run
@dataclass
class ProblemRecord:
    problem: tasksmod.Problem
    responses: list[str] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    keys: list = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    verdicts: list[list[float]] = field(default_factory=list)  # per candidate: verdicts or P(yes)
    unparsed: int = 0
    dropped: list[bool] = field(default_factory=list)  # removed by preliminary scoring
    tie_votes: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    pick: int = -1
    played: list[int] = field(default_factory=list)

    def scores(self) -> list[float]:
        return [float(np.mean(v)) if v else 0.0 for v in self.verdicts]


class Searcher:
    """Runs (or resumes) a primary run, call by call, writing every call to the transcripts."""

    def __init__(self, cfg: SearchConfig, run_dir: Path, task: tasksmod.Task, gen: Backend | None,
                 ver: Backend | None, fmt, judge: Backend | None = None):
        self.cfg, self.run_dir, self.task, self.gen, self.ver, self.fmt = cfg, Path(run_dir), task, gen, ver, fmt
        self.judge = judge
        self.tr = Transcripts(self.run_dir / "transcripts.jsonl")
        self.grades = Transcripts(self.run_dir / "judge.jsonl")  # the LLM judge's calls: grading, not the method

    def call(self, key: str, phase: str, pid: str, backend: Backend | None, prompt: Prompt, n: int = 1,
             temperature: float = 0.0, max_tokens: int = 0, stop: list[str] | None = None,
             prob: tuple[str, str] | None = None, log: Transcripts | None = None) -> dict:
        tr = log or self.tr
        rec = tr.get(key)
        if rec is not None:
            return rec
        if backend is None:
            raise ScalelabError(f"call {key} is not in the transcripts and no backend is available (rescore "
                                f"uses transcripts only; resume the run to complete it)")
        seed = derive_seed(self.cfg.seed, key)
        t0 = time.perf_counter()
        if prob is not None:
            r = backend.prob_yes(prompt, *prob)
        else:
            r = backend.generate(prompt, n, temperature, max_tokens, stop or [], seed)
        return tr.add({
            "key": key, "phase": phase, "problem": pid, "backend": backend.name, "price": backend.price,
            "prompt": prompt, "n": n, "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
            "outputs": [dataclasses.asdict(o) for o in r.outputs], "p_yes": r.p_yes,
            "usage": {"prompt": r.prompt_tokens, "completion": r.completion_tokens, "cached": r.cached_tokens,
                      "naive_prompt": r.naive_prompt_tokens},
            "seconds": round(time.perf_counter() - t0, 4)})

    # --- phases ------------------------------------------------------------------------------------------
    def run_problem(self, p: tasksmod.Problem) -> ProblemRecord:
        c, fmt = self.cfg, self.fmt
        rec = ProblemRecord(p)
        g = self.call(f"gen:{p.id}", "generate", p.id, self.gen, fmt.solve(p), c.k_inf, c.temperature, c.max_tokens,
                      fmt.stop)
        rec.responses = [o["text"] for o in g["outputs"]]
        rec.answers = [self.task.extract(p, t) for t in rec.responses]
        rec.keys = [self.task.key(p, a) for a in rec.answers]
        rec.correct = [self._correct(p, a) for a in rec.answers]
        k = len(rec.responses)
        rec.verdicts = [[] for _ in range(k)]
        rec.dropped = [False] * k
        if c.verifier == "checker":  # programmatic verifier, for analysis: no model calls
            rec.verdicts = [[float(ok)] * c.k_verif for ok in rec.correct]
        else:
            first = c.prelim_k if c.prelim else c.k_verif
            for i in range(k):
                self._verify(rec, i, 0, first)
            if c.prelim:
                self._prelim_filter(rec)
                for i in range(k):
                    if not rec.dropped[i]:
                        self._verify(rec, i, 1, c.k_verif - c.prelim_k)
        if c.tiebreak:
            self._select(rec)
        return rec

    def _correct(self, p: tasksmod.Problem, answer: str | None) -> bool:
        """The programmatic check; for MATH-style answers it rejects, the LLM judge when one is configured."""
        if self.task.is_correct(p, answer):
            return True
        if not self.cfg.judge or answer is None or p.kind != "math":
            return False
        prompt = [{"role": "user", "content": prompt_file("sss-judge-v1.txt").format(
            question=p.question, reference=p.answer, answer=answer)}]
        key = f"judge:{p.id}:{hashlib.sha256(answer.encode()).hexdigest()[:12]}"  # one call per distinct answer
        r = self.call(key, "judge", p.id, self.judge, prompt, 1, 0.0, 8, [], log=self.grades)
        text = r["outputs"][0]["text"].strip().lower() if r["outputs"] else ""
        return text.startswith("yes")

    def _verify(self, rec: ProblemRecord, i: int, part: int, n: int) -> None:
        c, p, resp = self.cfg, rec.problem, rec.responses[i]
        v = self.call(f"ver:{p.id}:{i}:{part}", "verify", p.id, self.ver, self.fmt.verify(p, resp), n,
                      c.verify_temperature, c.verify_max_tokens, self.fmt.stop)
        for j, o in enumerate(v["outputs"]):
            verdict = self.fmt.parse_verdict(o["text"])
            if c.score == "prob":
                q = self.call(f"vprob:{p.id}:{i}:{part}:{j}", "verify", p.id, self.ver,
                              self.fmt.verdict_query(p, resp, o["text"]), prob=(self.fmt.yes, self.fmt.no))
                rec.verdicts[i].append(float(q["p_yes"]))
            else:
                if verdict is None:
                    rec.unparsed += 1
                rec.verdicts[i].append(float(verdict or 0))

    def _prelim_filter(self, rec: ProblemRecord) -> None:
        c = self.cfg
        rng = np.random.default_rng(derive_seed(c.seed, f"prelim:{rec.problem.id}") % 2**32)
        s = rec.scores()
        for i in range(len(s)):
            rec.dropped[i] = s[i] < c.prelim_min
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, key in enumerate(rec.keys):
            if not rec.dropped[i]:
                groups[key].append(i)
        for members in groups.values():
            if len(members) > c.prelim_cap:
                tieb = rng.random(len(members))
                order = sorted(range(len(members)), key=lambda m: (-s[members[m]], tieb[m]))
                for m in order[c.prelim_cap:]:
                    rec.dropped[members[m]] = True

    def _votes(self, rec: ProblemRecord) -> Callable[[int, int], tuple[float, float]]:
        c, p = self.cfg, rec.problem

        def votes(i: int, j: int) -> tuple[float, float]:
            if rec.responses[i].strip() == rec.responses[j].strip():
                rec.tie_votes[(i, j)] = (0.0, 0.0)
                return 0.0, 0.0  # identical responses: nothing diverges, a draw without a call
            vi = vj = 0.0
            for part, (a, b, n) in enumerate([(i, j, (c.k_tie + 1) // 2), (j, i, c.k_tie // 2)]):
                if n == 0:
                    continue
                r = self.call(f"tie:{p.id}:{i}:{j}:{part}", "tiebreak", p.id, self.ver,
                              self.fmt.compare(p, rec.responses[a], rec.responses[b]), n, c.tie_temperature,
                              c.verify_max_tokens, self.fmt.stop)
                for o in r["outputs"]:
                    w = self.fmt.parse_winner(o["text"])
                    side = a if w == "A" else b if w == "B" else None
                    vi += side == i
                    vj += side == j
            rec.tie_votes[(i, j)] = (vi, vj)
            return vi, vj

        return votes

    def _select(self, rec: ProblemRecord) -> None:
        live = [i for i in range(len(rec.responses)) if not rec.dropped[i]]
        if not live:
            rec.pick = 0
            return
        s = rec.scores()
        sub_scores = [s[i] for i in live]
        votes = self._votes(rec) if self.cfg.verifier != "checker" else None
        if votes is not None:
            inner = votes
            votes = lambda a, b: inner(live[a], live[b])  # noqa: E731 - index map into the live set
        pick, played = select(sub_scores, [rec.keys[i] for i in live], self.cfg.trigger, self.cfg.threshold, votes)
        rec.pick, rec.played = live[pick], [live[i] for i in played]


# =========================================================================================== run / rescore
def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def prepare_run(cfg: SearchConfig, run_dir: Path, resume: bool) -> tasksmod.Task:
    """Create or reopen a run directory; a resumed run must have the same call-defining settings."""
    cfg.validate()
    run_dir = Path(run_dir)
    cfg_path = run_dir / "search.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        changed = [f for f in SearchConfig.CALL_FIELDS if old.get(f) != getattr(cfg, f)]
        if changed:
            raise ScalelabError(f"{run_dir} holds a search with different settings ({', '.join(changed)}); "
                                f"choose another --out")
        if not resume:
            log.info(f"resuming the search in {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScalelabError(f"cannot write to output directory {run_dir}: {e.strerror}") from None
    write_json(cfg_path, dataclasses.asdict(cfg))
    prob_path = run_dir / "problems.jsonl"
    if prob_path.is_file():
        task = load_problems(run_dir, cfg)
    else:
        task = tasksmod.load_task(cfg.task, cfg.n_problems, cfg.task_seed)
        prob_path.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in task.problems))
    return task


def load_problems(run_dir: Path, cfg: SearchConfig) -> tasksmod.Task:
    rows = [json.loads(line) for line in (Path(run_dir) / "problems.jsonl").read_text().splitlines() if line.strip()]
    return tasksmod.Task(cfg.task, [tasksmod.Problem(**r) for r in rows])


def load_config(run_dir: Path) -> SearchConfig:
    path = Path(run_dir) / "search.json"
    if not path.is_file():
        raise ScalelabError(f"{run_dir} is not a search run (no search.json)")
    d = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    return SearchConfig(**{k: v for k, v in d.items() if k in known})


def run_search(cfg: SearchConfig, run_dir: Path, resume: bool = True, gen: Backend | None = None,
               ver: Backend | None = None, progress: Callable[[int, int], None] | None = None,
               judge: Backend | None = None) -> list[ProblemRecord]:
    """The primary run: every problem's samples, verifications and tie-breaks, resumable."""
    cfg.validate()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if gen is None:
        gen = make_backend(cfg.backend, cfg.retries)
    if ver is None and cfg.verifier != "checker":
        ver = gen if cfg.verifier == "same" else make_backend(cfg.verifier, cfg.retries)
    if judge is None and cfg.judge:
        judge = make_backend(cfg.judge, cfg.retries)
    task = prepare_run(cfg, run_dir, resume)
    s = Searcher(cfg, run_dir, task, gen, ver, make_format(cfg.prompts), judge)
    out = []
    for n, p in enumerate(task.problems):
        try:
            out.append(s.run_problem(p))
        except BackendError as e:
            raise BackendError(f"{e}; {len(s.tr.records)} calls are saved in {s.tr.path}: rerun the same command "
                               f"to resume") from None
        if progress:
            progress(n + 1, len(task.problems))
    return out


def replay(run_dir: Path, trigger: str | None = None) -> tuple[SearchConfig, tasksmod.Task, list[ProblemRecord], Transcripts]:
    """Every problem's record rebuilt from the transcripts, with no model call. `trigger` re-selects with the
    other tie-break trigger: §3.1's tournaments are a subset of Algorithm 1's, so an alg1 run can be
    rescored as s31 from its own transcripts."""
    cfg = load_config(run_dir)
    if trigger is not None:
        cfg.trigger = trigger
        cfg.validate()
    task = load_problems(run_dir, cfg)
    s = Searcher(cfg, run_dir, task, None, None, make_format(cfg.prompts))
    recs = []
    for p in task.problems:  # an interrupted run is analysed over the problems it finished
        try:
            recs.append(s.run_problem(p))
        except ScalelabError:
            continue
    if not recs:
        raise ScalelabError(f"{run_dir} has no finished problem yet")
    return cfg, task, recs, s.tr


# =========================================================================================== analysis
def usage_by_phase(tr: Transcripts) -> dict[str, dict[str, int]]:
    out = {ph: {"calls": 0, "prompt": 0, "cached": 0, "completion": 0, "naive_prompt": 0} for ph in costmod.PHASES}
    for r in tr.records.values():
        u, o = r["usage"], out[r["phase"]]
        o["calls"] += 1
        for k in ("prompt", "cached", "completion", "naive_prompt"):
            o[k] += int(u.get(k, 0))
    return out


def curves(recs: list[ProblemRecord], ks: list[int], seeds: int, seed: int = 0,
           verif_ks: list[int] | None = None) -> dict:
    """Subsampled scaling curves (the paper's §2 protocol): for each k and seed, k of the k_inf candidates
    (without replacement) with their scores; tie-breaking omitted, as in the paper's figures."""
    rng = np.random.default_rng(seed)
    names = ("pass", "consistency", "verification", "weighted_vote")
    res = {n: [] for n in names}
    res["verification_given_pass"] = []
    for k in ks:
        acc = {n: [] for n in names}
        cond = []
        for r in recs:
            K = len(r.responses)
            if K == 0:
                continue
            corr = np.array(r.correct, dtype=float)
            sc = np.array([np.nan if r.dropped[i] else s for i, s in enumerate(r.scores())])
            for _ in range(seeds):
                idx = rng.choice(K, size=min(k, K), replace=False)
                p = float(corr[idx].max())
                v = expected_pick_accuracy(sc[idx], corr[idx])
                acc["pass"].append(p)
                acc["consistency"].append(vote_accuracy([r.keys[i] for i in idx], corr[idx]))
                acc["verification"].append(v)
                acc["weighted_vote"].append(vote_accuracy([r.keys[i] for i in idx], corr[idx],
                                                          np.nan_to_num(sc[idx])))
                if p > 0:
                    cond.append(v)
        for n in names:
            res[n].append(float(np.mean(acc[n])) if acc[n] else 0.0)
        res["verification_given_pass"].append(float(np.mean(cond)) if cond else float("nan"))
    res["k"] = list(ks)
    if verif_ks:  # the verification axis: k_inf candidates, kv of their verifications each
        res["kv"], res["verification_by_kv"] = list(verif_ks), []
        for kv in verif_ks:
            vals = []
            for r in recs:
                corr = np.array(r.correct, dtype=float)
                for _ in range(seeds):
                    sc = np.array([np.nan if r.dropped[i] or not v else
                                   float(np.mean(rng.choice(v, size=min(kv, len(v)), replace=False)))
                                   for i, v in enumerate(r.verdicts)])
                    vals.append(expected_pick_accuracy(sc, corr))
            res["verification_by_kv"].append(float(np.mean(vals)) if vals else 0.0)
    return res


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over problems and its 95% percentile bootstrap interval (problems resampled)."""
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def analyse(run_dir: Path, trigger: str | None = None) -> dict:
    """Every metric of a run, from its transcripts only. Written to `metrics.json` (`metrics-s31.json` when
    rescored with the other trigger)."""
    run_dir = Path(run_dir)
    cfg, task, recs, tr = replay(run_dir, trigger)
    n = len(recs)
    per = {"pass1": [], "passk": [], "cons": [], "verif": [], "verif_tb": [], "wvote": []}
    for r in recs:
        corr = np.array(r.correct, dtype=float)
        sc = np.array([np.nan if r.dropped[i] else s for i, s in enumerate(r.scores())])
        per["pass1"].append(float(corr.mean()))
        per["passk"].append(float(corr.max()))
        per["cons"].append(vote_accuracy(r.keys, corr))
        per["verif"].append(expected_pick_accuracy(sc, corr))
        per["wvote"].append(vote_accuracy(r.keys, corr, np.nan_to_num(sc)))
        per["verif_tb"].append(float(r.correct[r.pick]) if cfg.tiebreak and r.pick >= 0 else per["verif"][-1])
    arr = {k: np.array(v) for k, v in per.items()}
    K = cfg.k_inf
    ks = sorted({1, 2, 4, 8, 16, 32, 64, 128, 200, K} & set(range(1, K + 1)))
    kvs = sorted({1, 2, 4, 8, 16, 32, 50, cfg.k_verif} & set(range(1, cfg.k_verif + 1)))
    cv = curves(recs, ks, cfg.seeds, cfg.seed, kvs if cfg.verifier != "checker" else None)
    flat_s = [s for r in recs for i, s in enumerate(r.scores()) if not r.dropped[i]]
    flat_y = [c for r in recs for i, c in enumerate(r.correct) if not r.dropped[i]]
    usage = usage_by_phase(tr)
    prices = costmod.load_prices(cfg.prices_file or None)
    gen_price = cfg.price or (cfg.backend.split(":", 1)[0] in ("local", "run") and "local" or cfg.backend.split("#")[-1])
    ver_price = cfg.verifier_price or gen_price
    dollars = None
    if gen_price in prices and ver_price in prices:
        led = costmod.Ledger()
        for ph, u in usage.items():
            led.record("all", ph, u["prompt"], u["completion"], u["cached"], u["calls"])
        dollars = led.dollars(prices[gen_price], prices[ver_price])
    gap = paired_bootstrap(arr["verif_tb"], arr["cons"]) if n else (0, 0, 0)
    gap_nt = paired_bootstrap(arr["verif"], arr["cons"]) if n else (0, 0, 0)
    tie_played = sum(1 for r in recs if r.played)
    # the paper's ambiguous questions (§2): drop those Consistency@k_inf gets right and those whose samples are
    # all correct or all wrong
    amb = [i for i, r in enumerate(recs) if per["cons"][i] < 1 and 0 < per["pass1"][i] < 1]
    m = {
        "config": dataclasses.asdict(cfg), "problems": n, "problems_in_run": len(task.problems), "samples": sum(len(r.responses) for r in recs),
        "unextracted": sum(a is None for r in recs for a in r.answers),
        "unparsed_verdicts": sum(r.unparsed for r in recs),
        "dropped_by_prelim": sum(sum(r.dropped) for r in recs),
        "accuracy": {"Pass@1": float(arr["pass1"].mean()), f"Pass@{K}": float(arr["passk"].mean()),
                     f"Consistency@{K}": float(arr["cons"].mean()),
                     f"Verification@{K} (no tie-break)": float(arr["verif"].mean()),
                     f"Verification@{K}": float(arr["verif_tb"].mean()),
                     f"Score-weighted vote@{K}": float(arr["wvote"].mean())},
        "gap_verification_minus_consistency": {"mean": gap[0], "ci95": [gap[1], gap[2]]},
        "gap_no_tiebreak": {"mean": gap_nt[0], "ci95": [gap_nt[1], gap_nt[2]]},
        "tiebreaks_played": tie_played,
        "verifier_auroc": auroc(flat_s, flat_y),
        "ambiguous_questions": len(amb),
        "curves": cv, "usage": usage, "dollars": dollars, "price": {"generate": gen_price, "verify": ver_price},
        "per_problem": per,
    }
    write_json(run_dir / ("metrics.json" if trigger is None else f"metrics-{trigger}.json"), m)
    return m
