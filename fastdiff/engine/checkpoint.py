"""Checkpoints: safetensors + JSON, written atomically, no pickle anywhere.

Model checkpoints (`save` / `load`, DESIGN.md §4b) are a directory::

    path/
      model.safetensors   the state dict (contiguous CPU tensors)
      config.json         {"format": "fastdiff.checkpoint", "version": 1, "model": model.config,
                           "schedule": schedule.config, "prediction", "num_classes",
                           "scalar_conds", "dtype", "metadata": {...user...}}

`load` needs nothing else: it rebuilds the model with `build_model`, loads the weights
strictly and sets `model.schedule`. `save` replaces only those two files, each atomically
(anything else in the folder is kept), and stamps both with one `save_id`, so a reader
never mistakes the weights of one save for those of another.

Training-state files (`save_state` / `load_state`, for resuming long jobs) are ONE
safetensors file whose header metadata holds the JSON-encoded `meta`. `flatten_state_dict`
/ `unflatten_state_dict` turn any nested state dict (an optimizer's, a module's, a
scheduler's) into flat tensors + JSON and back exactly; `rng_state` / `set_rng_state`
capture every global random generator as tensors.

Every failure to read (missing folder or file, truncated/corrupt safetensors, foreign or
wrong-version JSON, weights that do not fit the config) raises `CheckpointError` (a
ValueError) naming the path and what is wrong; a failed write raises an OSError naming the
file, or CheckpointError for a safetensors failure.

Folders written by one job at a time: `lock_folder` takes an exclusive, non-blocking lock
(`fcntl.flock` on `<folder>/.lock`; a second writer gets `FolderLockedError`), and
`remove_stale_temps` deletes the temporary siblings (`.NAME.tmp-PID-XXXXXXXX`,
`.NAME.old-PID-XXXXXXXX`) that a killed atomic write leaves behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fastdiff.engine.models import build_model
from fastdiff.engine.schedules import CosineSchedule, schedule_from_config

__all__ = [
    "CheckpointError",
    "FolderLockedError",
    "atomic_write",
    "flatten_state_dict",
    "is_checkpoint",
    "is_state_file",
    "load",
    "load_config",
    "load_state",
    "lock_folder",
    "remove_stale_temps",
    "rng_state",
    "save",
    "save_state",
    "set_rng_state",
    "unflatten_state_dict",
]

FORMAT = "fastdiff.checkpoint"
STATE_FORMAT = "fastdiff.state"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint or state file that cannot be read or written; the message names it."""


class FolderLockedError(CheckpointError):
    """Another process holds the folder's lock (`lock_folder`)."""


# --- small filesystem helpers ---------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # directory fsync makes the rename durable; some filesystems refuse it — not fatal
    try:
        _fsync_file(path)
    except OSError:
        pass


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (deepest first), so a rename publishes data
    that is already on disk."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        try:
            _fsync_file(path)
        except OSError:  # some filesystems refuse fsync on directories
            pass


TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-(\d+)-[0-9a-f]{8}$")  # what _temp_sibling makes
LOCK = ".lock"


def _temp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _named(e: OSError, path: Path) -> OSError:
    """`e`, or the same error naming `path` where it names no file (a failed write(2))."""
    if e.filename is not None:
        return e
    named = OSError(e.errno, e.strerror or str(e), str(path))
    named.__cause__ = e
    return named


