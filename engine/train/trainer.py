"""The training loop: teacher phase, sandwich phase, checkpoints, logs, final evaluation.

A step leaves its losses on the device; they are read on the host once per --log-every steps (with the
non-finite guard's counts), so the loop does not wait for the GPU between steps.
"""
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

from engine import tune
from engine.data.loader import calibration_batches, load_data, shard_loader, steps_per_epoch, train_loader
from engine.elastic import set_backend
from engine.eval.evaluate import evaluate_subnets
from engine.eval.pareto import write_report
from engine.supernet import OFAMobileNetV3, SupernetSpec, arch
from engine.train import checkpoint
from engine.train.batched import BatchedSandwich, batched_step
from engine.train.compile import Compiler, eager
from engine.train.config import TrainConfig, validate
from engine.train.distributed import init_distributed, ranks_agree
from engine.train.guard import NonFiniteError, NonFiniteGuard, repair_running_stats
from engine.train.logger import RunLogger, Timer
from engine.train.sandwich import sample_sandwich, sequential_step
from engine.train.schedule import cosine_lr, make_plan, subnet_beta

log = logging.getLogger("engine.train")
# fields that may change between an interrupted run and its resumption
RESUMABLE_DIFFERENCES = {"resume", "max_steps", "progress", "workers", "out", "backend", "log_every",
                         "max_bad_steps", "compile", "compile_backend", "cuda_graphs", "tune"}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN parameters and biases (as OFA)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Zero momentum buffers for every parameter that has none. The fused SGD step takes all buffers
    or none, and parameters get their first gradient at different steps (the kernel transforms only
    when shrinking starts). With dampening 0 a zero buffer gives the same first step as none: buf = grad."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if device.type == "cpu":
        log.info("--amp on a CPU: bf16 autocast (most CPUs run it slower than float32)")
    return torch.bfloat16


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def build_model(cfg: TrainConfig, num_classes: int) -> OFAMobileNetV3:
    spec = SupernetSpec(variant=cfg.variant, width_mult=cfg.width_mult, kernel_sizes=tuple(cfg.kernel_sizes),
                        expand_ratios=tuple(cfg.expand_ratios), depths=tuple(cfg.depths), num_classes=num_classes,
                        dropout=cfg.dropout, bn_momentum=cfg.bn_momentum)
    return OFAMobileNetV3(spec)


