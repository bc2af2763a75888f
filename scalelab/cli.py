"""The `scalelab` command: every subcommand is a short function that parses flags and calls the library.

Errors a user can cause (a `ScalelabError`, or a bad flag) end with one line on stderr and exit status 2.
Shell completion: `scalelab --install-completion`.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.26 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from scalelab import log as logmod
from scalelab.errors import ConfigError, ScalelabError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="scalelab: a hackable lab for how language models scale.")
sweep_app = typer.Typer(no_args_is_help=True, help="Run a grid of training runs and fit scaling laws.")
search_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                         help="Sampling-based search with self-verification (SSS): run, rescore, bench, train the "
                              "Sudoku model.")
app.add_typer(sweep_app, name="sweep")
app.add_typer(search_app, name="search")

MODEL_HELP = "smollm2, a .gguf file, a run directory, or openai:<url>#<model>"
DTYPE_HELP = "float32 (default) or bfloat16 (faster, changes answers); for --quant none (int8/int4 run in bfloat16)"
QUANT_HELP = ("auto (default): int4 for GGUF files whose matmuls are all Q4_0/Q4_1/Q8_0, e.g. smollm2 (it keeps their "
              "blocks exactly; vs fp32 on 20k tokens: KL 0.0013 nats/token, top-1 97.6%, 2.1x single-stream speed), "
              "none otherwise | none (fp32, or --dtype) | int8 | int4: weight-only CPU kernels, bfloat16 activations")
BF16_WARNING = ("warning: bfloat16 roughly doubles CPU decode speed, but in the measurement behind scalelab's issue 5 "
                "(SmolLM2-135M on a 2-core CPU) it moved the logits by up to 1.2 and changed 27 of 50 greedy "
                "answers; float32 is the reference")
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.lr=1e-3")]


# ============================================================================================= training
@app.command()
def train(
    recipe: Annotated[Optional[str], typer.Option(help="a shipped recipe name (tiny, small, bd3-l4) or a TOML file")] = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its newest checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    strategy: Annotated[Optional[str], typer.Option(
        help="single | ddp | diloco (= --set distributed.strategy=...; ddp and diloco run under torchrun)")] = None,
) -> None:
    """Train a model from a recipe into a run directory."""
    from scalelab import config, distributed, report, train as trainmod
    from scalelab.model import check_memory

    logmod.setup()
    cfg = config.load(recipe, [*(set_ or []), *([f"distributed.strategy={strategy}"] if strategy else [])])
    check_memory(cfg)  # before the data, the tokenizer or any tensor
    run_dir = out or Path("runs") / cfg.name
    summary = trainmod.train(cfg, run_dir, resume=resume, progress=not quiet)
    if distributed.env_rank() != 0:  # under torchrun, rank 0 writes the report and speaks
        return
    path = report.run_report(run_dir)
    typer.echo(f"val loss {summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.4f} bits/byte; report: {path}")


@app.command()
def report(
    run: Annotated[Path, typer.Option(help="run directory")],
    tensorboard: Annotated[bool, typer.Option(
        help="also (re)write the run's TensorBoard events, tb/, from metrics.jsonl (needs scalelab[tb])")] = False,
) -> None:
    """Write report.md and loss plots for a run directory."""
    from scalelab import report as reportmod

    if tensorboard:
        from scalelab import tb

        tb.summary_writer("--tensorboard")  # before anything is written
    typer.echo(str(reportmod.run_report(run)))
    if tensorboard:
        typer.echo(str(tb.backfill(run)))


@app.command()
def compare(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="run directories", show_default=False)] = None,
    metric: Annotated[str, typer.Option(
        help="a metrics.jsonl field: val_loss, val_bpb, loss, lr, grad_norm, ...")] = "val_loss",
    x: Annotated[str, typer.Option("--x", help="tokens | steps | seconds")] = "tokens",
    out: Annotated[Path, typer.Option(help="output directory (compare.md, compare.png)")] = Path("runs/compare"),
) -> None:
    """Overlay runs' curves of one metric (compare.png); tabulate final metrics and config differences (compare.md)."""
    from scalelab import compare as comparemod

    typer.echo(str(comparemod.compare(list(runs or []), metric=metric, x=x, out=out)))


