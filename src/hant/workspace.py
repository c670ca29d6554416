"""The run folder: paths, atomic writes, checksums, the single-writer lock and crash points for tests.

Every artifact is written to a temporary name in the same folder and renamed into
place, so a killed process leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from hant.errors import HantError

FORMAT_VERSION = 1
FAULT_ENV = "HANT_FAULT"
FAULT_ACTIONS = ("kill", "exit", "interrupt")
FAULT_EXIT_CODE = 75  # EX_TEMPFAIL: what an `exit` fault ends the process with


def fault_point(name: str, n: int = 1, action: str = "kill") -> None:
    """A named point where crash tests make the process fail; does nothing unless asked to.

    HANT_FAULT holds comma-separated items `<name>[@<N>][=<action>]` (N defaults to 1; the
    older spelling `<name>:<N>` means the same as `<name>@<N>`). An item matches when its
    name is `name` and its N is `n`, the caller's count of passages through the point (the
    n-th checkpoint, the n-th epoch). The action is the item's, else the caller's `action`:
    `kill` sends SIGKILL, as `kill -9` or a power cut would (no cleanup, no finally
    blocks); `exit` ends the process with status 75 (os._exit: no cleanup either);
    `interrupt` sends the process SIGINT, as Ctrl-C does, and returns. Raises ValueError for
    an action that is none of these.
    """
    want = os.environ.get(FAULT_ENV, "")
    if not want:
        return
    for item in want.split(","):
        item, _, chosen = item.strip().partition("=")
        point, at, nth = item.partition("@")
        if not at:
            head, colon, tail = item.rpartition(":")
            if colon and tail.isdigit():
                point, nth = head, tail
        if point != name or (int(nth) if nth.isdigit() else 1) != n:
            continue
        act = chosen or action
        if act not in FAULT_ACTIONS:
            raise ValueError(f"unknown fault action {act!r}; use one of {', '.join(FAULT_ACTIONS)}")
        print(f"{FAULT_ENV}: {act} at {name}@{n}", file=sys.stderr, flush=True)
        if act == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif act == "exit":
            os._exit(FAULT_EXIT_CODE)
        else:
            os.kill(os.getpid(), signal.SIGINT)
        return


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + rename). Returns the path.

    Raises HantError when the disk is full (nothing is left half-written: a rerun after
    freeing space continues from the artifacts already complete).
    """
    path = Path(path)
    try:
        _replace_atomically(path, data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HantError(f"no space left on the device writing {path}; free some space and rerun "
                            "(finished work is kept)") from None
        raise
    return path


def _replace_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write a JSON artifact atomically; adds `"version"` when the object lacks one."""
    if isinstance(obj, dict) and "version" not in obj:
        obj = {"version": FORMAT_VERSION, **obj}
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON artifact. Raises HantError with one line when missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise HantError(f"{path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HantError(f"{path} is corrupt ({e.__class__.__name__}: {e}); delete it and rerun its stage") from e


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    """Write YAML atomically (safe dumper)."""
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_yaml(path: str | os.PathLike) -> Any:
    """Read YAML with the safe loader. Raises HantError when missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise HantError(f"{path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise HantError(f"{path} is not valid YAML{where}; fix or delete it") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically. Returns the file's sha256.

    The same tensors and metadata give the same bytes in every process.
    """
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    data = _sorted_metadata(data)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _sorted_metadata(data: bytes) -> bytes:
    # safetensors writes the metadata in hash-map order, which changes from process to
    # process; sorted, equal weights give equal files and checksums on every run. The
    # header keeps its length (the same entries in another order), so offsets hold.
    n = int.from_bytes(data[:8], "little")
    raw = data[8:8 + n]
    header = json.loads(raw)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or len(meta) < 2:
        return data
    header["__metadata__"] = dict(sorted(meta.items()))
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(new) != len(raw.rstrip(b" ")):
        return data  # serialised differently from safetensors: keep its bytes
    return data[:8] + new + raw[len(new):] + data[8 + n:]


def load_safetensors(path: str | os.PathLike, expect_sha256: str | None = None) -> dict:
    """Load a safetensors file; verify its sha256 when given. Raises HantError on mismatch."""
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise HantError(f"{path} does not exist")
    data = path.read_bytes()
    if expect_sha256 is not None and hashlib.sha256(data).hexdigest() != expect_sha256:
        raise HantError(f"{path} does not match its recorded checksum (truncated or altered); "
                        "rerun the stage that wrote it to recompute it")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types
        raise HantError(f"{path} is not a readable safetensors file ({e}); delete it and rerun") from e


class RunDir:
    """Paths of one run folder (see DESIGN.md, 'The run folder')."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def layers(self) -> Path:
        return self.root / "layers.json"

    @property
    def candidates_dir(self) -> Path:
        return self.root / "candidates"

    @property
    def candidates_index(self) -> Path:
        return self.candidates_dir / "index.json"

    def candidate_file(self, layer: str, spec: str) -> Path:
        return self.candidates_dir / layer / f"{spec}.safetensors"

    def latency_table(self, target_id: str) -> Path:
        return self.root / "latency" / f"{target_id}.json"

    def int8_scheme(self, batch_size: int, threads: int) -> Path:
        """The INT8 scheme measured for this machine at a batch size and thread count (hant.latency.int8)."""
        return self.root / "latency" / f"int8_scheme-b{int(batch_size)}-t{int(threads)}.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    def plan(self, name: str) -> Path:
        return self.root / "plans" / f"{name}.json"

    def context_scores(self, plan: str) -> Path:
        """Scores of every candidate with the rest of plan `plan` in place (`hant score --plan`)."""
        return self.root / "refine" / f"{plan}.scores.json"

    def refine_record(self, plan: str) -> Path:
        """The record of a plan's refinement rounds (`hant refine`)."""
        return self.root / "refine" / f"{plan}.json"

    def redistilled_dir(self, plan: str) -> Path:
        """A plan's re-distilled candidates (hant.redistill): <layer>/<spec>.safetensors, index.json."""
        return self.root / "redistilled" / plan

    def redistilled_index(self, plan: str) -> Path:
        """The index of a plan's re-distillation: its settings, layers, entries and held-out NMSE."""
        return self.redistilled_dir(plan) / "index.json"

    def student_dir(self, plan: str) -> Path:
        return self.root / "students" / plan

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def require(self, path: Path, stage: str) -> Path:
        """Return `path` if it exists, else raise HantError naming the stage that writes it."""
        if not path.exists():
            raise HantError(f"{path} is missing; run `hant {stage} --run {self.root}` first")
        return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(root: str | os.PathLike, log=print) -> Iterator[Path]:
    """Hold the run folder's single-writer lock for the duration of the block.

    A lock held by a live process on this host raises HantError; a stale lock (dead pid)
    is taken over with a message.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and _pid_alive(pid):
                raise HantError(f"{root} is in use by pid {pid} on {host}; wait for it or stop it")
            if host not in (None, me["host"]) and isinstance(pid, int):
                raise HantError(
                    f"{root} is locked by pid {pid} on host {host}; if that run is dead, delete {lock}"
                )
            log(f"taking over a stale lock on {root} (pid {pid} is gone)")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
