"""The `dinomix` command line.

User errors print one message and exit non-zero; SIGINT/SIGTERM cancel within a fraction of a second:
the work runs in a worker thread while the main thread only waits, so the signal handler runs at once,
removes temporary outputs and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from . import __version__
from .errors import Cancelled, DinomixError, OutputError
from .events import Reporter
from .imageio import DISK_FULL_ERRNOS, AtomicWriter, disk_full_error


class MemoryLimitError(DinomixError):
    """A segmentation would need more memory than allowed (--max-memory, default: the machine's memory)."""


CANCEL_EXIT = 130


class Job:
    """Runs `work(reporter, check_cancel)` in a worker thread with signal-driven cancellation."""

    def __init__(self, command: str, events_target: Optional[str], stages: dict[str, float],
                 on_cancel: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.command = command
        self.on_cancel = on_cancel
        self.writer = AtomicWriter()
        self.cancel_event = threading.Event()
        self.finished = threading.Event()  # the worker has ended: its outcome stands, signals change nothing
        self._events_file = None
        if events_target == "-":
            stream = sys.stdout
        elif events_target:
            try:
                self._events_file = open(events_target, "a", buffering=1)
            except OSError as exc:
                raise OutputError(f"cannot write events file {events_target}: {exc.strerror or exc}") from None
            stream = self._events_file
        else:
            stream = None
        self.reporter = Reporter(events=stream, bar=stream is not sys.stdout and sys.stderr.isatty(), stages=stages)

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        # Once the outputs are committed (or the worker has ended) the run has its outcome: a late signal
        # must not turn a success into 'cancelled' after its result, nor a traceback; the process exits
        # in a moment anyway.
        if self.finished.is_set():
            return
        # Remove partial outputs under the writers' lock and leave at once, whatever the worker is doing
        # (it may sit inside a long native call that does not return for seconds).
        if not self.writer.abort():
            return
        self.cancel_event.set()
        self.reporter.close()
        note = ""
        if self.on_cancel is not None:
            try:
                note = self.on_cancel() or ""
            except Exception as exc:  # never block the exit on a failing hook
                note = f"(could not save state: {exc})"
        self.reporter.emit("cancelled", message=f"{self.command} cancelled by signal {signum} {note}".strip())
        sys.stderr.write(f"dinomix: {self.command} cancelled\n")
        sys.stderr.flush()
        self.writer.sweep()  # a writer that got its temporary path before the abort may have made it again
        os._exit(CANCEL_EXIT)

    def run(self, work: Callable[[Reporter, Callable[[], None]], Any]) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.reporter.emit("start", command=self.command, version=__version__, pid=os.getpid())
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = work(self.reporter, self.check_cancel)
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc
                outcome["tb"] = traceback.format_exc()

        worker = threading.Thread(target=target, daemon=True, name=f"dinomix-{self.command}")
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
        self.finished.set()
        self.reporter.close()
        exc = outcome.get("error")
        if exc is None:
            self.reporter.emit("result", **(outcome.get("result") or {}))
            return 0
        self.writer.abort()  # files staged for a commit that will not come
        msg, kind, code = describe_error(exc, outcome.get("tb", ""))
        if kind == "Cancelled":
            self.reporter.emit("cancelled", message=msg)
            return CANCEL_EXIT
        self.reporter.emit("error", message=msg, kind=kind)
        sys.stderr.write(f"dinomix: error: {msg}\n")
        return code

    def close(self) -> None:
        if self._events_file:
            self._events_file.close()


def describe_error(exc: BaseException, tb: str = "") -> tuple[str, str, int]:
    """(one-line message, kind, exit code) of a failed run: user errors as they are, the rest named plainly.

    Shared by `Job`, the batch and `dinomix serve`, so a failure reads the same wherever it happens."""
    # MONAI wraps errors raised inside transforms in RuntimeError; report the user error inside.
    while not isinstance(exc, DinomixError) and isinstance(exc.__cause__, DinomixError):
        exc = exc.__cause__
    if isinstance(exc, Cancelled):
        return str(exc), "Cancelled", CANCEL_EXIT
    if isinstance(exc, DinomixError):
        return str(exc), type(exc).__name__, exc.exit_code
    if isinstance(exc, MemoryError):
        return "out of memory: try --mode fast or close other programs", "MemoryError", 3
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return str(disk_full_error(Path(exc.filename or "."))), "OutputError", OutputError.exit_code
    if os.environ.get("DINOMIX_DEBUG"):
        sys.stderr.write(tb)
    return f"internal error ({type(exc).__name__}: {exc}); please report it with the log", "InternalError", 1


# ---------------------------------------------------------------- segment

SEGMENT_DESCRIPTION = """Segment the abdominal organs of a CT, or of many in one run (a batch).

One input (a file or a DICOM series folder) writes the output named by -o, as always.

Several inputs, or a folder of scans (image files in it, or only DICOM series subfolders), make a batch:
the model is loaded once (while the first scan is read), the next scan is read while the previous one's
outputs are written (not earlier: it would add to the network's memory peak), and -o is a folder that
receives <scan name>.seg.nrrd, .nii.gz (.nii with --compression none) and .json per scan. A
bad scan gets its one-line error and the others go on. Two scans with the same name are refused (rename
one or use two runs); the output folder may not be a scanned input folder.

Batch events (--events): each scan's events are those of a single run with "scan": its index (0-based);
a scan starts with {"event": "start", "scan": i, "of": n, "input", "name"} and ends with its "result"
(the single run's summary, plus "model_load_s": > 0 only for the first scan) or "error". The batch ends
with {"event": "result", "batch": true, "ok": k, "failed": m, "exit_code", "scans": [{"scan", "name",
"input", "status": "ok"|"failed", "message", "kind", "outputs", "run_time_s"}]} (no "scan" field); a
cancel ends it with {"event": "cancelled", "batch": true, "ok": k, "scans": [...]} where the running
scan is "cancelled" and those not reached "pending".

Exit status: 0 every scan segmented; 4 some scans failed (the others were written); 5 every scan failed;
2 the batch could not start (bad -o, names that clash, no scans found, an unusable model); 130 cancelled (scans already
written stay, the running one leaves nothing). A single input exits as before: 0, 2 user error, 1 internal.
"""

def cmd_segment(args: argparse.Namespace) -> int:
    # The model's stages are added once the input has been read (see _segment): a bad input is reported
    # at once, without first importing PyTorch and MONAI and loading a model (seconds).
    if len(args.input) > 1 or _is_scan_folder(args.input[0]):
        return _segment_batch(args)
    args.input = args.input[0]
    job = Job("segment", args.events, {"read": 0.05})
    try:
        return job.run(lambda rep, check: _segment(args, job, rep, check))
    finally:
        job.close()


def _segment_batch(args: argparse.Namespace) -> int:
    """Several scans (batch.py): exit 0 all segmented, 4 some failed, 5 all failed (SEGMENT_DESCRIPTION)."""
    from .batch import make_batch_job, run_batch

    job = make_batch_job(args.events)
    summary: dict = {}

    def work(rep: Reporter, check: Callable[[], None]) -> dict:
        summary.update(run_batch(args, job, rep, check))
        return summary

    try:
        code = job.run(work)
    finally:
        job.close()
    return summary.get("exit_code", 0) if code == 0 else code


def _segment(args: argparse.Namespace, job: Job, rep: Reporter, check: Callable[[], None]) -> dict:
    t0 = time.perf_counter()
    paths, wanted = prepare_outputs(args, rep)
    limit = args.max_memory or _machine_memory()
    image, notes = read_input(args, rep, limit)
    check()
    from .inference import Segmenter

    add_model_stages(rep)
    seg = Segmenter(args.model, args.device)
    res, summary = segment_image(args, seg, image, notes, paths, wanted, job.writer, rep, check, limit, t0)
    if not args.events:
        vols = ", ".join(f"{o['name']} {o['volume_ml']:.0f} ml" for o in summary["organs"])
        print(f"segmented {args.input} in {summary['run_time_s']:.1f} s ({res.mode}, {res.device}) "
              f"with {res.meta.display_name()}\n  {vols}\n  wrote: {', '.join(summary['outputs'].values())}")
    return summary


def _is_scan_folder(path: str) -> bool:
    """A folder of scans (image files, or only subfolders) rather than one DICOM series (see batch.py)."""
    from .batch import scans_in_folder

    return scans_in_folder(Path(path)) is not None


def prepare_outputs(args: argparse.Namespace, rep: Reporter) -> tuple[dict[str, Path], list[str]]:
    """The output set of one scan, checked before any work: writable, never the input, no existing file
    without --overwrite; files left by a killed earlier run are removed."""
    from .imageio import remove_leftovers
    from .outputs import check_outputs, output_paths

    paths = output_paths(args.output)
    if getattr(args, "compression", "gzip") == "none":
        if str(args.output).endswith(".nii.gz"):
            raise OutputError(f"-o {args.output} names a compressed label map; with --compression none it is "
                              f"written uncompressed: name it {str(args.output)[:-3]}")
        paths["nifti"] = paths["nifti"].with_suffix("")  # x.nii.gz -> x.nii
    wanted = [k for k in ("seg_nrrd", "nifti", "summary") if not args.formats or k in args.formats]
    targets = [paths[k] for k in wanted]
    for p in remove_leftovers(targets):
        rep.log(f"removed {p}, left by an interrupted run")
    check_outputs(targets, args.input, args.overwrite)
    return paths, wanted


def read_input(args: argparse.Namespace, rep: Reporter, limit: int):
    """The input image (refused from its header alone when it would not fit in memory) and the notes on
    how it was read; not a CT -> NotCTError unless --force."""
    from .imageio import check_is_ct, read_image

    rep.begin("read", f"reading {args.input}")
    notes: list[str] = []
    image = read_image(args.input, notes, check_size=lambda size, bpv: _check_memory(args, limit, size, bpv))
    for note in notes:
        rep.log(note, "warning")
    if not args.force:
        check_is_ct(image, Path(args.input).name)
    return image, notes


def add_model_stages(rep: Reporter) -> None:
    """The stages after reading, added once the input was read (their weights sum with 'read')."""
    from .inference import STAGES

    rep.stages.update(STAGES)
    rep.total = sum(rep.stages.values())


def segment_image(args: argparse.Namespace, seg, image, notes: list[str], paths: dict[str, Path],
                  wanted: list[str], writer: AtomicWriter, rep: Reporter, check: Callable[[], None],
                  limit: int, t0: float):
    """Segment a read image with a loaded model and commit its output set; (result, summary)."""
    from .inference import SegmentOptions

    _check_memory(args, limit, image.GetSize(), 4, image.GetSpacing(),
                  seg.meta.preprocessing.mode(args.mode).spacing_mm, len(seg.meta.organs.organs) + 1)
    if not seg.meta.trained:
        rep.log(f"model '{seg.meta.model_id}' is UNTRAINED (random weights): its output is not anatomy", "warning")
    if seg.meta.backbone_untrained:
        from .nets.segdino import BACKBONE_UNTRAINED

        rep.log(f"model '{seg.meta.model_id}': {BACKBONE_UNTRAINED}; it was trained without DINOv3 weights, "
                "so expect poor segmentations", "warning")
    opts = SegmentOptions(mode=args.mode, organs=args.organs, overlap=args.overlap,
                          largest_component=False if args.no_largest_component else None,
                          fill_holes=False if args.no_fill_holes else None)
    res = seg.segment(image, opts, rep, check)
    rep.begin("write", "writing outputs")
    summary = _write_outputs(args, writer, rep, res, paths, wanted, notes, t0)
    rep.update(1.0, "done", force=True)
    return res, summary


def _write_outputs(args: argparse.Namespace, writer: AtomicWriter, rep: Reporter, res, paths: dict[str, Path],
                   wanted: list[str], notes: list[str], t0: float) -> dict:
    """Every output is written to a temporary file and verified, then all are renamed together: a failure
    or a cancel leaves the previous set as it was, never a mix of old and new files."""
    from .outputs import write_json, write_labelmap, write_seg_nrrd

    compress = getattr(args, "compression", "gzip") != "none"
    written = {k: str(paths[k]) for k in wanted}
    if "seg_nrrd" in wanted:
        write_seg_nrrd(res.labels, res.organs, paths["seg_nrrd"], writer, staged=True, compress=compress)
    if "nifti" in wanted:
        write_labelmap(res.labels, paths["nifti"], writer, staged=True, compress=compress)
    summary = {
        "input": str(args.input),
        "input_notes": notes,
        "model": {"id": res.meta.model_id, "trained": res.meta.trained, "status": res.meta.status,
                  "weights_sha256": res.meta.weights_sha256},
        "mode": res.mode, "device": res.device,
        "organs": [{"name": o.name, "display_name": o.display_name, "value": o.value,
                    "volume_ml": res.volumes_ml()[o.name]} for o in res.organs],
        "geometry": {"size": list(res.labels.GetSize()), "spacing": list(res.labels.GetSpacing()),
                     "origin": list(res.labels.GetOrigin()), "direction": list(res.labels.GetDirection())},
        "timings_s": {k: round(v, 3) for k, v in res.timings.items()},
        "run_time_s": round(time.perf_counter() - t0, 3),
        "outputs": written,
    }
    if "summary" in wanted:
        write_json(summary, paths["summary"], writer, staged=True)
    replaced = writer.commit(overwrite=args.overwrite)
    if replaced:
        rep.log(f"replaced the existing {', '.join(map(str, replaced))} (--overwrite)")
    return summary


def _machine_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _check_memory(args: argparse.Namespace, limit: int, size, bytes_per_voxel: int, spacing=None,
                  target=None, n_classes: int = 0) -> None:
    """Refuse, before anything large is allocated, an input whose segmentation would not fit in memory
    (the kernel would kill the process without a word: a wrong voxel size of 50 mm asks for 160 GB)."""
    from .imageio import _fmt_bytes
    from .preprocessing import estimate_memory, grid_shape

    need = estimate_memory(tuple(size), bytes_per_voxel, spacing, target, n_classes)
    if need <= limit:
        return
    grid = ""
    if spacing is not None and target is not None:
        shape = grid_shape(tuple(size), tuple(spacing), tuple(target))
        grid = (f"; its {'x'.join(map(str, size))} voxels of {'x'.join(f'{s:g}' for s in spacing)} mm become "
                f"{'x'.join(map(str, shape))} voxels on the model's {min(target):g} mm grid ({args.mode} mode). "
                "Check the voxel size in the image header")
    source = "--max-memory" if args.max_memory else "this machine's memory; raise it with --max-memory"
    raise MemoryLimitError(f"segmenting {Path(str(args.input)).name} needs about {_fmt_bytes(need)} of memory, "
                           f"more than the limit of {_fmt_bytes(limit)} ({source}){grid}")


def parse_size(text: str) -> int:
    """'16G', '16GB', '500M', '2.5g' or a plain number of bytes -> bytes (decimal units, as 'df -H')."""
    units = {"": 1, "B": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a memory size such as 16G or 500M") from None
    if not value > 0 or value != value:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive memory size")
    return int(value)


def overlap_value(text: str) -> float:
    """Sliding-window overlap: a fraction in [0, 1) (1 would never advance the window)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): give a fraction such as 0.25 or 0.5")
    return value


# ---------------------------------------------------------------- models

def cmd_models(args: argparse.Namespace) -> int:
    from . import registry

    try:
        if args.models_cmd == "list":
            entries = registry.list_models()
            if args.json:
                print(json.dumps([{"name": e.name, "path": str(e.path), "builtin": e.builtin,
                                   "trained": e.meta.trained, "status": e.meta.status,
                                   "modes": list(e.meta.preprocessing.modes), "parent": e.meta.parent}
                                  for e in entries], indent=2))
            else:
                print(f"models in {registry.registry_dir()} and built in:")
                for e in entries:
                    print(f"  {e.name:28s} {'built-in' if e.builtin else 'installed':9s} {e.meta.status:28s} "
                          f"modes: {','.join(e.meta.preprocessing.modes)}  organs: {len(e.meta.organs.organs)}")
                for path, reason in registry.broken_files():
                    print(f"  {path.stem:28s} BROKEN    {reason}\n  {'':28s}           (not used; remove it with "
                          f"'dinomix models remove {path.stem}')")
        elif args.models_cmd == "show":
            e = registry.resolve(args.name)
            meta = registry.checked_meta(e.path)
            if args.json:
                print(meta.model_dump_json(indent=2))
            else:
                print(f"{meta.model_id}  ({meta.status})\n  file: {e.path}\n  title: {meta.title}\n"
                      f"  created: {meta.created}\n  parent: {meta.parent or '-'}\n"
                      f"  organs: {', '.join(meta.organs.names)}\n"
                      f"  modes: "
                      + ", ".join(f"{k} {v.spacing_mm[0]:g} mm" for k, v in meta.preprocessing.modes.items())
                      + f"\n  architecture: {meta.architecture.model_dump()}\n  weights sha256: {meta.weights_sha256}\n"
                      f"  metrics: {json.dumps(meta.metrics)[:600]}")
        elif args.models_cmd == "import":
            e = registry.import_model(args.path)
            print(f"imported '{e.name}' ({e.meta.status}) into {e.path}")
        elif args.models_cmd == "remove":
            p = registry.remove_model(args.name)
            print(f"removed {p}")
        return 0
    except (DinomixError, OSError) as exc:  # OSError: e.g. removing a model from a read-only folder
        return report_error(exc)


# ---------------------------------------------------------------- parser

DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """The --device option every command that runs a network has."""
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: a CUDA GPU if there is one, else Apple's MPS, else the CPU")


def report_error(exc: BaseException) -> int:
    """The one-line `dinomix: error: ...` of a user error on stderr; returns the exit status (2 unless the error
    carries its own)."""
    if isinstance(exc, OSError) and not isinstance(exc, DinomixError):
        sys.stderr.write(f"dinomix: error: {exc.strerror or exc}: {exc.filename or ''}\n")
        return 2
    sys.stderr.write(f"dinomix: error: {exc}\n")
    return int(getattr(exc, "exit_code", 2))

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinomix", description="Abdominal organ segmentation for CT.")
    p.add_argument("--version", action="version", version=f"dinomix {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment the abdominal organs of a CT (or of many: a batch)",
                       description=SEGMENT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("input", nargs="+",
                   help="CT image (NIfTI, NRRD, MHA) or DICOM series folder; several, or a folder of scans: a batch")
    s.add_argument("-o", "--output", required=True,
                   help="output: a .seg.nrrd or .nii.gz file name, or a folder (JSON summary beside it); "
                        "a batch needs a folder (<scan name>.seg.nrrd/.nii.gz/.json in it)")
    s.add_argument("--mode", choices=["fast", "full"], default="fast",
                   help="quality mode; its grid comes from the model file (built-in: fast 3 mm, full 2 mm)")
    s.add_argument("--model", default=None, help="registry name or model file (default: abdomen-btcv13)")
    add_device_option(s)
    s.add_argument("--organs", nargs="+", default=None, help="only these organs (names from the model)")
    s.add_argument("--formats", nargs="+", choices=["seg_nrrd", "nifti", "summary"], default=None)
    s.add_argument("--overlap", type=overlap_value, default=None,
                   help="sliding-window overlap in [0, 1) (model default)")
    s.add_argument("--no-largest-component", action="store_true")
    s.add_argument("--no-fill-holes", action="store_true")
    s.add_argument("--force", action="store_true", help="segment even if the image does not look like CT")
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never the input); without it an existing output is refused")
    s.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                   help="refuse inputs whose segmentation needs more memory, e.g. 8G (default: this machine's memory)")
    s.add_argument("--compression", choices=["gzip", "none"], default="gzip",
                   help="gzip (default): compressed .seg.nrrd and .nii.gz; none: raw .seg.nrrd and .nii, which a "
                        "program (the Slicer module) loads without a gzip round trip")
    s.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events to FILE or stdout")
    s.set_defaults(func=cmd_segment)

    m = sub.add_parser("models", help="list, show, import or remove models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    ml = msub.add_parser("list")
    ml.add_argument("--json", action="store_true")
    ms = msub.add_parser("show")
    ms.add_argument("name", nargs="?", default=None)
    ms.add_argument("--json", action="store_true")
    mi = msub.add_parser("import")
    mi.add_argument("path")
    mr = msub.add_parser("remove")
    mr.add_argument("name")
    m.set_defaults(func=cmd_models)

    # the other commands' modules import this one (Job, the device option): imported here, once it is loaded
    from . import cache_cli, evaluate_cli, finetune_cli, scene_cli, serve_cli, train_cli

    for register in (train_cli.register, train_cli.register_dataset, evaluate_cli.register, finetune_cli.register,
                     cache_cli.register, scene_cli.register, serve_cli.register):
        register(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DinomixError as exc:  # raised before a command's own reporting starts (e.g. its events file)
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
