"""The training loop: teacher phase, sandwich phase, checkpoints, logs, final evaluation."""
from __future__ import annotations

import itertools
import json
import logging
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine.data.loader import calibration_batches, load_data, shard_loader, steps_per_epoch, train_loader
from engine.elastic import set_backend
from engine.eval.evaluate import evaluate_subnets
from engine.eval.pareto import write_report
from engine.supernet import OFAMobileNetV3, SupernetSpec, arch
from engine.train import checkpoint
from engine.train.config import TrainConfig
from engine.train.distributed import init_distributed, ranks_agree
from engine.train.logger import RunLogger, Timer
from engine.train.batched import BatchedSandwich, batched_step
from engine.train.sandwich import sample_sandwich, sequential_step
from engine.train.schedule import cosine_lr, make_plan, subnet_beta

log = logging.getLogger("engine.train")
# fields that may change between an interrupted run and its resumption
RESUMABLE_DIFFERENCES = {"resume", "max_steps", "progress", "workers", "out", "backend"}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN parameters and biases (as OFA)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def build_model(cfg: TrainConfig, num_classes: int) -> OFAMobileNetV3:
    spec = SupernetSpec(variant=cfg.variant, width_mult=cfg.width_mult, kernel_sizes=tuple(cfg.kernel_sizes),
                        expand_ratios=tuple(cfg.expand_ratios), depths=tuple(cfg.depths), num_classes=num_classes,
                        dropout=cfg.dropout, bn_momentum=cfg.bn_momentum)
    return OFAMobileNetV3(spec)


