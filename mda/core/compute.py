"""Where and how a stage computes: device, precision, micro-batches, threads, and the
`torch.distributed` context (rank, world size, reductions).

Every stage that runs a model calls `runtime(params.compute)` once. Under `torchrun` (see
`mda.core.launch`) each rank gets its own process; `Runtime` then holds the process group and the
collectives the stages use (sum-reduce, gather, broadcast, barrier). One process is the same
code with a world size of 1: every collective is then a no-op — there is no second path.

- `device`: `cpu`, `cuda` (rank r uses `cuda:<LOCAL_RANK>`), `auto` (cuda when available).
- `dtype`: `bfloat16` runs forward/backward under `torch.autocast`; parameters, optimizer
  state and every statistic we accumulate (EK-FAC covariances, eigendecompositions, score
  sums) stay float32/float64.
- Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from mda.core.config import Compute
from mda.core.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def launched_world() -> tuple[int, int, int, int]:
    """(rank, local rank, world size, local world size) from torchrun's environment."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))


def check_compute(compute: Compute) -> torch.device:
    """The device `compute` asks for, or one ConfigError line naming the key that cannot be met.
    Called by the launcher before any process starts, and by every rank."""
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params: compute.device: cuda, but no CUDA device is available here "
                          "(use cpu or auto)")
    use_cuda = compute.device == "cuda" or (compute.device == "auto" and torch.cuda.is_available())
    if use_cuda and compute.procs > torch.cuda.device_count():
        raise ConfigError(f"params: compute.procs: {compute.procs} processes need {compute.procs} GPUs; "
                          f"this machine has {torch.cuda.device_count()}")
    if not use_cuda and compute.procs > (os.cpu_count() or 1):
        raise ConfigError(f"params: compute.procs: {compute.procs} processes on a machine with "
                          f"{os.cpu_count()} CPU cores")
    if compute.dtype == "bfloat16" and not use_cuda and not hasattr(torch, "bfloat16"):
        raise ConfigError("params: compute.dtype: bfloat16 is not supported by this torch build")
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def check_batching(world_size: int, micro_batch: int | None, batch_size: int) -> None:
    """Every rank trains on the same number of rows of a step and micro-batches divide them."""
    if batch_size % world_size:
        raise ConfigError(f"params: compute.procs: {world_size} processes do not divide the "
                          f"{batch_size} rows of a step (corpus.batch_size)")
    rows = batch_size // world_size
    if micro_batch and rows % micro_batch:
        raise ConfigError(f"params: compute.micro_batch: {micro_batch} does not divide the {rows} rows "
                          f"each of {world_size} process(es) trains on per step")


@dataclass
class Runtime:
    """The resolved compute settings of this process and its place among the ranks."""

    device: torch.device
    dtype: torch.dtype
    micro_batch: int | None
    threads: int
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Forward/backward precision: bf16 autocast, or nothing for float32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def prepare(self, model):
        """`model` on this rank's device; on CUDA with PyTorch's fused attention kernels (the
        metrics that read attention patterns switch to eager attention for their own forward)."""
        model = model.to(self.device)
        if self.device.type == "cuda" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("sdpa")
        return model

    # ------------------------------------------------------------------ work split
    def shard(self, n: int) -> range:
        """This rank's contiguous part of `n` items (earlier ranks take the remainder)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (on the communication device) and return it."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        comm = tensor.to(self.comm_device).contiguous()  # collectives send storage order
        dist.all_reduce(comm)
        if comm is not tensor:
            tensor.copy_(comm)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`tensor` as rank `src` holds it, on every rank (in place)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        comm = tensor.to(self.comm_device).contiguous()  # eigh's eigenvectors are column-major
        dist.broadcast(comm, src=src)
        if comm is not tensor:
            tensor.copy_(comm)
        return tensor

    def gather_objects(self, obj) -> list:
        """`obj` from every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device.type == "cuda" else torch.device("cpu")


def runtime(compute: Compute) -> Runtime:
    """Set threads, resolve the device, and join the process group under torchrun (the group
    is joined once per process; later calls reuse it)."""
    device = check_compute(compute)
    torch.set_num_threads(compute.threads)
    rank, local_rank, world, local_world = launched_world()
    if world > 1 and local_world != compute.procs:
        raise ConfigError(f"params: compute.procs: {compute.procs}, but torchrun started "
                          f"{local_world} processes on this node")
    if world == 1 and compute.procs > 1:
        raise ConfigError(f"params: compute.procs: {compute.procs} processes need a launcher; run the "
                          f"stage as `python -m mda.core.launch <stage>` (or torchrun)")
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, dtype=DTYPES[compute.dtype], micro_batch=compute.micro_batch,
                   threads=compute.threads, rank=rank, local_rank=local_rank, world_size=world)
