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
from .imageio import AtomicWriter

CANCEL_EXIT = 130


class Job:
    """Runs `work(reporter, check_cancel)` in a worker thread with signal-driven cancellation."""

    def __init__(self, command: str, events_target: Optional[str], stages: dict[str, float],
                 on_cancel: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.command = command
        self.on_cancel = on_cancel
        self.writer = AtomicWriter()
        self.cancel_event = threading.Event()
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
        self.cancel_event.set()
        # Remove partial outputs under the writers' lock and leave at once, whatever the worker is doing
        # (it may sit inside a long native call that does not return for seconds).
        self.writer.abort()
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
        self.reporter.close()
        exc = outcome.get("error")
        # MONAI wraps errors raised inside transforms in RuntimeError; report the user error inside.
        while exc is not None and not isinstance(exc, DinomixError) and isinstance(exc.__cause__, DinomixError):
            exc = exc.__cause__
        if exc is None:
            self.reporter.emit("result", **(outcome.get("result") or {}))
            return 0
        if isinstance(exc, Cancelled):
            self.reporter.emit("cancelled", message=str(exc))
            return CANCEL_EXIT
        if isinstance(exc, DinomixError):
            msg = str(exc)
            kind = type(exc).__name__
            code = exc.exit_code
        elif isinstance(exc, MemoryError):
            msg, kind, code = "out of memory: try --mode fast or close other programs", "MemoryError", 3
        else:
            msg = f"internal error ({type(exc).__name__}: {exc}); please report it with the log"
            kind, code = "InternalError", 1
            if os.environ.get("DINOMIX_DEBUG"):
                sys.stderr.write(outcome.get("tb", ""))
        self.reporter.emit("error", message=msg, kind=kind)
        sys.stderr.write(f"dinomix: error: {msg}\n")
        return code

    def close(self) -> None:
        if self._events_file:
            self._events_file.close()


# ---------------------------------------------------------------- segment

def cmd_segment(args: argparse.Namespace) -> int:
    # The model's stages are added once the input has been read (see _segment): a bad input is reported
    # at once, without first importing PyTorch and MONAI and loading a model (seconds).
    job = Job("segment", args.events, {"read": 0.05})
    try:
        return job.run(lambda rep, check: _segment(args, job, rep, check))
    finally:
        job.close()


def _segment(args: argparse.Namespace, job: Job, rep: Reporter, check: Callable[[], None]) -> dict:
    from .imageio import check_is_ct, check_writable, read_image
    from .outputs import output_paths, write_json, write_labelmap, write_seg_nrrd

    t0 = time.perf_counter()
    paths = output_paths(args.output)
    wanted = {"seg_nrrd", "nifti", "summary"} if not args.formats else set(args.formats)
    for key in wanted:
        check_writable(paths[key])
    rep.begin("read", f"reading {args.input}")
    image = read_image(args.input)
    if not args.force:
        check_is_ct(image, Path(args.input).name)
    check()
    from .inference import STAGES, Segmenter, SegmentOptions

    rep.stages.update(STAGES)
    rep.total = sum(rep.stages.values())
    seg = Segmenter(args.model, args.device)
    if not seg.meta.trained:
        rep.log(f"model '{seg.meta.model_id}' is UNTRAINED (random weights): its output is not anatomy", "warning")
    if seg.meta.backbone_untrained:
        from .segdino import BACKBONE_UNTRAINED

        rep.log(f"model '{seg.meta.model_id}': {BACKBONE_UNTRAINED}; it was trained without DINOv3 weights, "
                "so expect poor segmentations", "warning")
    opts = SegmentOptions(mode=args.mode, organs=args.organs, overlap=args.overlap,
                          largest_component=False if args.no_largest_component else None,
                          fill_holes=False if args.no_fill_holes else None)
    res = seg.segment(image, opts, rep, check)
    rep.begin("write", "writing outputs")
    written = {}
    if "seg_nrrd" in wanted:
        written["seg_nrrd"] = str(write_seg_nrrd(res.labels, res.organs, paths["seg_nrrd"], job.writer))
    if "nifti" in wanted:
        written["nifti"] = str(write_labelmap(res.labels, paths["nifti"], job.writer))
    summary = {
        "input": str(args.input),
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
        written["summary"] = str(paths["summary"])
        write_json(summary, paths["summary"], job.writer)
    rep.update(1.0, "done", force=True)
    if not args.events:
        vols = ", ".join(f"{o['name']} {o['volume_ml']:.0f} ml" for o in summary["organs"])
        print(f"segmented {args.input} in {summary['run_time_s']:.1f} s ({res.mode}, {res.device}) "
              f"with {res.meta.display_name()}\n  {vols}\n  wrote: {', '.join(written.values())}")
    return summary


# ---------------------------------------------------------------- models

def cmd_models(args: argparse.Namespace) -> int:
    from . import registry
    from .modelfile import read_meta

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
        elif args.models_cmd == "show":
            e = registry.resolve(args.name)
            meta = read_meta(e.path)
            if args.json:
                print(meta.model_dump_json(indent=2))
            else:
                print(f"{meta.model_id}  ({meta.status})\n  file: {e.path}\n  title: {meta.title}\n"
                      f"  created: {meta.created}\n  parent: {meta.parent or '-'}\n"
                      f"  organs: {', '.join(meta.organs.names)}\n"
                      f"  modes: " + ", ".join(f"{k} {v.spacing_mm[0]:g} mm" for k, v in meta.preprocessing.modes.items())
                      + f"\n  architecture: {meta.architecture.model_dump()}\n  weights sha256: {meta.weights_sha256}\n"
                      f"  metrics: {json.dumps(meta.metrics)[:600]}")
        elif args.models_cmd == "import":
            e = registry.import_model(args.path)
            print(f"imported '{e.name}' ({e.meta.status}) into {e.path}")
        elif args.models_cmd == "remove":
            p = registry.remove_model(args.name)
            print(f"removed {p}")
        return 0
    except DinomixError as exc:
        sys.stderr.write(f"dinomix: error: {exc}\n")
        return exc.exit_code


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinomix", description="Abdominal organ segmentation for CT.")
    p.add_argument("--version", action="version", version=f"dinomix {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment the abdominal organs of a CT")
    s.add_argument("input", help="CT image (NIfTI, NRRD, MHA) or DICOM series folder")
    s.add_argument("-o", "--output", required=True,
                   help="output: a .seg.nrrd or .nii.gz file name, or a folder (JSON summary beside it)")
    s.add_argument("--mode", choices=["fast", "full"], default="fast",
                   help="quality mode; its grid comes from the model file (built-in: fast 3 mm, full 2 mm)")
    s.add_argument("--model", default=None, help="registry name or model file (default: abdomen-btcv13)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "mps"])
    s.add_argument("--organs", nargs="+", default=None, help="only these organs (names from the model)")
    s.add_argument("--formats", nargs="+", choices=["seg_nrrd", "nifti", "summary"], default=None)
    s.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (model default)")
    s.add_argument("--no-largest-component", action="store_true")
    s.add_argument("--no-fill-holes", action="store_true")
    s.add_argument("--force", action="store_true", help="segment even if the image does not look like CT")
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

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands() -> list[Callable[[Any], None]]:
    """Commands defined in other modules (training, evaluation), registered if importable."""
    regs = []
    for modname in ("dinomix.train_cli", "dinomix.evaluate_cli", "dinomix.finetune_cli", "dinomix.cache_cli", "dinomix.scene_cli"):
        try:
            mod = __import__(modname, fromlist=["register"])
            regs.append(mod.register)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
    return regs


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DinomixError as exc:  # raised before a command's own reporting starts (e.g. its events file)
        sys.stderr.write(f"dinomix: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
