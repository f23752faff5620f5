"""Processes: one, or many under ``torchrun`` (DDP, or FSDP2 with :func:`shard`). Each rank knows
its place and device, and stop decisions are taken together (``any``) so that no rank waits
forever on the others. Under FSDP the whole weights and optimizer state are gathered to rank 0
and sent from it into the shards through the helpers below, so checkpoints are one process's files
and only rank 0 ever holds the whole model."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank: the collective stop decision."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world


def setup_distributed() -> Dist:
    """This process's place under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), its device,
    and the process group joined; a single process without ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, device)


# --- FSDP2: sharded training, full checkpoints -------------------------------------------------
# Under ``--sharding fsdp`` each decoder layer is its own FSDP2 group and the trained root holds the
# rest (embeddings, final norm, LM head, pool, gates). Parameters, gradients and optimizer state are
# DTensors sharded across ranks; checkpoints are written and read whole (rank 0 writes), in the
# same files as a single process or DDP, through the unsharded copy the caller keeps.
def shard(root: torch.nn.Module, groups, passes: tuple[str, ...] = ()) -> None:
    """``fully_shard`` each module of ``groups`` (each unique decoder layer, called as often as the
    layout runs it), then ``root``, which takes every parameter left over. ``passes``: the root's
    methods besides ``forward`` that run the model, and so gather the root's weights around them."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in groups:
        fully_shard(module)
    fully_shard(root)
    for name in passes:
        register_fsdp_forward_method(root, name)


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


@torch.no_grad()
def gather_model(model: torch.nn.Module, into: torch.nn.Module | None) -> None:
    """The sharded ``model``'s whole weights copied into ``into`` (an unsharded copy, on rank 0;
    None elsewhere), one parameter at a time: rank 0 holds its copy and one whole tensor more, not
    a second copy. Collective: every rank gathers each parameter, in the same order. (Buffers do
    not train: ``into`` has them.)"""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():  # a tied parameter once, as ``into`` ties it
        whole = param.full_tensor() if isinstance(param, DTensor) else param  # the root's: maybe gathered
        if into is not None:
            into.get_parameter(name).copy_(whole)


def scatter_model(model: torch.nn.Module, full: torch.nn.Module | None) -> None:
    """Rank 0's whole weights (``full``; None on the other ranks) into the sharded ``model``, whose
    parameters may still be on the meta device: each rank receives its shard, tensor by tensor.
    Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    holders: dict[int, list] = {}  # a parameter -> the (module, name)s holding it: tied weights
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=_full_options(broadcast_from_rank0=True))
    for (module, name), *others in holders.values():  # a meta parameter is replaced under each of its
        for other, other_name in others:  # names: tie them again (e.g. the LM head to the embeddings)
            other._parameters[other_name] = module._parameters[name]


def gather_optimizer(model: torch.nn.Module, optimizer, names: list[str]) -> dict | None:
    """The whole optimizer state on rank 0 (None elsewhere), keyed like ``optimizer.state_dict()``
    in one process: by parameter index, ``names`` giving each index's parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not state:
        return None
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def scatter_optimizer(model: torch.nn.Module, optimizer, state: dict | None, names: list[str]) -> None:
    """Rank 0's whole optimizer state keyed by index (``state``; None on the other ranks) into the
    sharded ``optimizer``: each rank receives its shard. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    keyed = {} if state is None else {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, keyed, options=_full_options(broadcast_from_rank0=True))


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (``clip_grad_norm_`` over DTensor gradients gives a DTensor)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm
