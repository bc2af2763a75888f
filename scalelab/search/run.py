"""The primary run of sampling-based search with self-verification (Zhao et al. 2025, "Sample, Scrutinize and
Scale"): config, transcripts, the searcher, resume and replay.

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
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab import config as configmod
from scalelab.backends import Backend, BackendError, Prompt, canonical_spec, generate_many, make_backend
from scalelab.engine import SamplingParams
from scalelab.errors import ScalelabError
from scalelab.report import make_dir, write_json
from scalelab.search import cost as costmod, tasks as tasksmod
from scalelab.search.formats import STYLES, make_format, prompt_file
from scalelab.search.select import needs_tiebreak, pick, select, shortlist

log = logging.getLogger("scalelab")


# =========================================================================================== config
@dataclass
class SearchConfig:
    backend: str = "smollm2"  # smollm2 | FILE.gguf | RUN_DIR | openai:<url>#<model>
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
    quant: str = "auto"  # --quant of local backends: auto | none | int8 | int4 (backends.LocalBackend)
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
        need(self.quant in ("auto", "none", "int8", "int4"), f"quant must be auto, none, int8 or int4, got {self.quant!r}")
        need(self.trigger in ("alg1", "s31"), f"trigger must be alg1 or s31, got {self.trigger!r}")
        need(self.prompts in STYLES, f"prompts must be chat, fewshot, sudoku or served, got {self.prompts!r}")
        need(0 <= self.threshold < 1, f"threshold must be in [0, 1), got {self.threshold}")
        need(min(self.temperature, self.verify_temperature, self.tie_temperature) >= 0, "temperatures must be >= 0")
        need(not self.prelim or 1 <= self.prelim_k < self.k_verif,
             f"preliminary scoring needs 1 <= prelim-k < k-verif (got {self.prelim_k} and {self.k_verif})")
        need(self.prelim_cap >= 1 and 0 <= self.prelim_min <= 1, "prelim-cap must be >= 1, prelim-min in [0, 1]")

    @classmethod
    def load(cls, base: dict[str, Any] | None = None, path: Path | None = None,
             overrides: list[str] | None = None) -> SearchConfig:
        """`base` (e.g. the CLI's flags), then the `[search]` table of a TOML file, then `--set search.k=v`;
        unknown keys are errors, as for training configs."""
        values = {**(base or {}), **configmod.section_values("search", path, overrides or [])}
        return configmod.make_section(cls, "search", values)

    CALL_FIELDS = ("backend", "verifier", "task", "n_problems", "task_seed", "prompts", "k_inf", "k_verif", "k_tie",
                   "temperature", "verify_temperature", "tie_temperature", "max_tokens", "verify_max_tokens",
                   "score", "prelim", "prelim_k", "prelim_min", "prelim_cap", "seed", "judge", "quant")


def derive_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


# =========================================================================================== transcripts
class Transcripts:
    """Append-only `transcripts.jsonl`: one JSON line per model call, keyed. A line cut short by a crash is
    ignored (and its call redone). `path=None` keeps the records in memory only (a served request without a
    log directory). Appends are thread-safe: a server's concurrent searches share one file."""

    def __init__(self, path: Path | None, phases: tuple[str, ...] = costmod.PHASES):
        self.path = path
        self.records: dict[str, dict] = {}
        self.bad_lines: list[int] = []  # corrupt lines: not a call record
        self.lock = threading.Lock()
        if path is not None and path.is_file():
            with open(path, "rb") as f:
                for no, raw in enumerate(f, 1):
                    try:
                        r = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        r = None
                    if _is_call(r, phases):
                        self.records[r["key"]] = r
                    elif raw.strip() and raw.endswith(b"\n"):  # (a last line without one was cut short by a crash)
                        self.bad_lines.append(no)
        self.new_calls = 0

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, rec: dict) -> dict:
        line = json.dumps(rec) + "\n"
        with self.lock:
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            self.records[rec["key"]] = rec
            self.new_calls += 1
        return rec


