"""Training strategies over torch.distributed: `single`, `ddp` and `diloco`, applied to a model from outside.

The trainer (`train.py`) stays one loop; a strategy owns the few points where processes meet: which slice of
the global batch a process reads, the optimizer-step/sync point, which weights are evaluated and saved, and
whether this process writes files. `torchrun` launches the processes; the backend is gloo for CPU tensors and
NCCL for CUDA tensors (`cpu:gloo,cuda:nccl` when CUDA is present), chosen automatically.

- `single`: one process, the trainer exactly as it is (bitwise the same weights as before strategies existed).
- `ddp`: torch DistributedDataParallel over every process. `train.batch_size` stays the *global* batch; each
  of the W processes reads batch_size/W sequences of it (`data.Batches(rank, world)`), so DDP and single see
  the same windows per step. Gradient buckets are all-reduced through a counting comm hook.
- `diloco` (Douillard et al. 2023, Alg. 1; Charles et al. 2025, Alg. 1): M replicas each take H inner AdamW
  steps on their B/M share of the global batch; then the outer gradient Δ = θ_global − θ_replica is averaged
  over replicas (one SUM all-reduce, then /M, as torchft and prime do) and an outer SGD with Nesterov momentum
  (lr 0.7, momentum 0.9 by default) steps the global parameters, which every replica then loads. Inner AdamW
  state stays local across rounds and is never communicated. The final round is shortened so the run ends on
  a synced global model. Evaluation and checkpoints use the global model θ(t).
- One replica may be R = W/M processes: they form a DDP group inside the replica (a fast link), and rank j of
  every replica all-reduces Δ with rank j of the others (R cross-replica groups, each with the full Δ). This is
  supported and tested at R=2 on CPU; only the cross-replica traffic goes over the simulated slow link.
- The "broadcast" of the new global parameters is implicit: an all-reduce leaves bitwise-identical averages on
  every rank (ring reduction: each chunk is reduced once and then copied), so every replica computes the same
  outer step, which is equivalent to one outer step followed by a broadcast at half the bytes.

Communication accounting: every collective is counted by kind (`grad`: DDP buckets, `outer`: DiLoCo Δ,
`setup`: initial broadcasts, `control`: barriers and rank-0 decisions) as payload bytes handed to the
collective by this rank, plus the wire bytes of a bandwidth-optimal ring all-reduce, 2·P·(n−1)/n per node
(Charles et al. 2025, App. A). `distributed.link_gbps > 0` sleeps for the time that traffic would take over
such a link (plus `link_latency_ms` per collective), so wall-clock comparisons include a slow network.

Faults: the global state (θ_global, the outer optimizer, step, data position) is checkpointed at outer steps by
rank 0; each replica's leader also saves its inner AdamW state beside it, so a torchrun elastic restart after
a SIGKILL of any worker resumes from the last outer step and loses at most H inner steps (on CPU it ends on
the fault-free run's weights and optimizer states bit for bit, in the tests). A kill of rank 0 inside the global
checkpoint's write leaves the previous outer step as the latest; the inner states already written for the
interrupted step are simply rewritten when it is saved again. A shared filesystem for the run directory is
assumed across nodes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from scalelab import checkpoint
from scalelab.errors import CheckpointError, ConfigError, ScalelabError

log = logging.getLogger("scalelab")
T = TypeVar("T")
FAULT_TOLERANCE = ("none", "torchft")


class PeerError(ScalelabError):
    """Rank 0's error, re-raised on the other ranks so that every rank exits; the CLI prints it only once."""

    printed_by_rank0 = True


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank; under torchft each replica group is its own job, so its group id counts."""
    return int(os.environ.get("RANK", "0")) + int(os.environ.get("REPLICA_GROUP_ID", "0")) * int(
        os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------------------------- accounting
class Traffic:
    """Bytes handed to collectives by this rank, by kind, plus ring wire bytes and simulated link time."""

    SLOW = ("grad", "outer")  # the kinds that cross the slow (simulated) link; see Strategy.slow_kinds

    def __init__(self, link_gbps: float = 0.0, link_latency_ms: float = 0.0):
        self.link_gbps, self.link_latency_ms = link_gbps, link_latency_ms
        self.payload: dict[str, int] = {}
        self.wire: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.comm_s = 0.0  # measured wall time inside collectives
        self.link_s = 0.0  # simulated link time (slept)
        self._pending_link = 0.0
        self.window = {"payload": 0, "wire": 0, "link_s": 0.0}

    def count(self, kind: str, nbytes: int, group_size: int, op: str = "all_reduce", slow: bool = False) -> None:
        n = max(1, group_size)
        wire = {"all_reduce": 2 * nbytes * (n - 1) // n, "broadcast": nbytes * (n - 1) // n}.get(op, 0)
        self.payload[kind] = self.payload.get(kind, 0) + nbytes
        self.wire[kind] = self.wire.get(kind, 0) + wire
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if kind in ("grad", "outer"):
            self.window["payload"] += nbytes
            self.window["wire"] += wire
        if slow and n > 1 and (self.link_gbps > 0 or self.link_latency_ms > 0):
            bandwidth_s = wire * 8 / (self.link_gbps * 1e9) if self.link_gbps > 0 else 0.0
            self._pending_link += bandwidth_s + self.link_latency_ms / 1e3

    def settle_link(self) -> float:
        """Sleep for the simulated transfer time accumulated since the last call; return it."""
        t, self._pending_link = self._pending_link, 0.0
        if t > 0:
            time.sleep(t)
            self.link_s += t
            self.window["link_s"] += t
        return t

    def train_bytes(self) -> int:
        return sum(self.payload.get(k, 0) for k in ("grad", "outer"))

    def row(self) -> dict[str, Any]:
        """Fields for a metrics line: this window's bytes, then the running totals (this rank's view)."""
        rec = {"comm_bytes": self.window["payload"], "comm_wire_bytes": self.window["wire"],
               "link_s": round(self.window["link_s"], 6), "comm_bytes_total": self.train_bytes(),
               "comm_wire_bytes_total": sum(self.wire.get(k, 0) for k in ("grad", "outer")),
               "comm_by_kind": dict(self.payload), "comm_calls": dict(self.calls),
               "comm_s_total": round(self.comm_s, 6), "link_s_total": round(self.link_s, 6)}
        self.window = {"payload": 0, "wire": 0, "link_s": 0.0}
        return rec


# ------------------------------------------------------------------------------------------------ strategies
class Strategy:
    """The single-process strategy, and the interface the trainer calls (each hook marked in train.py)."""

    name = "single"
    rank, world = 0, 1
    replicas, replica_id = 1, 0

    def __init__(self, dcfg: Any = None):
        self.dcfg = dcfg
        self.traffic = Traffic()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world(self) -> int:
        return self.world

    def on_writer(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result (or its ScalelabError) to every rank."""
        return fn()

    def writer_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then on the others (e.g. building a shared cache once)."""
        return fn()

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on (under torchrun, `cuda` means cuda:LOCAL_RANK)."""
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return device

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call forward on (DDP wraps it to hook its gradients)."""
        return model

    def join(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Any, start: int) -> dict | None:
        """torchft only: a restarted replica group takes the global state from a live peer; returns its step."""
        return None

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, done: int, max_steps: int) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def checkpoint_due(self, done: int, every: int, max_steps: int) -> bool:
        return done % every == 0 or done == max_steps

    def save(self, done: int, ckpt_root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             save_fn: Callable[..., Any]) -> None:
        save_fn(done)

    def load(self, ck: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return checkpoint.load(ck, model, optimizer)

    def metrics(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class _Distributed(Strategy):
    """What ddp and diloco share: the process group, rank-0 decisions, counted collectives."""

    def __init__(self, dcfg: Any, batch_size: int):
        super().__init__(dcfg)
        if not under_torchrun():
            raise ScalelabError(f"strategy {self.name} needs torchrun (RANK and WORLD_SIZE are not set): "
                                f"torchrun --standalone --nproc-per-node N -m scalelab.cli train ...")
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.traffic = Traffic(dcfg.link_gbps, dcfg.link_latency_ms)
        self._check_layout(batch_size)
        self.timeout = datetime.timedelta(seconds=dcfg.timeout_s)
        backend = dcfg.backend
        if backend == "auto":
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend=backend, timeout=self.timeout, **_store_kwargs(self.rank, self.world,
                                                                                              self.timeout))
            except Exception as e:  # noqa: BLE001 - a store/rendezvous failure is the user's cluster problem
                raise ScalelabError(
                    f"the process group did not form (rank {self.rank} of {self.world}, "
                    f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, timeout "
                    f"{dcfg.timeout_s:g} s): a node could not join ({type(e).__name__})") from None
        self._owns_group = True
        self.control_group = dist.new_group(backend="gloo", timeout=self.timeout)  # CPU-side decisions

    def _check_layout(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ConfigError(f"train.batch_size ({batch_size}) is the global batch and must be divisible by "
                              f"the world size ({self.world})")

    # rank-0 decisions, shared with everyone (a pickled object over the gloo control group)
    def on_writer(self, fn: Callable[[], T]) -> T:
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except ScalelabError as e:
                box[0] = ("error", str(e))
        self._broadcast_object(box)
        status, value = box[0]
        if status == "error":
            if self.rank == 0:
                raise ScalelabError(value)
            raise PeerError(value)
        return value

    def writer_first(self, fn: Callable[[], T]) -> T:
        result = self.on_writer(fn)
        return result if self.rank == 0 else fn()

    def _broadcast_object(self, box: list[Any]) -> None:
        t0 = time.perf_counter()
        try:
            dist.broadcast_object_list(box, src=0, group=self.control_group)
        except Exception as e:  # noqa: BLE001 - rank 0 died or timed out
            raise ScalelabError(f"rank {self.rank}: rank 0 did not answer within {self.dcfg.timeout_s:g} s "
                                f"({type(e).__name__})") from None
        self.traffic.comm_s += time.perf_counter() - t0
        self.traffic.count("control", len(pickle.dumps(box[0])), self.world, "broadcast")

    def barrier(self) -> None:
        t0 = time.perf_counter()
        dist.barrier(group=self.control_group)
        self.traffic.comm_s += time.perf_counter() - t0
        self.traffic.count("control", 0, self.world, "barrier")

    def all_reduce(self, t: torch.Tensor, group: Any, kind: str, slow: bool) -> None:
        """SUM all-reduce, counted (this rank's payload) and, for slow kinds, charged to the simulated link."""
        n = dist.get_world_size(group)
        t0 = time.perf_counter()
        if n > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.traffic.comm_s += time.perf_counter() - t0
        self.traffic.count(kind, t.numel() * t.element_size(), n, "all_reduce", slow)

    def broadcast_module(self, module: torch.nn.Module, group: Any = None, src: int = 0) -> None:
        n = dist.get_world_size(group)
        for t in list(module.parameters()) + list(module.buffers()):
            if n > 1:
                dist.broadcast(t.data, src=src, group=group)
            self.traffic.count("setup", t.numel() * t.element_size(), n, "broadcast")

    def load(self, ck: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        self.on_writer(lambda: check_strategy(ck, self.name))  # one error line, every rank exits
        return checkpoint.load(ck, model, optimizer)

    def metrics(self) -> dict[str, Any]:
        return self.traffic.row()

    def summary(self) -> dict[str, Any]:
        return {"strategy": self.name, "world": self.world, "replicas": self.replicas,
                "comm_bytes_total": self.traffic.train_bytes(), "comm_by_kind": dict(self.traffic.payload),
                "link_s_total": self.traffic.link_s}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_strategy(ck: Path, name: str) -> None:
    """A DiLoCo checkpoint holds the global model and the outer optimizer; DDP/single ones hold AdamW."""
    saved = checkpoint.read_state(ck).get("config", {}).get("distributed", {}).get("strategy", "single")
    if (saved == "diloco") != (name == "diloco"):
        raise CheckpointError(f"checkpoint {ck} was written by strategy {saved}; resume it with --strategy {saved}")


def _store_kwargs(rank: int, world: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """Under torchrun's agent store, a key prefix per restart attempt.

    After an elastic restart the workers reuse the agent's store, where the previous attempt's gloo addresses
    are still registered under the same keys; without a prefix, the new workers dial dead peers (seen with
    torch 2.13 and --rdzv-backend c10d). The prefix makes each attempt's process group start clean.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"scalelab/attempt_{attempt}", store), "rank": rank, "world_size": world}


def _counting_allreduce_hook(strategy: _Distributed, slow: bool):
    """A DDP comm hook: count each gradient bucket, then the stock all-reduce (sum, divide by group size)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(group, bucket):  # no annotations: DDP checks them against its own types at runtime
        buf = bucket.buffer()
        strategy.traffic.count("grad", buf.numel() * buf.element_size(), dist.get_world_size(group),
                               "all_reduce", slow)
        return allreduce_hook(group, bucket)

    return hook


def _ddp_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    kw: dict[str, Any] = {"device_ids": [dev.index]} if dev.type == "cuda" else {}
    # The model has no buffers that change; skip DDP's per-forward buffer broadcast (renamed in newer torch).
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    kw[name] = False
    return kw


class DDP(_Distributed):
    """torch DistributedDataParallel over every process; all of its traffic crosses the (slow) link."""

    name = "ddp"

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters at construction; count that as setup traffic.
        for t in list(model.parameters()) + list(model.buffers()):
            self.traffic.count("setup", t.numel() * t.element_size(), self.world, "broadcast")
        self.ddp = DistributedDataParallel(model, **_ddp_kwargs(model))
        self.ddp.register_comm_hook(dist.group.WORLD, _counting_allreduce_hook(self, slow=True))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.ddp

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync() if accumulating else contextlib.nullcontext()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, done: int, max_steps: int) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.traffic.settle_link()

    def save(self, done, ckpt_root, model, optimizer, save_fn) -> None:
        if self.rank == 0:
            save_fn(done)
        self.barrier()


def nesterov_outer_step(global_params: list[torch.Tensor], mean_delta: list[torch.Tensor],
                        outer_opt: torch.optim.Optimizer) -> None:
    """θ ← OuterOpt(θ, Δ): the averaged outer gradient becomes the global parameters' .grad (no clipping)."""
    for p, d in zip(global_params, mean_delta):
        p.grad = d
    outer_opt.step()
    outer_opt.zero_grad(set_to_none=True)


def make_outer_optimizer(params: list[torch.Tensor], dcfg: Any) -> torch.optim.SGD:
    nesterov = dcfg.nesterov and dcfg.outer_momentum > 0
    return torch.optim.SGD(params, lr=dcfg.outer_lr, momentum=dcfg.outer_momentum, nesterov=nesterov)


class DiLoCo(_Distributed):
    """M replicas × H inner steps; outer SGD(Nesterov) on the mean outer gradient Δ = θ_global − θ_replica."""

    name = "diloco"

    def _check_layout(self, batch_size: int) -> None:
        M = self.dcfg.replicas or self.world
        if self.world % M:
            raise ConfigError(f"world size {self.world} is not divisible into distributed.replicas={M} replicas")
        super()._check_layout(batch_size)
        self.replicas, self.per_replica = M, self.world // M
        self.replica_id, self.replica_rank = self.rank // self.per_replica, self.rank % self.per_replica

    @property
    def data_rank(self) -> int:
        # Interleaved so that replica m's shard of each global batch is the same whatever its process count R:
        # its R processes read data ranks m, m+M, m+2M, ... of W, i.e. together every M-th window from m.
        return self.replica_rank * self.replicas + self.replica_id

    @property
    def H(self) -> int:
        return self.dcfg.inner_steps

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        M, R = self.replicas, self.per_replica
        # Every rank creates every group, in the same order (torch.distributed requires it).
        intra = [dist.new_group(list(range(m * R, (m + 1) * R)), timeout=self.timeout) for m in range(M)]
        cross = [dist.new_group([m * R + j for m in range(M)], timeout=self.timeout) for j in range(R)]
        self.intra_group, self.cross_group = intra[self.replica_id], cross[self.replica_rank]
        self.broadcast_module(model)  # θ(0) is rank 0's (the seeds agree anyway: PR #13 of prime is the bug)
        self.global_model = copy.deepcopy(model)
        for p in self.global_model.parameters():
            p.requires_grad_(False)
        self.global_params = list(self.global_model.parameters())
        self.local_params = list(model.parameters())
        self.outer_opt = make_outer_optimizer(self.global_params, self.dcfg)
        self.ddp = None
        if R > 1:
            from torch.nn.parallel import DistributedDataParallel

            for t in list(model.parameters()) + list(model.buffers()):  # DDP's own broadcast inside the replica
                self.traffic.count("setup", t.numel() * t.element_size(), R, "broadcast")
            self.ddp = DistributedDataParallel(model, process_group=self.intra_group,
                                               **_ddp_kwargs(model))
            self.ddp.register_comm_hook(self.intra_group, _counting_allreduce_hook(self, slow=False))
        self.syncs = 0
        self.last_sync = 0
        self._last_ckpt = 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else model

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync() if self.ddp is not None and accumulating else contextlib.nullcontext()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, done: int, max_steps: int) -> None:
        optimizer.step()  # the inner AdamW step, on this replica's own data; its state never leaves the replica
        optimizer.zero_grad(set_to_none=True)
        if done % self.H == 0 or done == max_steps:
            self.outer_sync()
            self.last_sync = done
        self.traffic.settle_link()

    @torch.no_grad()
    def outer_sync(self) -> None:
        # One flat buffer, one all-reduce: Δ_m = θ(t−H) − θ_m(t), summed over replicas, then divided by M.
        delta = torch.cat([(g - p.detach()).reshape(-1) for g, p in zip(self.global_params, self.local_params)])
        self.all_reduce(delta, self.cross_group, "outer", slow=True)
        delta /= self.replicas
        mean, i = [], 0
        for g in self.global_params:
            mean.append(delta[i:i + g.numel()].view_as(g))
            i += g.numel()
        nesterov_outer_step(self.global_params, mean, self.outer_opt)
        for g, p in zip(self.global_params, self.local_params):
            p.copy_(g)  # ∀m: θ_m(t) ← θ(t)
        self.syncs += 1

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.global_model  # "the most recent global model" (Charles et al. 2025, §2.2)

    def checkpoint_due(self, done: int, every: int, max_steps: int) -> bool:
        # Only at outer steps: the first one at or after each multiple of ckpt_every, and the last step.
        if self.last_sync != done:
            return False
        due = done == max_steps or done // every > self._last_ckpt // every
        if due:
            self._last_ckpt = done
        return due

    def _inner_path(self, ckpt_root: Path, step: int) -> Path:
        return ckpt_root / "inner" / f"step_{step:07d}-replica{self.replica_id}.safetensors"

    def save(self, done, ckpt_root, model, optimizer, save_fn) -> None:
        from safetensors.torch import save_file

        if self.replica_rank == 0:  # each replica's leader keeps its local inner AdamW state beside the ckpt
            path = self._inner_path(ckpt_root, done)
            path.parent.mkdir(parents=True, exist_ok=True)
            osd = optimizer.state_dict()
            tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in osd["state"].items()
                       for k, v in s.items()}
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(tensors, str(tmp), metadata={"param_groups": json.dumps(osd["param_groups"])})
            os.replace(tmp, path)
        self.barrier()  # every inner state is on disk before the global checkpoint names this step
        if self.rank == 0:
            save_fn(done, self.global_model, self.outer_opt)
            kept = {p.name for p in checkpoint.list_checkpoints(ckpt_root)}
            for f in (ckpt_root / "inner").glob("step_*-replica*.safetensors"):
                if f.name.split("-")[0] not in kept:
                    f.unlink(missing_ok=True)
        self.barrier()

    def load(self, ck: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from safetensors.torch import safe_open

        self.on_writer(lambda: check_strategy(ck, self.name))
        state = checkpoint.load(ck, self.global_model, self.outer_opt)
        with torch.no_grad():
            for g, p in zip(self.global_params, self.local_params):
                p.copy_(g)
        path = self._inner_path(ck.parent, state["step"])
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    groups = json.loads(f.metadata()["param_groups"])
                    osd: dict[str, Any] = {"state": {}, "param_groups": groups}
                    for key in f.keys():
                        i, name = key.split(".", 1)
                        osd["state"].setdefault(int(i), {})[name] = f.get_tensor(key)
                optimizer.load_state_dict(osd)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"inner optimizer state {path} is corrupt or does not fit: {e}") from None
        else:
            log.warning(f"replica {self.replica_id}: no inner AdamW state saved for step {state['step']}; "
                        f"its moments restart from zero")
        self.last_sync = self._last_ckpt = state["step"]
        return state

    def summary(self) -> dict[str, Any]:
        return dict(super().summary(), inner_steps=self.H, syncs=self.syncs)
