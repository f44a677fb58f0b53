"""The run folder (docs/run-folder.md): its named paths, the one atomic writer, and one reader and one writer for
each file a run writes. Every other module reaches a run's files through here.

Layer 0: imports nothing of recallk, so the engine (writers), the report (readers) and the CLI share it; nor torch
(a tensor or device given here is recognised when torch is loaded), so :mod:`recallk.provenance` can use it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

#: the prefix of validation metrics in an evaluation (``val/map@r``): when ``val/<best_metric>`` is there, it (not
#: the test split's ``best_metric``) chooses ``checkpoints/best.pt`` (:func:`selection_metric`)
VALIDATION_PREFIX = "val/"
#: the metric families of a summary table (the final table of ``recallk train``, the report's comparison)
SUMMARY_METRICS = ("recall@", "map@r", "r_precision")

@dataclass(frozen=True)
class RunFolder:
    """The named paths of a run folder ``root`` (``runs/<name>``); nothing is created or read here."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def best_json(self) -> Path:
        return self.root / "best.json"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def resumes(self) -> Path:
        return self.root / "resumes.jsonl"

    @property
    def lock(self) -> Path:
        """``.lock``: held (``fcntl.flock``) by the one ``recallk train`` writing the folder (:class:`RunLock`)."""
        return self.root / ".lock"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_pt(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_pt(self) -> Path:
        return self.checkpoints / "best.pt"

    def embeddings(self, split: str) -> Path:
        """``embeddings/<split>.npz``: the final evaluation's embeddings of ``split``."""
        return self.root / "embeddings" / f"{split}.npz"

    def raw_pixels(self, split: str) -> Path:
        """``embeddings/raw_pixels/<split>.npz``: the raw-pixel baseline's embeddings of ``split``."""
        return self.root / "embeddings" / "raw_pixels" / f"{split}.npz"

    def zero_shot(self, split: str) -> Path:
        """``embeddings/zero_shot/<split>.npz``: the pretrained network's own embeddings of ``split`` (no head, no
        training), written at the start of a run from pretrained weights."""
        return self.root / "embeddings" / "zero_shot" / f"{split}.npz"


# ------------------------------------------------------------------------------------------- the atomic writer
def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows opening a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, empty temporary file beside ``path`` (exclusive create, mode ``0o666`` less the umask, as ``open``
    gives; ``tempfile.mkstemp`` would make it 0600); returns (fd, name)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Any:
    """Yield a temporary path beside ``path`` (an empty file of the usual mode); when the block succeeds it
    replaces ``path`` (``os.replace``, atomic on POSIX and Windows), on any error it is removed and ``path`` is
    untouched. For writers that take a file name (faiss, torch.jit, onnx, ``np.savez``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write ``data`` to ``path`` so that the file is never half-written: a ``str`` (UTF-8), ``bytes``, or a
    function ``write(binary file)`` (``torch.save``, ``np.savez``) goes to a temporary file beside ``path``, which is
    flushed, fsync'ed and then put in place with ``os.replace``; parent folders are created. On any error
    (a full disk, an exception in ``write``) the temporary file is removed and the previous ``path`` is untouched.
    The file gets the mode of any file the process creates (``0o666 & ~umask``). Returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        if isinstance(data, str):
            handle.write(data.encode("utf-8"))
        elif isinstance(data, (bytes, bytearray)):
            handle.write(data)
        else:
            data(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path


# ---------------------------------------------------------------------------------------------- config.yaml
_FLOAT_TAG = "tag:yaml.org,2002:float"
#: YAML 1.2's floats (``1e-3``, ``1e3``, ``5E-1``, ``.5``: an exponent needs no dot or sign), plus YAML 1.1's own
#: forms (``1_000.5``, sexagesimal ``1:30.0``), ``.inf`` and ``.nan``; integers stay integers
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE)


class ConfigLoader(yaml.SafeLoader):
    """The one YAML loader of config files and ``key=value`` overrides: PyYAML's safe loader (YAML 1.1) reading
    numbers in scientific notation as YAML 1.2 does, as floats (``1e-3`` -> 0.001, ``1e3`` -> 1000.0, at any depth);
    YAML 1.1 reads ``1e-3`` (no dot) as a string. Everything else is read as ``yaml.safe_load`` reads it."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "-+0123456789.":  # floats first, as in the safe loader
    ConfigLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (_FLOAT_TAG, _FLOAT))