def _is_call(r: object, phases: tuple[str, ...]) -> bool:
    """A transcript line as `Searcher.call` writes it, as far as replay and analysis read it."""
    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not (isinstance(r, dict) and isinstance(r.get("key"), str) and r.get("phase") in phases
            and isinstance(r.get("usage"), dict) and all(count(v) for v in r["usage"].values())
            and isinstance(r.get("outputs"), list)
            and all(isinstance(o, dict) and isinstance(o.get("text"), str) for o in r["outputs"])):
        return False
    if r["key"].startswith("vprob:"):  # a P(Yes) query: no text, a probability
        return isinstance(r.get("p_yes"), int | float) and not isinstance(r["p_yes"], bool)
    return len(r["outputs"]) > 0


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


METHODS = ("sss", "best-of-n", "pyes-vote", "consistency")


class Searcher:
    """Runs (or resumes) a primary run, call by call, writing every call to the transcripts.

    `method` says which calls a problem needs (a served request asks for one method; a `scalelab search` run
    is `sss` and analyses every baseline from the same calls): `sss` verifies and plays Algorithm 1's
    tie-breaks, `best-of-n` and `pyes-vote` verify without tie-breaks, `consistency` only samples."""

    def __init__(self, cfg: SearchConfig, run_dir: Path | None, task: tasksmod.Task, gen: Backend | None,
                 ver: Backend | None, fmt, judge: Backend | None = None, batched: bool = True,
                 tr: Transcripts | None = None, grades: Transcripts | None = None, method: str = "sss"):
        self.cfg, self.task, self.gen, self.ver, self.fmt = cfg, task, gen, ver, fmt
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.judge, self.method = judge, method
        self.batched = batched  # a problem's verifications, and a round's tie-breaks, as one batched call
        self.tr = tr if tr is not None else Transcripts(self.run_dir / "transcripts.jsonl")
        # the LLM judge's calls: grading, not the method
        self.grades = grades if grades is not None else Transcripts(
            self.run_dir / "judge.jsonl" if self.run_dir is not None else None, ("judge",))
        # problem id -> the name its seeds derive from (served requests: one name, so a seed reproduces)
        self.seed_names: dict[str, str] = {}
        self.on_call: Callable[[dict], None] | None = None  # told of each new call record

    def seed(self, key: str, pid: str) -> int:
        name = self.seed_names.get(pid)
        return derive_seed(self.cfg.seed, key if name is None else key.replace(pid, name, 1))

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
        seed = self.seed(key, pid)
        t0 = time.perf_counter()
        if prob is not None:
            r = backend.prob_yes(prompt, *prob)
        else:
            r = backend.generate(prompt, SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature,
                                                        seed=seed, stop=list(stop or [])))
        return self._record(key, phase, pid, backend, prompt, n, temperature, max_tokens, seed, r,
                            time.perf_counter() - t0, tr)

    def prefetch(self, calls: list[tuple]) -> None:
        """Make these generation calls (`call`'s positional arguments: key, phase, pid, backend, prompt, n,
        temperature, max_tokens, stop) as one batched backend request where the backend can, each recorded as
        its own transcript line exactly as `call` would (same seed, so the same samples); the batch's wall time
        is shared evenly between its calls. Calls already in the transcripts are skipped."""
        todo = [c for c in calls if self.tr.get(c[0]) is None]
        by_backend: dict[int, list[tuple]] = defaultdict(list)
        for c in todo:
            if c[3] is not None:
                by_backend[id(c[3])].append(c)
        for group in by_backend.values():
            if len(group) == 1:
                continue  # `call` makes it when it is asked for
            backend = group[0][3]
            params = [SamplingParams(n=n, max_tokens=mt, temperature=t, seed=self.seed(key, pid),
                                     stop=list(stop or [])) for key, _, pid, _, _, n, t, mt, stop in group]
            t0 = time.perf_counter()
            responses = generate_many(backend, [(c[4], sp) for c, sp in zip(group, params)])
            share = (time.perf_counter() - t0) / max(1, len(responses))
            failure = None
            for (key, phase, pid, _, prompt, n, t, mt, _), sp, r in zip(group, params, responses):
                if isinstance(r, BackendError):
                    failure = failure or r
                else:  # what finished is kept, so a resume redoes only the rest
                    self._record(key, phase, pid, backend, prompt, n, t, mt, sp.seed, r, share, self.tr)
            if failure is not None:
                raise failure

    def _record(self, key, phase, pid, backend, prompt, n, temperature, max_tokens, seed, r, seconds, tr) -> dict:
        rec = tr.add({
            "key": key, "phase": phase, "problem": pid, "backend": backend.name, "price": backend.price,
            "prompt": prompt, "n": n, "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
            "outputs": [{"text": c.text, "tokens": c.n_tokens, "finish": c.finish_reason} for c in r.choices],
            "p_yes": r.p_yes,
            "usage": {"prompt": r.prompt_tokens, "completion": r.completion_tokens, "cached": r.cached_tokens,
                      "naive_prompt": r.naive_prompt_tokens},
            "seconds": round(seconds, 4)})
        if self.on_call is not None:
            self.on_call(rec)
        return rec

    # --- phases ------------------------------------------------------------------------------------------
    def run_problem(self, p: tasksmod.Problem) -> ProblemRecord:
        c, fmt = self.cfg, self.fmt
        rec = ProblemRecord(p)
        g = self.call(f"gen:{p.id}", "generate", p.id, self.gen, fmt.solve(p), c.k_inf, c.temperature, c.max_tokens,
                      fmt.stop)
        rec.responses = [o["text"] for o in g["outputs"]]
        rec.answers = [self.task.extract(p, t) for t in rec.responses]
        rec.keys = [self.task.key(p, a) for a in rec.answers]
        if p.kind == "free" and p.meta.get("equiv") == "judge":
            rec.keys = self._merge_equivalent(p, rec.answers, rec.keys)
        rec.correct = [self._correct(p, a) for a in rec.answers]
        k = len(rec.responses)
        rec.verdicts = [[] for _ in range(k)]
        rec.dropped = [False] * k
        if self.method == "consistency":  # a vote over final answers: no verification
            pass
        elif c.verifier == "checker":  # programmatic verifier, for analysis: no model calls
            rec.verdicts = [[float(ok)] * c.k_verif for ok in rec.correct]
        else:
            first = c.prelim_k if c.prelim else c.k_verif
            if self.batched:
                self.prefetch([self._verify_call(rec, i, 0, first) for i in range(k)])
            for i in range(k):
                self._verify(rec, i, 0, first)
            if c.prelim:
                self._prelim_filter(rec)
                live = [i for i in range(k) if not rec.dropped[i]]
                if self.batched:
                    self.prefetch([self._verify_call(rec, i, 1, c.k_verif - c.prelim_k) for i in live])
                for i in live:
                    self._verify(rec, i, 1, c.k_verif - c.prelim_k)
        if c.tiebreak and self.method == "sss":
            self._select(rec)
        else:
            rec.pick = pick(self.method, rec.scores(), rec.keys, rec.dropped)
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

    EQUIV_MAX = 8  # distinct answers the judge compares (at most 28 calls); the rest keep their text keys

    def _merge_equivalent(self, p: tasksmod.Problem, answers: list, keys: list) -> list:
        """Voting keys of free-form answers, merged where the judge says two final answers are the same: each
        distinct answer (first seen first) is compared with the representatives before it and joins the
        first that matches. Calls go to the grades log (phase `judge`)."""
        first: dict[str, str] = {}
        for a, k in zip(answers, keys):
            if k is not None and k not in first:
                first[k] = a
        reps: list[str] = []
        same: dict[str, str] = {}
        for n, (k, a) in enumerate(first.items()):
            if n >= self.EQUIV_MAX:
                break
            for r in reps:
                ids = "".join(hashlib.sha256(x.encode()).hexdigest()[:10] for x in (r, k))
                prompt = [{"role": "user", "content": prompt_file("sss-equiv-v1.txt").format(
                    question=p.question, a=first[r][:500], b=a[:500])}]
                out = self.call(f"equiv:{p.id}:{ids}", "judge", p.id, self.judge, prompt, 1, 0.0, 4, [],
                                log=self.grades)
                if out["outputs"] and out["outputs"][0]["text"].strip().lower().startswith("yes"):
                    same[k] = r
                    break
            else:
                reps.append(k)
        return [same.get(k, k) for k in keys]

    def _verify_call(self, rec: ProblemRecord, i: int, part: int, n: int) -> tuple:
        c, p = self.cfg, rec.problem
        return (f"ver:{p.id}:{i}:{part}", "verify", p.id, self.ver, self.fmt.verify(p, rec.responses[i]), n,
                c.verify_temperature, c.verify_max_tokens, self.fmt.stop)

    def _tie_calls(self, rec: ProblemRecord, i: int, j: int) -> list[tuple]:
        """The (up to two) tie-break calls of matchup (i, j): i shown first for ⌈k_tie/2⌉ samples, then j."""
        c, p = self.cfg, rec.problem
        return [(f"tie:{p.id}:{i}:{j}:{part}", "tiebreak", p.id, self.ver,
                 self.fmt.compare(p, rec.responses[a], rec.responses[b]), n, c.tie_temperature, c.verify_max_tokens,
                 self.fmt.stop)
                for part, (a, b, n) in enumerate([(i, j, (c.k_tie + 1) // 2), (j, i, c.k_tie // 2)]) if n > 0]

    def _verify(self, rec: ProblemRecord, i: int, part: int, n: int) -> None:
        c, p, resp = self.cfg, rec.problem, rec.responses[i]
        v = self.call(*self._verify_call(rec, i, part, n))
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
        rng = np.random.default_rng(self.seed(f"prelim:{rec.problem.id}", rec.problem.id) % 2**32)
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
        def votes(i: int, j: int) -> tuple[float, float]:
            if rec.responses[i].strip() == rec.responses[j].strip():
                rec.tie_votes[(i, j)] = (0.0, 0.0)
                return 0.0, 0.0  # identical responses: nothing diverges, a draw without a call
            vi = vj = 0.0
            for (a, b), call in zip([(i, j), (j, i)], self._tie_calls(rec, i, j)):
                r = self.call(*call)
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
            keys = [rec.keys[i] for i in live]
            if self.batched and needs_tiebreak(sub_scores, keys, self.cfg.trigger, self.cfg.threshold):
                sl = [live[i] for i in shortlist(sub_scores, self.cfg.threshold)]  # the round robin plays every pair
                self.prefetch([call for a, i in enumerate(sl) for j in sl[a + 1:]
                               if rec.responses[i].strip() != rec.responses[j].strip()
                               for call in self._tie_calls(rec, i, j)])
        pick, played = select(sub_scores, [rec.keys[i] for i in live], self.cfg.trigger, self.cfg.threshold, votes)
        rec.pick, rec.played = live[pick], [live[i] for i in played]


# =========================================================================================== run / replay
def prepare_run(cfg: SearchConfig, run_dir: Path, resume: bool) -> tasksmod.Task:
    """Create or reopen a run directory; a resumed run must have the same call-defining settings."""
    cfg.validate()
    run_dir = Path(run_dir)
    cfg_path = run_dir / "search.json"
    if cfg_path.is_file():
        old = _read_settings(cfg_path)
        spec = {"backend", "verifier", "judge"}  # `local:X` / `run:X` (older runs) name the same model as X
        old.setdefault("quant", "none")  # runs from before --quant decoded in fp32
        changed = [f for f in SearchConfig.CALL_FIELDS
                   if (canonical_spec(old.get(f) or "") if f in spec else old.get(f))
                   != (canonical_spec(getattr(cfg, f)) if f in spec else getattr(cfg, f))]
        if changed:
            raise ScalelabError(f"{run_dir} holds a search with different settings ({', '.join(changed)}); "
                                f"choose another --out")
        if not resume:
            log.info(f"resuming the search in {run_dir}")
    make_dir(run_dir)
    write_json(cfg_path, dataclasses.asdict(cfg))
    prob_path = run_dir / "problems.jsonl"
    if prob_path.is_file():
        task = load_problems(run_dir, cfg)
    else:
        task = tasksmod.load_task(cfg.task, cfg.n_problems, cfg.task_seed)
        prob_path.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in task.problems))
    return task


def _problem(row: object) -> tasksmod.Problem | None:
    """A problems.jsonl row as `prepare_run` writes it, or None."""
    fields = {f.name for f in dataclasses.fields(tasksmod.Problem)}
    if not (isinstance(row, dict) and set(row) <= fields
            and all(isinstance(row.get(k), str) for k in ("id", "question", "answer"))
            and row.get("kind", "number") in ("number", "math", "sudoku", "free") and isinstance(row.get("meta", {}), dict)):
        return None
    p = tasksmod.Problem(**row)
    return None if p.kind == "sudoku" and p.meta.get("size", 4) not in (4, 6, 9) else p


def load_problems(run_dir: Path, cfg: SearchConfig) -> tasksmod.Task:
    path = Path(run_dir) / "problems.jsonl"
    if not path.is_file():
        raise ScalelabError(f"{run_dir} is not a search run (no problems.jsonl)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ScalelabError(f"{path} is corrupt: not UTF-8 text") from None
    problems = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            p = _problem(json.loads(line))
        except json.JSONDecodeError:
            p = None
        if p is None:
            raise ScalelabError(f"{path}:{no}: not a problem record (a JSON object with id, question and answer "
                                "strings, as the search wrote it)")
        problems.append(p)
    return tasksmod.Task(cfg.task, problems)


def _read_settings(path: Path) -> dict[str, Any]:
    """search.json as a dict, or one error naming the file."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ScalelabError(f"{path} is corrupt: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ScalelabError(f"{path} is corrupt: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(values, dict):
        raise ScalelabError(f"{path} is corrupt: expected a JSON object of search settings, "
                            f"got {type(values).__name__}")
    return values


def load_config(run_dir: Path) -> SearchConfig:
    path = Path(run_dir) / "search.json"
    if not path.is_file():
        raise ScalelabError(f"{run_dir} is not a search run (no search.json)")
    try:
        cfg = configmod.make_section(SearchConfig, "search", _read_settings(path))
        cfg.validate()
    except ScalelabError as e:
        raise ScalelabError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    return cfg


def search_backend(spec: str, retries: int = 3, quant: str = "auto") -> Backend:
    """A backend as search uses it: long prompts keep their last tokens, one-token stops match as ids."""
    return make_backend(spec, retries=retries, truncate=True, stop_as_ids=True, quant=quant)


def run_search(cfg: SearchConfig, run_dir: Path, resume: bool = True, gen: Backend | None = None,
               ver: Backend | None = None, progress: Callable[[int, int], None] | None = None,
               judge: Backend | None = None, batched: bool = True) -> list[ProblemRecord]:
    """The primary run: every problem's samples, verifications and tie-breaks, resumable. `batched`: each
    problem's verifications, and each tie-break round, as one batched backend call (the same calls and
    samples as one by one)."""
    cfg.validate()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if gen is None:
        gen = search_backend(cfg.backend, cfg.retries, cfg.quant)
    if ver is None and cfg.verifier != "checker":
        ver = gen if cfg.verifier == "same" else search_backend(cfg.verifier, cfg.retries, cfg.quant)
    if judge is None and cfg.judge:
        judge = search_backend(cfg.judge, cfg.retries)
    task = prepare_run(cfg, run_dir, resume)
    s = Searcher(cfg, run_dir, task, gen, ver, make_format(cfg.prompts), judge, batched=batched)
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


def problem_settings(cfg: SearchConfig, p: tasksmod.Problem) -> tuple[SearchConfig, str]:
    """The settings and method a problem was searched with: the run's, or a served request's own
    (`meta["search"]`, `meta["method"]`, as `search/service.py` records them)."""
    own = p.meta.get("search")
    if not isinstance(own, dict):
        return cfg, "sss"
    try:
        c = dataclasses.replace(cfg, **own)
        c.validate()
    except (TypeError, ScalelabError) as e:
        raise ScalelabError(f"problem {p.id}: bad served settings: {e}") from None
    method = p.meta.get("method", "sss")
    if method not in METHODS:
        raise ScalelabError(f"problem {p.id}: unknown method {method!r}")
    return c, method


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
        s.cfg, s.method = problem_settings(cfg, p)
        if trigger is not None:
            s.cfg.trigger = trigger
        try:
            recs.append(s.run_problem(p))
        except ScalelabError:
            continue
    if s.tr.bad_lines and len(recs) < len(task.problems):  # a corrupt record would silently drop its problem
        raise ScalelabError(f"{s.tr.path}:{s.tr.bad_lines[0]}: not a call record, and {len(task.problems) - len(recs)} "
                            f"problem(s) cannot be replayed without their calls; resume the search to redo them")
    if not recs:
        raise ScalelabError(f"{run_dir} has no finished problem yet")
    return cfg, task, recs, s.tr
