"""`dinomix scene`: the Slicer modules' heavy work (surfaces, changed organs, export) from a JSON job file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import Cancelled, DinomixError
from ..scene import ExportCommit, run_changes, run_export, run_surfaces
from .job import Job


def register(sub) -> None:
    s = sub.add_parser("scene", help="heavy work of the Slicer modules (surfaces, changed organs, export), "
                                     "from a JSON job file")
    s.add_argument("task", choices=["surfaces", "changes", "export"])
    s.add_argument("job", help="JSON job file (see dinomix/scene.py)")
    s.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events to FILE or stdout")
    s.set_defaults(func=cmd_scene)


def cmd_scene(args: argparse.Namespace) -> int:

    job_spec = json.loads(Path(args.job).read_text())
    commit = ExportCommit()
    job = Job(f"scene {args.task}", args.events, {args.task: 1.0}, on_cancel=lambda: commit.cleanup())

    def work(rep, check) -> dict:
        rep.begin(args.task, args.task)

        def progress(fraction: float, message: str = "") -> None:
            rep.update(fraction, message)

        try:
            if args.task == "surfaces":
                try:
                    import vtk  # noqa: F401
                except ImportError:
                    raise DinomixError("3D surfaces need the 'vtk' package (Slicer's Python has it)") from None
                result = run_surfaces(job_spec, rep.emit, check, job.writer, progress)
            elif args.task == "changes":
                result = run_changes(job_spec, check, progress)
            else:
                result = run_export(job_spec, check, progress, commit)
        except InterruptedError:
            raise Cancelled("cancelled") from None
        rep.update(1.0, "done", force=True)
        return result

    try:
        return job.run(work)
    finally:
        job.close()
