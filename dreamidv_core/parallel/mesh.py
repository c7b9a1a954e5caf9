"""How the ranks of a ``torchrun`` job are laid out for inference, and what they share.

The world is cut into ``groups`` consecutive *groups* of ``G = cfg x ulysses`` ranks; each group works on one
clip at a time (``swap`` runs one group; ``swap-batch`` gives each group its own clips: data parallelism).
Inside a group, rank ``cfg_rank * ulysses + sp_rank`` evaluates guidance pass ``cfg_rank`` (0: with the
reference, 1: without; only with ``cfg_parallel``) on sequence part ``sp_rank`` (Ulysses, :mod:`.ulysses`);
the ranks of one Ulysses group are neighbours (they carry nearly all the traffic: on one node they share the
fastest links). Example, 8 GPUs, ``--ulysses 2 --cfg-parallel``: groups {0-3} and {4-7}; in the first,
Ulysses {0,1} (cond) and {2,3} (uncond), guidance pairs {0,2} and {1,3}.

What every rank of a group must hold identically, and how (:meth:`Mesh.share`, :meth:`Mesh.run_on_leader`):

* made by the group's *leader* (group rank 0) and broadcast: everything read from files or made by models with
  non-deterministic kernels or large one-off cost — the plan of the clip, the text context, the VAE latents of
  the video, mask and reference, the PoseGuider tokens, the face mask and the initial noise;
* computed by every rank (cheap, deterministic functions of the shared inputs): the text and time embeddings,
  the per-block text K/V, reference tokens, RoPE tables, pose K/V (for the rank's heads), the patch embedding.

Every guided velocity is assembled from all-gathered pieces with the same arithmetic on every rank, so every
rank of a group holds bit-identical latents at every step (the step cache's skip decisions, the only data
dependent control flow, are also agreed: :meth:`Mesh.agree`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, List, Optional, Tuple

import torch

from ..errors import DreamIDVError, InputError
from .process import init_distributed, torchrun_world
from .ulysses import SequenceParallel


DEFAULT_TIMEOUT_MIN = 120.0  # a batch's groups wait for each other only at the end: give them time


@dataclass(frozen=True)
class ParallelConfig:
    """``ulysses``: sequence-parallel degree (divides the number of heads); ``cfg_parallel``: the two guidance
    passes on two ranks; ``fsdp``: shard the blocks' weights over the group (memory, not speed)."""

    ulysses: int = 1
    cfg_parallel: bool = False
    fsdp: bool = False

    @property
    def cfg(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def group_size(self) -> int:
        return self.cfg * self.ulysses

    def describe(self) -> str:
        parts = [f"Ulysses {self.ulysses}" if self.ulysses > 1 else None,
                 "guidance-parallel" if self.cfg_parallel else None, "FSDP" if self.fsdp else None]
        return " x ".join(p for p in parts if p) or "one rank per clip"

    def check(self, num_heads: Optional[int] = None, guidance: Optional[float] = None, batch_guidance: bool = False,
              offload_blocks: int = 0, step_cache: float = 0.0) -> None:
        """InputError for a layout the model or the settings cannot use (each message says what to change)."""
        if self.ulysses < 1:
            raise InputError(f"--ulysses must be 1 or more, got {self.ulysses}")
        if num_heads is not None and num_heads % self.ulysses:
            ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise InputError(f"--ulysses {self.ulysses} does not divide the model's {num_heads} attention heads: each "
                             f"rank takes whole heads; use one of {', '.join(map(str, ok))}")
        if self.cfg_parallel and guidance is not None and guidance == 0:
            raise InputError("--cfg-parallel puts the two identity-guidance passes on two ranks, but guidance 0 "
                             "runs one pass only: drop --cfg-parallel (or use a guidance scale other than 0)")
        if self.cfg_parallel and batch_guidance:
            raise InputError("--cfg-parallel and --batch-guidance both decide where the two guidance passes run: "
                             "choose one")
        if self.fsdp and offload_blocks:
            raise InputError("--dit-fsdp and --offload-blocks both move the blocks' weights: choose one (FSDP shards "
                             "them over the GPUs, offload keeps them in CPU RAM)")
        if self.fsdp and self.group_size == 1:
            raise InputError("--dit-fsdp shards the weights over the ranks that work on one clip, but this layout "
                             "has one rank per clip: add --ulysses N and/or --cfg-parallel, or drop --dit-fsdp")
        if self.fsdp and step_cache > 0:
            raise InputError("--step-cache reads the first block's weights outside its forward, which --dit-fsdp "
                             "shards: drop one of them")

    def check_world(self, world: int, one_job: bool) -> int:
        """The number of groups for ``world`` processes; InputError when the layout does not fit."""
        g = self.group_size
        layout = f"--ulysses {self.ulysses}" + (" x 2 (--cfg-parallel)" if self.cfg_parallel else "")
        if world == 1 and g > 1:
            raise InputError(f"{layout} needs {g} processes per clip: start it under torchrun, e.g. "
                             f"torchrun --nproc_per_node={g} -m dreamidv_core ...")
        if world % g:
            raise InputError(f"{world} processes cannot be cut into groups of {g} ({layout}): start a multiple of {g} "
                             "with torchrun --nproc_per_node")
        if one_job and world != g:
            raise InputError(f"one clip on {g} rank{'s' if g > 1 else ''} ({layout}) needs exactly {g} "
                             f"process{'es' if g > 1 else ''}, but {world} were started: for several clips at once "
                             "use swap-batch")
        return world // g


@dataclass
class Mesh:
    """This rank's place in the layout (module docstring). A single process is a mesh of one rank."""

    config: ParallelConfig = field(default_factory=ParallelConfig)
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    groups: int = 1
    group_index: int = 0
    group_rank: int = 0
    group: Any = None  # process group of this rank's group (None: a group of one)
    sp: Optional[SequenceParallel] = None  # Ulysses group (None: ulysses 1)
    cfg_group: Any = None  # the two ranks of this rank's guidance pair (None: no guidance-parallel)
    cfg_rank: int = 0
    fsdp_mesh: Any = None

    # ------------------------------------------------------------------ layout
    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def leader(self) -> int:
        """Global rank of this group's leader."""
        return self.group_index * self.group_size

    @property
    def is_leader(self) -> bool:
        return self.group_rank == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors travel: the GPU with NCCL, the CPU with gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------ sharing inside the group
    def share_object(self, obj=None):
        """The leader's picklable ``obj`` on every rank of the group."""
        if self.group is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_leader else None]
        dist.broadcast_object_list(box, src=self.leader, group=self.group, device=self.comm_device)
        return box[0]

    def share(self, tensors: Optional[dict] = None, device=None) -> dict:
        """The leader's dict of tensors (or ``None`` values) on every rank of the group, on ``device`` (default:
        the leader's tensor's device type: the CPU, or this rank's GPU). Metadata travels once, then one broadcast
        per tensor, in the leader's dtype (bit-exact)."""
        if self.group is None:
            return dict(tensors or {})
        import torch.distributed as dist

        meta = None
        if self.is_leader:
            meta = {k: None if v is None else (tuple(v.shape), v.dtype, v.device.type) for k, v in tensors.items()}
        meta = self.share_object(meta)
        out = {}
        for key, m in meta.items():
            if m is None:
                out[key] = None
                continue
            if self.is_leader:
                t = tensors[key].detach().to(self.comm_device).contiguous()
            else:
                t = torch.empty(m[0], dtype=m[1], device=self.comm_device)
            dist.broadcast(t, src=self.leader, group=self.group)
            if self.is_leader:
                out[key] = tensors[key] if device is None else tensors[key].to(device)
            else:
                out[key] = t.to(device or (self.device if m[2] == "cuda" else torch.device("cpu")))
        return out

    def run_on_leader(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on the leader; if it raises, every rank of the group raises (the leader its own error, the
        others a :class:`DreamIDVError` naming it), so no rank is left waiting in a collective. The result
        stays on the leader (``None`` elsewhere)."""
        return self._run_on_one(fn, what, self.is_leader, self.share_object, "this group's leader", self.leader)

    def run_on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """:meth:`run_on_leader` for rank 0 and the whole world; the (picklable) result goes to every rank."""
        if not self.active:
            return fn()
        result = self._run_on_one(fn, what, self.is_main, self.broadcast_from_main, "rank 0", 0)
        return self.broadcast_from_main(result)

    def _run_on_one(self, fn, what: str, mine: bool, share: Callable, who: str, rank: int) -> Any:
        result, failure = None, None
        if mine:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - shared, then re-raised
                failure = exc
        status = share(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if status is not None:
            raise DreamIDVError(f"{what} failed on rank {rank} ({who}): {status}")
        return result

    def agree(self, flag: bool) -> bool:
        """True on every rank of the group when it is True on any (e.g. "compute this step")."""
        if self.group is None:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def pair(self, cond: Callable[[], torch.Tensor], uncond: Callable[[], torch.Tensor]
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two guidance passes -> (c, u) on every rank: in turn, or (guidance-parallel) ``cond`` on cfg rank
        0 and ``uncond`` on cfg rank 1, exchanged by one all-gather (the tensors are not changed on the way,
        so whatever combines them gives exactly one process's result)."""
        if self.cfg_group is None:
            return cond(), uncond()
        import torch.distributed as dist

        mine = (cond if self.cfg_rank == 0 else uncond)().contiguous()
        sent = mine.to(self.comm_device)
        parts = [torch.empty_like(sent) for _ in range(2)]
        dist.all_gather(parts, sent, group=self.cfg_group)
        c, u = (p.to(mine.device) for p in parts)
        return c, u

    def sum_over_pair(self, values: List[int]) -> List[int]:
        """Counters of one guidance pass each -> the pair's totals (unchanged without guidance-parallel)."""
        if self.cfg_group is None:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, group=self.cfg_group)
        return [int(v) for v in t.tolist()]

    # ------------------------------------------------------------------ the whole world
    def gather_to_main(self, obj) -> Optional[list]:
        """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_from_main(self, obj=None):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leave the process group after a run that ended normally. After an error it is left as it is: the
        process ends, and torchrun stops the others (tearing down a group that others still wait in can hang)."""
        if exc_type is None:
            self.close()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _new_groups(ranks_lists: List[List[int]], rank: int):
    """Create every group (all ranks call this in the same order); return (group, index in it) for ``rank``."""
    import torch.distributed as dist

    mine = (None, 0)
    for ranks in ranks_lists:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = (g, ranks.index(rank))
    return mine


