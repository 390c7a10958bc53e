"""The training loop: ``train`` validates everything, then drives the run's epochs (``epoch.py``) with a held-out
evaluation and a full checkpoint after each (``state.py``), and a final test evaluation; exact resume.

A run's data flow: ``train`` -> ``_train`` (the validation phase: config, ``Run`` assembled in ``run.py`` with its data
read in full, its model checked against two images, its device and backend launched once (``device.py``); the output
folder checked (``out_dir.py``) and, on resume, the checkpoint against this run (``resume.py``); a failed start writes
nothing) -> ``_run`` (the folder locked and prepared, ``run_folder.py``) -> ``_train_loop`` -> ``Run.train_epoch``
-> ``Run.step`` -> the method's step.

Reliability (see ``faults.py`` and ``step/guard.py``):

- Interruption: the first SIGINT/SIGTERM lets the current step finish, then ``checkpoint.pt`` is
  written *at step granularity* and ``TrainingInterrupted`` (exit code 130/143 in the CLI) says how
  to resume. A mid-epoch checkpoint records the loader's state from before the epoch's draw, the
  index of the next step in the epoch and the epoch's running sums, so ``--resume`` redraws the
  same epoch, skips the batches already done and continues the same run bit for bit.
- ``kill -9`` at any moment: every file is written atomically, so ``checkpoint.pt`` is always the
  last complete one; resume trims ``metrics.jsonl`` back to it and removes stale temporary files.
- Numeric faults: a step whose loss or gradients are not finite is undone on the device (no per-step sync), logged
  when the flags are read (every ``log_interval`` steps); ``max_faults`` of them stop the run (``NumericFaultError``).
- The output folder: rank 0 locks it for the run's life; ``--overwrite`` keeps the old run until the new one finished
  an epoch and puts it back if the new one stops before (``run_folder.py``).
- Failing midway (``OSError`` such as a full disk, out of memory): ``RunFailedError`` names the
  checkpoint the run left and how to resume.

Several processes (``torchrun --nproc_per_node N -m apart_fast train ...``): see ``step/distributed.py``.
Rank 0 alone writes files and prints; every rank evaluates a slice of the held-out/test data; a
stop signal and the fault flags are agreed between ranks at log intervals, so all ranks stop after
the same step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apart_fast.config import Config, ConfigError
from apart_fast.data import ImageData
from apart_fast.diagnostics import epoch_probe
from apart_fast.engine import checkpoint
from apart_fast.engine.device import auto_device, device_name
from apart_fast.engine.faults import NumericFaultError, RunFailedError, StopSignals, TrainingInterrupted, is_out_of_memory
from apart_fast.engine.out_dir import AUTO_OUT, auto_out_dir, check_free_space, check_out_dir, missing_folders, prepare_out_dir
from apart_fast.engine.resume import load_resume, restart_config, resume_config, trim_metrics
from apart_fast.engine.run import Run
from apart_fast.engine.run_folder import FolderLock, discard_start, recover, restore_backup
from apart_fast.step.distributed import Comm


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data: ImageData | None = None, model: nn.Module | None = None,
          changed: Collection[str] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return the final results; with ``cfg.out`` set, write metrics and checkpoints there.

    ``resume`` continues the run in ``cfg.out`` from its checkpoint.pt with the checkpoint's own config;
    of ``cfg``'s fields, those in ``changed`` (None: those that differ from Config()'s defaults) may
    differ from it only if listed in ``config.RESUME_MAY_CHANGE`` (``epochs`` only upwards).
    ``model``: a user's model instead of ``cfg.model`` (see ``Run``; pass it again to resume).
    Under torchrun (``WORLD_SIZE`` > 1) the processes train one model data-parallel
    (``step/distributed.py``) and rank 0 writes; a checkpoint resumes on any number of processes.
    Raises ConfigError/DataError/CheckpointError on bad input, found before anything is written;
    then ``TrainingInterrupted`` after SIGINT/SIGTERM (checkpoint written), ``NumericFaultError``
    after ``cfg.max_faults`` non-finite steps, ``RunFailedError`` on an OSError or out of memory,
    each naming the checkpoint left.
    """
    cfg.validate()
    if cfg.data_dir is not None:  # kept absolute, so an eval or resume from another folder reads the same data
        cfg = dataclasses.replace(cfg, data_dir=str(Path(cfg.data_dir).expanduser().absolute()))
    comm, device = Comm.from_env(auto_device(cfg.device))
    try:
        return _train(cfg, comm, device, resume, overwrite, progress, data, model, changed)
    finally:
        comm.close()


