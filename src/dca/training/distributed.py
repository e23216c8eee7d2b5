"""Data-parallel and sharded training under ``torchrun``: everything `dca train` needs to run as K processes.

`setup` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
and returns a `Processes`; outside torchrun it is a single process and every method does what one process does,
so `dca.training.train` has one code path. How K processes equal one:

* every rank builds the batch schedule at the global batch size (K x ``--batch-size``) and takes its own
  slice of rows and insertion points (`Processes.rows`), so the data order is that of one process;
* the loss of a micro-batch is divided by the *global* count of target tokens (`Processes.loss`), so the
  averaged gradients are those of one process with the whole batch;
* a LoRA or pause coprocessor is replicated (DDP); a full or from-scratch one is sharded (FSDP2): each of its
  layers is one shard group and the rest of the coprocessor the root group, while the frozen decoder and the
  embedding it shares with the coprocessor stay whole on every rank and never get gradients;
* checkpoints hold the full weights and optimiser state, gathered on rank 0 in the layout of one process
  (`full_optimizer_state`), so a run resumes under any number of processes; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dca.checks import resolve_device as resolve_device_checked
from dca.errors import ArgumentError, DCAError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # rank 0 may evaluate or write a large checkpoint while the others wait


class DistributedError(DCAError, RuntimeError):
    """A multi-process run that cannot start or go on (environment, sharding, or another rank's failure)."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(f"{name} is not set although WORLD_SIZE is {os.environ.get('WORLD_SIZE')}: "
                                   "start multi-process training with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer (it is set by torchrun)") from None


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """`device` as a torch device; under torchrun a GPU is the process's own, cuda:LOCAL_RANK."""
    resolved = resolve_device_checked("device", device)
    if local_rank is None:
        return resolved
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ArgumentError("device", f"is {device!r}: training with several processes runs on cpu or cuda")
    if resolved.index is not None:
        raise ArgumentError("device", f"is {device!r}, but under torchrun every process uses the GPU of its "
                                      "LOCAL_RANK: pass --device cuda (or auto)")
    if local_rank >= torch.cuda.device_count():
        raise ArgumentError("device", f"is cuda, but this process has LOCAL_RANK {local_rank} and the machine has "
                                      f"{torch.cuda.device_count()} GPU(s): start at most that many processes per "
                                      "machine (--nproc-per-node)")
    return torch.device("cuda", local_rank)


def setup(device: str) -> tuple[Processes, torch.device]:
    """The processes of this run and this process's device; starts the process group under torchrun.

    Everything is checked before the group starts (and before any model is loaded). Call `Processes.close`
    at the end, also on errors.
    """
    if dist.is_available() and dist.is_initialized():  # the caller started a group: use it, leave it open
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))
        owned = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world < 1:
            raise DistributedError(f"WORLD_SIZE={world} must be at least 1")
        if world == 1:
            return Processes(), resolve_device(device)
        if not dist.is_available():
            raise DistributedError("this torch build has no torch.distributed: train with one process")
        rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
        if not 0 <= rank < world or local_rank < 0:
            raise DistributedError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistributedError(f"{' and '.join(missing)} not set: start multi-process training with torchrun")
        owned = True
    resolved = resolve_device(device, local_rank)
    if owned:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=resolved)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return Processes(rank, world, resolved, owned), resolved


