"""Sampling-based search with self-verification (Zhao et al. 2025, "Sample, Scrutinize and Scale").

One module a job:
- `tasks`: the benchmarks (arithmetic, Sudoku, GSM8K/MATH-style JSONL) and their answer checkers;
- `formats`: prompts in and verdicts/winners out (chat, few-shot, the Sudoku model's one-line format);
- `select`: Algorithm 1's selection and the baselines' math, as pure functions;
- `run`: the config, transcripts, the searcher (resumable call by call) and replay without model calls;
- `analyse`: every metric, curve and cost of a run from its transcripts;
- `cost`: token accounting and the price table; `report`: report.md and plots; `bench`: the paper's §6
  verification benchmark built from a run.
Models come through the one `Backend` protocol of `scalelab.backends`.
"""

from scalelab.backends import BackendError
from scalelab.search.analyse import analyse, curves, method_costs, usage_by_phase
from scalelab.search.formats import ChatFormat, SudokuFormat, make_format, prompt_file
from scalelab.search.report import write_report
from scalelab.search.run import (ProblemRecord, SearchConfig, Searcher, Transcripts, derive_seed, load_config,
                                 replay, run_search, search_backend)
from scalelab.search.select import (auroc, expected_pick_accuracy, needs_tiebreak, paired_bootstrap,
                                    pass_at_k_unbiased, pick, select, shortlist, tournament, vote_accuracy)

__all__ = ["BackendError", "analyse", "curves", "method_costs", "usage_by_phase", "ChatFormat", "SudokuFormat",
           "make_format", "prompt_file", "write_report", "ProblemRecord", "SearchConfig", "Searcher", "Transcripts",
           "derive_seed", "load_config", "replay", "run_search", "search_backend", "auroc",
           "expected_pick_accuracy", "needs_tiebreak", "paired_bootstrap", "pass_at_k_unbiased", "pick", "select",
           "shortlist", "tournament", "vote_accuracy"]