@sweep_app.command("diloco")
def sweep_diloco(
    sizes: Annotated[str, typer.Option(help="model widths (model.d_model), comma-separated")] = "64,96,128",
    replicas: Annotated[str, typer.Option(help="DiLoCo replica counts M, comma-separated")] = "1,2,4",
    h: Annotated[int, typer.Option("--h", help="inner steps H between outer syncs")] = 30,
    recipe: Annotated[Optional[str], typer.Option(help="base recipe (default: the built-in defaults)")] = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option(help="fixed steps per run (default: tokens-per-param × N)")] = None,
    tokens_per_param: Annotated[float, typer.Option(help="token budget D = this × N (Chinchilla: 20)")] = 20.0,
    ddp: Annotated[bool, typer.Option(help="include the DDP baseline")] = True,
    out: Annotated[Path, typer.Option(help="sweep directory")] = Path("runs/sweep-diloco"),
) -> None:
    """Run DDP and DiLoCo for each size and M (sequentially), fit L = A·N^α per strategy and L = A·N^α·M^β."""
    import logging

    from scalelab import config, scaling

    logmod.setup()
    if steps is not None and steps < 1:
        raise ScalelabError("--steps must be >= 1")
    if tokens_per_param <= 0:
        raise ScalelabError("--tokens-per-param must be > 0")
    record = scaling.sweep_diloco(out, _ints(sizes, "--sizes"), _ints(replicas, "--replicas"), h,
                                  config.recipe_path(recipe) if recipe else None, set_ or [], steps,
                                  tokens_per_param, ddp, log=logging.getLogger("scalelab").info)
    for key, f in record["fits"].items():
        fit = scaling.Fit(**f)
        typer.echo(f"{key}: {fit.formula()}  (R² {fit.r2:.3f}, RMS log residual {fit.rms_log:.4f})")
    typer.echo(f"report: {out / 'scaling.md'}")


def _ints(spec: str, name: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ScalelabError(f"{name} must be comma-separated integers, got {spec!r}") from None


# ============================================================================================= inference
@app.command()
def sample(
    model: Annotated[str, typer.Option("--model", "--run", help=MODEL_HELP)] = "smollm2",
    prompt: Annotated[str, typer.Option(help="text to continue (with --chat: the user message)")] = "",
    n: Annotated[int, typer.Option("-n", help="number of samples")] = 1,
    max_tokens: Annotated[Optional[int], typer.Option(help="new tokens per sample (default 200 for runs, 128 else)")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy (default 0.8 for runs, 1.0 for BD3 runs, "
                                                              "0.7 else)")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus mass, 1 = off (default 0.95 for runs, "
                                                        "diffusion.top_p for BD3 runs, 1 else)")] = None,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    seed: Annotated[int, typer.Option(help="sample i uses engine.sample_seed(seed, i)")] = 0,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="wrap the prompt in the model's chat template "
                                                 "(default: chat for GGUF models and servers, raw for runs)")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 "
                                                    "(= --model openai:<url>#default; key from $OPENAI_API_KEY)")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    quant: Annotated[str, typer.Option(help=QUANT_HELP)] = "auto",
    mode: Annotated[str, typer.Option(help="auto (from the run) | ar | bd3; a mismatch with the run is an error")] = "auto",
    steps: Annotated[Optional[int], typer.Option(help="BD3: denoising steps per block, 1..block size "
                                                      "(default diffusion.sample_steps, 0 = block size)")] = None,
) -> None:
    """Sample n continuations of a prompt from any model: a lab run (autoregressive or BD3-LM), a GGUF file, the
    embedded smollm2, or an OpenAI-compatible server. `generate` is an alias."""
    from scalelab import backends

    if dtype == "bfloat16":
        print(BF16_WARNING, file=sys.stderr)
    spec = f"openai:{base_url}#{model if model != 'smollm2' else 'default'}" if base_url else model
    r = backends.sample(spec, prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=seed, stop=stop or [], chat=chat, dtype=dtype, mode=mode, steps=steps,
                         quant=quant)
    for i, (text, finish) in enumerate(r.samples):
        if n > 1:
            typer.echo(f"--- sample {i + 1} ({finish}) ---")
        typer.echo(text)
    if r.usage:
        print(f"[{r.usage[0]} prompt + {r.usage[1]} completion tokens]", file=sys.stderr)


