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

from engine.data.loader import calibration_batches, load_data, shard_loader, steps_per_epoch, train_loader
from engine.elastic import set_backend
from engine.eval.evaluate import evaluate_subnets
from engine.eval.pareto import write_report
from engine.supernet import OFAMobileNetV3, SupernetSpec, arch
from engine.train import checkpoint
from engine.train.batched import BatchedSandwich, batched_step
from engine.train.compile import Compiler, eager
from engine.train.config import TrainConfig, validate
from engine.train.errors import BadInput
from engine.train.distributed import init_distributed, ranks_agree
from engine.train.guard import NonFiniteError, NonFiniteGuard, repair_running_stats
from engine.train.logger import RunLogger, Timer
from engine.train.sandwich import sample_sandwich, sequential_step
from engine.train.schedule import cosine_lr, make_plan, subnet_beta

log = logging.getLogger("engine.train")
# fields that may change between an interrupted run and its resumption
RESUMABLE_DIFFERENCES = {"resume", "max_steps", "progress", "workers", "out", "backend", "log_every",
                         "max_bad_steps", "compile", "compile_backend", "cuda_graphs"}


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
    Raises BadInput for bad settings, data or checkpoints (before any step), NonFiniteError on divergence."""
    try:
        validate(cfg)
    except ValueError as err:
        raise BadInput(str(err)) from err
    training = Training(cfg)
    training.resume()
    training.start()
    try:
        while training.step < training.stop_at and not training.stop.requested:
            training.train_epoch()
            training.end_epoch()
        summary = training.finish()
    finally:
        training.close()
    return summary


class Training:
    """One run's state, advanced by its phases: build (the constructor), resume, start, train_epoch,
    end_epoch, finish; `save` writes the checkpoint."""

    def __init__(self, cfg: TrainConfig) -> None:
        """Build: distributed set-up, data, loaders, model, optimizer, schedule (BadInput on bad input)."""
        self.cfg = cfg
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        try:
            set_backend(cfg.backend)
        except (ValueError, RuntimeError) as err:
            raise BadInput(str(err)) from err
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.resume_path = None if not cfg.resume else self.ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        if self.resume_path is None and self.ckpt_path.exists():
            raise BadInput(f"{self.ckpt_path} exists: pass --resume to continue it, or choose another --out")
        try:             # the data's errors before any step are bad input
            self.data = load_data(cfg.dataset, cfg.data, cfg.resolution, cfg.seed, cfg.auto_augment,
                                  cfg.random_erase, cfg.skip_corrupt, jpeg_only=cfg.dali, workers=max(cfg.workers, 4))
            self.monitor_calib = calibration_batches(self.data, min(cfg.calib_images, 512), 256, self.device,
                                                     cfg.channels_last)
        except (ValueError, OSError) as err:
            raise BadInput(str(err)) from err
        self.epoch_batches, self.val_loader, self.spe = _loaders(cfg, self.data, self.device, self.rank, self.world)
        torch.manual_seed(cfg.seed)                    # same initial weights on every rank and every run
        self.model = build_model(cfg, self.data.num_classes).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.total = self.spe * cfg.epochs
        self.stop_at = min(self.total, cfg.max_steps) if cfg.max_steps else self.total
        self.base_lr = cfg.lr * cfg.batch_size * self.world / 128
        self.optimizer = torch.optim.SGD(_param_groups(self.model, cfg.weight_decay), lr=self.base_lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.plan = make_plan(cfg.method, cfg.epochs, cfg.teacher_epochs, cfg.warmup_epochs, cfg.sampler)
        self.step, self.reorganized, self.elapsed_before = 0, False, 0.0   # elapsed: wall seconds of earlier runs
        _momentum_buffers(self.optimizer)

    def resume(self) -> None:
        """Resume: load the checkpoint's weights, optimizer, RNG and step (CheckpointError if it does not fit)."""
        if self.resume_path is None:
            return
        cfg, path = self.cfg, self.resume_path
        state = checkpoint.load(path, self.model.spec.to_dict())
        changed = {k for k, v in cfg.to_dict().items() if state["config"].get(k) != v} - RESUMABLE_DIFFERENCES
        if changed:
            raise checkpoint.CheckpointError(f"checkpoint {path} was trained with other settings: "
                                             + ", ".join(f"{k}={state['config'].get(k)!r}" for k in sorted(changed)))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:       # a checkpoint of an older engine may say fused=False
            group["fused"], group["foreach"] = True, None
        _momentum_buffers(self.optimizer)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.reorganized = state["step"], state["reorganized"]
        self.elapsed_before = state["elapsed_seconds"]
        if self.rank == 0:
            log.info("resumed from step %d (epoch %d) of %s", self.step, self.step // self.spe, path)

    def start(self) -> None:
        """Start: the step function, DDP wrapper, compiler, logs, config.json, non-finite guard, signals."""
        cfg, model = self.cfg, self.model
        # "auto" stays sequential until a GPU measurement shows the batched step winning: on a CPU it is
        # 2.5-5x slower (bench/run_throughput.py), on a GPU it is not measured yet
        batched = cfg.sandwich == "batched"
        self.step_fn = batched_step if batched else sequential_step
        self.net: nn.Module = BatchedSandwich(model) if batched else model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.compiler = Compiler(model, cfg.compile, self.device, cfg.compile_backend, cfg.cuda_graphs)
        device_label = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.logger = RunLogger(self.out, self.rank == 0, self.world, device_label,
                                resume_step=self.step if self.resume_path is not None else None)
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.guard = NonFiniteGuard(max(cfg.subnets, 1), self.device, cfg.max_bad_steps, first_step=self.step)
        self.run_start = time.perf_counter()
        self.max_cfg = arch.max_config(model.spec, model.n_stages)
        self.summary: dict = {"interrupted": False, "skipped_corrupt_files": len(self.data.skipped)}
        self.check_grads = self.scaler is None   # with fp16, overflowing gradients are the scaler's business
        self.stop = _Stop()

    def train_epoch(self) -> None:
        """Train from the current step to the end of its epoch (or to --max-steps, or a stop signal)."""
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        self.epoch, in_epoch = divmod(self.step, self.spe)
        epoch = self.epoch
        bar = _progress(cfg.progress and self.rank == 0, self.spe, in_epoch, f"epoch {epoch}")
        steps_log = _StepLog(self.logger, self.guard, bar)
        timer = Timer()
        for images, labels in self.epoch_batches(epoch, in_epoch):
            if self.step >= self.stop_at or self.stop.requested:
                break
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            if cfg.channels_last:
                images = images.to(memory_format=torch.channels_last)
            phase = self.plan.phase(self.step / self.spe)
            if phase != "teacher" and cfg.reorganize and not self.reorganized:
                model.reorganize_channels(optimizer)
                self.reorganized = True
            torch.manual_seed(_step_seed(cfg.seed, self.step, self.rank))       # dropout: same on resume
            cfgs = sample_sandwich(model, phase, cfg.subnets, self.plan.sampler,
                                   torch.Generator().manual_seed(_step_seed(cfg.seed, self.step, 0)))
            beta = subnet_beta(self.step, self.spe, self.plan, 1.0, self.total, self.base_lr)
            betas = ([cfg.max_multiplier, cfg.min_multiplier * beta]
                     + [cfg.other_multiplier * beta] * (len(cfgs) - 2))[:len(cfgs)]
            lr = cosine_lr(self.step, self.total, self.base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_net = self.compiler.net(phase, self.net)
            result, compiled = self.compiler.timed_step(lambda: self.step_fn(
                model, step_net, images, labels, cfgs, betas, cfg.label_smoothing, cfg.temperature, self.scaler,
                self.amp_dtype, check_grads=self.check_grads))
            found_inf = self.guard.update(result.losses, result.grads_bad)
            _optimizer_step(optimizer, self.scaler, found_inf)
            self.step += 1
            seconds = timer.lap()
            steps_log.add({"step": self.step, "epoch": epoch, "phase": phase, "lr": lr, "beta": beta,
                           "images_per_s": images.shape[0] * self.world / max(seconds, 1e-9), "seconds": seconds,
                           "compiled": compiled}, result.losses, found_inf)
            bar.update(1)
            if self.step % cfg.log_every == 0:
                _after_flush(steps_log.flush(), model, self.rank)
        _after_flush(steps_log.flush(), model, self.rank)
        bar.close()

    def end_epoch(self) -> None:
        """End of epoch (or of the run's steps): checkpoint, max-net accuracy, device-hours report."""
        cfg, model = self.cfg, self.model
        model.set_max_net()
        self.save()
        # subnets' forwards also move the shared running statistics: re-calibrate for the max net
        with eager():
            acc = evaluate_subnets(model, {"max": self.max_cfg}, self.val_loader, self.monitor_calib, self.device,
                                   self.data.resolution, cfg.channels_last, self.amp_dtype, costs=False)[0]["top1"]
        hours = _hours(self.logger, self.plan, self.spe, self.step, self.total, cfg, self._elapsed(),
                       self.compiler.compile_seconds)
        self.logger.write_hours(hours)
        self.logger.log_eval("max_top1", acc, self.step)
        if self.rank == 0:
            log.info("epoch %d step %d: max-net top-1 %.2f%% (BN re-calibrated), %s-hours used %.4f, "
                     "projected for the run %.4f", self.epoch, self.step, acc, hours["device"],
                     hours["used_hours"], hours["projected_total_hours"])

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.run_start

    def save(self) -> None:
        """Rank 0 writes the checkpoint atomically; never one holding non-finite weights."""
        if self.rank != 0:
            return
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are not finite "
                                 f"at step {self.step}: not writing a checkpoint (the last good one, "
                                 f"{self.ckpt_path}, is kept); lower --lr")
        checkpoint.save_atomic({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": checkpoint.rng_state(),
            "step": self.step, "epoch": self.step // self.spe, "reorganized": self.reorganized,
            "elapsed_seconds": self._elapsed(), "config": self.cfg.to_dict(), "arch": self.model.spec.to_dict()},
            self.ckpt_path)

    def finish(self) -> dict:
        """Finish: final evaluation (all epochs done) or the reason for stopping, DDP check, summary.json."""
        cfg, summary, step, total = self.cfg, self.summary, self.step, self.total
        summary["skipped_steps"] = self.guard.read()["skipped_steps"]
        summary["compile"] = {"mode": self.compiler.mode, "compile_seconds": self.compiler.compile_seconds}
        if self.stop.requested and step < total:
            summary["interrupted"] = True
            log.info("interrupted at step %d of %d (checkpoint %s); continue with --resume", step, total,
                     self.ckpt_path)
        elif step < total:
            log.info("stopped at --max-steps %d of %d (checkpoint %s); continue with --resume", step, total,
                     self.ckpt_path)
        else:
            with eager():
                summary.update(_final_evaluation(self.model, cfg, self.data, self.device, self.val_loader,
                                                 self.amp_dtype, self.out, self.rank))
        if self.world > 1:
            agree = ranks_agree(self.model)
            summary["ddp"] = agree
            if self.rank == 0:
                (self.out / "ddp_check.json").write_text(json.dumps(agree, indent=2))
        summary["step"] = step
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
        return summary

    def close(self) -> None:
        """Restore the signal handlers and close the logs (idempotent; runs on every exit)."""
        self.stop.restore()
        self.logger.close()


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