class _Stop:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit (a second SIGINT stops at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _StepLog:
    """Per-step rows whose losses are still on the device; written out once per logging interval."""

    def __init__(self, logger: RunLogger, guard: NonFiniteGuard, bar) -> None:
        self.logger, self.guard, self.bar, self.rows = logger, guard, bar, []

    def add(self, row: dict, losses: torch.Tensor, skipped: torch.Tensor) -> None:
        k = losses.shape[0]
        row["_device"] = torch.stack([losses[0], losses[1:].mean() if k > 1 else torch.zeros_like(losses[0]),
                                      skipped.reshape(())])
        self.rows.append(row)

    def flush(self) -> dict:
        """Read the pending losses and the guard's counts (one host sync); NonFiniteError when the run
        has diverged."""
        if self.rows:
            values = torch.stack([r.pop("_device") for r in self.rows]).tolist()
            for row, (loss_max, loss_subnets, skipped) in zip(self.rows, values):
                row.update(loss_max=loss_max, loss_subnets=loss_subnets, skipped=int(skipped))
                self.logger.log_step(row)
            last = self.rows[-1]
            self.bar.set_postfix(phase=last["phase"], loss=f"{last['loss_max']:.3f}", kd=f"{last['loss_subnets']:.3f}",
                                 img_s=f"{last['images_per_s']:.0f}")
            self.logger.flush()
            self.rows = []
        return self.guard.read()


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    found_inf: torch.Tensor) -> None:
    """The fused SGD skips the update on the device where found_inf is 1; with fp16 the GradScaler's own
    inf check does (a non-finite loss makes non-finite gradients)."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.found_inf = found_inf
        optimizer.step()


def run(cfg: TrainConfig) -> dict:
    """Train according to `cfg`; returns a summary dict (also written to <out>/summary.json).
    Raises ValueError for bad settings (before any data is read) and NonFiniteError on divergence."""
    validate(cfg)
    rank, world, local_rank = init_distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    set_backend(cfg.backend)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    resume_path = None if not cfg.resume else ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
    if resume_path is None and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    data = load_data(cfg.dataset, cfg.data, cfg.resolution, cfg.seed, cfg.auto_augment, cfg.random_erase,
                     cfg.skip_corrupt, jpeg_only=cfg.dali, workers=max(cfg.workers, 4))
    epoch_batches, val_loader, spe = _loaders(cfg, data, device, rank, world)
    torch.manual_seed(cfg.seed)                    # same initial weights on every rank and every run
    model = build_model(cfg, data.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total = spe * cfg.epochs
    base_lr = cfg.lr * cfg.batch_size * world / 128
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=base_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, fused=True)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    plan = make_plan(cfg.method, cfg.epochs, cfg.teacher_epochs, cfg.warmup_epochs, cfg.sampler)

    step, reorganized, elapsed_before = 0, False, 0.0     # elapsed: wall seconds of earlier runs
    _momentum_buffers(optimizer)
    if resume_path is not None:
        state = checkpoint.load(resume_path, model.spec.to_dict())
        changed = {k for k, v in cfg.to_dict().items() if state["config"].get(k) != v} - RESUMABLE_DIFFERENCES
        if changed:
            raise checkpoint.CheckpointError(f"checkpoint {resume_path} was trained with other settings: "
                                             + ", ".join(f"{k}={state['config'].get(k)!r}" for k in sorted(changed)))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:       # a checkpoint of an older engine may say fused=False
            group["fused"], group["foreach"] = True, None
        _momentum_buffers(optimizer)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        step, reorganized = state["step"], state["reorganized"]
        elapsed_before = state["elapsed_seconds"]
        if rank == 0:
            log.info("resumed from step %d (epoch %d) of %s", step, step // spe, resume_path)

    # "auto" stays sequential until a GPU measurement shows the batched step winning: on a CPU it is
    # 2.5-5x slower (bench/run_throughput.py), on a GPU it is not measured yet
    batched = cfg.sandwich == "batched"
    step_fn = batched_step if batched else sequential_step
    net: nn.Module = BatchedSandwich(model) if batched else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    compiler = Compiler(model, cfg.compile, device, cfg.compile_backend, cfg.cuda_graphs)
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    logger = RunLogger(out, rank == 0, world, device_label, resume_step=step if resume_path is not None else None)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    guard = NonFiniteGuard(max(cfg.subnets, 1), device, cfg.max_bad_steps, first_step=step)

    def save() -> None:
        if rank != 0:
            return
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are not finite "
                                 f"at step {step}: not writing a checkpoint (the last good one, {ckpt_path}, is "
                                 "kept); lower --lr")
        checkpoint.save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": checkpoint.rng_state(),
            "step": step, "epoch": step // spe, "reorganized": reorganized,
            "elapsed_seconds": elapsed_before + time.perf_counter() - run_start,
            "config": cfg.to_dict(), "arch": model.spec.to_dict()}, ckpt_path)

    tune.prepare_for_training(cfg, model, device, rank, world)   # the dispatch table, the same on every rank
    stop = _Stop()
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    run_start = time.perf_counter()
    max_cfg = arch.max_config(model.spec, model.n_stages)
    monitor_calib = calibration_batches(data, min(cfg.calib_images, 512), 256, device, cfg.channels_last)
    summary: dict = {"interrupted": False, "skipped_corrupt_files": len(data.skipped)}
    check_grads = scaler is None                     # with fp16, overflowing gradients are the scaler's business
    try:
        while step < stop_at and not stop.requested:
            epoch, in_epoch = divmod(step, spe)
            bar = _progress(cfg.progress and rank == 0, spe, in_epoch, f"epoch {epoch}")
            steps_log = _StepLog(logger, guard, bar)
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
                step_net = compiler.net(phase, net)
                result, compiled = compiler.timed_step(lambda: step_fn(
                    model, step_net, images, labels, cfgs, betas, cfg.label_smoothing, cfg.temperature, scaler,
                    amp_dtype, check_grads=check_grads))
                found_inf = guard.update(result.losses, result.grads_bad)
                _optimizer_step(optimizer, scaler, found_inf)
                step += 1
                seconds = timer.lap()
                steps_log.add({"step": step, "epoch": epoch, "phase": phase, "lr": lr, "beta": beta,
                               "images_per_s": images.shape[0] * world / max(seconds, 1e-9), "seconds": seconds,
                               "compiled": compiled}, result.losses, found_inf)
                bar.update(1)
                if step % cfg.log_every == 0:
                    _after_flush(steps_log.flush(), model, rank)
            _after_flush(steps_log.flush(), model, rank)
            bar.close()
            model.set_max_net()
            save()
            # subnets' forwards also move the shared running statistics: re-calibrate for the max net
            with eager():
                acc = evaluate_subnets(model, {"max": max_cfg}, val_loader, monitor_calib, device, data.resolution,
                                       cfg.channels_last, amp_dtype, costs=False)[0]["top1"]
            hours = _hours(logger, plan, spe, step, total, cfg, elapsed_before + time.perf_counter() - run_start,
                           compiler.compile_seconds)
            logger.write_hours(hours)
            logger.log_eval("max_top1", acc, step)
            if rank == 0:
                log.info("epoch %d step %d: max-net top-1 %.2f%% (BN re-calibrated), %s-hours used %.4f, "
                         "projected for the run %.4f", epoch, step, acc, hours["device"],
                         hours["used_hours"], hours["projected_total_hours"])
        summary["skipped_steps"] = guard.read()["skipped_steps"]
        summary["compile"] = {"mode": compiler.mode, "compile_seconds": compiler.compile_seconds}
        if stop.requested and step < total:
            summary["interrupted"] = True
            log.info("interrupted at step %d of %d (checkpoint %s); continue with --resume", step, total, ckpt_path)
        elif step < total:
            log.info("stopped at --max-steps %d of %d (checkpoint %s); continue with --resume", step, total, ckpt_path)
        else:
            with eager():
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


def _after_flush(state: dict, model: nn.Module, rank: int) -> None:
    """After a logging interval with skipped steps: clean the running statistics their forwards touched."""
    if state["new_skipped"]:
        fixed = repair_running_stats(model)
        if fixed and rank == 0:
            log.warning("%d non-finite running-statistics entries reset after skipped steps", fixed)


def _loaders(cfg: TrainConfig, data, device: torch.device, rank: int, world: int):
    """(epoch_batches(epoch, skip) -> iterable of (images, labels), val loader, steps per epoch)."""
    if not cfg.dali:
        def epoch_batches(epoch: int, skip: int):
            return train_loader(data, cfg.batch_size, epoch, cfg.seed, rank, world, skip, cfg.workers)

        return (epoch_batches, shard_loader(data.val, 256, rank, world, cfg.workers),
                steps_per_epoch(data, cfg.batch_size, world))
    from engine.data.dali import DaliLoader

    device_id = device.index if device.type == "cuda" else None
    # the data was already checked (and, with --skip-corrupt, filtered) by load_data
    common = dict(kind=data.kind, resolution=data.resolution, seed=cfg.seed, rank=rank, world=world,
                  device_id=device_id, num_threads=max(cfg.workers, 2))
    train = DaliLoader(data.train.base, cfg.batch_size, True, auto_augment=cfg.auto_augment,
                       random_erase=cfg.random_erase, **common)
    val = DaliLoader(data.val.base, 256, False, **common)

    def epoch_batches(epoch: int, skip: int):
        # DALI cannot seek: a mid-epoch resume reads and drops the batches already trained on (their
        # augmentations, unlike the torchvision loader's, are not reproduced bit for bit)
        return itertools.islice(iter(train), skip, None)

    return epoch_batches, val, len(train)


def _hours(logger: RunLogger, plan, spe: int, step: int, total: int, cfg: TrainConfig, elapsed: float,
           compile_s: float) -> dict:
    teacher_total = min(total, int(plan.shrink_start * spe))
    remaining_teacher = max(0, teacher_total - step)
    remaining_shrink = max(0, total - max(step, teacher_total))
    return logger.device_hours(elapsed, remaining_teacher, remaining_shrink, cfg.subnets, compile_s)


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