app.command("generate", help="Alias of `sample`: sample n completions of one prompt from any model.")(sample)


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Option(help="run directory (its newest checkpoint is exported)")],
    out: Annotated[Path, typer.Option(help="output directory (gguf: or a FILE.gguf); must not exist or be empty, "
                                           "unless --force")],
    format_: Annotated[str, typer.Option("--format", help="hf (a transformers / vLLM / lm-eval directory) | gguf "
                                                          "(llama.cpp)")] = "hf",
    dtype: Annotated[str, typer.Option(help="weights: f32 (default) | f16 | bf16 (hf) | q8_0 (gguf)")] = "f32",
    force: Annotated[bool, typer.Option(help="replace an existing --out (the new copy is complete before the "
                                             "old one goes)")] = False,
) -> None:
    """Export a run as a Hugging Face Llama directory or a llama.cpp GGUF file (plain Llama runs only)."""
    from scalelab import export as exportmod

    path = exportmod.export(run, format_, out, dtype=dtype, force=force)
    typer.echo(str(path))


@app.command()
def chat(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "smollm2",
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option(help="new tokens per reply")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass; 1 = off")] = 0.95,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    quant: Annotated[str, typer.Option(help=QUANT_HELP)] = "auto",
) -> None:
    """Talk to a local model, streaming its replies (empty line or Ctrl-D ends)."""
    from scalelab.backends import LocalBackend
    from scalelab.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    params.validate()
    if dtype == "bfloat16":
        print(BF16_WARNING, file=sys.stderr)
    backend = LocalBackend(model, dtype=dtype, quant=quant)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        print("bot> ", end="", flush=True)
        for deltas in backend.stream_ids(backend.prompt_ids(messages), params):
            for d in deltas:
                reply += d.text
                print(d.text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
        params.seed = (params.seed or 0) + 1


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(
        help="smollm2, a .gguf file or a run directory (default smollm2, unless --upstream)")] = None,
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8000,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    allow_origin: Annotated[Optional[list[str]], typer.Option(
        help="a browser origin allowed besides localhost, e.g. http://localhost:3000 (repeatable; * allows any)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="the most tokens a request may ask for (default: the context)")] = None,
    max_n: Annotated[int, typer.Option(help="the most samples per request")] = 64,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help="the longest prompt accepted (default: the context − 1)")] = None,
    max_body: Annotated[int, typer.Option(help="the largest request body in bytes")] = 1 << 20,
    batch_rows: Annotated[int, typer.Option(help="sequences decoded together (a request with n samples takes n)")] = 64,
    kv_mib: Annotated[float, typer.Option(help="KV cache budget of the batch in MiB")] = 512.0,
    max_waiting: Annotated[int, typer.Option(help="requests waiting for room in the batch; one more gets a 429")] = 64,
    max_prompts: Annotated[int, typer.Option(help="prompts in one batched /v1/completions request")] = 64,
    grace: Annotated[float, typer.Option(help="seconds in-flight requests get to finish after SIGTERM")] = 10.0,
    quant: Annotated[str, typer.Option(help=QUANT_HELP)] = "auto",
    upstream: Annotated[Optional[str], typer.Option(
        help="openai:<url>#<model>: be a proxy; searches sample from this server, other requests pass through")] = None,
    verifier_upstream: Annotated[Optional[str], typer.Option(
        help="openai:<url>#<model> that verifies and plays tie-breaks (default: the generator itself)")] = None,
    log_dir: Annotated[Optional[Path], typer.Option(
        help="append every search's calls here (transcripts.jsonl; `scalelab search rescore DIR` replays them)")] = None,
    max_search_calls: Annotated[int, typer.Option(help="the most samples (k + k × kv) one search may ask for")] = 1024,
    max_searches: Annotated[int, typer.Option(help="searches running at once; one more gets a 429")] = 8,
    prices: Annotated[Optional[Path], typer.Option(help="a TOML price table extending the shipped one")] = None,
    retries: Annotated[int, typer.Option(help="retries (with backoff) of a failed upstream call")] = 3,
    judge: Annotated[Optional[str], typer.Option(
        help="same | openai:<url>#<model>: an LLM that decides which free-form final answers are the same")] = None,
) -> None:
    """Serve a local model over the OpenAI-compatible API on 127.0.0.1 (chat, completions, streaming), with
    test-time search per request: model `sss:<name>` (or consistency:, pyes-vote:, best-of-n:) or a `search`
    object in the body. With --upstream, a proxy that searches over another OpenAI-compatible server."""
    from scalelab.backends import is_remote, make_backend
    from scalelab.search.service import SearchService
    from scalelab.serve import Limits, serve as serve_fn

    if upstream and model:
        raise ScalelabError("--model and --upstream exclude each other: serve a local model, or proxy a server")
    for name, spec in (("--upstream", upstream), ("--verifier-upstream", verifier_upstream),
                       ("--judge", None if judge == "same" else judge)):
        if spec and not is_remote(spec):
            raise ScalelabError(f"{name} must be openai:<url>#<model>, got {spec!r}")
    if retries < 0:
        raise ScalelabError(f"--retries must be >= 0, got {retries}")
    if dtype == "bfloat16":
        print(BF16_WARNING, file=sys.stderr)
    limits = Limits(max_tokens=max_tokens, max_n=max_n, prompt_tokens=max_prompt_tokens, body_bytes=max_body,
                    rows=batch_rows, kv_mib=kv_mib, waiting=max_waiting, max_prompts=max_prompts,
                    allow_origins=list(allow_origin or []))
    spec = upstream or model or "smollm2"
    gen_up = make_backend(upstream, retries=retries) if upstream else None
    ver = make_backend(verifier_upstream, retries=retries) if verifier_upstream else None
    service_args = dict(ver=ver, ver_spec=verifier_upstream or "", max_calls=max_search_calls,
                        max_searches=max_searches, log_dir=log_dir, prices_file=str(prices or ""))
    SearchService.check(**service_args)  # bad flags fail before the model loads
    service_args.update(judge=make_backend(judge, retries=retries) if judge and judge != "same" else None,
                        judge_spec=judge or "")

    def search(engine_backend):
        gen = engine_backend or gen_up
        return SearchService(gen, spec, names={spec, gen.name}, **service_args)

    serve_fn(None if upstream else spec, port=port, dtype=dtype, limits=limits, grace_s=grace, quant=quant,
             search=search)


