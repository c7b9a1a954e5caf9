"""Many jobs (clips) over the groups of a ``torchrun`` job: job lists, balancing, resume, a line per job, a summary.

* :func:`read_job_table`: a ``.csv`` (header row) or ``.jsonl`` list of jobs -> rows of fields (relative paths
  resolved against the list's folder);
* :func:`balance`: jobs -> one list per group, longest first onto the least loaded group (deterministic, so
  every rank computes the same assignment);
* :func:`plan_jobs`: rank 0 decides which jobs are still to do (a job is done when its output exists: outputs are
  written atomically, so a killed run leaves no output that looks finished) and tells every rank;
* :func:`run_jobs`: each group
  works through its share; every job's outcome (done / failed, seconds) is printed by its group's leader; rank 0
  prints the summary. A job that fails on bad inputs (every rank of its group raises the same error) is reported
  and the group goes on with the next one; a rerun retries it. An unexpected error (out of memory, a bug) in a
  group of several ranks stops the run (torchrun then stops every process): rerun to continue where it stopped.

Nothing here knows what a job does: :mod:`dreamidv_core.pipelines.swap_batch` (face swaps) and
:mod:`dreamidv_core.synthesis.batch` (SyncID-Pipe samples) give the ``done`` and ``run`` functions.
"""
from __future__ import annotations

import csv
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import DreamIDVError, InputError
from .mesh import Mesh

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def say(line: str) -> None:
    """Print a progress line now (a batch's output often goes to a pipe or a log file, which buffer)."""
    print(line, flush=True)


@dataclass(frozen=True)
class Job:
    """One unit of work: ``name`` (unique, the output's name), ``files`` (role -> path), ``seed`` (None: the
    run's), ``cost`` (relative work, for balancing: e.g. frames x pixels)."""

    name: str
    files: Dict[str, str]
    seed: Optional[int] = None
    cost: float = 1.0


@dataclass
class JobResult:
    name: str
    status: str  # "done" | "skipped" | "failed"
    seconds: float = 0.0
    message: str = ""
    group: int = 0

    def line(self) -> str:
        took = f" in {self.seconds:.1f} s" if self.seconds else ""
        return f"{self.name}: {self.status}{took}" + (f" ({self.message})" if self.message else "")


# ------------------------------------------------------------------------------------------------ job lists

