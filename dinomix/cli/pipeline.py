"""Reading, segmenting and writing one scan: the steps `dinomix segment`, the batch and `dinomix serve` share."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from ..errors import DinomixError, OutputError
from ..events import Reporter
from ..imageio import AtomicWriter


class MemoryLimitError(DinomixError):
    """A segmentation would need more memory than allowed (--max-memory, default: the machine's memory)."""


def prepare_outputs(args: argparse.Namespace, rep: Reporter) -> tuple[dict[str, Path], list[str]]:
    """The output set of one scan, checked before any work: writable, never the input, no existing file
    without --overwrite; files left by a killed earlier run are removed."""
    from ..imageio import remove_leftovers
    from ..outputs import check_outputs, output_paths

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
    from ..imageio import check_is_ct, read_image

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
    from ..inference import STAGES

    rep.stages.update(STAGES)
    rep.total = sum(rep.stages.values())


def segment_image(args: argparse.Namespace, seg, image, notes: list[str], paths: dict[str, Path],
                  wanted: list[str], writer: AtomicWriter, rep: Reporter, check: Callable[[], None],
                  limit: int, t0: float):
    """Segment a read image with a loaded model and commit its output set; (result, summary)."""
    from ..inference import SegmentOptions

    _check_memory(args, limit, image.GetSize(), 4, image.GetSpacing(),
                  seg.meta.preprocessing.mode(args.mode).spacing_mm, len(seg.meta.organs.organs) + 1)
    if not seg.meta.trained:
        rep.log(f"model '{seg.meta.model_id}' is UNTRAINED (random weights): its output is not anatomy", "warning")
    if seg.meta.backbone_untrained:
        from ..nets.segdino import BACKBONE_UNTRAINED

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
    from ..outputs import write_json, write_labelmap, write_seg_nrrd

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


def machine_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _check_memory(args: argparse.Namespace, limit: int, size, bytes_per_voxel: int, spacing=None,
                  target=None, n_classes: int = 0) -> None:
    """Refuse, before anything large is allocated, an input whose segmentation would not fit in memory
    (the kernel would kill the process without a word: a wrong voxel size of 50 mm asks for 160 GB)."""
    from ..imageio import _fmt_bytes
    from ..preprocessing import estimate_memory, grid_shape

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