# ============================================================================================= search
@search_app.callback()
def search_main(
    ctx: typer.Context,
    backend: Annotated[str, typer.Option(help=MODEL_HELP)] = "smollm2",
    verifier: Annotated[str, typer.Option(help="same | checker | another backend spec")] = "same",
    judge: Annotated[str, typer.Option(help="backend spec of an LLM judge for MATH-style answers the programmatic "
                                            "check rejects (grading only: judge.jsonl, not in the costs)")] = "",
    tasks: Annotated[str, typer.Option("--tasks", help="arithmetic[:LEVEL] | sudoku[:CLUES] | FILE.jsonl")] = "arithmetic",
    n: Annotated[int, typer.Option("-n", help="problems")] = 20,
    k: Annotated[int, typer.Option("--k", help="k_inf: candidates per problem")] = 16,
    kv: Annotated[int, typer.Option("--kv", help="k_verif: verifications per candidate")] = 4,
    k_tie: Annotated[int, typer.Option(help="comparisons per tie-break matchup")] = 4,
    temperature: Annotated[float, typer.Option(help="σ_inf (the paper: 1.5)")] = 1.0,
    verify_temperature: Annotated[float, typer.Option(help="σ_verif")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="per candidate")] = 256,
    verify_max_tokens: Annotated[int, typer.Option(help="per verification / comparison")] = 256,
    score: Annotated[str, typer.Option(help="verdict (mean verdict) | prob (P(Yes) from logprobs)")] = "verdict",
    trigger: Annotated[str, typer.Option(help="alg1 (Algorithm 1, default) | s31 (§3.1)")] = "alg1",
    prelim: Annotated[bool, typer.Option(help="preliminary scoring (§5)")] = False,
    prompts: Annotated[str, typer.Option(help="auto | chat | fewshot | sudoku")] = "auto",
    seeds: Annotated[int, typer.Option(help="subsample seeds for the curves")] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    task_seed: Annotated[int, typer.Option()] = 0,
    price: Annotated[str, typer.Option(help="price-table entry for the generator (default: local / model name)")] = "",
    verifier_price: Annotated[str, typer.Option(help="price-table entry for the verifier")] = "",
    prices: Annotated[Optional[Path], typer.Option(help="your own price table (TOML)")] = None,
    config: Annotated[Optional[Path], typer.Option(help="a TOML file with a [search] table (any SearchConfig key)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set search.k_tie=2")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/search/<task>)")] = None,
    threads: Annotated[int, typer.Option(help="torch threads for local models (0 = default; 1 on a busy CPU)")] = 0,
    quant: Annotated[str, typer.Option(help=QUANT_HELP)] = "auto",
) -> None:
    """Run (or resume) a search and write report.md. Subcommands: rescore, bench, train-sudoku."""
    if ctx.invoked_subcommand is not None:
        return
    import json
    import logging

    from scalelab import search
    from scalelab.backends import is_run

    logmod.setup()
    # The flags, then the TOML file and --set on top: one mapping onto SearchConfig, strict keys.
    flags = dict(backend=backend, verifier=verifier, task=tasks, n_problems=n, task_seed=task_seed,
                 prompts=prompts, k_inf=k, k_verif=kv, k_tie=k_tie, temperature=temperature,
                 verify_temperature=verify_temperature, tie_temperature=verify_temperature, max_tokens=max_tokens,
                 verify_max_tokens=verify_max_tokens, score=score, trigger=trigger, prelim=prelim, seeds=seeds,
                 seed=seed, price=price, verifier_price=verifier_price, prices_file=str(prices or ""),
                 threads=threads, judge=judge, quant=quant)
    cfg = search.SearchConfig.load(flags, config, set_ or [])
    if cfg.prompts == "auto":
        cfg.prompts = "sudoku" if is_run(cfg.backend) else "chat"
    cfg.validate()
    run_dir = out or Path("runs") / "search" / Path(cfg.task.replace(":", "-")).stem
    log = logging.getLogger("scalelab")
    search.run_search(cfg, run_dir, progress=lambda i, t: log.info(f"problem {i}/{t} done"))
    path = search.write_report(run_dir)
    acc = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
    typer.echo(" | ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()))
    typer.echo(f"report: {path}")


@search_app.command("bench")
def search_bench(
    run: Annotated[Path, typer.Argument(help="a search run directory")],
    verifier: Annotated[str, typer.Option(help="backend spec to score (default: the run's verifier)")] = "",
    k: Annotated[int, typer.Option("--k", help="samples per question (Pass@1 and Cons@k)")] = 5,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Optional[Path], typer.Option(help="output directory (default RUN/bench)")] = None,
) -> None:
    """Build a verification benchmark from a search run and score a verifier on it (the paper's §6)."""
    from scalelab.search import bench

    logmod.setup()
    m = bench.run(run, out or run / "bench", verifier, k, seed)
    a = m["accuracy"]
    typer.echo(f"{m['items']} entries | scoring correct {100 * a['correct@1']:.1f}% / wrong {100 * a['wrong@1']:.1f}% "
               f"| comparison {100 * a['compare@1']:.1f}% (Pass@1); Cons@{k}: {100 * a['correct@k']:.1f}% / "
               f"{100 * a['wrong@k']:.1f}% / {100 * a['compare@k']:.1f}%")
    typer.echo(f"report: {(out or run / 'bench') / 'report.md'}")


