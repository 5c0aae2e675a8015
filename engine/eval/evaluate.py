"""Subnet evaluation: BN re-calibration, top-1 on the validation set (reduced across ranks)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from engine.eval.bn_calibration import calibrated
from engine.supernet.mobilenetv3 import OFAMobileNetV3


@torch.no_grad()
def top1(model: torch.nn.Module, loader: DataLoader, device: torch.device, channels_last: bool = False,
         amp_dtype: torch.dtype | None = None) -> float:
    """Top-1 accuracy in percent of the active subnet over `loader` (summed over all ranks)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        counts[0] += (logits.argmax(-1) == labels).sum()
        counts[1] += labels.numel()
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    return 100.0 * counts[0].item() / max(counts[1].item(), 1.0)


def evaluate_subnets(model: OFAMobileNetV3, subnets: dict[str, dict], val_loader: DataLoader,
                     calib_batches: list[torch.Tensor], device: torch.device, resolution: int,
                     channels_last: bool = False, amp_dtype: torch.dtype | None = None,
                     costs: bool = True) -> list[dict]:
    """For each named config: re-calibrate BN on `calib_batches`, then top-1 (and FLOPs and params
    when `costs`).

    The supernet's own running statistics are restored afterwards.
    """
    rows = []
    for name, cfg in subnets.items():
        with calibrated(model, cfg, calib_batches):
            row = {"subnet": name, "top1": top1(model, val_loader, device, channels_last, amp_dtype), "config": cfg}
            if costs:
                row.update(mflops=model.flops(resolution) / 1e6, mparams=model.params() / 1e6)
        rows.append(row)
    return rows
