"""Files the library writes: one atomic writer, one JSON encoder, fresh names, safe loads.

The lowest layer of the package: it imports nothing from ``lightning_unlearn``.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Mapping

import torch

ON_EXISTS = ("suffix", "error")
FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], overwrite: bool = True) -> Path:
    """Write ``path`` through a temporary file in the same folder, then make it appear in one step.

    ``overwrite=True`` replaces an existing file (``os.replace``); ``overwrite=False`` never does:
    the file is hard-linked into place, which fails if ``path`` appeared meanwhile. Either way a
    crash never leaves half a file under ``path``, and every result gets mode 0644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=f".{path.name}.", suffix=".tmp") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, FILE_MODE)  # temporary files are private; the result gets the usual permissions
    try:
        if overwrite:
            os.replace(f.name, path)
        else:
            try:
                os.link(f.name, path)
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while writing; refusing to overwrite it") from None
    finally:
        if os.path.exists(f.name):
            os.unlink(f.name)
    return path


def save_torch(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f), overwrite)


def to_jsonable(value: Any) -> Any:
    """Plain JSON values for tensors, NumPy values, paths, dataclass-like objects; NaN becomes null."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if hasattr(value, "tolist") and callable(value.tolist):  # NumPy arrays and scalars
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def dumps_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2)


def write_json(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON through :func:`atomic_write`."""
    text = dumps_json(obj).encode()
    return atomic_write(path, lambda f: f.write(text), overwrite)


def unique_path(path: str | os.PathLike, on_exists: str = "suffix") -> Path:
    """``path`` if free; else ``name-1.ext``, ``name-2.ext``... (``"suffix"``) or FileExistsError (``"error"``)."""
    if on_exists not in ON_EXISTS:
        raise ValueError(f"unknown on_exists {on_exists!r}; allowed values are {list(ON_EXISTS)}")
    path = Path(path)
    if not path.exists():
        return path
    if on_exists == "error":
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass on_exists='suffix' to add one)")
    stem, suffix = (path.name.split(".", 1) + [""])[:2]
    for i in range(1, 10_000):
        candidate = path.with_name(f"{stem}-{i}" + (f".{suffix}" if suffix else ""))
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free name for {path} after 9999 suffixes")


def load_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(..., weights_only=True)`` with one-line errors that name the file.

    Files a user or another process can write are untrusted: no pickled code ever runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the file
        text = str(err)
        if "Unsupported global" in text or "not an allowed global" in text:
            raise ValueError(f"{what} {path} holds objects other than tensors and plain data; refusing to load it "
                             "(weights_only=True)") from None
        reason = next((ln.strip() for ln in text.splitlines() if "error:" in ln.lower()), None) or \
            next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
        raise ValueError(f"{what} {path} is not a readable torch file ({reason[:160]})") from None


def check_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove it takes a file, before any work is spent on what goes there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except FileExistsError:
        raise ValueError(f"{what} {path} is not a directory") from None
    except NotADirectoryError:
        raise ValueError(f"{what} {path} lies under a file, not a directory") from None
    except PermissionError:
        raise ValueError(f"{what} {path} is not writable") from None
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written: {err.strerror or err}") from None
    return path


class RunMarker:
    """Marks one run's output files as incomplete until :meth:`done`; a rerun removes what a killed run left.

    The marker (``.<first file>.incomplete`` next to the outputs) lists every file before it is
    written, so a run killed at any point leaves only files the marker names: none of them is taken
    for a finished result (:func:`is_incomplete`), and :meth:`clean` deletes them.
    """

    SUFFIX = ".incomplete"

    def __init__(self, first: Path) -> None:
        self.path = first.parent / f".{first.name}{self.SUFFIX}"
        self.files: list[str] = []

    def add(self, path: str | os.PathLike) -> Path:
        """Record ``path`` (before writing it); returns it."""
        self.files.append(str(Path(path).resolve()))
        write_json({"files": self.files}, self.path)
        return Path(path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def clean(cls, directory: str | os.PathLike) -> list[Path]:
        """Delete the files of every interrupted run in ``directory`` (and their temporary files); returns them."""
        removed: list[Path] = []
        directory = Path(directory)
        if not directory.is_dir():
            return removed
        for marker in directory.glob(f".*{cls.SUFFIX}"):
            for f in map(Path, _listed(marker)):
                for leftover in [f, *f.parent.glob(f".{f.name}.*.tmp")]:
                    if leftover.is_file() and leftover.parent == directory.resolve():
                        leftover.unlink()
                        removed.append(leftover)
            marker.unlink(missing_ok=True)
        return removed


def is_incomplete(path: str | os.PathLike) -> bool:
    """True if ``path`` was written by a run that did not finish (its :class:`RunMarker` still lists it)."""
    path = Path(path).resolve()
    return any(str(path) in _listed(marker) for marker in path.parent.glob(f".*{RunMarker.SUFFIX}"))


def _listed(marker: Path) -> list[str]:
    """The files a run marker lists (none for an unreadable marker)."""
    try:
        return list(json.loads(marker.read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return []
