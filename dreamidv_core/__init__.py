"""dreamidv_core: DreamID-V video face swapping as a pure PyTorch library (no ComfyUI needed).

The folders name the roles; each module imports only from the folders above it in this list, so there
are no import cycles (``tests/test_import_graph.py`` checks it):

* :mod:`.errors`, :mod:`.progress` — the exceptions and the progress/cancel protocol everything uses;
* :mod:`.optional` — the optional dependencies (extras): importing one, or the exact command to install it;
* :mod:`.io` — safe reading and atomic writing of files: weight files (no pickle ever runs), videos;
* :mod:`.models` — the networks: the DreamID-V DiT and its layers, attention, PoseGuider, ArcFace ID
  projection, configs, the frame grid, umT5, the Wan 2.1 VAE (blocks, tiling), the IVS;
* :mod:`.weights` — which tensors go where: checkpoint detection, loading and conversion, LoRA and
  ID-projection files, the catalogue of model files;
* :mod:`.sampling` — samplers over ``model(x, sigma)``, guidance, windows for long clips, step cache,
  block offload;
* :mod:`.parallel` — several processes on one job under ``torchrun``: process groups, Ulysses sequence
  parallelism, guidance-parallel, FSDP weight sharding, resumable batches spread over the ranks;
* :mod:`.preprocess` — frames, geometry, pose and face mask, the reference identity, SAM 2
  segmentation, the background composite;
* :mod:`.pipelines` — whole jobs: the clip plan, streaming a clip through the VAE, the swap, the IVS,
  the text context, adapters for host conventions (ComfyUI's VAE and conditioning);
* :mod:`.eval` — measuring results (identity report);
* :mod:`.synthesis` — the paper's SyncID-Pipe data synthesis;
* :mod:`.cli` — ``python -m dreamidv_core``.
"""