class _Stop:
    """SIGTERM: finish the current step, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def run(cfg: TrainConfig) -> dict:
    """Train according to `cfg`; returns a summary dict (also written to <out>/summary.json)."""
    rank, world, local_rank = init_distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    set_backend(cfg.backend)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    data = load_data(cfg.dataset, cfg.data, cfg.resolution, cfg.seed, cfg.auto_augment, cfg.random_erase)
    epoch_batches, val_loader, spe = _loaders(cfg, data, device, rank, world)
    torch.manual_seed(cfg.seed)                    # same initial weights on every rank and every run
    model = build_model(cfg, data.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total = spe * cfg.epochs
    base_lr = cfg.lr * cfg.batch_size * world / 128
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=base_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    plan = make_plan(cfg.method, cfg.epochs, cfg.teacher_epochs, cfg.warmup_epochs, cfg.sampler)

    step, reorganized, elapsed_before = 0, False, 0.0     # elapsed: wall seconds of earlier runs
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        state = checkpoint.load(path, model.spec.to_dict())
        changed = {k for k, v in cfg.to_dict().items() if state["config"].get(k) != v} - RESUMABLE_DIFFERENCES
        if changed:
            raise checkpoint.CheckpointError(f"checkpoint {path} was trained with other settings: "
                                             + ", ".join(f"{k}={state['config'].get(k)!r}" for k in sorted(changed)))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        step, reorganized = state["step"], state["reorganized"]
        elapsed_before = state["elapsed_seconds"]
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")

    # "auto" stays sequential until a GPU measurement shows the batched step winning: on a CPU it is
    # 2.5-5x slower (bench/run_throughput.py), on a GPU it is not measured yet
    batched = cfg.sandwich == "batched"
    step_fn = batched_step if batched else sequential_step
    net: nn.Module = BatchedSandwich(model) if batched else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    logger = RunLogger(out, rank == 0, world, device_label)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def save() -> None:
        if rank == 0:
            checkpoint.save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": checkpoint.rng_state(),
                "step": step, "epoch": step // spe, "reorganized": reorganized,
                "elapsed_seconds": elapsed_before + time.perf_counter() - run_start,
                "config": cfg.to_dict(), "arch": model.spec.to_dict()}, ckpt_path)

    stop = _Stop()
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    run_start = time.perf_counter()
    max_cfg = arch.max_config(model.spec, model.n_stages)
    monitor_calib = calibration_batches(data, min(cfg.calib_images, 512), 256, device, cfg.channels_last)
    summary: dict = {"interrupted": False}
    try:
        while step < stop_at and not stop.requested:
            epoch, in_epoch = divmod(step, spe)
            bar = _progress(cfg.progress and rank == 0, spe, in_epoch, f"epoch {epoch}")
            timer = Timer()
            for images, labels in epoch_batches(epoch, in_epoch):
                if step >= stop_at or stop.requested:
                    break
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.to(memory_format=torch.channels_last)
                phase = plan.phase(step / spe)
                if phase != "teacher" and cfg.reorganize and not reorganized:
                    model.reorganize_channels(optimizer)
                    reorganized = True
                torch.manual_seed(_step_seed(cfg.seed, step, rank))       # dropout: same on resume
                cfgs = sample_sandwich(model, phase, cfg.subnets, plan.sampler,
                                       torch.Generator().manual_seed(_step_seed(cfg.seed, step, 0)))
                beta = subnet_beta(step, spe, plan, 1.0, total, base_lr)
                betas = ([cfg.max_multiplier, cfg.min_multiplier * beta]
                         + [cfg.other_multiplier * beta] * (len(cfgs) - 2))[:len(cfgs)]
                lr = cosine_lr(step, total, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                result = step_fn(model, net, images, labels, cfgs, betas, cfg.label_smoothing,
                                 cfg.temperature, scaler, amp_dtype)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                seconds = timer.lap()
                ips = images.shape[0] * world / max(seconds, 1e-9)
                logger.log_step({"step": step, "epoch": epoch, "phase": phase, "lr": lr, "beta": beta,
                                 "loss_max": result.loss_max, "loss_subnets": result.loss_subnets,
                                 "images_per_s": ips, "seconds": seconds})
                bar.set_postfix(phase=phase, loss=f"{result.loss_max:.3f}", kd=f"{result.loss_subnets:.3f}", img_s=f"{ips:.0f}")
                bar.update(1)
            bar.close()
            model.set_max_net()
            save()
            # subnets' forwards also move the shared running statistics: re-calibrate for the max net
            acc = evaluate_subnets(model, {"max": max_cfg}, val_loader, monitor_calib, device, data.resolution,
                                   cfg.channels_last, amp_dtype, costs=False)[0]["top1"]
            hours = _hours(logger, plan, spe, step, total, cfg, elapsed_before + time.perf_counter() - run_start)
            logger.write_hours(hours)
            logger.log_eval("max_top1", acc, step)
            if rank == 0:
                log.info("epoch %d step %d: max-net top-1 %.2f%% (BN re-calibrated), %s-hours used %.4f, "
                         "projected for the run %.4f", epoch, step, acc, hours["device"],
                         hours["used_hours"], hours["projected_total_hours"])
        if step < total:
            summary["interrupted"] = True
            log.info("stopped at step %d of %d (checkpoint %s); continue with --resume", step, total, ckpt_path)
        else:
            summary.update(_final_evaluation(model, cfg, data, device, val_loader, amp_dtype, out, rank))
        if world > 1:
            agree = ranks_agree(model)
            summary["ddp"] = agree
            if rank == 0:
                (out / "ddp_check.json").write_text(json.dumps(agree, indent=2))
    finally:
        stop.restore()
        logger.close()
    summary["step"] = step
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1 and dist.is_initialized():
        dist.barrier()
    return summary


def _loaders(cfg: TrainConfig, data, device: torch.device, rank: int, world: int):
    """(epoch_batches(epoch, skip) -> iterable of (images, labels), val loader, steps per epoch)."""
    if not cfg.dali:
        def epoch_batches(epoch: int, skip: int):
            return train_loader(data, cfg.batch_size, epoch, cfg.seed, rank, world, skip, cfg.workers)

        return (epoch_batches, shard_loader(data.val, 256, rank, world, cfg.workers),
                steps_per_epoch(data, cfg.batch_size, world))
    from engine.data.dali import DaliLoader, dali_available

    ok, why = dali_available()
    if not ok:
        raise ValueError(f"--dali: {why}")
    device_id = device.index if device.type == "cuda" else None
    common = dict(kind=data.kind, resolution=data.resolution, seed=cfg.seed, rank=rank, world=world,
                  device_id=device_id, skip_corrupt=cfg.skip_corrupt)
    train = DaliLoader(data.train.base, cfg.batch_size, True, auto_augment=cfg.auto_augment, **common)
    val = DaliLoader(data.val.base, 256, False, **common)
    if cfg.random_erase:
        log.warning("--dali: random erasing is not part of the DALI pipeline; it is applied only by the "
                    "torchvision loader")

    def epoch_batches(epoch: int, skip: int):
        # DALI cannot seek: a mid-epoch resume reads and drops the batches already trained on (their
        # augmentations, unlike the torchvision loader's, are not reproduced bit for bit)
        return itertools.islice(iter(train), skip, None)

    return epoch_batches, val, len(train)


def _hours(logger: RunLogger, plan, spe: int, step: int, total: int, cfg: TrainConfig, elapsed: float) -> dict:
    teacher_total = min(total, int(plan.shrink_start * spe))
    remaining_teacher = max(0, teacher_total - step)
    remaining_shrink = max(0, total - max(step, teacher_total))
    return logger.device_hours(elapsed, remaining_teacher, remaining_shrink, cfg.subnets)


def _final_evaluation(model: OFAMobileNetV3, cfg: TrainConfig, data, device, val_loader, amp_dtype, out: Path,
                      rank: int) -> dict:
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    subnets = {"max": arch.max_config(model.spec, model.n_stages), "min": arch.min_config(model.spec, model.n_stages)}
    for i in range(cfg.eval_subnets):
        subnets[f"random{i}"] = arch.random_config(model.spec, model.n_stages, g)
    calib = calibration_batches(data, cfg.calib_images, 256, device, cfg.channels_last)
    rows = evaluate_subnets(model, subnets, val_loader, calib, device, data.resolution, cfg.channels_last, amp_dtype)
    if rank == 0:
        write_report(rows, out, f"{cfg.method} on {cfg.dataset}")
        for r in rows:
            log.info("%-8s top-1 %6.2f%%  %8.2f MFLOPs  %.3f M params", r["subnet"], r["top1"], r["mflops"],
                     r["mparams"])
    model.set_max_net()
    return {"eval": [{k: v for k, v in r.items() if k != "config"} for r in rows]}


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
