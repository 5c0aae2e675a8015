"""Export a chosen subnet as a standalone model, and load it back.

Three artifacts, each re-loaded and checked against the supernet's own output (eval mode, the same
re-calibrated BN statistics) on the same images:
  subnet.pt    {"spec", "config", "state_dict"} of the plain-torch nn.Sequential (`load_subnet` rebuilds
               it: no supernet checkpoint needed)
  subnet.pt2   a torch.export program (batch size dynamic): torch.export.load(path).module()
  subnet.onnx  ONNX (when the `onnx` package is installed), self-contained (weights inside, no external
               data file; subnets are far below ONNX's 2 GB limit), checked with onnxruntime when installed
The supernet may be on any device: the artifacts are built from a CPU copy of its weights.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path

import torch
from torch import nn

from engine.supernet import SupernetSpec
from engine.supernet.mobilenetv3 import OFAMobileNetV3


def load_subnet(path: str | Path) -> nn.Module:
    """The exported subnet saved by `export_subnet` (subnet.pt), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    supernet = OFAMobileNetV3(SupernetSpec(**saved["spec"]))
    supernet.set_active_subnet(saved["config"])
    net = supernet.export_active_subnet()
    net.load_state_dict(saved["state_dict"])
    return net.eval()


def _diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max())


def cpu_subnet(supernet: OFAMobileNetV3, cfg: dict, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor,
                                                                                 torch.Tensor]:
    """(the plain-torch subnet `cfg` of a CPU copy of `supernet` in eval mode, `images` on the CPU, the
    copy's logits on them): what every artifact is made from and checked against."""
    images = images.detach().cpu().contiguous()
    ref_model = OFAMobileNetV3(supernet.spec)
    ref_model.load_state_dict({k: v.detach().cpu() for k, v in supernet.state_dict().items()})
    ref_model.set_active_subnet(cfg)
    ref_model.eval()
    with torch.inference_mode():
        want = ref_model(images)
    return ref_model.export_active_subnet().eval(), images, want


def export_subnet(supernet: OFAMobileNetV3, cfg: dict, images: torch.Tensor, out: Path,
                  tolerance: float = 1e-4) -> dict:
    """Write the three artifacts of the supernet's subnet `cfg` (whose BN statistics the caller has
    re-calibrated: the supernet is in eval mode with them) into `out`; each is re-loaded and its logits
    on `images` compared with the supernet's. ValueError when one differs by more than `tolerance`
    (relative to the largest logit)."""
    out.mkdir(parents=True, exist_ok=True)
    net, images, want = cpu_subnet(supernet, cfg, images)
    scale = float(want.abs().max()) or 1.0
    report: dict = {}

    path = out / "subnet.pt"
    torch.save({"spec": supernet.spec.to_dict(), "config": cfg, "state_dict": net.state_dict()}, path)
    with torch.inference_mode():
        report["state_dict"] = {"file": path.name, "max_abs_diff": _diff(load_subnet(path)(images), want)}

    path = out / "subnet.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (images,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    with torch.inference_mode():
        report["torch_export"] = {"file": path.name,
                                  "max_abs_diff": _diff(torch.export.load(path).module()(images), want)}

    if importlib.util.find_spec("onnx") is None:
        report["onnx"] = {"skipped": "the onnx package is not installed (pip install onnx onnxscript onnxruntime)"}
    else:
        report["onnx"] = _onnx(net, images, want, out / "subnet.onnx")
    bad = {k: v for k, v in report.items() if v.get("max_abs_diff", 0.0) > tolerance * scale}
    if bad:
        raise ValueError(f"exported subnet differs from the supernet: {bad} (logit scale {scale:.3g})")
    return report


def _onnx(net: nn.Module, images: torch.Tensor, want: torch.Tensor, path: Path) -> dict:
    import onnx

    for name in ("onnx_ir", "onnxscript", "torch.onnx"):           # INFO lines per pass and initializer
        logging.getLogger(name).setLevel(logging.WARNING)

    if importlib.util.find_spec("onnxscript") is not None:      # the supported exporter (torch.export based)
        with contextlib.redirect_stdout(io.StringIO()):              # its "[torch.onnx] ..." progress prints
            torch.onnx.export(net, (images,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True,
                              verbose=False, external_data=False)
    else:                                                         # the TorchScript-based one, without onnxscript
        torch.onnx.export(net, (images,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    extra = sorted(p.name for p in path.parent.glob(path.name + "*") if p != path)
    if extra:
        raise ValueError(f"the ONNX export wrote external data files {extra}: it is not self-contained")
    entry: dict = {"file": path.name, "self_contained": True}
    if importlib.util.find_spec("onnxruntime") is None:
        entry["checked"] = "onnx.checker only (onnxruntime is not installed)"
        return entry
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    entry["max_abs_diff"] = _diff(got, want)
    return entry
