"""Several processes on one job under ``torchrun`` (NCCL on GPUs, gloo on CPUs): inference only.

* :mod:`.process` — joining the process group torchrun describes (also used by training);
* :mod:`.mesh` — the layout of the ranks: data-parallel groups of ``guidance x sequence`` ranks
  (:class:`ParallelConfig`, :class:`Mesh`), sharing the leader's inputs, agreeing on decisions;
* :mod:`.ulysses` — Ulysses sequence parallelism: the DiT's token sequence split over ranks with an
  all-to-all around every attention (:class:`SequenceParallel`);
* :mod:`.fsdp` — FSDP2 weight sharding (training's units; the inference layout shards the blocks only);
* :mod:`.batch` — job lists, balancing over groups, resumable runs with a line per job and a summary.

The DiT takes a :class:`~.ulysses.SequenceParallel` through ``DreamIDVTransformer.prepare(..., parallel=)``;
guidance-parallel is a ``pair`` function for :func:`dreamidv_core.sampling.guidance.make_guided_model`.
"""