def read_yaml(text: str) -> Any:
    """``text`` read by :class:`ConfigLoader` (raises ``yaml.YAMLError`` when it is not valid YAML)."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass: no Python objects


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as ``config.yaml`` holds it: YAML's plain types (tuples become lists, paths and devices
    strings), by a ``yaml.safe_dump`` / ``yaml.safe_load`` round trip, so that a checkpoint and the file say the
    same.

    Raises:
        ValueError: a value YAML cannot represent (an object, a tensor), naming the problem.
    """
    try:
        return yaml.safe_load(yaml.safe_dump(_plain(dict(config)), sort_keys=False))
    except yaml.YAMLError as e:
        raise ValueError(f"the run config must hold plain values (numbers, strings, lists, mappings): {e}") from e


def _torch_types(*names: str) -> tuple[type, ...]:
    """The torch classes ``names`` when torch is loaded, else () (then no value can be one of them)."""
    torch = sys.modules.get("torch")
    return tuple(getattr(torch, name) for name in names) if torch is not None else ()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (os.PathLike, *_torch_types("device", "dtype"))):
        return str(value)
    return value


def write_config(config: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML (keys in their order, :func:`plain_config`) to ``path`` atomically."""
    return write_atomic(path, yaml.safe_dump(plain_config(config), sort_keys=False))


def read_config(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """(text, mapping) of a ``config.yaml``; (None, {}) when it does not exist.

    Raises:
        ValueError: the file is not valid YAML or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        return None, {}
    text = path.read_text(encoding="utf-8")
    try:
        config = read_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if config is None:
        return text, {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a YAML mapping (the resolved config), got {type(config).__name__}")
    return text, config


# ---------------------------------------------------------------------------------------- best.json and its rule
def selection_metric(metrics: Iterable[str], best_metric: str) -> tuple[str, str]:
    """(metric key, split) that chooses ``best.pt`` among an evaluation's ``metrics`` (its keys):
    ``val/<best_metric>`` on the "validation" split when the evaluation has it, else ``best_metric`` on "test".
    The one rule: the trainer applies it, the report reads it back."""
    validation = VALIDATION_PREFIX + best_metric
    return (validation, "validation") if validation in set(metrics) else (best_metric, "test")


def write_best(path: str | os.PathLike, metric: str, split: str, value: float, epoch: int, step: int) -> Path:
    """``best.json`` atomically: which evaluation chose ``checkpoints/best.pt``: ``{"metric", "split"
    ("validation" or "test"), "value" (a fraction, as in metrics.jsonl), "epoch", "step"}``."""
    record = {"metric": metric, "split": split, "value": value, "epoch": epoch, "step": step}
    return write_atomic(path, json.dumps(record) + "\n")


def read_best(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of ``best.json`` (see :func:`write_best`), or None when the file does not exist.

    Raises:
        ValueError: not a JSON object with ``metric`` and ``epoch``.
    """
    return read_json_file(path, lambda r: isinstance(r, dict) and "metric" in r and "epoch" in r,
                          "a JSON object with 'metric', 'split', 'value', 'epoch' and 'step'")


def read_json_file(path: str | os.PathLike, valid: Callable[[Any], bool], requirement: str,
                   fix: str = "") -> Any:
    """The JSON value of the file ``path`` (``best.json``, ``run.json``), or None when it does not exist.

    Raises:
        ValueError: not valid JSON (``"<path> is not valid JSON (<why>)<fix>"``), or ``valid(value)`` is False
            (``"<path> must be <requirement>"``).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}){fix}") from e
    if not valid(value):
        raise ValueError(f"{path} must be {requirement}")
    return value


# ------------------------------------------------------------------------------------------ JSON-lines files
def json_value(value: Any) -> Any:
    """``value`` with tensors and numpy scalars turned into plain numbers and lists (for a JSON line)."""
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, _torch_types("Tensor")) and value.numel() != 1:
        return value.tolist()
    return value.item() if callable(getattr(value, "item", None)) else value  # one-element tensor, numpy scalar


