"""The `scalelab` command: one subcommand per stage of the lab.

Errors a user can cause (a `ScalelabError`, or a bad flag) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.26 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from scalelab.errors import ConfigError, ScalelabError
from scalelab.horizon import horizon_command
from scalelab.scaling import sweep_app
from scalelab.search_report import search_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="scalelab: a hackable lab for how language models scale.")
app.command("horizon", help="METR-style time horizons from a runs file: fits, bootstrap CIs, doubling time, report.")(
    horizon_command)
app.add_typer(sweep_app, name="sweep")
app.add_typer(search_app, name="search")


def _setup_logging(quiet: bool = False) -> None:
    from rich.logging import RichHandler

    # Logs piped to a file stay one line per message; a terminal gets rich's formatting.
    handler = (RichHandler(show_time=False, show_path=False, markup=False, console=_stderr()) if sys.stderr.isatty()
               else logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", handlers=[handler],
                        force=True)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


@app.command()
def train(
    recipe: Annotated[Optional[Path], typer.Option(help="TOML recipe, e.g. recipes/tiny.toml")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.lr=1e-3")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its newest checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    strategy: Annotated[Optional[str], typer.Option(
        help="single | ddp | diloco (= --set distributed.strategy=...; ddp and diloco run under torchrun)")] = None,
) -> None:
    """Train a model from a recipe into a run directory."""
    from scalelab import config, report, train as trainmod
    from scalelab.distributed import env_rank

    _setup_logging()
    cfg = config.load(recipe, [*(set_ or []), *([f"distributed.strategy={strategy}"] if strategy else [])])
    run_dir = out or Path("runs") / cfg.name
    summary = trainmod.train(cfg, run_dir, resume=resume, progress=not quiet)
    if env_rank() != 0:  # under torchrun, rank 0 writes the report and speaks
        return
    path = report.run_report(run_dir)
    typer.echo(f"val loss {summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.4f} bits/byte; report: {path}")


@app.command()
def sample(
    run: Annotated[Path, typer.Option(help="run directory")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    n: Annotated[int, typer.Option("-n", help="number of samples")] = 1,
    max_tokens: Annotated[int, typer.Option(help="new tokens per sample")] = 200,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy (default 0.8; BD3 runs 1.0)")] = None,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus mass; 1 = off (default 0.95; BD3 runs: "
                                                          "diffusion.top_p)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    mode: Annotated[str, typer.Option(help="auto (from the run) | ar | bd3; a mismatch with the run is an error")] = "auto",
    steps: Annotated[Optional[int], typer.Option(help="BD3: denoising steps per block, 1..block size "
                                                      "(default diffusion.sample_steps, 0 = block size)")] = None,
) -> None:
    """Sample continuations of a prompt from a trained run (autoregressive or BD3-LM block diffusion)."""
    import torch

    from scalelab import tokenizer as tokmod, train as trainmod

    if n < 1 or max_tokens < 1:
        raise ScalelabError("-n and --max-tokens must be >= 1")
    if mode not in ("auto", "ar", "bd3"):
        raise ScalelabError(f"--mode must be auto, ar or bd3, got {mode!r}")
    from scalelab.model import generate

    cfg, model = trainmod.load_run(run)
    block = cfg.diffusion.block_size
    if mode == "ar" and block:
        raise ScalelabError(f"run {run} is a BD3-LM run (block size {block}); sample it with --mode bd3 or auto")
    if mode == "bd3" and not block:
        raise ScalelabError(f"run {run} is an autoregressive run; sample it with --mode ar or auto")
    if steps is not None and not block:
        raise ScalelabError("--steps is for BD3-LM runs only")
    temperature = (1.0 if block else 0.8) if temperature is None else temperature
    top_p = (cfg.diffusion.top_p if block else 0.95) if top_p is None else top_p
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ScalelabError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    tok = tokmod.load(run / "tokenizer.json")
    eot = tokmod.eot_id(tok)
    ids = tok.encode(prompt).ids or [eot]  # an empty prompt starts a new document
    x = torch.tensor([ids] * n)
    if block:  # BD3-LM: block-by-block denoising with a KV cache over clean blocks (scalelab/diffusion.py)
        from scalelab.diffusion import bd3_generate

        t_steps = cfg.diffusion.sample_steps if steps is None else steps
        if steps is not None and not 1 <= steps <= block:
            raise ScalelabError(f"--steps must be in [1, block size = {block}], got {steps}")
        if top_k:
            raise ScalelabError("--top-k is not supported for BD3-LM runs (the paper samples with top-p)")
        out = bd3_generate(model, x, max_tokens, block, t_steps, temperature, top_p, seed=seed, stop_id=eot)
    else:
        out = generate(model, x, max_tokens, temperature, top_k, top_p, seed=seed, stop_id=eot)
    for i in range(n):
        new = [t for t in out[i, len(ids):].tolist()]
        if eot in new:
            new = new[:new.index(eot)]
        if n > 1:
            typer.echo(f"--- sample {i + 1} ---")
        typer.echo(prompt + tok.decode(new))


@app.command()
def report(run: Annotated[Path, typer.Option(help="run directory")]) -> None:
    """Write report.md and loss plots for a run directory."""
    from scalelab import report as reportmod

    typer.echo(str(reportmod.run_report(run)))


@app.command()
def reproduce(
    papers: Annotated[Optional[list[str]], typer.Argument(help="which papers (default: all): dyt")] = None,
    quick: Annotated[bool, typer.Option(help="smaller runs, for a demo or CI")] = False,
    out: Annotated[Path, typer.Option(help="where the runs and the report card go")] = Path("runs/reproduce"),
) -> None:
    """Run each paper's small experiment, compare with its claim, and write one report card."""
    from scalelab import reproduce as repro

    _setup_logging()
    path = repro.reproduce(papers or list(repro.PAPERS), out, quick=quick)
    typer.echo(f"report card: {path}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="text to continue (with --chat: the user message)")],
    model: Annotated[str, typer.Option(help="smollm2, a .gguf file or a run directory")] = "smollm2",
    base_url: Annotated[Optional[str], typer.Option(help="use an OpenAI-compatible server instead, e.g. "
                                                      "http://127.0.0.1:8000/v1 (key from $OPENAI_API_KEY)")] = None,
    n: Annotated[int, typer.Option("-n", help="number of samples")] = 1,
    max_tokens: Annotated[int, typer.Option(help="new tokens per sample")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass; 1 = off")] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    seed: Annotated[int, typer.Option(help="sample i uses engine.sample_seed(seed, i)")] = 0,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="wrap the prompt in the model's chat template")] = True,
    dtype: Annotated[str, typer.Option(help="float32 (default) or bfloat16 (faster, changes answers)")] = "float32",
) -> None:
    """Sample n completions of one prompt from a local model or an OpenAI-compatible server."""
    from scalelab.backends import make_backend
    from scalelab.engine import SamplingParams

    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop or [])
    params.validate()
    if dtype == "bfloat16":
        print(BF16_WARNING, file=sys.stderr)
    backend = make_backend(model, base_url) if base_url else make_backend(model, dtype=dtype)
    r = backend.chat([{"role": "user", "content": prompt}], params) if chat else backend.complete(prompt, params)
    for i, c in enumerate(r.choices):
        if n > 1:
            typer.echo(f"--- sample {i + 1} ({c.finish_reason}) ---")
        typer.echo(c.text if chat else prompt + c.text)
    print(f"[{r.prompt_tokens} prompt + {r.completion_tokens} completion tokens]", file=sys.stderr)


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="smollm2, a .gguf file or a run directory")] = "smollm2",
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option(help="new tokens per reply")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass; 1 = off")] = 0.95,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[str, typer.Option(help="float32 (default) or bfloat16 (faster, changes answers)")] = "float32",
) -> None:
    """Talk to a local model, streaming its replies (empty line or Ctrl-D ends)."""
    from scalelab.backends import LocalBackend
    from scalelab.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    params.validate()
    if dtype == "bfloat16":
        print(BF16_WARNING, file=sys.stderr)
    backend = LocalBackend(model, dtype=dtype)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = backend.encode(backend.chat_prompt(messages), bos=False)
        reply = ""
        print("bot> ", end="", flush=True)
        for deltas in backend.stream_ids(ids, params):
            for d in deltas:
                reply += d.text
                print(d.text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
        params.seed = (params.seed or 0) + 1


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="smollm2, a .gguf file or a run directory")] = "smollm2",
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8000,
    dtype: Annotated[str, typer.Option(help="float32 (default) or bfloat16 (faster, changes answers)")] = "float32",
) -> None:
    """Serve a local model over the OpenAI-compatible API on 127.0.0.1 (chat, completions, streaming)."""
    from scalelab.serve import serve as serve_fn

    if dtype == "bfloat16":
        print(BF16_WARNING, file=sys.stderr)
    serve_fn(model, port=port, dtype=dtype)


BF16_WARNING = ("warning: bfloat16 roughly doubles CPU decode speed, but in the measurement behind scalelab's issue 5 "
                "(SmolLM2-135M on a 2-core CPU) it moved the logits by up to 1.2 and changed 27 of 50 greedy "
                "answers; float32 is the reference")


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
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
