"""Distributed helpers: torchrun start-up, rank queries and reductions (NCCL on GPUs, gloo on CPUs)."""
import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> torch.device:
    """Join the process group started by torchrun (if any) and return this process's device.

    `device` is 'auto', 'cpu' or 'cuda'. Without torchrun's environment this is one process.
    """
    if device not in ('auto', 'cpu', 'cuda'):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    use_cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = 'nccl' if use_cuda else 'gloo'
        store, rank, world_size = next(dist.rendezvous('env://'))
        # torchrun keeps one store over restarts (--max-restarts): without a prefix of its own, a restarted
        # process could read the address a killed one left there and fail to connect.
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
        dist.init_process_group(backend, store=dist.PrefixStore(f'trar/attempt_{attempt}', store), rank=rank,
                                world_size=world_size)
    return torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place), a no-op for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """Every process's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def raise_first_error(error: BaseException | None) -> None:
    """Raise on every process the error of the lowest rank that had one, so that all stop with the same message
    (a collective: every process calls it, with None when it has no error). Also a barrier."""
    first = next((e for e in all_gather_objects(error) if e is not None), None)
    if first is not None:
        raise first


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
