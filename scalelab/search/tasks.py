"""Benchmark tasks for test-time search: generated arithmetic and Sudoku, GSM8K/MATH-style JSONL, checkers.

Used by `search/run.py` (Sampling-based search with self-verification, Zhao et al. 2025, §1 Algorithm 1 and §5's
benchmarks). A task is a list of `Problem`s plus two functions: `extract(problem, response)` pulls the final
answer out of a response (None when there is none: counted, never a crash) and `is_correct(problem, answer)`.

Notable choices:
- Generators are seeded and need no files. Arithmetic word problems have difficulty levels 1-4 (the number
  of operations). Sudoku is 4×4 (Shidoku) with a unique solution and 4-5 clues: uniqueness is decided by
  counting which of the 288 valid 4×4 grids keep the clues; 6×6 and 9×9 are optional (backtracking count).
- Sudoku has a programmatic checker: a grid is correct iff it is complete, keeps the clues and repeats no
  digit in a row, column or box. With a unique solution that is the same as "equals the solution", and it
  is why checking is easier than solving here (issue 7, item 6).
- Numeric equivalence is exact: both sides are parsed as fractions after removing `$`, `,`, `%` and units
  words, so "1,000", "1000.0" and "$1000" agree. MATH-style answers that are not numbers are compared after
  a light LaTeX normalisation; the paper matches answers with an LLM judge (§5, Appendix A.2): the search's
  `--judge BACKEND` asks one about the MATH-style answers this comparison rejects.
- The JSONL loaders report the line number of a bad line (a `DataError`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from scalelab.errors import DataError, ScalelabError


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # the reference final answer (a number, a LaTeX expression, or a solved grid)
    kind: str = "number"  # number | math | sudoku | free (a served question with no checker: `extract_free`)
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ answers
_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+"


def parse_number(s: str) -> Fraction | None:
    """'1,234', '$12.50', '-3/4', '45%' -> an exact Fraction; None if `s` is not a number."""
    t = s.strip().strip(".").replace(",", "").replace("$", "").replace("\\$", "").replace("\\%", "").rstrip("%")
    t = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", t)
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t).strip()
    if not re.fullmatch(r"-?(\d+(\.\d+)?|\.\d+)(/\d+)?", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched."""
    i = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if i < 0:
        return None
    j = text.index("{", i) + 1
    depth, k = 1, j
    while k < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        k += 1
    return text[j:k - 1].strip() if depth == 0 else None


def extract_number(text: str) -> str | None:
    """The final numeric answer of a response: '#### N', then \\boxed{N}, then 'answer is N', then the last
    number in the text."""
    m = re.findall(r"####\s*(" + _NUM + ")", text)
    if m:
        return m[-1]
    b = last_boxed(text)
    if b is not None and parse_number(b) is not None:
        return b
    m = re.findall(r"answer(?: is|:)\s*\**\s*(" + _NUM + ")", text, flags=re.I)
    if m:
        return m[-1]
    m = re.findall(_NUM, text)
    return m[-1] if m else None


def normalize_latex(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(left|right|!|,|;|:|displaystyle)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = s.replace(" ", "").rstrip(".")
    return s


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """Numeric equality when both parse as numbers, else equality after LaTeX normalisation."""
    if a is None or b is None:
        return False
    fa, fb = parse_number(a), parse_number(b)
    if fa is not None and fb is not None:
        return fa == fb
    return normalize_latex(a) == normalize_latex(b)


def normalize_text(s: str) -> str:
    """Free text as voting compares it: lower case, markdown emphasis and quotes removed, whitespace
    collapsed, trailing punctuation dropped."""
    s = re.sub(r"[*_`\"“”]", "", s.lower())
    return re.sub(r"\s+", " ", s).strip().rstrip(".!?;:,").strip()


def extract_free(text: str) -> str | None:
    """The final answer of a free-form response (a served question with no task checker): '#### X', then
    \\boxed{X}, then 'answer is X' / 'answer: X' (X up to the end of its line), else the whole response. The
    voting key (`free_key`) compares numbers exactly and anything else as normalised text."""
    m = re.findall(r"####\s*(.+)", text)
    if m:
        return m[-1].strip()
    b = last_boxed(text)
    if b:
        return b
    m = re.findall(r"answer(?: is|:)\s*(.+)", text, flags=re.I)
    if m and m[-1].strip(" *."):
        return m[-1].strip()
    return text.strip() or None


def answer_key(answer: str | None) -> str | None:
    """A canonical form for voting (Consistency@k): equivalent answers share a key."""
    if answer is None:
        return None
    f = parse_number(answer)
    return str(f) if f is not None else normalize_latex(answer)


def free_key(answer: str | None) -> str | None:
    """The voting key of a free-form answer: an exact number when it parses as one, else normalised text."""
    if answer is None:
        return None
    t = normalize_text(answer)
    f = parse_number(t)
    return str(f) if f is not None else t


# ------------------------------------------------------------------------------------------ Sudoku
def box_shape(size: int) -> tuple[int, int]:
    return {4: (2, 2), 6: (2, 3), 9: (3, 3)}[size]


@lru_cache(maxsize=None)
def all_grids(size: int = 4) -> tuple[tuple[int, ...], ...]:
    """Every valid completed size×size grid (row-major tuples of digits 1..size). 288 for 4×4."""
    if size != 4:
        raise ScalelabError("all_grids enumerates 4×4 only (6×6 has 28,200,960 grids)")
    out = []
    _fill([0] * 16, 0, 4, out, limit=10**6)
    return tuple(tuple(g) for g in out)


def _candidates(g: list[int], i: int, size: int) -> list[int]:
    br, bc = box_shape(size)
    r, c = divmod(i, size)
    used = {g[r * size + j] for j in range(size)} | {g[j * size + c] for j in range(size)}
    r0, c0 = r - r % br, c - c % bc
    used |= {g[(r0 + a) * size + c0 + b] for a in range(br) for b in range(bc)}
    return [d for d in range(1, size + 1) if d not in used]


def _fill(g: list[int], i: int, size: int, out: list, limit: int) -> None:
    """Backtracking over cells in row-major order; appends solutions to `out` until `limit`."""
    while i < size * size and g[i]:
        i += 1
    if i == size * size:
        out.append(list(g))
        return
    for d in _candidates(g, i, size):
        g[i] = d
        _fill(g, i + 1, size, out, limit)
        if len(out) >= limit:
            g[i] = 0
            return
    g[i] = 0


def count_solutions(puzzle: list[int], size: int, limit: int = 2) -> int:
    """Solutions of a puzzle (0 = blank), counted up to `limit`."""
    out: list = []
    _fill(list(puzzle), 0, size, out, limit)
    return len(out)


def grid_to_text(g, size: int) -> str:
    return "/".join("".join(str(d) if d else "." for d in g[r * size:(r + 1) * size]) for r in range(size))


def text_to_grid(text: str, size: int) -> list[int] | None:
    """'1.3./...' -> digits (0 = blank); None if the shape is wrong."""
    rows = text.strip().split("/")
    if len(rows) != size or any(len(r) != size for r in rows):
        return None
    try:
        return [0 if ch == "." else int(ch) for r in rows for ch in r]
    except ValueError:
        return None


def sudoku_valid(puzzle: list[int], grid: list[int] | None, size: int) -> bool:
    """The checker: complete, keeps the clues, no repeated digit in any row, column or box."""
    if grid is None or len(grid) != size * size or any(not 1 <= d <= size for d in grid):
        return False
    if any(p and p != d for p, d in zip(puzzle, grid)):
        return False
    br, bc = box_shape(size)
    for r in range(size):
        if len(set(grid[r * size:(r + 1) * size])) != size or len({grid[j * size + r] for j in range(size)}) != size:
            return False
    for r0 in range(0, size, br):
        for c0 in range(0, size, bc):
            if len({grid[(r0 + a) * size + c0 + b] for a in range(br) for b in range(bc)}) != size:
                return False
    return True


def _random_full_grid(size: int, rng: random.Random) -> list[int]:
    if size == 4:
        return list(rng.choice(all_grids(4)))
    g = [0] * (size * size)

    def fill(i: int) -> bool:
        if i == size * size:
            return True
        ds = _candidates(g, i, size)
        rng.shuffle(ds)
        for d in ds:
            g[i] = d
            if fill(i + 1):
                return True
        g[i] = 0
        return False

    fill(0)
    return g


@lru_cache(maxsize=1)
def _grid_array():
    import numpy as np

    return np.array(all_grids(4), dtype=np.int8)


def unique_4x4(puzzle: list[int]) -> bool:
    """Uniqueness decided against all 288 valid grids: exactly one keeps the clues."""
    idx = [i for i, p in enumerate(puzzle) if p]
    G = _grid_array()
    return int((G[:, idx] == [puzzle[i] for i in idx]).all(axis=1).sum()) == 1


def sudoku_problems(n: int, seed: int = 0, clues: int | tuple[int, ...] = (4, 5), size: int = 4,
                    split: str = "all") -> list[Problem]:
    """`n` distinct seeded Sudoku puzzles with a unique solution.

    4×4: draw a grid among the 288 and `clues` cells, keep the puzzle if exactly one grid fits (4 is the
    minimum for a unique 4×4 puzzle). 6×6/9×9: remove cells from a random grid while the solution stays unique
    (`clues` is then ignored; the result is a minimal puzzle). `split` = "train" / "test" / "all" keeps the
    puzzles whose hash falls in that part (1 in 10 is test), so a model can be trained on puzzles it is never
    tested on.
    """
    if size not in (4, 6, 9):
        raise ScalelabError(f"Sudoku size must be 4, 6 or 9, got {size}")
    if n < 0:
        raise ScalelabError(f"the number of problems must be >= 0, got {n}")
    rng = random.Random(f"sudoku-{size}-{seed}")
    clue_choices = (clues,) if isinstance(clues, int) else tuple(clues)
    if size == 4 and not all(4 <= c <= 15 for c in clue_choices):
        raise ScalelabError("4×4 puzzles need 4..15 clues (fewer than 4 is never unique)")
    seen, out = set(), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ScalelabError(f"could not generate {n} distinct puzzles (asked for too many?)")
        sol = _random_full_grid(size, rng)
        if size == 4:
            c = rng.choice(clue_choices)
            keep = set(rng.sample(range(16), c))
            puzzle = [d if i in keep else 0 for i, d in enumerate(sol)]
            if not unique_4x4(puzzle):
                continue
        else:
            puzzle = list(sol)
            for i in rng.sample(range(size * size), size * size):
                d, puzzle[i] = puzzle[i], 0
                if count_solutions(puzzle, size) != 1:
                    puzzle[i] = d
        q = grid_to_text(puzzle, size)
        if q in seen or (split != "all" and (puzzle_split(q) != split)):
            continue
        seen.add(q)
        out.append(Problem(id=f"sudoku{size}-{seed}-{len(out)}", question=q, answer=grid_to_text(sol, size),
                           kind="sudoku", meta={"size": size, "clues": sum(1 for d in puzzle if d)}))
    return out


def puzzle_split(q: str) -> str:
    import hashlib

    return "test" if int(hashlib.sha1(q.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"


def extract_grid(text: str, size: int = 4) -> str | None:
    """The first size×size grid in a response: rows of digits separated by '/' or newlines."""
    m = re.search(r"(?<![\d.])" + "[/\n ]*".join([rf"([1-9]{{{size}}})"] * size), text)
    if not m:
        return None
    return "/".join(m.groups())


# ------------------------------------------------------------------------------------------ arithmetic
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells", "cards", "stamps"]


def arithmetic_problems(n: int, seed: int = 0, level: int = 1) -> list[Problem]:
    """Seeded word problems; `level` (1-4) is the number of operations after the starting amount.

    Level 1-2 use + and -, level 3 adds "times as many", level 4 adds a fair split ("shares equally"). All
    intermediate values are positive integers.
    """
    if not 1 <= level <= 4:
        raise ScalelabError(f"arithmetic level must be 1..4, got {level}")
    if n < 0:
        raise ScalelabError(f"the number of problems must be >= 0, got {n}")
    rng = random.Random(f"arith-{level}-{seed}")
    out = []
    for idx in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        x = rng.randint(3, 20 if level <= 2 else 12)
        parts = [f"{name} has {x} {item}."]
        used: set[str] = set()
        ops = ["add", "sub"] + (["mul"] if level >= 3 else []) + (["div"] if level >= 4 else [])
        for step in range(level):
            op = rng.choice(ops)
            if op == "mul" and "mul" in used:  # one multiplication at most keeps the numbers small
                op = "add"
            used.add(op)
            if op == "sub" and x <= 1:
                op = "add"
            if op == "div" and not [d for d in (2, 3, 4, 5) if x % d == 0 and x // d >= 1]:
                op = "add"
            if op == "add":
                a = rng.randint(2, 15)
                parts.append(rng.choice([f"{name} buys {a} more.", f"A friend gives {name} {a} more {item}.",
                                         f"Then {name} finds {a} more."]))
                x += a
            elif op == "sub":
                a = rng.randint(1, min(x - 1, 12))
                parts.append(rng.choice([f"{name} gives away {a}.", f"{name} loses {a} of them.",
                                         f"Then {name} uses {a}."]))
                x -= a
            elif op == "mul":
                a = rng.choice([2, 3])
                parts.append(f"Then the number of {item} {name} has becomes {'twice' if a == 2 else 'three times'} "
                             f"as large.")
                x *= a
            else:
                d = rng.choice([d for d in (2, 3, 4, 5) if x % d == 0])
                parts.append(f"{name} shares them equally among {d} friends and keeps one share.")
                x //= d
        parts.append(f"How many {item} does {name} have now?")
        out.append(Problem(id=f"arith{level}-{seed}-{idx}", question=" ".join(parts), answer=str(x),
                           meta={"level": level}))
    return out


# ------------------------------------------------------------------------------------------ JSONL
def load_jsonl(path: str | Path, style: str = "auto", limit: int = 0) -> list[Problem]:
    """GSM8K-style (`question`, `answer` ending in '#### N') or MATH-style (`problem`/`question` and a
    `solution` or `answer` holding \\boxed{...}) problems. A bad line raises a DataError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    if style not in ("auto", "gsm8k", "math"):
        raise ScalelabError(f"JSONL style must be auto, gsm8k or math, got {style!r}")
    out: list[Problem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        q = row.get("question", row.get("problem"))
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: missing a 'question' (or 'problem') string")
        sol = row.get("answer", row.get("solution"))
        if not isinstance(sol, str | int | float) or isinstance(sol, bool):
            raise DataError(f"{where}: missing an 'answer' (or 'solution')")
        sol = str(sol)
        gsm = re.search(r"####\s*(.+?)\s*$", sol)
        boxed = last_boxed(sol) if "\\boxed" in sol or "\\fbox" in sol else None
        if style == "gsm8k" or (style == "auto" and gsm):
            if not gsm:
                raise DataError(f"{where}: GSM8K-style answer has no final '#### N' line")
            ans, kind = gsm.group(1).replace(",", ""), "number"
        elif style == "math" or boxed is not None:
            if boxed is None and "solution" in row and "answer" not in row:
                raise DataError(f"{where}: MATH-style solution has no \\boxed{{...}} answer")
            ans = boxed if boxed is not None else sol.strip()
            kind = "number" if parse_number(ans) is not None else "math"
        else:
            ans = sol.strip()
            kind = "number" if parse_number(ans) is not None else "math"
        out.append(Problem(id=str(row.get("id", f"{path.stem}-{no}")), question=q, answer=ans, kind=kind,
                           meta={"line": no}))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path} holds no problems")
    return out


# ------------------------------------------------------------------------------------------ Task
@dataclass
class Task:
    """Problems plus how to read and check an answer (programmatically; the search's optional LLM judge,
    `--judge`, takes over for MATH-style answers this rejects)."""

    name: str
    problems: list[Problem]

    def extract(self, problem: Problem, response: str) -> str | None:
        if problem.kind == "sudoku":
            return extract_grid(response, problem.meta.get("size", 4))
        if problem.kind == "math":
            return last_boxed(response) or extract_number(response)
        if problem.kind == "free":
            return extract_free(response)
        return extract_number(response)

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        if answer is None:
            return False
        if problem.kind == "sudoku":
            size = problem.meta.get("size", 4)
            return sudoku_valid(text_to_grid(problem.question, size), text_to_grid(answer, size), size)
        if problem.kind == "free":
            return bool(problem.answer) and free_key(answer) == free_key(problem.answer)
        return answers_equivalent(answer, problem.answer)

    def key(self, problem: Problem, answer: str | None) -> str | None:
        """Voting key: equivalent answers collide."""
        if problem.kind == "free":
            return free_key(answer)
        return answer if problem.kind == "sudoku" else answer_key(answer)


def load_task(spec: str, n: int = 100, seed: int = 0) -> Task:
    """'arithmetic[:LEVEL]', 'sudoku[:CLUES[:SIZE]]', or a JSONL file path (GSM8K/MATH style)."""
    head, *rest = spec.split(":")
    try:
        if head == "arithmetic":
            return Task(spec, arithmetic_problems(n, seed, int(rest[0]) if rest else 1))
        if head == "sudoku":
            clues = (int(rest[0]),) if rest and rest[0] else (4, 5)
            size = int(rest[1]) if len(rest) > 1 else 4
            return Task(spec, sudoku_problems(n, seed, clues, size, split="test"))
    except ValueError:
        raise ScalelabError(f"bad task spec {spec!r}: use arithmetic[:LEVEL], sudoku[:CLUES[:SIZE]] or a file") from None
    path = Path(spec)
    if not path.suffix == ".jsonl" and not path.exists():
        raise ScalelabError(f"unknown task {spec!r}: use arithmetic[:LEVEL], sudoku[:CLUES[:SIZE]] or a .jsonl file")
    return Task(path.stem, load_jsonl(path, limit=n))

