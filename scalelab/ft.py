"""DiLoCo whose replica groups survive faults without a restart of the job, on torchft (optional extra).

`--set distributed.fault_tolerance=torchft` keeps scalelab's own DiLoCo (outer gradient Δ = θ_global − θ_local,
mean over the replicas that take part, outer SGD with Nesterov momentum, inner AdamW state local, our byte
accounting) and borrows three things from torchft's `Manager` (pip install torchft-nightly):

- a quorum per outer step, computed by a Lighthouse (`torchft_lighthouse`) from heartbeats, over a
  reconfigurable gloo process group: when a replica group dies, the next quorum leaves it out and the others
  go on (the round that was in flight when it died is dropped: `should_commit` is False, the global
  parameters stay at the last outer step, and the round is redone by the survivors);
- healing: a restarted group joins the next quorum behind the others, receives the global parameters, the
  outer optimizer state, the step and the data position from a live peer (torchft's HTTP checkpoint
  transport), takes no part in that round's average (its Δ is zeroed) but applies the same outer step, and
  then trains on as a member;
- DiLoCo needs torchft's synchronous quorum (`use_async_quorum=False`), as torchft's own DiLoCo requires.

Layout: each replica group is its own torchrun job with one process (REPLICA_GROUP_ID=m, NUM_REPLICA_GROUPS=M
or distributed.replicas), all pointing at one Lighthouse (distributed.lighthouse or $TORCHFT_LIGHTHOUSE).
Group m reads shard m of each global batch (B/M sequences); while a group is down its shard is skipped. Group 0
writes the run directory (metrics, global checkpoints at outer steps) and evaluates the global model.
Several processes per group (DDP inside a group) are not supported here: torchft's DiLoCo assumes one
data-parallel rank per group for the outer sync (torchft issue #171).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from scalelab import checkpoint
from scalelab.distributed import Strategy, Traffic, make_outer_optimizer, nesterov_outer_step
from scalelab.errors import ConfigError, ScalelabError

log = logging.getLogger("scalelab")


class TorchftDiLoCo(Strategy):
    name = "diloco"

    def __init__(self, dcfg: Any, batch_size: int):
        super().__init__(dcfg)
        try:
            import torchft  # noqa: F401
        except ImportError:
            raise ScalelabError("distributed.fault_tolerance=torchft needs the torchft extra: "
                                "pip install torchft-nightly") from None
        if "RANK" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ScalelabError("fault_tolerance=torchft runs each replica group as its own torchrun job "
                                "(torchrun --nproc-per-node 1 ...); RANK/MASTER_PORT are not set")
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ConfigError("fault_tolerance=torchft supports one process per replica group "
                              f"(got WORLD_SIZE={os.environ['WORLD_SIZE']}); launch one torchrun job per group")
        self.replicas = int(os.environ.get("NUM_REPLICA_GROUPS", dcfg.replicas or 0))
        self.replica_id = int(os.environ.get("REPLICA_GROUP_ID", "0"))
        if self.replicas < 1 or not 0 <= self.replica_id < self.replicas:
            raise ConfigError(f"torchft: need NUM_REPLICA_GROUPS (or distributed.replicas) >= 1 and "
                              f"0 <= REPLICA_GROUP_ID < it, got {self.replica_id} of {self.replicas}")
        if batch_size % self.replicas:
            raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the {self.replicas} replica groups")
        self.lighthouse = dcfg.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")
        if not self.lighthouse:
            raise ConfigError("torchft: set distributed.lighthouse or $TORCHFT_LIGHTHOUSE "
                              "(e.g. http://127.0.0.1:29510, a running torchft_lighthouse)")
        self.rank = self.replica_id  # group m's only process; group 0 writes
        self.traffic = Traffic(dcfg.link_gbps, dcfg.link_latency_ms)
        self.timeout = datetime.timedelta(seconds=dcfg.timeout_s)
        self.commits = self.dropped = self.healed_at = 0
        self.participants = 0
        self.step_now = 0
        self.batches = None

    # group 0 decides and writes; the other groups get their state from a peer when they join
    def on_writer(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.replica_id == 0 else None

    @property
    def data_rank(self) -> int:
        return self.replica_id

    @property
    def data_world(self) -> int:
        return self.replicas

    @property
    def H(self) -> int:
        return self.dcfg.inner_steps

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import copy

        from torchft import Manager
        from torchft.process_group import ProcessGroupGloo

        self.model = model
        self.global_model = copy.deepcopy(model)
        for p in self.global_model.parameters():
            p.requires_grad_(False)
        self.global_params = list(self.global_model.parameters())
        self.local_params = list(model.parameters())
        self.outer_opt = make_outer_optimizer(self.global_params, self.dcfg)
        self.last_sync = self._last_ckpt = 0
        try:
            self.manager = Manager(
                pg=ProcessGroupGloo(timeout=self.timeout), load_state_dict=self._load_state_dict,
                state_dict=self._state_dict, min_replica_size=1, use_async_quorum=False, timeout=self.timeout,
                quorum_timeout=self.timeout * 3, connect_timeout=self.timeout, rank=0, world_size=1,
                replica_id=f"scalelab_{self.replica_id}", hostname="127.0.0.1", lighthouse_addr=self.lighthouse,
                init_sync=False)
        except Exception as e:  # noqa: BLE001 - an unreachable Lighthouse is the user's setup problem
            raise ScalelabError(f"torchft: cannot reach the Lighthouse at {self.lighthouse} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    # ---- torchft state transfer (healing): the global state, as a checkpoint would hold it
    def _state_dict(self) -> dict[str, Any]:
        return {"global": {k: v.detach().clone() for k, v in self.global_model.state_dict().items()},
                "outer": self.outer_opt.state_dict(), "step": self.step_now,
                "data": self.batches.state() if self.batches is not None else None}

    def _load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.global_model.load_state_dict(sd["global"])
            for g, p in zip(self.global_params, self.local_params):
                p.copy_(g)
        self.outer_opt.load_state_dict(sd["outer"])
        self._healed = sd

    def join(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Any, start: int) -> dict | None:
        """One sync round at start-up: a fresh group just agrees on θ(0); a restarted one heals from a peer."""
        self.batches, self.step_now, self._healed = batches, start, None
        # Wait (up to distributed.timeout_s) for a quorum of all M groups, so that groups started together begin
        # together; each attempt is a full round (quorum, all-reduce of Δ = 0, commit), keeping peers in step.
        # A group that comes later, or restarts, heals from the others in its first round instead.
        deadline = time.time() + self.dcfg.timeout_s
        while True:
            self.outer_sync(count=False)
            if self.participants >= self.replicas or self._healed is not None or time.time() > deadline:
                break
            time.sleep(0.1)
        if self._healed is None or self._healed["step"] <= start:
            return None
        sd = self._healed
        if sd["data"] is not None:
            batches.load_state(sd["data"])
        self.last_sync = self._last_ckpt = self.healed_at = sd["step"]
        log.warning(f"torchft: replica group {self.replica_id} healed from a peer at step {sd['step']}")
        return {"step": sd["step"]}

    @torch.no_grad()
    def outer_sync(self, count: bool = True) -> None:
        self.manager.start_quorum()  # may heal this group (then its global and local weights are the peer's)
        delta = torch.cat([(g - p.detach()).reshape(-1) for g, p in zip(self.global_params, self.local_params)])
        n = self.manager.num_participants()
        t0 = time.perf_counter()
        work = self.manager.allreduce(delta)  # SUM over the quorum / participants; a healing group sends zeros
        work.wait()
        self.traffic.comm_s += time.perf_counter() - t0
        if count:  # the start-up rounds carry Δ = 0 and are not part of training's traffic
            self.traffic.count("outer", delta.numel() * delta.element_size(), n, "all_reduce", slow=True)
        self.participants = n
        if self.manager.should_commit():
            mean, i = [], 0
            for g in self.global_params:
                mean.append(delta[i:i + g.numel()].view_as(g))
                i += g.numel()
            nesterov_outer_step(self.global_params, mean, self.outer_opt)
            self.commits += count
        else:  # a peer failed mid-round: drop the round, keep θ at the last outer step
            self.dropped += 1
            log.warning(f"torchft: outer step at step {self.step_now} not committed; round dropped")
        for g, p in zip(self.global_params, self.local_params):
            p.copy_(g)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, done: int, max_steps: int) -> None:
        self.manager.disallow_state_dict_read()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.manager.allow_state_dict_read()
        self.step_now = done
        if done % self.H == 0 or done == max_steps:
            self.outer_sync()
            self.last_sync = done
        self.traffic.settle_link()

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.global_model

    def checkpoint_due(self, done: int, every: int, max_steps: int) -> bool:
        if self.last_sync != done or self.replica_id != 0:
            return False
        due = done == max_steps or done // every > self._last_ckpt // every
        if due:
            self._last_ckpt = done
        return due

    def save(self, done, ckpt_root, model, optimizer, save_fn) -> None:
        save_fn(done, self.global_model, self.outer_opt)

    def load(self, ck: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = checkpoint.load(ck, self.global_model, self.outer_opt)
        with torch.no_grad():
            for g, p in zip(self.global_params, self.local_params):
                p.copy_(g)
        self.last_sync = self._last_ckpt = self.step_now = state["step"]
        return state

    def metrics(self) -> dict[str, Any]:
        return dict(self.traffic.row(), participants=self.participants, commits=self.commits, dropped=self.dropped)

    def summary(self) -> dict[str, Any]:
        return {"strategy": "diloco+torchft", "replicas": self.replicas, "commits": self.commits,
                "dropped": self.dropped, "healed_at": self.healed_at, "comm_bytes_total": self.traffic.train_bytes()}

    def close(self) -> None:
        if hasattr(self, "manager"):
            self.manager.shutdown(wait=False)