def _replace_files(folder: Path, writers: dict) -> None:
    """Replace the files `folder/name` atomically, one by one: each `writers[name](tmp)`
    fills a temporary sibling; all of them are fsynced before the first rename, and the
    folder after the last. A failure removes the temporaries and leaves the old files."""
    temps = {}
    try:
        for name, write in writers.items():
            temps[name] = tmp = _temp_sibling(folder / name, "tmp")
            try:
                write(tmp)
            except SafetensorError as e:  # a failed write inside safetensors (disk full, ...)
                raise CheckpointError(f"cannot write {folder / name}: {e}") from e
            except OSError as e:
                raise _named(e, folder / name) from e
        for tmp in temps.values():
            _fsync_file(tmp)
        for name, tmp in temps.items():
            try:
                os.replace(tmp, folder / name)
            except OSError as e:
                raise _named(e, folder / name) from e
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def atomic_write(path, write) -> Path:
    """Write one file atomically: `write(tmp)` fills a temporary sibling, which is fsynced
    and os.replace'd over `path`; a crash leaves the old file or the new one, never half
    (and perhaps the temporary, see `remove_stale_temps`). A failure raises an OSError that
    names the file (CheckpointError for a safetensors failure)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _named(e, path.parent) from e
    _replace_files(path.parent, {path.name: write})
    return path


def remove_stale_temps(root, *, depth: int = 3) -> list[Path]:
    """Delete the temporaries of killed atomic writes (`.NAME.tmp-PID-X`, `.NAME.old-PID-X`)
    in `root` and its subfolders down to `depth` levels; returns what was removed.

    Only safe while no other process writes there: call it holding `lock_folder(root)`.
    Even then, a temporary whose writer (the pid in its name) is still alive is kept (a
    command that takes no lock, such as `fastdiff sample --out`, may be writing it); a
    subfolder with its own lock file belongs to another job and is skipped, and symbolic
    links are never followed.
    """
    root = Path(root)
    removed = []

    def in_use(pid: int) -> bool:
        if pid == os.getpid():  # this process is not writing while it sweeps
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # alive, someone else's
            return True
        return True

    def walk(folder: Path, level: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            match = TEMP_NAME.match(entry.name)
            if match:
                if in_use(int(match.group(2))):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
            elif (level < depth and entry.is_dir(follow_symlinks=False)
                  and not (path / LOCK).exists()):
                walk(path, level + 1)

    walk(root, 1)
    return removed


class FolderLock:
    """An exclusive lock on a folder, held until `release()` (or the `with` block ends, or
    the process exits: the kernel drops a dead process's flock)."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self._fd = folder, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder) -> FolderLock:
    """Lock `folder` (created if missing) for this process alone: `fcntl.flock` on
    `folder/.lock`, non-blocking. Raises FolderLockedError naming the holder's pid when
    another process holds it, an OSError naming the path when the folder is not writable.
    The lock file stays (removing it could let two processes lock two different files)."""
    folder = Path(folder)
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _named(e, path) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise FolderLockedError(
                f"{folder} is in use: another process{who} is writing there (it holds "
                f"{path}); wait for it to finish or write somewhere else") from None
        raise _named(e, path) from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return FolderLock(folder, fd)


def atomic_dir(target, fill) -> Path:
    """Write one folder atomically: `fill(tmp)` fills a temporary sibling folder, which is
    fsynced and renamed over `target`. An existing `target` is renamed aside first (and put
    back if the swap fails), then removed. Callers decide whether `target` may be replaced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = _temp_sibling(target, "tmp"), _temp_sibling(target, "old")
    try:
        tmp.mkdir()
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            if aside.exists() and not target.exists():
                os.rename(aside, target)  # put the old folder back
            raise
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


def _contiguous_cpu(tensors: dict) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:  # a view of a tensor already saved (tied weights)
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


# --- model checkpoints ----------------------------------------------------------------------


def _checkpoint_dir(path) -> Path:
    """The checkpoint folder for `path` (the folder itself or its model.safetensors)."""
    path = Path(path)
    return path.parent if path.name == WEIGHTS else path


def save(model: torch.nn.Module, path, *, metadata: dict | None = None) -> Path:
    """Save `model` to the directory `path`; returns the directory.

    Writes model.safetensors and config.json as temporary siblings, fsyncs both, then
    renames each over its old file: only those two files are replaced, anything else in the
    folder (a distillation's checkpoints/, student/, ...) is kept. Both files carry the same
    fresh `save_id`; `load` refuses a pair from two different saves (a reader between the
    two renames, or a save killed between them) instead of mixing them. The schedule
    recorded is `model.schedule` if the model has one, else the default cosine schedule.
    `metadata` is any JSON-able dict, stored under "metadata". A `path` ending in
    model.safetensors means its folder. Refuses a model with non-finite weights, and a
    folder whose config.json or model.safetensors is not a fastdiff checkpoint's. A
    torch.compile'd or DDP-wrapped model is saved as the module inside.
    """
    target = _checkpoint_dir(path)
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "kind" not in config:
        raise CheckpointError(
            f"cannot save to {target}: the model ({type(model).__name__}) has no fastdiff "
            f"`config` dict with a 'kind', so load() could not rebuild it"
        )
    schedule = getattr(model, "schedule", None) or CosineSchedule()
    params = [p for p in model.state_dict().values() if p.is_floating_point()]
    save_id = uuid.uuid4().hex
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": config,
        "schedule": schedule.config,
        "prediction": getattr(model, "prediction", "v"),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "scalar_conds": list(getattr(model, "scalar_conds", ())),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else "float32",
        "save_id": save_id,
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save to {target}: config/metadata not JSON-able: {e}") from e
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise CheckpointError(
            f"cannot save to {target}: the model has non-finite weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); training diverged")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it is a file, not a folder")
    foreign = _foreign_files(target)
    if foreign:
        raise CheckpointError(
            f"refusing to overwrite {foreign}: it exists and is not a fastdiff checkpoint's")
    weights = _contiguous_cpu(model.state_dict())
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _named(e, target) from e
    _replace_files(target, {
        WEIGHTS: lambda tmp: save_file(weights, str(tmp),
                                       metadata={"format": FORMAT, "save_id": save_id}),
        CONFIG: lambda tmp: tmp.write_text(text),
    })
    return target


def _unwrap(model):
    """The module inside torch.compile (`_orig_mod`) / DistributedDataParallel (`module`)
    wrappers, whose state-dict keys carry a prefix the rebuilt model would not have."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DataParallel", "DistributedDataParallel"):
            model = model.module  # by name: touching torch.nn.parallel imports torch.jit
        else:
            return model


def is_checkpoint(folder) -> bool:
    """Whether `folder` holds a fastdiff checkpoint's config.json (weights not checked)."""
    try:
        return json.loads((Path(folder) / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_state_file(path) -> bool:
    """Whether `path` is a fastdiff training-state file (its header, not its tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == STATE_FORMAT
    except Exception:  # not a safetensors file at all
        return False


def _foreign_files(target: Path) -> Path | None:
    """The file of `target` that `save` would replace but did not write, if any: a
    config.json that is not a fastdiff checkpoint config, or weights without one."""
    config, weights = target / CONFIG, target / WEIGHTS
    if config.exists() or config.is_symlink():
        return None if is_checkpoint(target) else config
    return weights if (weights.exists() or weights.is_symlink()) else None


def load_config(path) -> dict:
    """The parsed, checked config.json of the checkpoint at `path` (folder or its weights)."""
    folder = _checkpoint_dir(path)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}: folder does not exist")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"not a fastdiff checkpoint: {cfg_path} is missing")
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(
            f"{cfg_path} is not a fastdiff checkpoint config "
            f"(format {found!r}, expected {FORMAT!r})"
        )
    if doc.get("version") != VERSION:
        raise CheckpointError(
            f"{cfg_path} has checkpoint format version {doc.get('version')!r}; this fastdiff "
            f"reads version {VERSION}"
        )
    if not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{cfg_path} has no 'model' config dict")
    return doc


def load(path, *, map_location="cpu") -> torch.nn.Module:
    """Rebuild the model saved at `path` (its folder, or the model.safetensors in it).

    Returns the model in eval mode, on `map_location`, in the saved dtype, with
    `model.schedule` set from the checkpoint and `model.checkpoint_metadata` holding the user
    metadata. Raises CheckpointError for anything unreadable or inconsistent.
    """
    folder = _checkpoint_dir(path)
    doc, state = _read_pair(folder)
    try:
        model = build_model(doc["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: cannot build the model: {e}") from e
    try:
        schedule = schedule_from_config(doc.get("schedule"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: bad schedule config: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"weights in {folder / WEIGHTS} do not match the model config in {folder / CONFIG}: "
            f"{str(e).strip()}"
        ) from e
    dtype = getattr(torch, str(doc.get("dtype", "float32")), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model.to(dtype)
    model.to(map_location)
    model.schedule = schedule
    model.checkpoint_metadata = doc.get("metadata", {})
    return model.eval()


def _read_pair(folder: Path, tries: int = 3) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of ONE save: a pair whose save_ids differ is being
    written right now (read again, a moment later) or was left so by a killed save."""
    weights = folder / WEIGHTS
    for attempt in range(tries):
        doc = load_config(folder)
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {weights} is missing")
        state, header = _read_safetensors(weights, with_header=True)
        wanted, found = doc.get("save_id"), header.get("save_id")
        if wanted is None or found == wanted:  # checkpoints from before save_id: no check
            return doc, state
        time.sleep(0.05 * (attempt + 1))
    raise CheckpointError(
        f"checkpoint {folder} is inconsistent: {weights} and {folder / CONFIG} come from two "
        f"different saves (save_id {found!r} vs {wanted!r}); a save was interrupted between "
        "them or is still running: save again, or wait for it")


def _read_safetensors(path: Path, with_header: bool = False):
    try:
        if not with_header:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError, ...: one clear message instead
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt safetensors file ({e})"
        ) from e


# --- training state -------------------------------------------------------------------------


def save_state(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` and the JSON-able `meta` to ONE safetensors file, atomically.

    The file is written as a temporary sibling, flushed and fsynced, then os.replace'd over
    `path`, so a crash leaves either the old file or the new one. `meta` goes (as JSON) into
    the safetensors header metadata.
    """
    path = Path(path)
    try:
        meta_text = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save state to {path}: meta is not JSON-able: {e}") from e
    header = {"format": STATE_FORMAT, "version": str(VERSION), "meta": meta_text}
    tensors = _contiguous_cpu(tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_state`: (tensors on CPU, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training-state file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt safetensors file ({e})"
        ) from e
    if header.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not a fastdiff training-state file (format {header.get('format')!r})"
        )
    if header.get("version") != str(VERSION):
        raise CheckpointError(
            f"{path} has state format version {header.get('version')!r}; expected {VERSION}"
        )
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: header metadata 'meta' is missing or not JSON") from e
    return _read_safetensors(path), meta


# --- nested state dicts <-> flat tensors + JSON ----------------------------------------------
# JSON tree encoding (every container is tagged, so no user value can be mistaken for a tag):
#   None / bool / int / float / str  -> themselves (NaN/±inf via Python json's extension)
#   Tensor                           -> {"T": name}     (name of the entry in `tensors`)
#   list                             -> [items...]
#   tuple                            -> {"tuple": [items...]}
#   dict (keys of any encodable type, order kept) -> {"dict": [[key, value], ...]}


def flatten_state_dict(sd) -> tuple[dict[str, torch.Tensor], dict]:
    """Nested state (dicts/lists/tuples of tensors, ints, floats, bools, str, None) ->
    (flat {name: Tensor}, JSON-able meta). `unflatten_state_dict` inverts it exactly
    (types, key types, order, tensor dtypes and values)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj, where: str):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            name = where or "tensor"
            while name in tensors:  # keys containing '.' could collide: disambiguate
                name += "~"
            tensors[name] = obj
            return {"T": name}
        if type(obj) is list:
            return [enc(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {
                "tuple": [enc(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]
            }
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                    raise TypeError(f"state key {k!r} at {where or '<root>'} has unsupported type")
                items.append([enc(k, ""), enc(v, f"{where}.{k}" if where else str(k))])
            return {"dict": items}
        raise TypeError(
            f"cannot flatten a {type(obj).__name__} at {where or '<root>'}: only dicts, lists, "
            f"tuples, tensors, None, bool, int, float and str are supported"
        )

    return tensors, {"tree": enc(sd, "")}


def unflatten_state_dict(tensors: dict[str, torch.Tensor], meta: dict):
    """Inverse of `flatten_state_dict`."""

    def dec(obj):
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if isinstance(obj, dict):
            if "T" in obj:
                if obj["T"] not in tensors:
                    raise CheckpointError(f"state tensor {obj['T']!r} is missing")
                return tensors[obj["T"]]
            if "tuple" in obj:
                return tuple(dec(v) for v in obj["tuple"])
            if "dict" in obj:
                return {_hashable(dec(k)): dec(v) for k, v in obj["dict"]}
            raise CheckpointError(f"unrecognised node in flattened state: {obj!r}")
        return obj

    if not isinstance(meta, dict) or "tree" not in meta:
        raise CheckpointError("flattened-state meta must be a dict with a 'tree' entry")
    return dec(meta["tree"])


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, (tuple, list)) else k


# --- random generators ------------------------------------------------------------------------


def rng_state() -> dict[str, torch.Tensor]:
    """Every global random generator's state as tensors (no pickle):

    - "torch_cpu": torch's CPU generator (uint8); "torch_cuda.<i>": each CUDA device's.
    - "numpy_keys" (uint8 view of the 624 uint32 MT19937 words), "numpy_pos" (int64
      [pos, has_gauss]), "numpy_gauss" (float64 [cached_gaussian]).
    - "python_state" (int64, the 625 words of `random.getstate()`), "python_version"
      (int64 [version]), "python_gauss" (float64 [has_gauss_next, gauss_next]).
    """
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"torch_cuda.{i}"] = torch.cuda.get_rng_state(i)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    if name != "MT19937":
        raise RuntimeError(f"unexpected numpy global generator {name!r}")
    out["numpy_keys"] = torch.from_numpy(
        np.ascontiguousarray(keys, dtype=np.uint32).view(np.uint8).copy()
    )
    out["numpy_pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    version, words, gauss_next = random.getstate()
    out["python_state"] = torch.tensor(words, dtype=torch.int64)
    out["python_version"] = torch.tensor([version], dtype=torch.int64)
    out["python_gauss"] = torch.tensor(
        [0.0, 0.0] if gauss_next is None else [1.0, gauss_next], dtype=torch.float64
    )
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore generators from `rng_state()`'s dict. CUDA entries are restored onto the
    devices that exist (a warning names any that do not)."""
    known = {"torch_cpu", "numpy_keys", "numpy_pos", "numpy_gauss", "python_state",
             "python_version", "python_gauss"}  # fmt: skip
    unknown = [k for k in state if k not in known and not k.startswith("torch_cuda.")]
    if unknown:
        raise ValueError(f"set_rng_state: unknown entries {unknown}; expected rng_state()'s keys")
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    for key in state:
        if key.startswith("torch_cuda."):
            i = int(key.split(".", 1)[1])
            if torch.cuda.is_available() and i < torch.cuda.device_count():
                torch.cuda.set_rng_state(state[key].to(torch.uint8), i)
            else:
                warnings.warn(
                    f"set_rng_state: no CUDA device {i} here; its state is skipped", stacklevel=2
                )
    if "numpy_keys" in state:
        keys = state["numpy_keys"].numpy().astype(np.uint8).view(np.uint32)
        pos, has_gauss = (int(x) for x in state["numpy_pos"].tolist())
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    if "python_state" in state:
        version = int(state["python_version"][0])
        has, g = state["python_gauss"].tolist()
        words = tuple(int(x) for x in state["python_state"].tolist())
        random.setstate((version, words, g if has else None))
