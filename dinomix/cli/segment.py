"""`dinomix segment`: one scan, or many in one run (a batch, `batch.py`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from ..events import Reporter
from .job import Job
from .options import add_device_option, overlap_value, parse_size
from .pipeline import add_model_stages, machine_memory, prepare_outputs, read_input, segment_image

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


def register(sub) -> None:
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
    limit = args.max_memory or machine_memory()
    image, notes = read_input(args, rep, limit)
    check()
    from ..inference import Segmenter

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
