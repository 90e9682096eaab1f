"""What training does to its run directory (infer.run_directory holds the layout, the
manifest schema and the readers and writers both sides use): plan where an invocation writes
(resume, replace), find checkpoints, export model/ and adapter/, draw the loss curve, write
the manifest with its model cards, and hold the lock that keeps a second writer out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from infer.checksums import sha256_file, sha256_tree
from infer.run_directory import ADAPTER_CONFIG, RunDirectory
from train.recipe import Recipe

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The run directory is in a state the requested action must not touch."""


@dataclass
class RunPlan:
    """Where one invocation writes (`work`: the run itself, or the replacement being built) and
    the checkpoint it resumes from."""

    final: "RunDir"
    work: "RunDir"
    checkpoint: Path | None

    @property
    def replaces(self) -> bool:
        return self.work.path != self.final.path


def describe_data_source(source: str) -> dict[str, Any]:
    """Path + sha256 of one data source; a dataset directory hashes its files in name order."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.is_dir():
        return {"path": str(path), "sha256": sha256_tree(path), "kind": "directory"}
    return {"path": str(path), "sha256": None, "note": "not a local file"}


def dataset_hashes(recipe: Recipe) -> dict[str, list[dict[str, Any]]]:
    """Each source of each split: its file's hash, and how it was read (format, max_rows, weight)."""
    def describe(source) -> dict[str, Any]:
        how = {"format": source.format, "max_rows": source.max_rows, "weight": source.weight}
        return {**describe_data_source(source.path), **how}

    out = {
        "train": [describe(s) for s in recipe.data.train],
        "validation": [describe(s) for s in recipe.data.validation or []],
    }
    if recipe.eval.data:
        out["eval"] = [describe_data_source(recipe.eval.data)]
    return out


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("tunewright", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


class RunDir(RunDirectory):
    def checkpoints(self) -> list[Path]:
        """Checkpoint directories in step order (the trainer writes checkpoint-<step>)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.glob("checkpoint-*"):
            suffix = p.name.rpartition("-")[2]
            # A checkpoint without trainer_state.json was cut off while being written.
            if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
                found.append((int(suffix), p))
        return [p for _, p in sorted(found)]

    def last_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # ------------------------------------------------------------ planning a run

    @property
    def staging_path(self) -> Path:
        """Where a run that replaces this one (output.overwrite) is built until it completes."""
        return self.path.parent / f".{self.path.name}.next"

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def plan(self, *, resume: bool, overwrite: bool, recipe_path: str = "RECIPE") -> "RunPlan":
        """Decide where this invocation writes and what it resumes from; change nothing on disk.

        A run that replaces an existing one (output.overwrite) is built in a hidden sibling
        directory and swapped in by `install` only once it is complete: the old run stays whole
        until then, whatever goes wrong on the way.
        """
        p = self.path
        staging = RunDir(self.staging_path)
        if resume:
            # An interrupted replacement continues where it was built; otherwise the run itself.
            work = staging if overwrite and staging.checkpoints() else self
            ckpt = work.usable_checkpoint()
            if ckpt is None:
                raise RunDirError(
                    f"--resume: no checkpoint in {work.checkpoints_dir} to resume from. "
                    f"Start the run without --resume: python -m train {recipe_path}"
                )
            return RunPlan(final=self, work=work, checkpoint=ckpt)
        if p.exists() and not p.is_dir():
            raise RunDirError(f"{p} exists and is a file, not a run directory. Choose another output.dir or name.")
        if not (p.exists() and any(p.iterdir())):
            return RunPlan(final=self, work=self, checkpoint=None)
        if not (self.recipe_file.is_file() or self.checkpoints_dir.is_dir() or self.is_complete()):
            raise RunDirError(
                f"{p} exists and is not a tunewright run directory; refusing to write into it. "
                "Choose another output.dir or name."
            )
        if not overwrite:
            if self.is_complete():
                what = "holds a completed run"
            elif self.last_checkpoint() is not None:
                what = f"holds an unfinished run (last checkpoint: {self.last_checkpoint().name})"
            else:
                what = "holds an earlier, unfinished run"
            raise RunDirError(
                f"{p} {what}. Continue it with: python -m train {recipe_path} --resume ; "
                f"or start over with: python -m train {recipe_path} output.overwrite=true ; "
                "or give this run another name (name=...)."
            )
        return RunPlan(final=self, work=staging, checkpoint=None)

    def begin(self, plan: "RunPlan") -> None:
        """Make `plan.work` ready for writing. Called once everything has been validated."""
        work = plan.work
        if plan.checkpoint is not None:
            # The run is about to change: it must stop looking complete until the new manifest lands.
            work.manifest_file.unlink(missing_ok=True)
            return
        if plan.replaces:
            shutil.rmtree(work.path, ignore_errors=True)  # a replacement an earlier invocation left unfinished
        work.path.mkdir(parents=True, exist_ok=True)

    def install(self, plan: "RunPlan") -> None:
        """Put a completed replacement in place of the old run: two renames, then the old one goes.

        Killed between the renames, the old run is in .<name>.old and the new one in
        .<name>.next: both whole, neither deleted.
        """
        if not plan.replaces:
            return
        old = self.path.parent / f".{self.path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            self.path.rename(old)
        plan.work.path.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)

    def prepare(self, *, resume: bool, overwrite: bool, recipe_path: str = "RECIPE") -> Path | None:
        """`plan` + `begin` for callers with nothing to validate in between; returns the checkpoint."""
        plan = self.plan(resume=resume, overwrite=overwrite, recipe_path=recipe_path)
        self.begin(plan)
        return plan.checkpoint

    def usable_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files are whole; a damaged newer one is skipped, saying so."""
        from train.checks import checkpoint_problem

        for ckpt in reversed(self.checkpoints()):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            log.warning("%s is damaged (%s): resuming from the checkpoint before it", ckpt, problem)
        return None

    # ------------------------------------------------------------ metrics

    def write_loss_plot(self) -> bool:
        rows = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if not train and not evals:
            return False
        try:
            import matplotlib
        except ImportError:  # a declared dependency, but a missing plot must not fail a finished run
            log.warning("matplotlib is not installed: no %s", self.loss_png)
            return False

        matplotlib.use("Agg")  # no display on servers; must be chosen before pyplot is imported
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.loss_png.with_name(".loss.png.tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.loss_png)
        return True

    # ------------------------------------------------------------ export

    def _install_dir(self, staging: Path, final: Path) -> None:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)

    def export_adapter(self, peft_model, tokenizer, *, base_model: str, revision: str | None = None) -> None:
        """Save the LoRA adapter with the tokenizer (and its chat template) beside it, naming its base
        as `base_model` (peft would write the local directory the base was loaded from)."""
        staging = Path(tempfile.mkdtemp(dir=self.path, prefix=".adapter-"))
        try:
            peft_model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            config_file = staging / ADAPTER_CONFIG
            config = json.loads(config_file.read_text())
            config.update(base_model_name_or_path=base_model, revision=revision)
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            self._install_dir(staging, self.adapter_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def export_model(self, model, tokenizer) -> None:
        """Save a plain transformers checkpoint (weights, config, tokenizer, chat template) as model/."""
        staging = Path(tempfile.mkdtemp(dir=self.path, prefix=".model-"))
        try:
            model.config.use_cache = True  # training turned it off; generation wants it
            _fix_generation_config(model, tokenizer)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            self._install_dir(staging, self.model_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def write_manifest(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The model cards, then manifest.json, which marks the run complete."""
        manifest = self.complete_manifest(fields)
        self.write_model_cards(manifest)
        return super().write_manifest(manifest)

    def write_model_cards(self, manifest: dict[str, Any]) -> None:
        """README.md model cards in model/ and adapter/, before the manifest marks the run complete.
        A card that cannot be written costs a warning, not a finished run."""
        from infer.modelcard import write_run_cards

        try:
            write_run_cards(self.path, manifest)
        except Exception as exc:  # noqa: BLE001 - the weights are the product; the card is documentation
            log.warning("model cards not written (%s: %s)", type(exc).__name__, exc)


def _fix_generation_config(model, tokenizer) -> None:
    """Generation must stop at the chat template's end-of-turn token and know the pad token."""
    from train.chat_templates import end_of_turn_id

    gen = model.generation_config
    eos: Iterable[int] | int | None = gen.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.insert(0, tokenizer.eos_token_id)
    # What the model was trained to end a turn with, when that is not eos (e.g. a template set by
    # data.chat_template); training only uses templates whose turns end on such a token.
    try:
        end = end_of_turn_id(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    except Exception:  # a template that cannot render the probe conversation was not trained on either
        end = None
    if end is not None and end not in eos_ids:
        eos_ids.append(end)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


class RunLock:
    """One writer per run name: a second `python -m train` of the same run fails at once.

    The lock is an flock on <output.dir>/.<name>.lock, which the kernel releases when the
    holder dies however it dies, so a lock left by a killed run is simply taken over. The file
    holds the holder's PID, for the message.
    """

    def __init__(self, run_path: Path):
        self.run_path = Path(run_path)
        self.path = RunDir(run_path).lock_path
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        from train.errors import RunLockedError, UserError

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"output.dir {self.path.parent} cannot be created: {exc.strerror or exc}") from None
        for _ in range(10):  # retried only while another process is removing the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"output.dir {self.path.parent} is not writable: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(
                    f"{self.run_path} is being written by another training process "
                    f"(PID {holder}, lock {self.path}). Wait for it to finish, or give this run another name (name=...)."
                ) from None
            # The previous holder may have unlinked the file between our open and our flock.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:
            raise RunLockedError(f"could not take the lock {self.path}; another process keeps replacing it")
        previous = os.read(fd, 64).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            log.info("taking over the lock %s left by PID %s, which is no longer running", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking, so no one locks a file about to vanish
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