def append_json_line(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(json_value(dict(record))) + "\n")


def read_json_lines(path: str | os.PathLike, valid: Callable[[Any], bool], requirement: str) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line, in file order (blank lines skipped).

    Raises:
        ValueError: a line is not valid JSON, or ``valid(entry)`` is False (``"<path>:<line> must be
            <requirement>"``); FileNotFoundError is the caller's to turn into words (this reads an existing file).
    """
    entries = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e.msg}); fix or delete that line") from e
            if not valid(entry):
                raise ValueError(f"{path}:{number} must be {requirement}")
            entries.append(entry)
    return entries


def append_metrics(path: str | os.PathLike, kind: str, epoch: int, step: int, values: Mapping[str, Any]) -> None:
    """One ``metrics.jsonl`` line: ``{"kind", "epoch", "step", "time" (unix seconds), **values}``."""
    append_json_line(path, {"kind": kind, "epoch": epoch, "step": step, "time": time.time(), **values})


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` in file order (blank lines skipped).

    Raises:
        ValueError: the file is missing, a line is not a JSON object, or a line lacks ``kind`` / ``epoch``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file not found: expected {path} (written by training, see docs/run-folder.md)")
    return read_json_lines(path, lambda r: isinstance(r, dict) and "kind" in r and "epoch" in r,
                           "a JSON object with 'kind' and 'epoch' keys")


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Cut ``metrics.jsonl`` back to ``step`` (atomically): drop the lines of later steps (written after the
    checkpoint a run resumes from), so that a resume never duplicates a line. Nothing happens when the file does
    not exist."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------- resumes.jsonl
def append_resume(path: str | os.PathLike, argv: list[str], changes: Mapping[str, tuple[Any, Any]]) -> None:
    """One ``resumes.jsonl`` line for a ``--resume``: ``{"time" (unix seconds), "argv", "changes": {key: [old,
    new]}}`` (values JSON cannot hold are written as their ``str``)."""
    record = {"time": time.time(), "argv": list(argv), "changes": {k: list(v) for k, v in changes.items()}}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def read_resumes(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of ``resumes.jsonl`` (see :func:`append_resume`) in file order, [] when it does not exist.

    Raises:
        ValueError: a line is not a JSON object with a numeric ``time`` (naming the file and line).
    """
    if not Path(path).is_file():
        return []
    return read_json_lines(path, lambda e: isinstance(e, dict) and isinstance(e.get("time"), int | float),
                           "a JSON object with a 'time'")


# --------------------------------------------------------------------------------------------------- .lock
try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock
    fcntl = None  # type: ignore[assignment]


#: the lock files this process holds (fd): a forked child (a DataLoader worker) closes its copies at once, so that
#: the lock goes with its holder, not with the last of its children
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:  # close only: flock's LOCK_UN here would release the parent's lock
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunFolderBusyError(ValueError):
    """Another process holds the run folder's lock (:class:`RunLock`). ``holder``: what it recorded in the lock
    file (``pid``, ``host``, ``started``, ``command``; {} when it had not written them yet)."""

    def __init__(self, root: Path, holder: Mapping[str, Any]) -> None:
        self.root, self.holder = Path(root), dict(holder)
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        if holder:
            command = f": {holder['command']}" if holder.get("command") else ""
            who = f"pid {pid} on host {host}, started {holder.get('started', '?')}{command}"
            stop = f"stop that process (kill {pid} on {host}: it saves checkpoints/last.pt)"
        else:
            who, stop = "a process that is just starting", "stop that process"
        super().__init__(f"run folder {root} is in use by another recallk train ({who}); wait for it to end, or "
                         f"{stop}, then run this command again")


class RunLock:
    """An exclusive lock on the run folder ``root`` for as long as the ``with`` block runs: ``fcntl.flock`` on
    ``root/.lock`` (:attr:`RunFolder.lock`; the folder is created), which then records the holder's ``pid``,
    ``host``, ``started`` (local time, ISO 8601) and ``command`` as JSON. The lock file is removed on a normal
    release; the OS releases the lock when the process dies (a crash or SIGKILL leaves no stale lock, at most the
    file, which the next holder rewrites). Only one process takes it: no waiting.

    Without ``fcntl`` (Windows) the block runs unlocked.

    Raises:
        RunFolderBusyError: (a ValueError) another process holds it; nothing in the folder was changed.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = RunFolder(root).lock
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (see the class); raises RunFolderBusyError when another process holds it."""
        if fcntl is None or self._fd is not None:
            return
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileNotFoundError:  # the folder was removed in between: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderBusyError(self.path.parent, holder) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file that its holder removed on release: lock the one at the path now
        now = time.time()
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
                  "time": now, "command": _command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Remove the lock file (when it is still the one locked) and release the lock; nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        try:
            if _same_file(fd, self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # releases the flock


def _command_line() -> str:
    """This process's command line as typed: ``recallk train ...`` (``python -m recallk train ...`` when started
    as a module), not the full path of the console script."""
    if not sys.argv:
        return ""
    program = Path(sys.argv[0])
    words = ["python", "-m", program.parent.name] if program.name == "__main__.py" else [program.name]
    return shlex.join([*words, *sys.argv[1:]])


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` now (not removed or replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    """What the holder of a lock file recorded (see :class:`RunLock`); {} when nothing (yet) or unreadable."""
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------------- train.log
def append_log(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``train.log``, each of its lines prefixed with a timestamp (``YYYY-mm-dd HH:MM:SS``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(f"{stamp} {line}\n" for line in text.splitlines()))


# ------------------------------------------------------------------------------------------- embeddings/*.npz
def write_embeddings_npz(path: str | os.PathLike, embeddings: np.ndarray, labels: np.ndarray) -> Path:
    """``np.savez(path, embeddings=(N, d), labels=(N,))`` atomically."""
    return write_atomic(path, lambda f: np.savez(f, embeddings=embeddings, labels=labels))


def read_embeddings_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings (N, d), labels (N,))`` of an ``embeddings/<split>.npz`` file.

    Raises:
        ValueError: the file lacks either array or their lengths differ.
    """
    with np.load(path) as npz:
        if "embeddings" not in npz or "labels" not in npz:
            raise ValueError(f"{path} must hold arrays 'embeddings' (N, d) and 'labels' (N,)")
        embeddings, labels = npz["embeddings"], npz["labels"].reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: embeddings {embeddings.shape} and labels {labels.shape} do not match")
    return embeddings, labels


__all__ = [
    "SUMMARY_METRICS",
    "VALIDATION_PREFIX",
    "ConfigLoader",
    "RunFolder",
    "RunFolderBusyError",
    "RunLock",
    "append_json_line",
    "append_log",
    "append_metrics",
    "append_resume",
    "atomic_path",
    "json_value",
    "plain_config",
    "read_best",
    "read_config",
    "read_embeddings_npz",
    "read_json_file",
    "read_json_lines",
    "read_metrics",
    "read_resumes",
    "read_yaml",
    "selection_metric",
    "trim_metrics",
    "write_atomic",
    "write_best",
    "write_config",
    "write_embeddings_npz",
]
