"""
The process a training run runs in (train.py): one device, or one rank of torchrun's DDP (detected from its
environment), and its precision (Env, setup); and the model wrapped for DDP over its trainable tensors only
(wrap_ddp).
"""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Env:
    """Where and how this process trains."""
    rank: int
    world: int
    device: torch.device
    bf16: bool
    ctx: object  # the one precision context: autocast bf16, or nullcontext for fp32
    log: object  # print on rank 0, silent elsewhere

    @property
    def master(self):
        return self.rank == 0


def setup(args):
    """-> (Env, whether DDP was initialised). DDP is detected from torchrun's environment (RANK); a plain
    `python train.py` is world size 1."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and use_cuda)
    # autocast bf16: frozen weights in bf16, trainable weights, optimizer and losses stay fp32
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return Env(rank, world, device, bf16, ctx, print if rank == 0 else (lambda *a, **k: None)), ddp


def wrap_ddp(vital, env):
    """DDP over the trainable tensors only: frozen backbone weights and buffers are neither broadcast nor
    all-reduced. Every trainable tensor gets a gradient each step (scaffolds are not built for K = 0), so
    find_unused_parameters stays off."""
    if env.world == 1:
        return vital
    frozen = ([n for n, p in vital.named_parameters() if not p.requires_grad]
              + [n for n, _ in vital.named_buffers()])
    DDP._set_params_and_buffers_to_ignore_for_model(vital, frozen)
    # gradient_as_bucket_view: the gradients ARE views into DDP's all-reduce buckets, not a second copy of
    # every trainable gradient (7.2 GiB at real size: 1.93B fp32)
    return DDP(vital, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True)
