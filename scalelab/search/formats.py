"""Prompt formats of sampling-based search (Zhao et al. 2025): how a problem, a candidate and a pair of
candidates become prompts, and how verdicts and winners are read back.

`chat` and `fewshot` are our versioned prompts (`scalelab/prompts/sss-*.txt`), written from the paper's
description since its own prompts are not reproduced in our notes; `sudoku` is the one-line format of the
self-verifying Sudoku model trained by `papers/sudoku_model.py`.
"""

from __future__ import annotations

from importlib import resources

from scalelab.backends import Prompt
from scalelab.errors import ScalelabError
from scalelab.search import tasks as tasksmod

STYLES = ("chat", "fewshot", "sudoku", "served")
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
    `papers/sudoku_model.py`): solve, verify (rewrite as clue, row, column and box lemmas with their checks, then
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


class ServedFormat(ChatFormat):
    """A served request (`search/service.py`): candidates answer the client's own messages
    (`problem.meta["messages"]`); verification and comparison are `chat`'s, over the question as asked."""

    def solve(self, p: tasksmod.Problem) -> Prompt:
        messages = p.meta.get("messages")
        return [dict(m) for m in messages] if isinstance(messages, list) and messages else super().solve(p)


def make_format(style: str) -> ChatFormat | SudokuFormat:
    if style == "served":
        return ServedFormat()
    if style in ("chat", "fewshot"):
        return ChatFormat(fewshot=style == "fewshot")
    if style == "sudoku":
        return SudokuFormat()
    raise ScalelabError(f"unknown prompt style {style!r}: chat, fewshot or sudoku")