@search_app.command("rescore")
def search_rescore(
    run: Annotated[Path, typer.Argument(help="a search run directory")],
    trigger: Annotated[Optional[str], typer.Option(
        help="re-select with this tie-break trigger (alg1 | s31); an alg1 run holds every s31 call")] = None,
) -> None:
    """Recompute every metric and the report from transcripts.jsonl, with no model call."""
    from scalelab import search

    if not (run / "transcripts.jsonl").is_file():
        raise ScalelabError(f"{run} has no transcripts.jsonl")
    if search.load_config(run).task == "served":  # a `scalelab serve --log-dir` log: per-request settings
        from scalelab.search import service

        m = service.rescore(run)
        typer.echo(f"{m['answered']} served answers; {m['selections_checked'] - len(m['selections_differ'])} of "
                   f"{m['selections_checked']} selections reproduced from the transcripts")
        typer.echo(f"report: {run / 'report.md'}")
        if m["selections_differ"]:
            raise ScalelabError(f"{len(m['selections_differ'])} selection(s) differ from what was served, "
                                f"first {m['selections_differ'][0]}")
        return
    if trigger is not None:
        m = search.analyse(run, trigger)
        typer.echo(" | ".join(f"{k} {100 * v:.1f}%" for k, v in m["accuracy"].items()) + f"  (trigger {trigger})")
        return
    typer.echo(f"report: {search.write_report(run)}")


