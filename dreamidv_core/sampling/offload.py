"""Block offload: keep some DiT blocks in host memory and stream them to the device just in time.

:func:`enable_block_offload` keeps the last ``n`` transformer blocks in (pinned) host memory. Two staging
slots on the compute device take turns: while block ``i`` computes, the weights of the next offloaded block
are copied into the other slot on a side CUDA stream. A parameter's ``.data`` points at its slot only while
its block runs and at the host copy otherwise, so there is never a second copy of any weight on the device.
With ``device == storage`` (e.g. both CPU) the same path runs synchronously, which tests use. Outputs are
bit-identical to running without offload.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import InputError

__all__ = ["BlockOffload", "enable_block_offload", "disable_block_offload", "offload_memory", "OffloadMemory"]


@dataclass
class OffloadMemory:
    """Memory arithmetic of block offload (bytes). ``saved`` = ``stored_off_device - staging``."""

    blocks: int
    offloaded: int
    block_bytes: int
    stored_off_device: int
    staging: int
    saved: int
    device_weights: int  # weights that stay on the device, staging slots included

    def describe(self) -> str:
        gib = 1024 ** 3
        return (f"{self.offloaded}/{self.blocks} blocks offloaded: {self.stored_off_device / gib:.2f} GiB kept off "
                f"the device, {self.staging / gib:.2f} GiB staging, {self.saved / gib:.2f} GiB saved; "
                f"{self.device_weights / gib:.2f} GiB of weights on the device")


def _tensors(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(module))


def offload_memory(dit: nn.Module, n_blocks: int) -> OffloadMemory:
    """What offloading the last ``n_blocks`` blocks of ``dit`` saves on the device (no side effects).

    Two staging slots (one block each) are allocated once ``n_blocks >= 2`` (one for ``n_blocks == 1``),
    so offloading fewer than 3 blocks saves nothing. Released 1.3B model in bf16: ~113 MB per block.
    """
    n_total = len(dit.blocks)
    n = _check_count(n_blocks, n_total)
    block = _nbytes(dit.blocks[0]) if n_total else 0
    off, staging = n * block, min(2, n) * block
    total = _nbytes(dit)
    return OffloadMemory(blocks=n_total, offloaded=n, block_bytes=block, stored_off_device=off, staging=staging,
                         saved=off - staging, device_weights=total - off + staging)


def _check_count(n_blocks, n_total: int) -> int:
    n = int(n_blocks)
    if n < 0 or n > n_total:
        raise InputError(f"offload blocks must be between 0 and {n_total} (the model's block count), got {n_blocks}")
    return n


class BlockOffload:
    """Streams the offloaded blocks of one DiT through two device slots. Built by :func:`enable_block_offload`.

    The DiT calls :meth:`begin` before its block loop, :meth:`fetch` before block ``i`` and
    :meth:`release` after it (see ``DreamIDVTransformer.streamed_blocks``).
    """

    def __init__(self, dit: nn.Module, n_blocks: int, device, storage="cpu"):
        self.device, self.storage = torch.device(device), torch.device(storage)
        n_total = len(dit.blocks)
        n = _check_count(n_blocks, n_total)
        self.indices = list(range(n_total - n, n_total))
        self.order = {b: k for k, b in enumerate(self.indices)}
        self.blocks = dit.blocks
        cuda = self.device.type == "cuda"
        pin = cuda and self.storage.type == "cpu"
        # host copies, one list per offloaded block, in _tensors order
        self.host: Dict[int, List[torch.Tensor]] = {}
        for b in self.indices:
            kept = []
            for _, t in _tensors(self.blocks[b]):
                h = t.data.to(self.storage)
                if h.data_ptr() == t.data.data_ptr():
                    h = h.clone()  # same device: the slot copy must not alias the stored weights
                if pin:
                    h = h.pin_memory()
                t.data = h
                kept.append(h)
            self.host[b] = kept
        # everything else (resident blocks, embeddings, head) goes to the compute device
        offloaded = {id(t) for b in self.indices for _, t in _tensors(self.blocks[b])}
        for _, t in _tensors(dit):
            if id(t) not in offloaded and t.device != self.device:
                t.data = t.data.to(self.device)
        self.slots: List[List[torch.Tensor]] = []
        if self.indices:
            ref = self.host[self.indices[0]]
            for b in self.indices[1:]:
                if [(h.shape, h.dtype) for h in self.host[b]] != [(h.shape, h.dtype) for h in ref]:
                    raise InputError(f"block {b} has different weight shapes or dtypes than block {self.indices[0]}; "
                                     "block offload needs identical blocks")
            self.slots = [[torch.empty_like(h, device=self.device) for h in ref] for _ in range(min(2, n))]
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.copied: Dict[int, Optional[torch.cuda.Event]] = {}  # block -> copy-done event (None: synchronous)
        self.free: List[Optional[torch.cuda.Event]] = [None] * len(self.slots)  # slot -> last use done
        self.fetches = 0

    def _slot(self, b: int) -> int:
        return self.order[b] % len(self.slots)

    def _prefetch(self, b: int) -> None:
        if b in self.copied:
            return
        s = self._slot(b)
        dst, src = self.slots[s], self.host[b]
        if self.stream is None:
            for d, h in zip(dst, src):
                d.copy_(h)
            self.copied[b] = None
            return
        with torch.cuda.stream(self.stream):
            if self.free[s] is not None:
                self.stream.wait_event(self.free[s])
            for d, h in zip(dst, src):
                d.copy_(h, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.copied[b] = done

    def begin(self) -> None:
        """Start copying the first offloaded block (it overlaps the resident blocks' compute)."""
        self.copied.clear()  # prefetches an interrupted loop left behind
        if self.indices:
            self._prefetch(self.indices[0])

    def fetch(self, i: int) -> None:
        """Make block ``i``'s weights the slot tensors (waiting for their copy) and prefetch the next one."""
        if i not in self.order:
            return
        self._prefetch(i)
        done = self.copied[i]
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        for (_, t), d in zip(_tensors(self.blocks[i]), self.slots[self._slot(i)]):
            t.data = d
        k = self.order[i]
        if k + 1 < len(self.indices):
            self._prefetch(self.indices[k + 1])
        self.fetches += 1

    def release(self, i: int) -> None:
        """Point block ``i`` back at its host weights; its slot is free once the queued compute is done."""
        if i not in self.order:
            return
        for (_, t), h in zip(_tensors(self.blocks[i]), self.host[i]):
            t.data = h
        del self.copied[i]
        if self.stream is not None:
            used = torch.cuda.Event()
            used.record(torch.cuda.current_stream(self.device))
            self.free[self._slot(i)] = used

    def memory(self, dit: nn.Module) -> OffloadMemory:
        return offload_memory(dit, len(self.indices))


def enable_block_offload(dit: nn.Module, n_blocks: int, device=None, storage="cpu") -> OffloadMemory:
    """Keep the last ``n_blocks`` blocks of ``dit`` in ``storage`` (pinned host memory when ``device`` is
    CUDA) and everything else on ``device`` (default: where the patch embedding is). Each offloaded
    block is streamed into a device slot just before it runs. Returns the memory arithmetic.
    Replaces a previous offload; ``n_blocks == 0`` just disables it. Inference only (no gradients).
    """
    disable_block_offload(dit, device)
    if device is None:
        device = dit.patch_embedding.weight.device
    if int(n_blocks) == 0:
        return offload_memory(dit, 0)
    dit.block_offload = BlockOffload(dit, n_blocks, device, storage)
    return dit.block_offload.memory(dit)


def disable_block_offload(dit: nn.Module, device=None) -> None:
    """Bring the offloaded blocks back to ``device`` (default: the offload's device); frees the slots."""
    off = getattr(dit, "block_offload", None)
    if off is None:
        return
    target = torch.device(device) if device is not None else off.device
    for b in off.indices:
        for (_, t), h in zip(_tensors(dit.blocks[b]), off.host[b]):
            t.data = h.to(target)
    dit.block_offload = None
