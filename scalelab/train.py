"""The training loop: AdamW, warmup + cosine, clipping, accumulation, eval, checkpoints, exact resume.

One function, `train(cfg, run_dir)`, turns a config into a run directory:
`config.toml` (resolved), `metrics.jsonl` (train lines every `log_every` steps, eval lines every
`eval_every`), `checkpoints/step_*/` and, at the end, a final checkpoint. Resuming restores weights,
optimizer moments, RNG state and the data position, and truncates the metrics to the checkpoint's step, so a
run killed at any instant and resumed ends bitwise-equal (on CPU, in either train.dtype) to one that was never
interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from scalelab import checkpoint, config as configmod, data as datamod, diffusion, distributed
from scalelab.report import write_text
from scalelab.config import Config
from scalelab.errors import ConfigError, ScalelabError
from scalelab.model import Transformer, check_memory, loss_fn, norm_probe

log = logging.getLogger("scalelab")


def lr_at(step: int, cfg: configmod.TrainConfig) -> float:
    """cosine: linear warmup to lr over warmup_steps, then cosine decay to lr·min_lr_ratio at max_steps.
    fms (the DyT paper's LLaMA code, IBM fms-fsdp): min(1 − (1 − s/W)² (a parabolic warmup over W steps),
    r + (1 − r)·½(1 + cos(π·s/N)) (a cosine over the whole run N)) times lr, with s = min(step, ·)."""
    r = cfg.min_lr_ratio
    if cfg.schedule == "fms":
        w = max(1, cfg.warmup_steps)
        warm = 1 - (1 - min(step, w) / w) ** 2
        cos = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(step, cfg.max_steps) / cfg.max_steps))
        return cfg.lr * min(warm, cos)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: configmod.TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, DyT scalars or the embedding scale)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token loss in nats over fixed validation batches."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = sum(loss_fn(model(x.to(dev)), y.to(dev)).item() for x, y in batches) / len(batches)
    model.train(was_training)
    return total


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ScalelabError(f"cannot write to output directory {run_dir}: {e.strerror}") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they belong to the lost part of an interrupted run)."""
    if not isinstance(step, int) or isinstance(step, bool):  # a bug: checkpoint.read_state validated the step
        raise TypeError(f"_truncate_metrics needs an integer step, got {step!r}")
    if not path.is_file():
        return
    keep = []
    text = path.read_text()
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    if (new := "".join(k + "\n" for k in keep)) != text:  # unchanged: leave the file as it is
        write_text(path, new)


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but this torch sees no CUDA device (install a CUDA build of torch)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> str:
    """train.dtype: "auto" is bfloat16 on CUDA and float32 elsewhere (CPU runs stay bitwise reproducible)."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def build_model(cfg: Config, vocab_size: int) -> Transformer:
    cfg.model.vocab_size = vocab_size
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model)


def make_strategy(cfg: Config) -> distributed.Strategy:
    """The configured strategy (distributed.py; torchft's DiLoCo in ft.py); `ddp`/`diloco` join the torchrun
    process group here (rank and world size from the environment)."""
    d = cfg.distributed
    if d.strategy == "single":
        if distributed.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ScalelabError(f"strategy single launched as {os.environ['WORLD_SIZE']} torchrun processes; "
                                f"pass --strategy ddp or --strategy diloco")
        return distributed.Strategy(d)
    if d.fault_tolerance == "torchft":
        from scalelab import ft

        return ft.TorchftDiLoCo(d, cfg.train.batch_size)
    cls = {"ddp": distributed.DDP, "diloco": distributed.DiLoCo}[d.strategy]
    return cls(d, cfg.train.batch_size)


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` into `run_dir`; return a summary (final val loss, bits per byte, speed).

    [distributed] `cfg.distributed.strategy` (single | ddp | diloco, see distributed.py) is applied to the loop
    through the hooks marked `[distributed]`; ddp and diloco join torchrun's process group here.
    """
    check_memory(cfg)  # before the data, the tokenizer or any tensor
    if cfg.train.tensorboard:  # the tensorboard package, or one error line before any work
        from scalelab import tb

        tb.summary_writer("train.tensorboard=true")
    strat = make_strategy(cfg)
    try:
        return _train(cfg, Path(run_dir), resume, progress, strat)
    finally:
        strat.close()


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, strat: distributed.Strategy) -> dict[str, Any]:
    ckpt_root = run_dir / "checkpoints"
    cfg_path = run_dir / "config.toml"

    def decide(resume: bool) -> bool:
        if resume and not cfg_path.is_file():
            log.info(f"nothing to resume in {run_dir}; starting a new run")
            resume = False
        if resume:
            saved = configmod.load(cfg_path)
            for section in ("model", "data"):
                mine, theirs = getattr(cfg, section), getattr(saved, section)
                if section == "model":
                    mine.vocab_size = theirs.vocab_size
                if mine != theirs:
                    diff = [k for k in vars(mine) if getattr(mine, k) != getattr(theirs, k)]
                    raise ConfigError(f"cannot resume {run_dir} with a different {section} config "
                                      f"(changed: {', '.join(f'{section}.{k}' for k in diff)})")
            if cfg.diffusion.block_size != saved.diffusion.block_size:
                raise ConfigError(f"cannot resume {run_dir} with a different diffusion.block_size "
                                  f"({saved.diffusion.block_size} -> {cfg.diffusion.block_size})")
        elif checkpoint.list_checkpoints(ckpt_root) or cfg_path.is_file():
            raise ScalelabError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        _check_writable(run_dir)
        return resume

    resume = strat.on_writer(lambda: decide(resume))  # [distributed] rank 0 decides; the others follow
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    prepared = strat.writer_first(lambda: datamod.prepare(cfg.data, log=log.info))  # [distributed] one cache
    device = strat.device(resolve_device(cfg.train.device))  # [distributed] cuda:LOCAL_RANK under torchrun
    # BD3-LM hook (scalelab/diffusion.py): its loss, NELBO eval and (β, ω) search; the model gets a [MASK] id.
    bd3 = diffusion.BD3Objective(cfg) if cfg.diffusion.block_size else None
    model = build_model(cfg, prepared.meta["vocab_size"] + (1 if bd3 else 0)).to(device)
    optimizer = make_optimizer(model, cfg.train)
    strat.setup(model, optimizer)  # [distributed] DDP wrapper / DiLoCo global copy and outer optimizer
    # bfloat16: autocast runs matmuls and attention in bf16; weights, gradients and AdamW state stay fp32 (the
    # master copy). The resolved dtype goes into config.toml and every checkpoint's state.
    cfg.train.dtype = resolve_dtype(cfg.train.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")
    t = cfg.train
    # [distributed] train.batch_size is the global batch; this process reads its 1/world share of it
    batches = datamod.train_batches(prepared, cfg.data, cfg.model.context, t.batch_size // strat.data_world, t.seed,
                                    strat.data_rank, strat.data_world)  # random windows, or a streamed corpus's
    val = datamod.eval_batches(prepared.tokens("val"), cfg.model.context, t.batch_size, t.eval_batches,
                               mask=prepared.mask("val"))
    bpt = prepared.bytes_per_token("val")

    start, tokens_seen, elapsed = 0, 0, 0.0
    if resume and (ck := strat.on_writer(lambda: checkpoint.latest(ckpt_root))) is not None:
        checkpoint.read_state(ck, need=checkpoint.RESUME_KEYS)  # all of state.json valid before anything uses it
        state = strat.load(ck, model, optimizer)  # [distributed] DiLoCo: global model + outer state + inner state
        checkpoint.set_rng_state(state["rng"])
        batches.load_state(state["data"])
        start, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed"]
        log.info(f"resuming {run_dir} from step {start}")
        if bd3 is not None:
            bd3.load_state(state.get("diffusion"))
    elif bd3 is not None:
        bd3.init_weights(model)
    if (peer := strat.join(model, optimizer, batches, start)) is not None:  # [distributed] torchft: heal from a peer
        start = peer["step"]
        tokens_seen = start * t.batch_size * t.grad_accum * cfg.model.context
    if strat.is_writer:  # [distributed] rank 0 writes the run directory
        _truncate_metrics(run_dir / "metrics.jsonl", start)
        _truncate_metrics(run_dir / "probes.jsonl", start)
        write_text(cfg_path, configmod.to_toml(cfg))
        # The run directory is self-contained: sampling and reports need no data cache.
        write_text(run_dir / "tokenizer.json", prepared.tokenizer_path.read_text())
        write_text(run_dir / "data.json", json.dumps(prepared.meta, indent=2))

    fwd = torch.compile(strat.wrap(model)) if t.compile else strat.wrap(model)  # [distributed] e.g. DDP(model)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context
    flops_per_step = model.flops_per_token(cfg.model.context) * tokens_per_step
    if bd3 is not None and cfg.diffusion.block_size < cfg.model.context:
        flops_per_step *= 2  # BD3-LM trains on x_t ⊕ x, 2L tokens
    metrics = open(run_dir / "metrics.jsonl", "a") if strat.is_writer else None
    board = None  # train.tensorboard: each record of metrics.jsonl also as TensorBoard scalars in tb/ (rank 0)
    if t.tensorboard and strat.is_writer:
        from scalelab import tb

        board = tb.Writer(run_dir, resume_step=start)

    def emit(rec: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if board is not None:
            board.write(rec)

    def save(step: int, module: torch.nn.Module = model, optim: torch.optim.Optimizer = optimizer) -> None:
        checkpoint.save(ckpt_root, step, module, optim,
                        {"config": cfg.to_dict(), "data": batches.state(), "rng": checkpoint.rng_state(),
                         "tokens": tokens_seen, "elapsed": elapsed, **({"diffusion": bd3.state()} if bd3 else {})},
                        t.keep_last)

    last_val = None
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TimeRemainingColumn(), disable=not progress or not strat.is_writer, transient=False)
    model.train()
    with bar:
        task = bar.add_task(cfg.name, total=t.max_steps, completed=start, loss="-", tps="-")
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        for step in range(start, t.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = 0.0
            for micro in range(t.grad_accum):
                x, y = batches.next()
                with strat.no_sync(micro < t.grad_accum - 1):  # [distributed] DDP reduces on the last micro-batch
                    with autocast:
                        if bd3 is not None:  # BD3-LM: NELBO over x (noise seeded by seed, step, micro)
                            loss = bd3.loss(fwd, x.to(device, non_blocking=True), step, micro) / t.grad_accum
                        else:
                            loss = loss_fn(fwd(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)) / t.grad_accum
                    loss.backward()
                step_loss += loss.item()
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item() if t.grad_clip
                     else math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)))
            strat.optimizer_step(optimizer, step + 1, t.max_steps)  # [distributed] step + DiLoCo outer sync
            if not math.isfinite(step_loss):
                raise ScalelabError(f"loss became {step_loss} at step {step + 1}; lower train.lr or raise warmup")
            dt = time.perf_counter() - t0
            elapsed += dt
            tokens_seen += tokens_per_step
            window_loss, window_steps, window_time = window_loss + step_loss, window_steps + 1, window_time + dt
            done = step + 1
            if done % t.log_every == 0 or done == t.max_steps:
                emit({"step": done, "tokens": tokens_seen, "lr": lr, "loss": window_loss / window_steps,
                      "grad_norm": gnorm, "step_time": window_time / window_steps,
                      "tok_per_s": tokens_per_step * window_steps / window_time,
                      "flops_per_s": flops_per_step * window_steps / window_time, "elapsed": elapsed,
                      **strat.metrics()})  # [distributed] bytes communicated (nothing for single)
                bar.update(task, loss=f"{window_loss / window_steps:.3f}",
                           tps=f"{tokens_per_step * window_steps / window_time:,.0f}")
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            if t.probe_every and done % t.probe_every == 0 and strat.is_writer:  # norm inputs (DyT saturation)
                with open(run_dir / "probes.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, **norm_probe(strat.eval_model(model), val[0][0].to(device))}) + "\n")
            if (done % t.eval_every == 0 or done == t.max_steps) and strat.is_writer:
                emodel = strat.eval_model(model)  # [distributed] DiLoCo: the global model
                last_val = bd3.evaluate(emodel, val) if bd3 is not None else evaluate(emodel, val)
                search = (bd3.search(emodel, val, done) if bd3 is not None else None) or {}  # BD3: (β, ω)
                emit({"step": done, "tokens": tokens_seen, "val_loss": last_val,
                      "val_bpb": last_val / math.log(2) / bpt, **search})
            if strat.checkpoint_due(done, t.ckpt_every, t.max_steps):  # [distributed] DiLoCo: at outer steps
                batches.sync(strat)  # [distributed] a streamed corpus: every rank's position, for rank 0 to save
                strat.save(done, ckpt_root, model, optimizer, save)
            bar.update(task, completed=done)
    if metrics is not None:
        metrics.close()
    if board is not None:
        board.close()
    if last_val is None:  # resumed a finished run: report its last evaluation ([distributed] rank 0 only)
        emodel = strat.eval_model(model)
        last_val = (bd3.evaluate(emodel, val) if bd3 is not None else evaluate(emodel, val)) if strat.is_writer else math.nan
    return {"val_loss": last_val, "val_bpb": last_val / math.log(2) / bpt, "steps": t.max_steps,
            "tokens": tokens_seen, "elapsed": elapsed, "params": model.num_params(),
            "flops_per_token": model.flops_per_token(cfg.model.context), **strat.summary()}