@search_app.command("train-sudoku")
def search_train_sudoku(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/sss/sudoku-model"),
    quick: Annotated[bool, typer.Option(help="a tiny model, for a demo or CI")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default)")] = 0,
    config: Annotated[Optional[Path], typer.Option(help="a TOML file with a [sudoku] table (any SVConfig key)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set sudoku.rounds=2")] = None,
) -> None:
    """Train the self-verifying 4×4 Sudoku model (solve, then rounds of sample → check → train)."""
    from dataclasses import asdict

    from scalelab import config as configmod
    from scalelab.papers import sudoku_model

    logmod.setup()
    base = sudoku_model.SVConfig.quick(seed) if quick else sudoku_model.SVConfig(seed=seed)
    base.threads = threads
    sv = configmod.make_section(sudoku_model.SVConfig, "sudoku",
                                {**asdict(base), **configmod.section_values("sudoku", config, set_ or [])})
    run = sudoku_model.train_sudoku_model(out, sv, progress=True)
    typer.echo(f"model: {run}  (search it: scalelab search --backend {run} --tasks sudoku:4 --score prob)")


# ============================================================================================= papers
@app.command()
def reproduce(
    papers: Annotated[Optional[list[str]], typer.Argument(help="which papers (default: all): dyt, horizon, diloco, "
                                                               "bd3lm, sss")] = None,
    quick: Annotated[bool, typer.Option(help="smaller runs, for a demo or CI")] = False,
    out: Annotated[Path, typer.Option(help="where the runs and the report card go")] = Path("runs/reproduce"),
    shared: Annotated[Optional[Path], typer.Option(help="the lab's shared data, holding data/metr "
                                                        "(default: ../shared when present)")] = None,
    sss_model: Annotated[Optional[Path], typer.Option(help="reuse a Sudoku model trained by `scalelab search "
                                                           "train-sudoku` in the sss section")] = None,
    parallel: Annotated[int, typer.Option(help="training processes at once (1 is fastest for the tiny recipe "
                                               "on 2 cores; more on a bigger machine)")] = 1,
    device: Annotated[str, typer.Option(help="cpu, or cuda: every run trains on one GPU, and full mode takes each "
                                             "section's GPU sizes (README: Reproductions)")] = "cpu",
) -> None:
    """Run each paper's small experiment, compare with its claim, and write one report card."""
    from scalelab import papers as papersmod

    logmod.setup()
    if shared is not None and not (shared / "data").is_dir():
        raise ScalelabError(f"--shared {shared} has no data/ folder")
    if parallel < 1:
        raise ScalelabError("--parallel must be >= 1")
    if sss_model is not None and not (sss_model / "rounds.json").is_file():  # fail before any work starts
        raise ScalelabError(f"--sss-model {sss_model} is not a trained Sudoku model directory (no rounds.json)")
    opts = papersmod.Options(shared=shared, sss_model=sss_model, parallel=parallel, device=device)
    path = papersmod.reproduce(papers or list(papersmod.PAPERS), out, quick=quick, opts=opts)
    typer.echo(f"report card: {path}")


