"""The training loop: teacher phase, sandwich phase, checkpoints, logs, final evaluation.

A step leaves its losses on the device; they are read on the host once per --log-every steps (with the
non-finite guard's counts), so the loop does not wait for the GPU between steps.
"""
from __future__ import annotations

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
from engine.train import checkpoint, preflight, run_dir
from engine.train.batched import BatchedSandwich, batched_step
from engine.train.compile import Compiler, eager
from engine.train.config import LEGACY_SETTINGS, TrainConfig, validate
from engine.train.checkpoint import write_error_cause
from engine.train.distributed import any_rank, from_rank0, init_distributed, kill_for_test, ranks_agree, together
from engine.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, BadInput, DataFailed, WriteFailed
from engine.train.guard import NonFiniteError, NonFiniteGuard, repair_running_stats
from engine.train.logger import RunLogger, Timer
from engine.train.periodic import Periodic, parse_cadence
from engine.train.sandwich import sample_sandwich, sequential_step
from engine.train.schedule import cosine_lr, make_plan, subnet_epsilon

log = logging.getLogger("engine.train")
# fields that may change between an interrupted run and its resumption
RESUMABLE_DIFFERENCES = {"resume", "max_steps", "progress", "workers", "out", "backend", "log_every",
                         "max_bad_steps", "compile", "compile_backend", "cuda_graphs", "move_aside", "checkpoint_every",
                         "tune"}


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


def _resume_path(resume: str | None, ckpt_path: Path) -> Path | None:
    """The checkpoint to continue: --resume PATH; "last" (bare --resume): <out>/checkpoint.pt; "auto" (the
    default under torchrun): that one when it exists, else none (a fresh start)."""
    if resume == "auto":
        return ckpt_path if ckpt_path.exists() else None
    return ckpt_path if resume == "last" else None if resume is None else Path(resume)


def _check_same_settings(cfg: TrainConfig, state: dict, path: Path) -> None:
    """CheckpointError when the checkpoint was trained with settings this run may not change."""
    trained = {**LEGACY_SETTINGS, **state["config"]}
    changed = {k for k, v in cfg.to_dict().items() if trained.get(k) != v} - RESUMABLE_DIFFERENCES
    if changed:
        raise checkpoint.CheckpointError(f"checkpoint {path} was trained with other settings: "
                                         + ", ".join(f"{k}={trained.get(k)!r}" for k in sorted(changed)))


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """An upper estimate of a checkpoint's size, known before any data is read: the supernet's float32
    weights and momentum with a 1000-class head, its buffers, and 1 MiB for the rest."""
    with torch.device("meta"):
        model = build_model(cfg, 1000)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * params + sum(b.numel() * b.element_size() for b in model.buffers()) + run_dir.MIB


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
    """Train according to `cfg`; returns a summary dict (also written to <out>/summary.json, as it is
    when the run fails). Raises BadInput for bad settings, data, checkpoints or --out (before any step),
    NonFiniteError on divergence, WriteFailed when a run file cannot be written, DataFailed when the
    data fails mid-run (errors.py: each has its exit code)."""
    validate(cfg)
    training = Training(cfg)
    try:
        training.build()
        training.resume()
        training.start()
        while training.step < training.stop_at and not training.stopping:
            training.train_epoch()
            training.end_epoch()
        return training.finish()
    except OSError as err:               # the data's read errors are DataFailed by now: a run file failed
        failed = WriteFailed(f"writing {err.filename or 'a run file'} failed ({write_error_cause(err)}); "
                             f"{training.last_good()}")
        training.record_failure(failed)
        raise failed from err
    except BaseException as err:
        training.record_failure(err)
        raise
    finally:
        training.close()


