"""Loaded (as `sitecustomize`, from PYTHONPATH) only by the OpenCLIP training subprocess of
tests/test_training_clients.py. It edits no installed file.

torchvision's wheels on PyPI are CUDA builds: their `_C.so` needs `libtorch_cuda.so`, which the CPU
torch here does not have, so the extension does not load; `torchvision/_meta_registrations.py` then
registers fake kernels for `torchvision::nms` and `qnms` without checking, and `import torchvision`
fails ("operator torchvision::nms does not exist"). OpenCLIP imports torchvision for its transforms,
which are pure Python. When (and only when) the extension cannot load, this declares the two
operators' schemas, no kernels, so the import succeeds; calling `nms` still raises torchvision's own
"Couldn't load custom C++ ops". On a machine whose torchvision loads, it does nothing.
"""

import glob
import importlib.util
import os

_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.submodule_search_locations:
    import torch

    _loaded = False
    for _library in sorted(glob.glob(os.path.join(next(iter(_spec.submodule_search_locations)), "_C*.so"))):
        try:
            torch.ops.load_library(_library)
            _loaded = True
            break
        except OSError:
            pass
    if not _loaded:
        _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")  # registrations live as long as it
        _TORCHVISION_OPS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