class _Step(nn.Module):
    """What DDP and FSDP2 wrap. Their hooks run around `forward`, but the model is used through
    `AugmentedLM.training_loss` and evaluation: so `forward(fn, ...)` runs `fn(model, ...)` inside them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(self.model, *args, **kwargs)


class Processes:
    """The processes of a run, from one of them. With one process every method is the plain single-process code."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None, owned: bool = False):
        self.rank, self.world_size, self.device, self.owned = rank, world_size, device, owned
        self.model: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.strategy = "single"  # or "DDP", "FSDP2"
        self._sharded: list[nn.Module] = []  # FSDP2 modules, layers first, the root last

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return bool(self._sharded)

    def close(self) -> None:
        """End the process group if this run started it (safe to call twice, and after a failure)."""
        # nothing may hold the group when it ends: a sharded parameter that outlives it (its mesh keeps it)
        # is destroyed at interpreter exit, and gloo's threads then abort the process
        self.model = self.wrapped = None
        self._sharded = []
        if self.owned and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
        self.owned = False

    # ------------------------------------------------------------------ coordination
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only (file-system work); every rank returns its result or raises its error."""
        if not self.active:
            return fn()
        outcome: list[Any] = [None, None]
        if self.is_main:
            try:
                outcome[0] = fn()
            except BaseException as err:
                outcome[1] = _portable_error(err)
                dist.broadcast_object_list(outcome, src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            cls, args = outcome[1]
            try:
                error = cls(*args)
            except Exception:  # a class whose constructor takes other arguments
                error = DistributedError(f"rank 0 failed: {cls.__name__}: {args[-1]}")
            raise error
        return outcome[0]

    def sum(self, *values: float) -> tuple[float, ...]:
        """The sums over all ranks (in float64: logged numbers match one process to its precision)."""
        if not self.active:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    # ------------------------------------------------------------------ data and loss
    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (built at K x the per-process batch size)."""
        if not self.active:
            return batch
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def loss(self, out: Any) -> torch.Tensor:
        """What to differentiate: the one-pass loss as a mean over the *global* batch's target tokens.

        Ranks hold different numbers of targets, so each divides its sum by the global count; the wrappers
        average gradients over ranks, hence the factor K.
        """
        if not self.active:
            return out.loss
        count = out.target_mask.sum()
        dist.all_reduce(count)
        return out.token_losses.sum() / count.clamp(min=1) * self.world_size

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP for a LoRA or pause coprocessor, FSDP2 for a full or from-scratch one (nothing with one process).

        Build the optimiser after this: under FSDP2 it must hold the sharded parameters.
        """
        self.model = model
        if not self.active:
            return model
        config = model.coprocessor.config
        frozen = {p for p in model.parameters() if not p.requires_grad}  # the decoder, and what it shares
        step = _Step(model)
        if config.method == "pause" or config.uses_lora:
            from torch.nn.parallel import DistributedDataParallel

            # the frozen weights are the same file on every rank: no broadcast of them at start
            names = [name for name, p in step.named_parameters(remove_duplicate=False) if p in frozen]
            names += [name for name, _ in step.named_buffers(remove_duplicate=False)]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, names)
            self.wrapped = DistributedDataParallel(step, forward_sync_buffers=False)
            self.strategy = "DDP"
        else:
            self.wrapped = self._fully_shard(step, model, frozen)
            self.strategy = "FSDP2"
        return self.wrapped

    def _fully_shard(self, step: _Step, model: nn.Module, frozen: set[nn.Parameter]) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        body = model.coprocessor.body
        # one shard group per coprocessor layer; its parameters are its own (only the embedding is shared,
        # and it is no layer's): every shared or frozen tensor stays out of every group
        layer_types = set(getattr(body, "_no_split_modules", None) or ())
        layers = [m for m in body.modules() if type(m).__name__ in layer_types]
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        self._sharded = [*layers, fully_shard(step, mesh=mesh, ignored_params=frozen)]
        if not any(isinstance(p, DTensor) for p in step.parameters()):
            raise DistributedError(f"FSDP2 sharded nothing of the {type(body).__name__} coprocessor: its trainable "
                                   "weights are all shared with the frozen decoder; train it with one process")
        return step

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(model, *args, **kwargs)` -- through the wrapper, whose hooks gather and sync the weights."""
        if self.wrapped is None:
            return fn(self.model, *args, **kwargs)
        return self.wrapped(fn, *args, **kwargs)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Accumulate gradients locally (no communication) unless `enabled`: the last micro-batch syncs."""
        if self.strategy == "DDP" and not enabled:
            with self.wrapped.no_sync():
                yield
            return
        if self.strategy == "FSDP2":
            self._sharded[-1].set_requires_gradient_sync(enabled)
        yield

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip to `max_norm` over the whole model (every shard) and return the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def all_finite(self, params: list[nn.Parameter]) -> bool:
        """Whether every weight on every rank is finite (every rank gets the same answer)."""
        local = torch.stack([_local(p).isfinite().all() for p in params]).all() if params else torch.tensor(True)
        if not self.active:
            return bool(local)
        flag = local.to(self.device, torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Within: the model holds its full weights on every rank (FSDP2 gathers them), e.g. to save them."""
        for module in self._sharded:
            module.unshard()
        try:
            yield
        finally:
            for module in reversed(self._sharded):
                module.reshard()

    # ------------------------------------------------------------------ optimiser state, as one process has it
    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """`optimizer.state_dict()` as one process would have it (on CPU), on rank 0; None on the others.

        Its keys are parameter indices in model order, which no wrapper changes, and its tensors are whole,
        so any number of processes can load it.
        """
        state = optimizer.state_dict()
        if not self.sharded:
            return state if self.is_main else None
        gathered: dict[int, dict[str, Any]] = {}
        for index, values in state["state"].items():
            gathered[index] = {}
            for key, value in values.items():
                if hasattr(value, "full_tensor"):  # a collective: every rank gathers, in the same order
                    value = value.full_tensor()
                    value = value.cpu() if self.is_main else None
                gathered[index][key] = value
        return {"state": gathered, "param_groups": state["param_groups"]} if self.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a `full_optimizer_state` (from any number of processes): each rank keeps its own shards."""
        if self.sharded:
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            saved = [i for group in state["param_groups"] for i in group["params"]]
            if len(saved) != len(params):
                raise DistributedError(f"the checkpoint's optimiser holds {len(saved)} tensors, this model trains "
                                       f"{len(params)}")
            by_index = dict(zip(saved, params, strict=True))
            state = {**state, "state": {
                index: {key: distribute_tensor(value.to(by_index[index].device), by_index[index].device_mesh,
                                               by_index[index].placements, src_data_rank=None)
                        if isinstance(by_index[index], DTensor) and isinstance(value, torch.Tensor)
                        and value.shape == by_index[index].shape else value
                        for key, value in values.items()}
                for index, values in state["state"].items()}}
        optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ saving, from rank 0
    def save(self, write: Callable[[dict | None], T], optimizer: torch.optim.Optimizer | None = None) -> T:
        """`write(optimizer_state)` on rank 0, with the full weights in the model; every rank returns its result.

        Every rank must call this (FSDP2 gathers the shards); the others wait for rank 0 to finish writing.
        """
        state = self.full_optimizer_state(optimizer) if optimizer is not None else None
        with self.full_weights():
            return self.on_main(lambda: write(state))

    def describe(self) -> str:
        return f"; {self.world_size} processes ({self.strategy})" if self.active else ""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _portable_error(err: BaseException) -> tuple[type, tuple]:
    """(class, constructor arguments) that rebuild `err` on another rank (dca errors keep their class)."""
    if isinstance(err, ArgumentError):
        return ArgumentError, (err.argument, err.message)
    if isinstance(err, DCAError):
        return type(err), (str(err),)
    return DistributedError, (f"rank 0 failed: {type(err).__name__}: {err}",)