class Training:
    """One run's state, advanced by its phases: claim --out (the constructor), build, resume, start,
    train_epoch, end_epoch, finish, close; `save` writes the checkpoint."""

    def __init__(self, cfg: TrainConfig) -> None:
        """Claim: distributed set-up, backend, the checkpoint to resume read and verified, --out created,
        locked and checked by rank 0 (BadInput, on every rank, before any data is read)."""
        self.cfg, self.lock, self.stop, self.logger = cfg, None, None, None
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        try:
            set_backend(cfg.backend)
        except (ValueError, RuntimeError) as err:
            raise BadInput(str(err)) from err
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.resume_path = _resume_path(cfg.resume, self.ckpt_path)
        self.resume_state = checkpoint.read(self.resume_path) if self.resume_path is not None else None
        if self.resume_state is not None:
            _check_same_settings(cfg, self.resume_state, self.resume_path)
        together(self._check_resume)
        self.step, self.saved_step = 0, None           # saved: the step of the last good checkpoint in --out
        self.summary: dict = {"interrupted": False}
        self.run_id = from_rank0(self._claim_out)

    def _check_resume(self) -> None:
        """Every rank resumes from rank 0's step, and with as many processes as wrote the checkpoint (the
        learning rate, steps per epoch and data shards depend on it): BadInput otherwise."""
        step = self.resume_state["step"] if self.resume_state is not None else None
        first = from_rank0(lambda: step)
        if step != first:
            raise BadInput(f"rank {self.rank} would resume from {step if step is not None else 'nothing'} and rank 0 "
                           f"from step {first}: every node must see the same --out (shared storage)")
        written = (self.resume_state or {}).get("world", self.world)
        if written != self.world:
            raise BadInput(f"{self.resume_path} was written by a run of {written} processes, this one has "
                           f"{self.world}: resume with as many (the learning rate and data order depend on it)")

    def _claim_out(self) -> str:
        """Rank 0: create and lock --out, check it, set aside another run's files; returns the run id."""
        out, resume_here = self.out, self.resume_path is not None and self.resume_path.resolve() == \
            self.ckpt_path.resolve()
        run_id = (self.resume_state or {}).get("run_id") or run_dir.new_run_id()
        run_dir.create(out)
        self.lock = run_dir.RunLock(out, run_id)
        self.lock.acquire()
        try:
            run_dir.remove_stale_temporaries(out)
            if self.resume_path is None and self.ckpt_path.exists():
                raise BadInput(f"{self.ckpt_path} exists: pass --resume to continue it, or choose another --out")
            owner = None if resume_here else run_dir.folder_owner(out)
            if owner is not None and owner != run_id:
                if self.ckpt_path.exists() and not self.cfg.move_aside:
                    raise BadInput(f"--out {out} holds the checkpoint of run {owner}; resuming {self.resume_path} "
                                   f"(run {run_id}) there would replace it: choose another --out, or pass "
                                   f"--move-aside to move run {owner}'s files into {out}/set-aside-{owner}/")
                run_dir.move_aside(out, owner)    # a checkpoint-less run's logs are kept aside, not mixed
            run_dir.check_free_space(out, checkpoint_bytes(self.cfg), self.ckpt_path if resume_here else None)
        except BaseException:
            self.lock.release()
            raise
        self.saved_step = self.resume_state["step"] if resume_here else None
        return run_id

    def build(self) -> None:
        """Build: data (checked against the settings), loaders, model, optimizer, schedule."""
        cfg = self.cfg
        try:             # the data's errors before any step are bad input
            self.data = load_data(cfg.dataset, cfg.data, cfg.resolution, cfg.seed, cfg.auto_augment,
                                  cfg.random_erase, cfg.skip_corrupt, jpeg_only=cfg.dali, workers=max(cfg.workers, 4),
                                  share=from_rank0, progress=cfg.progress and self.rank == 0,
                                  heldout_images=cfg.heldout_images)
            self.monitor_calib = calibration_batches(self.data, min(cfg.calib_images, 512), 256, self.device,
                                                     cfg.channels_last)
        except (ValueError, OSError) as err:
            raise BadInput(str(err)) from err
        self.epoch_batches, self.val_loader, self.spe = _loaders(cfg, self.data, self.device, self.rank, self.world)
        preflight.check_data(self.data, self.spe, cfg.batch_size, self.world, cfg.data)
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
        self.reorganized, self.elapsed_before = False, 0.0   # elapsed: wall seconds of earlier runs
        _momentum_buffers(self.optimizer)

    def resume(self) -> None:
        """Resume: load the checkpoint's weights, optimizer, RNG and step (CheckpointError if it does not fit)."""
        if self.resume_path is None:
            return
        path, state = self.resume_path, self.resume_state
        checkpoint.check_arch(state, path, self.model.spec.to_dict())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:       # loading replaces the groups' flags: keep the fused
                                                        # update, which takes the guard's found_inf
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
            (self.out / "config.json").write_text(json.dumps({**cfg.to_dict(), "run_id": self.run_id}, indent=2))
            self._write_skipped_list()
        self.guard = NonFiniteGuard(max(cfg.subnets, 1), self.device, cfg.max_bad_steps, first_step=self.step)
        self.run_start = time.perf_counter()
        self.max_cfg = arch.max_config(model.spec, model.n_stages)
        self.summary["skipped_corrupt_files"] = len(self.data.skipped)
        self.summary["images"] = {"train": len(self.data.train), "val": len(self.data.val),
                                  "heldout": 0 if self.data.heldout is None else len(self.data.heldout)}
        self.check_grads = self.scaler is None   # with fp16, overflowing gradients are the scaler's business
        tune.prepare_for_training(cfg, model, self.device)   # rank 0's table, the same on every rank
        self.periodic, self.stopping = Periodic(parse_cadence(cfg.checkpoint_every)), False
        self.stop = _Stop()
        if self.rank == 0:
            log.info("writing to %s on %s x %d (%s); settings: %s", self.out, device_label, self.world,
                     f"resuming {self.resume_path} at step {self.step}" if self.resume_path else "fresh start",
                     ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))

    def train_epoch(self) -> None:
        """Train from the current step to the end of its epoch (or to --max-steps, or a stop signal).
        A batch that cannot be read ends the run with DataFailed after a checkpoint of the last step."""
        self.epoch, in_epoch = divmod(self.step, self.spe)
        bar = _progress(self.cfg.progress and self.rank == 0, self.spe, in_epoch, f"epoch {self.epoch}")
        steps_log = _StepLog(self.logger, self.guard, bar)
        timer = Timer()
        batches = iter(self.epoch_batches(self.epoch, in_epoch))
        while self.step < self.stop_at and not self.stopping:
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - whatever the loader raised, the data failed
                _after_flush(steps_log.flush(), self.model, self.rank)
                raise self._data_failed("reading the training data", err) from err
            self._train_step(images, labels, steps_log, timer)
            bar.update(1)
            kill_for_test(self.rank, self.step)
            if self.step % self.cfg.log_every == 0:
                _after_flush(steps_log.flush(), self.model, self.rank)
            self._checkpoint_if_due()
        _after_flush(steps_log.flush(), self.model, self.rank)
        bar.close()

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, steps_log: _StepLog, timer: Timer) -> None:
        """One sandwich step on a batch; its losses are logged when `steps_log` is next flushed."""
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
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
        epsilon = subnet_epsilon(self.step, self.spe, self.plan, 1.0, self.total, self.base_lr)
        epsilons = ([cfg.max_multiplier, cfg.min_multiplier * epsilon]
                    + [cfg.other_multiplier * epsilon] * (len(cfgs) - 2))[:len(cfgs)]
        lr = cosine_lr(self.step, self.total, self.base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_net = self.compiler.net(phase, self.net)
        result, compiled = self.compiler.timed_step(lambda: self.step_fn(
            model, step_net, images, labels, cfgs, epsilons, cfg.label_smoothing, cfg.temperature, self.scaler,
            self.amp_dtype, check_grads=self.check_grads))
        found_inf = self.guard.update(result.losses, result.grads_bad)
        _optimizer_step(optimizer, self.scaler, found_inf)
        self.step += 1
        seconds = timer.lap()
        steps_log.add({"step": self.step, "epoch": self.epoch, "phase": phase, "lr": lr, "epsilon": epsilon,
                       "images_per_s": images.shape[0] * self.world / max(seconds, 1e-9), "seconds": seconds,
                       "compiled": compiled}, result.losses, found_inf)

    def _checkpoint_if_due(self) -> None:
        """Stop requests and the periodic checkpoint, decided alike on every rank: under DDP at each
        logging interval (the ranks synchronise there anyway), in one process at every step."""
        time_due = False
        if self.world == 1 or self.step % self.cfg.log_every == 0:
            self.stopping, time_due = any_rank([self.stop.requested, self.periodic.time_due()], self.device)
        if (time_due or self.periodic.step_due(self.step)) and self.step < self.stop_at:
            self.save()

    def _data_failed(self, what: str, err: BaseException) -> DataFailed:
        """The run's end on a data error: this step's checkpoint is written (if not already), then the
        DataFailed to raise, naming the cause and the checkpoint to resume from."""
        if self.saved_step != self.step and self.world == 1:
            self.model.set_max_net()
            self.save()
        elif self.saved_step != self.step and self.rank == 0:
            # one rank's failure: no collective can be shared with ranks still training (they end when
            # torchrun stops the job); rank 0's weights are every rank's, so it writes alone
            self.model.set_max_net()
            self._write_checkpoint()
            self.saved_step = self.step
        return DataFailed(f"{what} failed after step {self.step} ({type(err).__name__}: {err}); "
                          f"{self.last_good()}: fix or remove the file (or pass --skip-corrupt) and continue with "
                          "--resume")

    def end_epoch(self) -> None:
        """End of epoch (or of the run's steps): checkpoint, max-net accuracy, device-hours report."""
        cfg, model = self.cfg, self.model
        model.set_max_net()
        if self.saved_step != self.step:
            self.save()
        # a signal that reached some rank after the last agreed step: agreed now, before evaluating
        self.stopping = any_rank([self.stopping or self.stop.requested], self.device)[0]
        if self.stopping:               # SIGTERM/SIGINT: exit at once with the checkpoint, no evaluation
            return
        # subnets' forwards also move the shared running statistics: re-calibrate for the max net
        try:
            with eager():
                acc = evaluate_subnets(model, {"max": self.max_cfg}, self.val_loader, self.monitor_calib,
                                       self.device, self.data.resolution, cfg.channels_last, self.amp_dtype,
                                       costs=False)[0]["top1"]
        except (OSError, ValueError) as err:       # the decoders' errors for a bad file
            raise self._data_failed("evaluating on the validation data", err) from err
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
        """Every rank calls it at the same step; an error on any rank is raised on all (distributed.together)."""
        together(self._write_checkpoint)
        self.saved_step = self.step
        self.periodic.saved()

    def _write_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint atomically; never one holding non-finite weights."""
        if self.rank != 0:
            return
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are not finite "
                                 f"at step {self.step}: not writing a checkpoint (the last good one, "
                                 f"{self.ckpt_path}, is kept); lower --lr")
        try:
            checkpoint.save_atomic({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": checkpoint.rng_state(), "step": self.step, "epoch": self.step // self.spe,
                "reorganized": self.reorganized, "elapsed_seconds": self._elapsed(), "config": self.cfg.to_dict(),
                "arch": self.model.spec.to_dict(), "run_id": self.run_id, "world": self.world}, self.ckpt_path)
        except WriteFailed as err:
            raise WriteFailed(f"{err} at step {self.step}; {self.last_good()}") from err

    def last_good(self) -> str:
        """Where this run's last good checkpoint is, for a failure's message."""
        if self.saved_step is None:
            return f"no checkpoint of this run is in {self.out} yet"
        return f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step})"

    def finish(self) -> dict:
        """Finish: final evaluation (all epochs done) or the reason for stopping, DDP check, summary.json."""
        cfg, summary, step, total = self.cfg, self.summary, self.step, self.total
        summary["skipped_steps"] = self.guard.read()["skipped_steps"]
        summary["compile"] = {"mode": self.compiler.mode, "compile_seconds": self.compiler.compile_seconds}
        if self.stopping and step < total:
            summary["interrupted"] = True
            log.info("interrupted at step %d of %d (checkpoint %s); continue with --resume", step, total,
                     self.ckpt_path)
        elif step < total:
            log.info("stopped at --max-steps %d of %d (checkpoint %s); continue with --resume", step, total,
                     self.ckpt_path)
        else:
            try:
                with eager():
                    summary.update(_final_evaluation(self.model, cfg, self.data, self.device, self.val_loader,
                                                     self.amp_dtype, self.out, self.rank))
            except (OSError, ValueError) as err:    # the decoders' errors for a bad file
                raise self._data_failed("the final evaluation on the validation data", err) from err
        if self.world > 1:
            agree = ranks_agree(self.model)
            summary["ddp"] = agree
            if self.rank == 0:
                (self.out / "ddp_check.json").write_text(json.dumps(agree, indent=2))
        summary["step"] = step
        summary["exit_code"] = EXIT_INTERRUPTED if summary["interrupted"] else EXIT_OK
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
        return summary

    def record_failure(self, err: BaseException) -> None:
        """summary.json of a run that ends on an error (rank 0, --out claimed): step, exit code, message.
        A failure to write it is only logged: it must not hide the error itself."""
        if self.lock is None or isinstance(err, BadInput) and (self.out / "summary.json").exists():
            return                   # bad input trained nothing: an earlier summary still tells the folder's state
        code = getattr(err, "exit_code", EXIT_FAILED)
        summary = {**self.summary, "step": self.step, "exit_code": code, "error": f"{type(err).__name__}: {err}"}
        try:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        except OSError as write_err:
            log.warning("could not write %s (%s)", self.out / "summary.json", write_error_cause(write_err))

    def _write_skipped_list(self) -> None:
        """--skip-corrupt: the files left out, one per line, in <out>/skipped_files.txt."""
        if self.data.skipped:
            path = self.out / "skipped_files.txt"
            path.write_text("".join(f"{name}\n" for name in self.data.skipped))
            log.warning("--skip-corrupt: %d image files left out, listed in %s", len(self.data.skipped), path)

    def close(self) -> None:
        """Restore the signal handlers, close the logs, release --out (runs on every exit)."""
        if self.stop is not None:
            self.stop.restore()
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()


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
    val = DaliLoader(data.val.base, 256, False, **common)
    train: list[DaliLoader] = []

    def epoch_batches(epoch: int, skip: int):
        # built at the first epoch the run trains, so a mid-epoch resume starts at the next batch (the
        # samples are the torchvision loader's; DALI's augmentations are not reproduced bit for bit)
        if not train:
            train.append(DaliLoader(data.train.base, cfg.batch_size, True, auto_augment=cfg.auto_augment,
                                    random_erase=cfg.random_erase, start_epoch=epoch, skip_batches=skip, **common))
        return train[0]

    return epoch_batches, val, steps_per_epoch(data, cfg.batch_size, world)


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
