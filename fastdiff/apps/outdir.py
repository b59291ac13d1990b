"""The `--out` folder of a command that writes (train-teacher, distill): checked before any
work, locked for one writer, swept of a killed run's temporaries, emptied by `--overwrite`.

    with claim_out(args.out, owned=DISTILL_FILES, overwrite=args.overwrite):
        ...train and save into args.out...

`check_out` turns every way a folder can be unusable (under a file, a symlink loop, a file
itself, not writable) into one ValueError/OSError that names the path, before anything is
trained. `claim_out` then holds `fastdiff.engine.checkpoint.lock_folder(out)` for the whole
command, so a second writer stops at once with one line instead of mixing its files with
the first's; while the lock is held nobody else writes there, so the temporaries of an
atomic write that was killed (`remove_stale_temps`) can be removed safely.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastdiff.engine.checkpoint import (
    CONFIG,
    WEIGHTS,
    is_checkpoint,
    is_state_file,
    lock_folder,
    remove_stale_temps,
)


@dataclass(frozen=True)
class Owned:
    """What a command writes in its `--out` folder: the only files `--overwrite` removes.

    models: its fastdiff checkpoint folders ("." is `out` itself: model.safetensors and
    config.json there); teacher_state: its training states in `out/checkpoints` are the
    `teacher*.state` files (True) or all the other `*.state` files (False);
    checkpoint_models: the fastdiff checkpoint folders in `out/checkpoints` are its own.
    """

    models: tuple[str, ...]
    teacher_state: bool
    checkpoint_models: bool


# train-teacher: the teacher in out/ itself and its training state, never a distillation's
TEACHER_FILES = Owned(models=(".",), teacher_state=True, checkpoint_models=False)
# distill (every method): its students and checkpoints, never a teacher saved in out/ itself
DISTILL_FILES = Owned(models=("student", "stage1", "stochastic"), teacher_state=False,
                      checkpoint_models=True)


def check_out(path) -> Path:
    """The folder `path` as a command's output, created if missing; raises a one-line
    ValueError (or an OSError naming the path) if it cannot be one: under a file, a file
    itself, a symbolic-link loop or a broken link, not writable. Nothing is written but the
    folder itself."""
    out = Path(path)
    for part in [*reversed(out.parents), out]:  # from the top down to `out`
        if str(part) == ".":
            continue
        try:
            st = os.stat(part)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"--out {path}: {part} is a symbolic-link loop") from None
            if e.errno == errno.ENOENT and part.is_symlink():
                raise ValueError(f"--out {path}: {part} is a broken symbolic link (to "
                                 f"{os.readlink(part)})") from None
            if e.errno == errno.ENOENT:
                break  # created below
            raise OSError(e.errno, f"--out {path}: {e.strerror}", str(part)) from None
        if not stat.S_ISDIR(st.st_mode):
            what = "is a file" if part == out else "is a file, so it cannot hold a folder"
            raise ValueError(f"--out {path}: {part} {what}; --out must be a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"--out {path}: cannot create the folder: {e.strerror}",
                      str(e.filename or out)) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"--out {path}: the folder is not writable", str(out))
    return out


def remove_owned(out, owned: Owned) -> list[Path]:
    """Remove the files of an earlier run that `owned` names: fastdiff checkpoints (their
    model.safetensors and config.json; a folder left empty goes too) and training states,
    each recognised by its contents, never anything else; returns what was removed."""
    out = Path(out)
    removed = []

    def remove_model(folder: Path) -> None:
        if folder.is_symlink() or not is_checkpoint(folder):
            return
        for file in (WEIGHTS, CONFIG):
            if (folder / file).is_file():
                (folder / file).unlink()
                removed.append(folder / file)
        if folder != out and not any(folder.iterdir()):
            folder.rmdir()

    for name in owned.models:
        remove_model(out / name)
    ckpt = out / "checkpoints"
    if ckpt.is_dir() and not ckpt.is_symlink():
        for entry in sorted(ckpt.iterdir()):
            if entry.suffix == ".state" and entry.is_file() and not entry.is_symlink():
                if entry.name.startswith("teacher") == owned.teacher_state \
                        and is_state_file(entry):
                    entry.unlink()
                    removed.append(entry)
            elif owned.checkpoint_models and entry.is_dir():
                remove_model(entry)
        if not any(ckpt.iterdir()):
            ckpt.rmdir()
    return removed


@contextmanager
def claim_out(path, *, owned: Owned, overwrite: bool = False, writer: bool = True,
              say=print):
    """Check `path` (`check_out`), lock it, sweep stale temporaries and, with `overwrite`,
    remove the earlier run's files (`remove_owned`); the lock is held until the block ends.
    writer=False (the other ranks of a torchrun job, which never write) does nothing."""
    if not writer:
        yield Path(path)
        return
    out = check_out(path)
    with lock_folder(out):
        stale = remove_stale_temps(out)
        if stale:
            say(f"removed {len(stale)} temporary file(s) left by an interrupted write in {out}")
        if overwrite:
            gone = remove_owned(out, owned)
            if gone:
                say(f"--overwrite: removed {len(gone)} file(s)/folder(s) of the earlier run "
                    f"in {out}")
        yield out