def timeout_from_env() -> timedelta:
    minutes = float(os.environ.get("DREAMIDV_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    return timedelta(minutes=minutes)


def init_mesh(config: ParallelConfig = ParallelConfig(), one_job: bool = False,
              timeout: Optional[timedelta] = None) -> Mesh:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and lay the ranks out (module docstring).
    ``one_job``: the world must be exactly one group (``swap``). ``timeout``: how long a rank may wait for
    the others (default ``$DREAMIDV_DIST_TIMEOUT_MIN`` or 120 minutes: a batch's groups meet only at the end)."""
    world = torchrun_world()
    groups = config.check_world(world, one_job)
    ctx = init_distributed(timeout or timeout_from_env())
    if not ctx.active:
        return Mesh(config=config, device=ctx.device)
    g, u, c = config.group_size, config.ulysses, config.cfg
    rank = ctx.rank
    mesh = Mesh(config=config, rank=rank, world=ctx.world, device=ctx.device, groups=groups, group_index=rank // g,
                group_rank=rank % g)
    import torch.distributed as dist

    if g > 1:
        if groups == 1:
            mesh.group = dist.group.WORLD
        else:
            mesh.group, _ = _new_groups([list(range(k * g, (k + 1) * g)) for k in range(groups)], rank)
    if u > 1:
        sp_lists = [[k * g + ci * u + s for s in range(u)] for k in range(groups) for ci in range(c)]
        mesh.sp = SequenceParallel(*_new_groups(sp_lists, rank), u)
    if c > 1:
        cfg_lists = [[k * g + ci * u + s for ci in range(c)] for k in range(groups) for s in range(u)]
        mesh.cfg_group, mesh.cfg_rank = _new_groups(cfg_lists, rank)
    return mesh
