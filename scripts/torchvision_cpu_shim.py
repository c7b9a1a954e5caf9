"""Make the PyPI torchvision (a CUDA build) importable on the CPU-only torch of this environment.

Installed into site-packages by scripts/get_comfyui.sh together with a one-line ``.pth`` file, so it
runs at interpreter start. It only adds a meta-path hook (no torch import at start-up). The first time
anything imports ``torchvision``, the hook checks whether torchvision's own C++ ops library loads; if it
does not (``libc10_cuda.so`` missing), it defines ``torchvision::nms`` and ``torchvision::qnms`` with
``torch.library`` and gives them CPU implementations, before torchvision's ``_meta_registrations``
module needs them. The rest of torchvision (transforms, models, io of pure Python parts) then works;
other compiled ops (roi_align, deform_conv2d) stay unavailable, as torchvision reports itself.
The DreamID-V pack does not use torchvision; ComfyUI imports it at start-up.
"""
import os
import sys

_LIB = None  # keeps the torch.library registration alive


def _nms_cpu(dets, scores, iou_threshold):
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    dets = dets.float()
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _qnms_cpu(dets, scores, iou_threshold):
    if dets.is_quantized:
        dets = dets.dequantize()
    if scores.is_quantized:
        scores = scores.dequantize()
    return _nms_cpu(dets, scores, iou_threshold)


def _prepare():
    global _LIB
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg_dir = list(spec.submodule_search_locations)[0]
    for name in os.listdir(pkg_dir):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(pkg_dir, name))
                return  # torchvision's own ops work here: nothing to do
            except (OSError, ImportError, RuntimeError):
                break
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms_cpu, "CPU")
    lib.impl("qnms", _qnms_cpu, "CPU")
    lib.impl("qnms", _qnms_cpu, "QuantizedCPU")
    _LIB = lib


class _TorchvisionHook:
    done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not _TorchvisionHook.done:
            _TorchvisionHook.done = True
            try:
                _prepare()
            except Exception as e:  # never break an import because of the shim
                print(f"[dreamidv torchvision shim] could not register CPU ops: {e!r}", file=sys.stderr)
        return None  # let the normal finders import torchvision

    def invalidate_caches(self):
        pass


if not any(isinstance(f, _TorchvisionHook) or type(f).__name__ == "_TorchvisionHook" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionHook())