def train_once(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.out`` so that calling again after an interruption finishes the same run: a run
    finished there returns its results.json without training, one interrupted there continues from its
    checkpoint.pt (with that checkpoint's config), anything else starts afresh. For scripts that run many
    trainings, one folder each (the ablation study, benchmarks/dropin.py)."""
    if cfg.out is None or cfg.out == AUTO_OUT:
        raise ConfigError("train_once needs cfg.out: the folder whose finished run or checkpoint it picks up")
    out = Path(cfg.out)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    if checkpoint.is_run_checkpoint(out / "checkpoint.pt"):
        return train(cfg, resume=True, progress=progress, changed=set())
    return train(cfg, overwrite=True, progress=progress)


def _train(cfg: Config, comm: Comm, device: str, resume: bool, overwrite: bool, progress: bool,
           data: ImageData | None, model: nn.Module | None, changed: Collection[str] | None) -> dict[str, Any]:
    """``train`` inside its process group: the validation phase, then the run, with the output folder locked by rank 0
    from the first look at it (a folder that does not exist yet: from its creation) to the end."""
    progress = progress and comm.is_main
    if cfg.out == AUTO_OUT:
        if resume:
            raise ConfigError("--resume needs the run's folder; pass --resume DIR")
        cfg = dataclasses.replace(cfg, out=comm.broadcast_object(auto_out_dir(cfg) if comm.is_main else None))
    lock = FolderLock(Path(cfg.out), "--resume" if resume else "--out") if cfg.out is not None and comm.is_main else None
    made = missing_folders(lock.folder) if lock is not None else []
    try:
        if lock is not None and lock.folder.is_dir():
            lock.acquire()
            recover(lock.folder)
        comm.barrier()  # rank 0 holds the folder and settled it before any rank judges it
        if resume:
            restart = restart_config(cfg, changed, comm)
            if restart is not None:
                cfg, resume = restart, False
        out = check_out_dir(cfg.out, resume, overwrite)
        saved = None
        if resume:
            assert out is not None
            saved = load_resume(out)
            cfg = resume_config(Config.from_dict(saved["config"]), cfg, changed, str(out))
        run = Run(cfg, data, model=model, comm=comm, device=device)
        if saved is not None:
            run.load_state_dict(saved)
        if out is not None:
            state = run.state_dict()
            model_bytes = checkpoint.tensor_bytes(state["model"])
            check_free_space(out, 2 * checkpoint.tensor_bytes(state) + 2 * model_bytes)
            del state
        comm.barrier()  # every rank has checked everything before rank 0 writes
        try:
            return _run(run, out, resume, overwrite, progress, lock)
        except BaseException as err:
            if out is not None and not resume and lock is not None and lock.held:  # never in a folder another process holds
                if restore_backup(out):
                    err.args = (f"{err.args[0] if err.args else err}; the run --overwrite would have replaced is back "
                                f"in {out}", *err.args[1:])
                else:
                    discard_start(out)
            raise
    finally:
        if lock is not None and lock.held:
            lock.release()
            for folder in made:  # a start that failed before its first checkpoint leaves no folder behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


def _run(run: Run, out: Path | None, resume: bool, overwrite: bool, progress: bool,
         lock: FolderLock | None) -> dict[str, Any]:
    """The run after the validation phase: prepare the output folder, train, evaluate, write the results."""
    cfg, comm = run.cfg, run.comm
    history: list[dict[str, Any]] = []
    if out is not None:  # everything is checked: from here on the run may write
        run.out = out
        if comm.is_main:
            run.replacing = prepare_out_dir(str(out), resume, overwrite, lock)
            if resume:
                history = trim_metrics(out, run.step_count, run.epoch)
            checkpoint.atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        run.replacing = comm.broadcast_object(run.replacing)
        history = comm.broadcast_object(history)
    hx, hy = run.val_x, run.val_y
    if progress:
        amp = run.precision.mode
        tqdm.write(f"apart-fast: {cfg.method} on {run.device} ({device_name(run.device)}), amp {amp}, "
                   f"{len(run.loader)} steps/epoch, validation {int(hx.shape[0])} training-split images; "
                   f"{run.describe(out)}", file=sys.stderr)
        for line in run.method.describe():
            tqdm.write(f"apart-fast: {line}", file=sys.stderr)
    stop = StopSignals()
    with stop.installed():
        try:
            results = _train_loop(run, out, history, hx, hy, progress, stop)
            ev = results.pop("_final")
            results.update(test_clean_acc=ev["clean_acc"], test_robust_acc=ev["robust_acc"], test_n=ev["n"],
                           eval=f"PGD-{cfg.final_eval_steps}x{cfg.final_eval_restarts}, eps {cfg.eval_eps:.4g}")
            ema = results.pop("_final_ema", None)
            if ema is not None:
                results.update(ema_test_clean_acc=ema["clean_acc"], ema_test_robust_acc=ema["robust_acc"],
                               ema_decay=cfg.ema, ema_warmup=cfg.ema_warmup)
            results["out"] = str(out) if out is not None else None
            if out is not None and comm.is_main:
                checkpoint.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
        except KeyboardInterrupt:  # a second signal, or one during the final evaluation
            if stop.signum is None:
                raise
            raise _interrupted(run, out, stop, saved=False) from None
        except NumericFaultError as err:
            if out is None:
                raise
            if run.saved_at is None and not run.replacing and run.model_finite():  # nothing saved yet: keep this state
                run.save_checkpoint(out)
            evaluate_it = (f"; evaluate it with: apart-fast eval --checkpoint {out}/checkpoint.pt, or resume with a "
                           f"lower peak lr: apart-fast train --resume {out} --lr <lower>") if run.saved_at else ""
            raise NumericFaultError(f"{err}; {run.held(out)}{evaluate_it}") from None
        except (OSError, MemoryError, RuntimeError) as err:
            if not isinstance(err, OSError) and not is_out_of_memory(err):
                raise
            what = f"{type(err).__name__}: {' '.join(str(err).split())}"
            resume_it = f"; fix the cause and resume with: apart-fast train --resume {out}" if run.saved_at else ""
            kept = run.held(out) if out is not None else "the run had --out none, so nothing was saved"
            raise RunFailedError(f"the run failed at {run.position()} ({what}); {kept}{resume_it}") from err
    run.model.zero_grad(set_to_none=True)  # the caller's next backward must not add to the last step's gradients
    results["model"] = run.model
    if run.ema is not None:
        results["model_ema"] = run.ema.module
    return results


def _train_loop(run: Run, out: Path | None, history: list[dict[str, Any]], hx: torch.Tensor, hy: torch.Tensor,
                progress: bool, stop: StopSignals) -> dict[str, Any]:
    """The epochs and the final evaluation; raises TrainingInterrupted once a signal was seen."""
    cfg = run.cfg
    while run.epoch < run.epochs:
        stats = run.train_epoch(progress, stop)
        if stats is None:  # a signal mid-epoch: save the step we stopped after (an --overwrite's first epoch: drop it)
            saved = out is not None and not run.replacing
            if saved:
                run.save_checkpoint(out)
            raise _interrupted(run, out, stop, saved=saved)
        rec: dict[str, Any] = {"epoch": run.epoch + 1, "step": run.step_count, **stats}
        run.epoch += 1
        if cfg.eval_n > 0 and (run.epoch % cfg.eval_every == 0 or run.epoch == run.epochs):
            ev = run.evaluate(hx, hy, steps=cfg.eval_steps)
            rec.update(holdout_clean_acc=ev["clean_acc"], holdout_robust_acc=ev["robust_acc"])
        rec.update(run.method.log_values())
        rec.update(epoch_probe(run))
        robust = rec.get("holdout_robust_acc")
        improved = robust is not None and robust > run.best_robust
        if improved:
            run.best_robust, run.best_epoch = robust, run.epoch
        rec.update(best_epoch=run.best_epoch, best_holdout_robust_acc=run.best_robust, skipped_steps=run.faults.total)
        history.append(rec)
        if out is not None:
            if run.comm.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            run.save_checkpoint(out, model_too=True, best=improved)
        if progress and run.comm.is_main:
            desc = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float) and not k.startswith("a_"))
            tqdm.write(f"[{cfg.method}] epoch {rec['epoch']}: {desc}")
        if run._should_stop(stop, 0):
            raise _interrupted(run, out, stop, saved=True)
    stop.hard = True  # training is complete and saved: a signal now aborts the final evaluation at once
    if run._should_stop(stop, 0):
        raise _interrupted(run, out, stop, saved=False)
    n_val = int(hx.shape[0])
    selection = (f"model_best.pt: highest PGD-{cfg.eval_steps} accuracy on {n_val} training-split images held out of "
                 "training (validation slice, disjoint from the test split)" if n_val and cfg.eval_steps else
                 "none (no validation slice: --eval-n 0 or no PGD steps)")
    results: dict[str, Any] = {"method": cfg.method, "epochs": run.epochs, "train_seconds": run.train_seconds,
                               "train_cpu_seconds": run.train_cpu_seconds,
                               "best_epoch": run.best_epoch, "best_holdout_robust_acc": run.best_robust,
                               "selection": selection, "n_train": len(run.train_y), "n_validation": n_val,
                               "passes_per_step": run.method.passes, "steps_per_epoch": len(run.loader),
                               "skipped_steps": run.faults.total, "device": str(run.device),
                               "device_name": device_name(run.device), "amp": run.precision.mode, "history": history}
    if hasattr(run.method, "resolved"):
        results["apart"] = run.method.resolved()
    d = run.data
    results["_final"] = run.evaluate(d.test_x, d.test_y, steps=cfg.final_eval_steps, restarts=cfg.final_eval_restarts,
                                     progress=progress)
    if run.ema is not None:
        results["_final_ema"] = run.evaluate(d.test_x, d.test_y, steps=cfg.final_eval_steps,
                                             restarts=cfg.final_eval_restarts, progress=progress, model=run.ema.module)
    return results


def _interrupted(run: Run, out: Path | None, stop: StopSignals, saved: bool) -> TrainingInterrupted:
    """The exception that ends an interrupted run, its message saying where the run stands and how to resume."""
    name = {130: "SIGINT", 143: "SIGTERM"}.get(stop.exit_code, f"signal {stop.signum}")
    where = (f"epoch {run.epoch + 1}, step {run.step_in_epoch}/{len(run.loader)}" if run.step_in_epoch
             else f"the end of epoch {run.epoch}")
    if out is None:
        return TrainingInterrupted(f"interrupted by {name} at {where}; the run had --out none, so nothing was saved",
                                   stop.exit_code)
    if run.replacing:  # _train puts the run --overwrite was replacing back and says so
        return TrainingInterrupted(f"interrupted by {name} at {where}, before the new run finished its first epoch, "
                                   "so it was not kept", stop.exit_code)
    if not saved and not (out / "checkpoint.pt").exists():
        return TrainingInterrupted(f"interrupted by {name} before the first checkpoint; nothing to resume, "
                                   f"start again with --overwrite --out {out}", stop.exit_code)
    what = f"checkpoint.pt saved at {where}" if saved else "checkpoint.pt holds the last complete checkpoint"
    return TrainingInterrupted(f"interrupted by {name}; {what}; resume with: apart-fast train --resume {out}",
                               stop.exit_code)