def read_job_table(path, path_fields: Sequence[str], other_fields: Sequence[str] = ("name", "seed")) -> List[dict]:
    """Rows of a ``.csv`` (first row: the field names) or ``.jsonl`` (one object per line) job list.

    Fields in ``path_fields`` are file paths (relative ones are relative to the list's folder); unknown fields
    are an error naming the line; empty values are dropped.
    """
    path = Path(path)
    known = set(path_fields) | set(other_fields)
    if not path.is_file():
        raise InputError(f"job list {path} does not exist")
    rows: List[tuple] = []
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {i}: not a JSON object ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}, line {i}: expected a JSON object like {{\"video\": ..., \"reference\": ...}}")
            rows.append((i, obj))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(line for line in text.splitlines() if line.strip())
        if not reader.fieldnames:
            raise InputError(f"{path}: empty; the first row names the columns ({', '.join(path_fields)}, ...)")
        for i, obj in enumerate(reader, 2):
            if None in obj:
                raise InputError(f"{path}, line {i}: more values than the {len(reader.fieldnames)} columns of the "
                                 "header (quote paths that contain commas)")
            rows.append((i, {k.strip(): v for k, v in obj.items()}))
    else:
        raise InputError(f"job list {path}: expected a .csv (with a header row) or a .jsonl file")
    out = []
    for i, obj in rows:
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InputError(f"{path}, line {i}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        row = {"line": i}
        for k, v in obj.items():
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            if k in path_fields:
                p = Path(str(v).strip()).expanduser()
                row[k] = str(p if p.is_absolute() else path.parent / p)
            else:
                row[k] = v.strip() if isinstance(v, str) else v
        out.append(row)
    if not out:
        raise InputError(f"job list {path} lists no jobs")
    return out


def files_by_stem(folder, suffixes: Iterable[str]) -> Dict[str, Path]:
    """{stem: path} of the files in ``folder`` with one of ``suffixes`` (case-insensitive), sorted by name."""
    found: Dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes:
            found.setdefault(p.stem, p)
    return found


def check_names(jobs: Sequence[Job], what: str) -> None:
    """Names must be unique (they name the outputs) and usable as file names."""
    seen: Dict[str, int] = {}
    for i, j in enumerate(jobs):
        if not j.name or "/" in j.name or "\\" in j.name or j.name.startswith("."):
            raise InputError(f"{what}: job {i + 1} has the name {j.name!r}; a name becomes a file name (no '/', not "
                             "starting with '.')")
        if j.name in seen:
            raise InputError(f"{what}: jobs {seen[j.name] + 1} and {i + 1} are both named {j.name!r} and would write "
                             "the same output; give them distinct names (a 'name' column)")
        seen[j.name] = i


def check_files(jobs: Sequence[Job], what: str) -> None:
    """Every job's files exist; one error listing every missing one."""
    missing = [f"{j.name}: {role} {p}" for j in jobs for role, p in j.files.items() if not Path(p).is_file()]
    if missing:
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise InputError(f"{what}: {len(missing)} input file{'s' if len(missing) > 1 else ''} missing:\n  "
                         + "\n  ".join(missing[:20]) + more)


# ------------------------------------------------------------------------------------------------ scheduling

def video_cost(path, frame_num: Optional[int] = None, area=(832, 480)) -> float:
    """Relative work of a clip for :func:`balance`: frames x min(pixels, area) from the container's metadata
    (0 when the file cannot be read: its job then fails with the reader's message)."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            pixels = stream.codec_context.width * stream.codec_context.height
    except Exception:  # noqa: BLE001 - any unreadable file: balanced as free, reported by its job
        return 0.0
    frames = frames if frame_num is None else min(frames, frame_num)
    return float(frames) * min(pixels, area[0] * area[1])


def balance(jobs: Sequence[Job], groups: int) -> List[List[Job]]:
    """Longest processing time first: each job (by decreasing cost, then name) to the group with the least work
    so far (the lowest index on ties). Each group's list keeps that order. Deterministic."""
    shares: List[List[Job]] = [[] for _ in range(groups)]
    load = [0.0] * groups
    for job in sorted(jobs, key=lambda j: (-j.cost, j.name)):
        g = min(range(groups), key=lambda k: (load[k], k))
        shares[g].append(job)
        load[g] += job.cost
    return shares


def leftover_partials(output: Path) -> List[Path]:
    """Hidden temporaries an interrupted atomic write of ``output`` left beside it (``.<name>.*.partial``)."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    return sorted(output.parent.glob(f".{output.name}.*.partial"))


@dataclass
class BatchReport:
    results: List[JobResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> List[JobResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self, what: str = "jobs") -> str:
        head = (f"{len(self.results)} {what}: {self.count('done')} done, {self.count('skipped')} skipped (finished "
                f"before), {self.count('failed')} failed; {self.seconds:.1f} s")
        lines = [head] + [f"  failed: {r.line()}" for r in self.failed]
        return "\n".join(lines)


def plan_jobs(mesh: Mesh, jobs: Sequence[Job], done: Callable[[Job], bool]) -> Tuple[List[Job], List[str]]:
    """(jobs to do, names of those done before) on every rank; ``done(job)`` is asked on rank 0 only."""
    return mesh.run_on_main(lambda: ([j for j in jobs if not done(j)], [j.name for j in jobs if done(j)]),
                            "looking for finished jobs")


def run_jobs(mesh: Mesh, pending: Sequence[Job], run: Callable[[Job], str], finished: Sequence[str] = (),
             log: Callable[[str], None] = say, what: str = "jobs") -> Optional[BatchReport]:
    """Run the ``pending`` jobs (:func:`plan_jobs`) spread over the groups of ``mesh`` (module docstring).

    ``run(job)`` is called by every rank of the job's group and returns a short description of the result (the
    leader's is printed). Returns the report on rank 0 (``None`` elsewhere) after the summary was printed there.
    """
    start = time.time()
    if mesh.is_main:
        log(f"{what}: {len(pending) + len(finished)} listed, {len(finished)} finished before, {len(pending)} to do"
            + (f" on {mesh.groups} group{'s' if mesh.groups > 1 else ''} of {mesh.group_size} rank"
               f"{'s' if mesh.group_size > 1 else ''} ({mesh.config.describe()})" if mesh.active else ""))
    mine = balance(pending, mesh.groups)[mesh.group_index]
    results = []
    for k, job in enumerate(mine):
        t0 = time.time()
        tag = f"[group {mesh.group_index}: {k + 1}/{len(mine)}]" if mesh.groups > 1 else f"[{k + 1}/{len(mine)}]"
        try:
            note = run(job)
            results.append(JobResult(job.name, "done", time.time() - t0, note or "", mesh.group_index))
        except DreamIDVError as exc:  # raised on every rank of the group alike (Mesh.run_on_leader): go on
            results.append(JobResult(job.name, "failed", time.time() - t0, str(exc), mesh.group_index))
        except Exception as exc:
            if mesh.group_size > 1:  # e.g. out of memory on one rank: the others would wait for it; stop the run
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1]
            results.append(JobResult(job.name, "failed", time.time() - t0,
                                     f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})",
                                     mesh.group_index))
        if mesh.is_leader:
            log(f"{tag} {results[-1].line()}")
    gathered = mesh.gather_to_main(results if mesh.is_leader else [])
    if not mesh.is_main:
        return None
    by_name = {r.name: r for part in gathered for r in part}
    report = BatchReport([JobResult(n, "skipped") for n in finished]
                         + [by_name[j.name] for j in pending if j.name in by_name], time.time() - start)
    log(report.summary(what))
    return report