@app.command("horizon")
def horizon(
    runs: Annotated[Path, typer.Argument(help="METR runs JSONL, a CSV (model,task_id,task_family,human_minutes,"
                                              "success[,weight]), or a per-model fits CSV (METR headline.csv).")],
    release_dates: Annotated[Optional[Path], typer.Option(
        "--release-dates", "-r", help="METR release_dates.yaml (date: {model: YYYY-MM-DD}) or CSV "
        "model,release_date.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory.")] = Path("horizon-report"),
    models: Annotated[Optional[str], typer.Option("--models", "-m", help="Models in the trend: 'frontier11' "
                                                  "(METR's headline set), 'all', or a comma list.")] = None,
    weighting: Annotated[str, typer.Option(
        help="invsqrt (METR), equal, none, or given (a weight column).")] = "invsqrt",
    C: Annotated[float, typer.Option("-C", "--C", help="Inverse L2 strength on the slope; METR: 10 "
                                     "(regularization 0.1).")] = 10.0,
    n_bootstrap: Annotated[int, typer.Option("--bootstrap", "-b", help="Hierarchical bootstrap replicates "
                                             "(0: none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Replicate r uses default_rng(seed + r); METR: 42.")] = 42,
    p: Annotated[str, typer.Option("--p", help="Success levels, percent or fraction, comma separated.")] = "50,80",
    replicates: Annotated[Optional[Path], typer.Option(help="Reuse saved replicates (ours or METR's "
                                                       "bootstrap/headline.csv) instead of bootstrapping.")] = None,
    after: Annotated[Optional[str], typer.Option(help="Only models released on or after YYYY-MM-DD enter "
                                                 "the trend.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="a TOML file with a [horizon] table (any HorizonConfig key)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set horizon.C=5")] = None,
) -> None:
    """METR-style time horizons from a runs file: fits, bootstrap CIs, doubling time, report and plots."""
    import math

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scalelab import config as configmod, horizon as H
    from scalelab.horizon_report import write_report

    flags = dict(release_dates=str(release_dates or ""), models=models or "", weighting=weighting, C=C,
                 bootstrap=n_bootstrap, seed=seed, p=p, replicates=str(replicates or ""), after=after or "")
    cfg = configmod.make_section(H.HorizonConfig, "horizon",
                                 {**flags, **configmod.section_values("horizon", config, set_ or [])})
    console = Console(stderr=True)
    with Progress(TextColumn("bootstrap"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("bootstrap", total=cfg.bootstrap)
        result = cfg.analyse(runs, progress=lambda k: bar.advance(task, k))
    paths = write_report(result, out)
    for t in result.trends:
        lo, hi = t.ci
        ci = f" (95% CI {lo:.0f}–{hi:.0f})" if math.isfinite(lo) else ""
        console.print(f"{H.p_label(t.p)} doubling time: {t.doubling_days:.1f} days{ci} over {len(t.models)} models, "
                      f"R² {t.r2:.3f}")
    console.print(f"wrote {out}/: {', '.join(q.name for q in paths)}", soft_wrap=True)


# ============================================================================================= mcp
@app.command("mcp")
def mcp_command(
    http: Annotated[bool, typer.Option(help="serve streamable HTTP at /mcp instead of stdio")] = False,
    host: Annotated[Optional[str], typer.Option(help="with --http: the address to bind (default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="with --http: the port (default 8765)")] = None,
    allow_remote: Annotated[bool, typer.Option(help="allow a non-loopback --host (the server is unauthenticated)")] = False,
    runs: Annotated[Path, typer.Option(help="the runs root: every run the server reads or starts is in it")] = Path("runs"),
    allow_path: Annotated[Optional[list[Path]], typer.Option(help="a directory whose files tools may use (repeatable)")] = None,
    allow_remote_backends: Annotated[bool, typer.Option(
        help="let sample and search reach non-loopback OpenAI-compatible servers, and training hf: corpora")] = False,
    max_jobs: Annotated[int, typer.Option(help="background jobs that may run at once")] = 1,
    max_steps: Annotated[int, typer.Option(help="cap on a job's train.max_steps (and a sweep's --steps)")] = 100_000,
) -> None:
    """Serve the lab to MCP clients (agents): stdio by default, --http for streamable HTTP on 127.0.0.1.
    Unauthenticated: see docs/mcp.md."""
    from scalelab import mcp_server

    opts = mcp_server.Options(runs_root=runs, allow_paths=allow_path or [], allow_remote_backends=allow_remote_backends,
                              max_jobs=max_jobs, max_steps=max_steps)
    mcp_server.main(opts, http=http, host=host, port=port, allow_remote=allow_remote)


# ============================================================================================= entry
@functools.cache
def _command():
    """The click command of `app`, built once (0.2 s): in-process callers (tests, the fuzz harness) call main often."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    command = _command()
    try:
        command.main(args=argv, prog_name="scalelab", standalone_mode=False)
    except ScalelabError as e:
        # Under torchrun, rank 0 speaks: a PeerError is rank 0's error mirrored here, and a config error is the
        # same on every rank. Other errors (this rank's own, e.g. a timeout) are printed by the rank that had them.
        if getattr(e, "printed_by_rank0", False) or (isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0"):
            sys.exit(2)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except click_exc.NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        sys.exit(2)
    except click_exc.ClickException as e:  # bad flags and values
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
