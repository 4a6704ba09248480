"""The training loop: `train(config) -> RunResult`, callable from other code (experiment grids,
multi-GPU launchers).

`Trainer` builds a run from its config (data first, so a bad dataset fails before anything is
written; the parts that follow from config and data alone come from `dli.training.components`,
device and precision from `dli.training.devices`), then `fit()` runs the remaining epochs:
training steps (`dli.training.steps`), validation, threshold calibration, the epoch's files in the
run folder (`dli.training.run_folder`), its line and TensorBoard scalars (`dli.training.epoch_log`)
and pictures. `Progress` (`dli.training.run_state`) is what `last.pt` keeps of where a run stands.
Mixed precision is bf16 where the GPU supports it, fp16 with loss scaling otherwise, fp32 on
CPU or with `--no-amp`; activations are channels-last. `--protocol`
(`dli.training.config.PROTOCOL_DEFAULTS`) chooses the loss terms, decoder depth, resizing, Poisson
label, schedule (cosine per step or per epoch), last-batch policy and precision as a whole,
each overridable by its own flag; a run resumes only under the protocol it started with. A
step whose loss or gradients are not finite is skipped on the device and counted; after
`MAX_SKIPPED_IN_A_ROW` such steps in a row the run stops as diverged (`DliError`, exit status
2). A checkpoint whose weights are not finite is never written. `--patience N` ends a run after
N evaluations without a better IoU. `--resume` continues a killed run from `last.pt`; the
loader's shuffling and injection plans depend only on (seed, epoch), so the resumed run sees
the same batches as an uninterrupted one.

Several processes (`rank`/`world_size`, see `dli.training.distributed`) train one model with
`DistributedDataParallel`: each decodes, plans its part of and injects batch_size / K images,
and the K parts of a step are exactly the batch one process would see (see
`dli.pipeline.loader`), so a run's data does not depend on K. Gradients are averaged across
processes, validation counts summed, and only rank 0 writes files and prints. BatchNorm
statistics stay per process, as usual with DDP.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dli.common.atomic import atomic_write_text, remove_stale_temp_files
from dli.common.lock import FolderLock
from dli.common.progress import bar as progress_bar
from dli.common.progress import on_terminal
from dli.models.checkpoint import (
    ModelInfo,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from dli.models.metrics import ConfusionCounter, SegmentationScores, all_mean, all_reduce_sum, evaluate_model
from dli.models.thresholds import CHECKPOINT_KEY as THRESHOLDS_KEY
from dli.models.thresholds import ThresholdCalibrator, choose_thresholds
from dli.models.tiled import TiledModel
from dli.models.unet import PretrainedStatus, build_model, count_parameters
from dli.training.components import (
    image_settings_of,
    injection_of,
    loaders_of,
    losses_of,
    pixel_counts_of,
)
from dli.training.config import (
    TrainConfig,
    portable_paths,
    resolved_paths,
    write_run_config,
)
from dli.training.datasets import check_same_data, data_record, datasets_of
from dli.training.devices import amp_dtype_for, device_description, resolve_device, seed_everything, versions
from dli.training.distributed import check_batch_split, check_last_batch, rank0_value
from dli.training.epoch_log import log_tensorboard, print_epoch
from dli.training.figures import PredictionGrid, write_curves
from dli.training.run_folder import (
    BEST,
    CALIBRATED_SCORES_KEY,
    IOU_BY_IMAGE_CLASS,
    LAST,
    check_resumable,
    default_run_name,
    prepare_run_folder,
)
from dli.training.run_state import EpochCallback, Progress, RunResult
from dli.training.steps import (
    StepMonitor,
    StepTotals,
    check_divergence,
    check_mostly_skipped,
    make_optimizer,
    train_step,
)


class Trainer:
    """One training run: data, model, optimisation state and run folder, built from a config.

    `fit()` runs the remaining epochs. Construction reads and validates the data first, so a
    bad dataset fails before anything is written.
    """

    def __init__(
        self, config: TrainConfig, *, rank: int = 0, world_size: int = 1, local_rank: int | None = None
    ) -> None:
        self.started = time.perf_counter()
        config = config.validate().resolved()
        assert config.epochs is not None and config.batch_size is not None and config.image_size is not None
        local_batch = check_batch_split(config.batch_size, world_size)
        check_last_batch(config.last_batch, world_size)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.writer_rank = rank == 0
        self.device = resolve_device(config.device, rank if local_rank is None else local_rank)
        self.amp_dtype = amp_dtype_for(self.device, config.amp)

        self.datasets = datasets_of(config)
        self.data_record = data_record(self.datasets)
        self.class_names = self.datasets.class_names
        empty = self.datasets.train.empty_classes()
        if empty and self.writer_rank:
            warnings.warn(f"no training image of class(es) {', '.join(empty)}", RuntimeWarning, stacklevel=3)

        if world_size > 1 and config.out is None:
            config = replace(config, out=rank0_value(str(Path("runs") / default_run_name(config))))
        self.folder = prepare_run_folder(config)
        config = self.config = replace(config, out=str(self.folder.root))  # recorded where it really is
        checkpoint = load_checkpoint(self.folder.last) if config.resume else None
        if checkpoint is not None:
            check_resumable(config, resolved_paths(checkpoint["config"], self.folder.root), self.folder.last)
            check_same_data(self.data_record, checkpoint.get("data"), self.folder.last)

        # Shuffling, flips and injection plans are functions of (seed, epoch) alone.
        injection = injection_of(config, self.datasets)

        self.pixel_counts = pixel_counts_of(config, self.datasets, self.folder)
        self.loss_fn, self.loss_spec, self.eval_loss_fn = losses_of(
            config, self.datasets, self.pixel_counts, global_batch=world_size > 1
        )

        seed_everything(config.seed)
        pretrained = config.pretrained and checkpoint is None  # a resumed run loads its own weights
        self.model, self.pretrained = build_model(
            config.encoder,
            len(self.class_names),
            pretrained=pretrained,
            decoder_convs=int(config.decoder_convs or 2),
        )

        # Channels and normalization: a resumed run keeps its own; a new one decides them here,
        # after the model, since ``--normalization auto`` depends on whether ImageNet weights loaded.
        self.colour_files = self.datasets.colour_files()
        self.channels, self.normalization = image_settings_of(
            config,
            self.datasets,
            checkpoint,
            imagenet_weights=self.pretrained.loaded,
            device=self.device,
            rank=rank,
            world_size=world_size,
            batch_size=local_batch,
            colour_files=self.colour_files,
        )
        self.train_loader, self.val_loader, self.tiling = loaders_of(
            config,
            self.datasets,
            injection,
            device=self.device,
            rank=rank,
            world_size=world_size,
            batch_size=local_batch,
            channels=self.channels,
            normalization=self.normalization,
            colour_files=self.colour_files,
        )
        # Once the flags have been checked (the loaders check crops): a bad flag stays the only line.
        unscored = self.datasets.val.empty_classes()
        if unscored and self.writer_rank:
            warnings.warn(
                f"no validation image of class(es) {', '.join(unscored)}: their IoU cannot be measured "
                "(only their false positives count) and their thresholds stay uncalibrated at 0.5",
                RuntimeWarning,
                stacklevel=3,
            )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, lr=config.lr, weight_decay=config.weight_decay)
        # Cosine annealing to 0 over the run, stepped after every step or after every epoch.
        self.per_epoch_schedule = config.lr_schedule == "per-epoch"
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, config.epochs if self.per_epoch_schedule else self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        self._skipped_in_a_row = 0  # non-finite steps in a row, across epochs (see `train_epoch`)
        if checkpoint is not None:
            self._load_state(checkpoint)

        # What the forward pass runs: the model, maybe wrapped for several GPUs and compiled.
        # Validation runs the model itself under DDP: each process scores its own shard, with no
        # collective per batch, so shards of unequal length cannot stall it.
        self.net: nn.Module = self.model
        if world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.net = torch.compile(self.net)
        self.eval_net = self.model if world_size > 1 else self.net

        self.info = ModelInfo(
            encoder=config.encoder,
            class_names=self.class_names,
            image_size=config.image_size,
            mean=tuple(self.train_loader.mean),
            std=tuple(self.train_loader.std),
            decoder_convs=int(config.decoder_convs or 2),
            resize=str(config.resize),
            tiling=self.tiling,
            channels=self.channels,
            normalization=self.normalization.source,
            aspect=config.aspect,
        )
        self.tensorboard: Any = None
        self.lock = FolderLock(self.folder.root, "run folder")
        self.prediction_grid: PredictionGrid | None = None  # built at the first figure
        if self.writer_rank:
            try:
                self._open_run_folder()
            except BaseException:
                self.lock.release()
                raise

    # -- set-up -----------------------------------------------------------------------------------

    def _load_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.progress = Progress.from_state(checkpoint["progress"])
        self.pretrained = PretrainedStatus(**checkpoint["pretrained"])
        restore_rng_state(checkpoint["rng"])  # last: building the model above drew from the RNG

    def runtime(self) -> dict[str, Any]:
        """Facts about this run that the config does not fix (written to `config.yaml`)."""
        params = count_parameters(self.model)
        return {
            "data_path": str(self.datasets.data_path),
            "class_names": list(self.class_names),
            "train_counts": self.datasets.train.counts_by_name(),
            "val_counts": self.datasets.val.counts_by_name(),
            **({"groups": asdict(self.datasets.groups)} if self.datasets.groups is not None else {}),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "device": device_description(self.device),
            "world_size": self.world_size,
            "batch_per_process": self.train_loader.batch_size,
            "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32",
            "pretrained": self.pretrained.to_dict(),
            "loss": self.loss_spec.to_dict(),
            "class_weights": self._class_weights(),
            "parameters": {"encoder": params.encoder, "decoder": params.decoder, "head": params.head},
            "channels": self.channels,
            "normalization": self.normalization.to_dict(),
            "versions": versions(),
            "command": " ".join(sys.argv),
        }

    def _class_weights(self) -> dict[str, Any] | None:
        """The per-class weights the weighted loss uses, by class name, and how they were derived."""
        weights = self.loss_spec.class_weights
        if weights is None:
            return None
        return {
            "method": self.config.method,
            "rule": self.loss_spec.weight_rule,
            "weights": {name: float(w) for name, w in zip(self.class_names, weights, strict=True)},
        }

    def _open_run_folder(self) -> None:
        """Lock the run folder (one writer at a time), tidy what a killed run left, write its config."""
        from torch.utils.tensorboard import SummaryWriter

        self.lock.acquire()
        prepare_run_folder(self.config)  # again, under the lock: another run may have written meanwhile
        for stale in remove_stale_temp_files(self.folder.root):
            print(f"dli train: removed {stale.name}, left by a write that was killed", file=sys.stderr)
        if not self.config.resume and self.folder.best.exists():
            warnings.warn(
                f"{self.folder.root} holds a {BEST} but no {LAST} (a run killed before its first epoch "
                f"was saved): starting it over, {BEST} removed",
                RuntimeWarning,
                stacklevel=3,
            )
            self.folder.best.unlink()
        write_run_config(self.folder.config, self.config, self.runtime())
        if self.pixel_counts is not None:
            atomic_write_text(
                self.folder.class_pixels, json.dumps(self.pixel_counts.to_dict(), indent=2) + "\n"
            )
        # On resume, events logged after the checkpoint's epoch (by the killed run) are dropped.
        purge = self.progress.epoch + 1 if self.progress.epoch else None
        self.tensorboard = SummaryWriter(str(self.folder.tensorboard), purge_step=purge)

    # -- checkpoints ------------------------------------------------------------------------------

    def _payload(self, *, resumable: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": unwrap(self.model).state_dict(),
            "model_info": self.info.to_dict(),
            "config": portable_paths(self.config.to_dict(), self.folder.root),
            "epoch": self.progress.epoch,
            "metrics": self.progress.history[-1] if self.progress.history else {},
        }
        if resumable:
            payload |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": capture_rng_state(),
                "progress": self.progress.to_state(),
                "pretrained": self.pretrained.to_dict(),
                "data": self.data_record,
            }
        return payload

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, on_epoch_end: EpochCallback | None = None) -> RunResult:
        """Train the remaining epochs, validating every `eval_every` and at the end."""
        config, progress = self.config, self.progress
        assert config.epochs is not None
        if self.writer_rank:
            params = count_parameters(self.model)
            print(
                f"dli train: {config.encoder} ({params.encoder / 1e6:.2f}M encoder), method {config.method}, "
                f"{len(self.datasets.train)} train / {len(self.datasets.val)} val images, "
                f"{config.epochs} epochs x {self.steps_per_epoch} steps on "
                f"{device_description(self.device)} -> {self.folder.root}",
                file=sys.stderr,
            )
            if self.datasets.groups is not None:
                print(
                    f"dli train: --group-by {config.group_by}: {self.datasets.groups.line()}", file=sys.stderr
                )
        try:
            while progress.epoch < config.epochs and progress.step < self.total_steps:
                if self._out_of_patience():
                    break
                record = self.train_epoch(progress.epoch)
                progress.epoch += 1
                last_epoch = progress.epoch == config.epochs or progress.step >= self.total_steps
                if progress.epoch % config.eval_every == 0 or last_epoch:
                    record |= self.validate_epoch()
                progress.history.append(record)
                if self.writer_rank:
                    self._write_epoch(record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.lock.release()
            if self.prediction_grid is not None:
                self.prediction_grid.close()
            self.train_loader.close()  # DALI pipelines hold worker threads and buffers
            if self.val_loader is not None:
                self.val_loader.close()
        return RunResult(
            run_dir=self.folder.root,
            config=config,
            epochs_completed=progress.epoch,
            steps=progress.step,
            skipped_steps=progress.skipped_steps,
            best_epoch=progress.best_epoch,
            best=progress.best,
            last=progress.last,
            history=progress.history,
            pretrained=self.pretrained,
            seconds=time.perf_counter() - self.started,
        )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training loader; returns the epoch's training record.

        Raises `DliError` once `MAX_SKIPPED_IN_A_ROW` steps in a row were skipped as non-finite
        (read one step late: the loop never waits for the step it has just queued).
        """
        started = time.perf_counter()
        self.train_loader.set_epoch(epoch)
        self.net.train()
        counter = ConfusionCounter(self.class_names, device=self.device)
        monitor = StepMonitor(self.device, self._skipped_in_a_row)
        steps, images = 0, 0
        bar = self._progress_bar(epoch)
        for batch in bar if bar is not None else self.train_loader:
            if self.progress.step >= self.total_steps:
                break
            y = batch.masks.to(self.device, non_blocking=True)
            loss, logits, stepped = train_step(
                self.net,
                self.loss_fn,
                self.optimizer,
                self.scaler,
                batch.images,
                y,
                amp_dtype=self.amp_dtype,
                agree=self._agree if self.world_size > 1 else None,
            )
            previous = monitor.add(loss, stepped)
            if previous is not None:
                self._check_divergence(previous)
            if not self.per_epoch_schedule:
                self.scheduler.step()
            self.progress.step += 1
            steps += 1
            counter.update(logits, y)
            images += len(y)
            if bar is not None:
                last = self.progress.last
                bar.set_postfix(
                    loss="-" if previous is None else f"{previous.mean_loss:.4f}",
                    val_iou="-" if last is None else f"{100 * last.iou:.1f}",
                    img_s=f"{images * self.world_size / max(time.perf_counter() - started, 1e-9):.1f}",
                    refresh=False,
                )
        if bar is not None:
            bar.close()
        totals = monitor.read()
        self._skipped_in_a_row = totals.skipped_in_a_row
        self._check_divergence(totals)
        skipped = steps - totals.finite_steps
        check_mostly_skipped(
            epoch,
            steps,
            skipped,
            run_steps=self.progress.step,
            run_skipped=self.progress.skipped_steps,
            last_epoch=epoch + 1 >= (self.config.epochs or 0) or self.progress.step >= self.total_steps,
            lr=self.config.lr,
            writer=self.writer_rank,
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at (per-epoch schedule)
        if self.per_epoch_schedule:
            self.scheduler.step()
        self.progress.skipped_steps += skipped
        seconds = time.perf_counter() - started
        return {
            "epoch": epoch + 1,
            "step": self.progress.step,
            "lr": lr,
            "train_loss": all_mean(totals.loss_sum, totals.finite_steps, self.device),
            "train_iou": counter.compute().iou,
            "skipped_steps": skipped,
            "images_per_s": images * self.world_size / max(seconds, 1e-9),
            "seconds": seconds,
        }

    def _agree(self, stepped: torch.Tensor) -> torch.Tensor:
        """Whether every process may step (all must skip together); on the device, no host sync."""
        bad = all_reduce_sum((~stepped).to(torch.float32))
        return bad == 0

    def _check_divergence(self, totals: StepTotals) -> None:
        check_divergence(
            totals,
            epoch=self.progress.epoch,
            step=self.progress.step,
            lr=self.config.lr,
            writer=self.writer_rank,
        )

    def validate_epoch(self) -> dict[str, Any]:
        """Score the model on the validation set; keeps `best.pt` when the IoU improves.

        The same pass calibrates the per-class thresholds that `best.pt` stores with its weights.
        """
        calibrator = ThresholdCalibrator(self.class_names, device=self.device)
        evaluation = evaluate_model(
            *self._validation_model_and_batches(),
            self.class_names,
            device=self.device,
            amp_dtype=self.amp_dtype,
            loss_fn=self.eval_loss_fn,
            observers=[calibrator],
        )
        scores, progress = evaluation.scores, self.progress
        progress.last = scores
        record = {"val_loss": evaluation.loss, **scores.to_dict()}
        if evaluation.by_image_class is not None:
            grouped = zip(self.class_names, evaluation.by_image_class.class_iou, strict=True)
            record |= {f"{IOU_BY_IMAGE_CLASS}/{name}": value for name, value in grouped}
        if progress.improves(scores):
            progress.best, progress.best_epoch = scores, progress.epoch
            progress.evaluations_since_best = 0
            calibration = self._calibration(calibrator)  # every rank: the histograms are summed across them
            if self.writer_rank:
                payload = self._payload(resumable=False) | {"metrics": record} | calibration
                save_checkpoint(self.folder.best, payload)
        else:
            progress.evaluations_since_best += 1
        return record

    def _validation_model_and_batches(self) -> tuple[nn.Module, Any]:
        """The model and batches validation runs: the loader's, or whole native images by tiles."""
        if self.val_loader is not None:
            return self.eval_net, self.val_loader
        from dli.pipeline.native import native_batches

        assert self.tiling is not None
        tiled = TiledModel(self.eval_net, self.tiling, batch=self.config.batch_size or 8)
        val = self.datasets.val  # each process scores its share; counts are summed across them
        share = val.subset(range(self.rank, len(val), self.world_size))
        return tiled, native_batches(share, self.info.mean, self.info.std, channels=self.channels)

    def _calibration(self, calibrator: ThresholdCalibrator) -> dict[str, Any]:
        """Checkpoint entries: the calibrated thresholds and the validation scores at them."""
        curves = calibrator.curves(all_reduce_sum)
        source = f"validation set, {len(self.datasets.val)} images"
        thresholds = choose_thresholds(curves, min_recall=self.config.min_recall, source=source)
        scores = SegmentationScores(self.class_names, *curves.counts_at(thresholds.values))
        return {THRESHOLDS_KEY: thresholds.to_state(), CALIBRATED_SCORES_KEY: scores.to_state()}

    def _write_epoch(self, record: Mapping[str, Any]) -> None:
        # The checkpoint first: metrics files never list an epoch that `last.pt` lacks, so a run
        # killed between the two writes resumes from what its metrics say (and rewrites them).
        save_checkpoint(self.folder.last, self._payload(resumable=True))
        self.folder.write_history(self.progress.history, self.class_names)
        if "iou" in record and self.progress.best_epoch == record["epoch"]:
            self._write_figures()
        log_tensorboard(self.tensorboard, record)
        print_epoch(record, self.config.epochs or 0)
        if self._out_of_patience():
            print(
                f"stopping: no better validation IoU in {self.config.patience} evaluations "
                f"(best at epoch {self.progress.best_epoch})",
                file=sys.stderr,
            )

    def _out_of_patience(self) -> bool:
        patience = self.config.patience
        return patience is not None and self.progress.evaluations_since_best >= patience

    def _write_figures(self) -> None:
        """Redraw `curves.png` and `val_predictions.png` (the best model's predictions; rank 0)."""
        title = f"{self.folder.root.name}  \u00b7  best epoch {self.progress.best_epoch}"
        write_curves(self.folder.curves, self.progress.history, self.class_names, title=title)
        if self.prediction_grid is None:
            assert self.config.image_size is not None
            self.prediction_grid = PredictionGrid(
                self.datasets.val,
                image_size=self.config.image_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
                native=(self.info.mean, self.info.std) if self.tiling is not None else None,
                channels=self.channels,
                mean=self.normalization.mean,
                std=self.normalization.std,
                resize=str(self.config.resize),
                fit=self.info.aspect == "fit",
            )
        model = self.model if self.tiling is None else TiledModel(self.model, self.tiling)
        self.prediction_grid.write(model, self.folder.predictions, title=f"validation, {title}")

    def _progress_bar(self, epoch: int) -> Any:
        """A tqdm bar over the training loader, or None when quiet, not rank 0 or not on a terminal."""
        if not (self.writer_rank and self.config.progress and on_terminal()):
            return None
        return progress_bar(
            self.train_loader,
            total=len(self.train_loader),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            leave=False,
        )


def train(
    config: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> RunResult:
    """Train as `config` says and return the best and last validation scores.

    `rank`/`world_size` shard the data across the processes of an initialised process group
    (only rank 0 writes); `local_rank` (default `rank`) picks this process's GPU.
    `on_epoch_end(record)` runs after each epoch's files are written (record = its
    `metrics.jsonl` line); an exception from it stops the run as a kill would.
    """
    trainer = Trainer(config, rank=rank, world_size=world_size, local_rank=local_rank)
    return trainer.fit(on_epoch_end)
