"""`dinomix serve`: a warm engine that keeps models loaded and segments on request.

Every `dinomix segment` pays about 4 s for starting Python, importing PyTorch/MONAI/SimpleITK and loading
the model. A client (the Slicer module) starts `dinomix serve` once and sends requests to it instead.

Protocol (JSON lines; schemas: Resources/Schemas/serve-request.schema.json and serve-reply.schema.json):

  stdin, one request a line:
    {"id": "r1", "command": "segment", "input": "ct.nii.gz", "output": "out/ct.seg.nrrd",
     "mode": "fast", "organs": null, "model": null, ...}    options as `dinomix segment`'s (see REQUEST_FIELDS;
                                          relative paths are relative to the server's working folder)
    {"command": "cancel", "id": "r1"}     cancel a queued or running request: "cancelled" comes at once
    {"command": "ping", "id": ...}        -> {"event": "pong", "busy": running id or null, "queued": n, "models": [...]}
    {"command": "shutdown"}               cancel everything, reply {"event": "shutdown"}, exit 0

  stdout, one event a line: at start {"event": "start", "command": "serve", "pid", "version"}, then
  {"event": "ready", "model", "load_s"} once the default model is loaded (--no-preload: at once). Each
  segment request gets {"event": "queued", "id", "ahead"} and then the events of `dinomix segment --events -`
  tagged with its "id": start, progress, log, and exactly one final event: "result" (the summary that
  segment writes, plus "warm": the model was loaded before this request, "model_load_s", "queued_s",
  "request_s"), "error" ({"message", "kind"}) or "cancelled". A line that is no valid request gets
  {"event": "error", "id": its id or null, "kind": "RequestError"}.

Requests run one at a time, in order. A request naming another model (or a model whose file changed on
disk) loads it; the last two models stay loaded. Cancel (the command, or SIGINT) answers within a fraction
of a second: the request's temporary files are removed at once and its outputs are never committed; the
computation stops at its next check (a window of the sliding window) while the server goes on answering.
SIGTERM cancels everything and exits (130). The server exits when stdin closes: it never outlives the
program that holds the pipe. It also exits when the process given by --parent-pid ends (or, on POSIX, when its
own parent process ends and it is orphaned): a pipe's writing end can outlive a crashed client when a
grandchild inherited it, and the Slicer module names Slicer's pid so the engine never outlives Slicer.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..errors import Cancelled, DinomixError

# Request fields of "segment" and their types; the schema file says the same for other programs.
REQUEST_FIELDS: dict[str, tuple] = {
    "id": (str, int), "command": (str,), "input": (str,), "output": (str,), "mode": (str,),
    "organs": (list, type(None)), "model": (str, type(None)), "formats": (list, type(None)),
    "compression": (str,), "overwrite": (bool,), "force": (bool,), "overlap": (int, float, type(None)),
    "largest_component": (bool,), "fill_holes": (bool,),
}
CHOICES = {"mode": ("fast", "full"), "compression": ("gzip", "none"),
           "formats": ("seg_nrrd", "nifti", "summary")}
KEEP_MODELS = 2


class RequestError(DinomixError):
    """A request line that cannot be run: not JSON, an unknown command or field, a wrong type."""


# ---------------------------------------------------------------- requests

@dataclass
class Request:
    id: Any
    fields: dict
    received: float = field(default_factory=time.perf_counter)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    writer: Any = None
    final_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")


def parse_request(line: str) -> dict:
    """One request line -> its fields, checked (RequestError names what is wrong)."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not a JSON object: {exc.msg} at column {exc.colno}") from None
    if not isinstance(req, dict):
        raise RequestError("a request is one JSON object a line")
    command = req.get("command")
    if command not in ("segment", "cancel", "ping", "shutdown"):
        raise RequestError(f"unknown command {command!r} (segment, cancel, ping, shutdown)")
    if "id" in req and (not isinstance(req["id"], (str, int)) or isinstance(req["id"], bool)):
        raise RequestError("'id' must be a string or an integer")
    if command == "cancel" and "id" not in req:
        raise RequestError("cancel needs the 'id' of the request to cancel")
    if command != "segment":
        unknown = set(req) - {"command", "id"}
        if unknown:
            raise RequestError(f"unknown field(s) for {command}: {', '.join(sorted(unknown))}")
        return req
    _check_segment_fields(req)
    return req


def _check_segment_fields(req: dict) -> None:
    for key in ("id", "input", "output"):
        if key not in req:
            raise RequestError(f"segment needs '{key}'")
    for key, value in req.items():
        types = REQUEST_FIELDS.get(key)
        if types is None:
            raise RequestError(f"unknown field '{key}' (fields: {', '.join(REQUEST_FIELDS)})")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RequestError(f"'{key}' has the wrong type ({type(value).__name__})")
        allowed = CHOICES.get(key)
        if allowed and value is not None:
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if v not in allowed]
            if bad:
                raise RequestError(f"'{key}': {bad[0]!r} is not one of {', '.join(allowed)}")
    if req.get("organs") is not None and not all(isinstance(o, str) for o in req["organs"]):
        raise RequestError("'organs' is a list of organ names")
    ov = req.get("overlap")
    if ov is not None and not 0.0 <= ov < 1.0:
        raise RequestError(f"'overlap' {ov} is outside [0, 1)")


def segment_args(req: dict, server: argparse.Namespace) -> argparse.Namespace:
    """The options of `dinomix segment` that a request stands for (so both run the same code)."""
    return argparse.Namespace(
        input=req["input"], output=req["output"], mode=req.get("mode", "fast"), organs=req.get("organs"),
        model=req.get("model") or server.model, device=server.device, formats=req.get("formats"),
        compression=req.get("compression", "gzip"), overwrite=req.get("overwrite", False),
        force=req.get("force", False), overlap=req.get("overlap"), max_memory=server.max_memory,
        no_largest_component=req.get("largest_component") is False, no_fill_holes=req.get("fill_holes") is False,
        events="-")


# ---------------------------------------------------------------- models

class ModelCache:
    """Loaded models by file; a model file that changed on disk (time or size) is loaded again."""

    def __init__(self, device: str, keep: int = KEEP_MODELS) -> None:
        self.device = device
        self.keep = keep
        self._models: dict[str, tuple[tuple, Any]] = {}  # path -> (file stamp, Segmenter), oldest first

    def get(self, model: Optional[str]) -> tuple[Any, float]:
        """(Segmenter, seconds spent loading it now: 0.0 when it was loaded already)."""
        from ..inference import Segmenter
        from ..registry import resolve

        entry = resolve(model)
        key = str(Path(entry.path).resolve())
        stamp = _stamp(Path(entry.path))
        held = self._models.pop(key, None)
        if held is not None and held[0] == stamp:
            self._models[key] = held  # most recently used last
            return held[1], 0.0
        t = time.perf_counter()
        seg = Segmenter(str(entry.path), self.device)
        self._models[key] = (stamp, seg)
        while len(self._models) > self.keep:
            self._models.pop(next(iter(self._models)))
        return seg, time.perf_counter() - t

    def loaded(self) -> list[str]:
        return [seg.meta.model_id for _, seg in self._models.values()]


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


# ---------------------------------------------------------------- the server

class Server:
    """Reads requests (main thread), runs them one at a time (worker thread), writes events (any thread)."""

    def __init__(self, args: argparse.Namespace, stdout=None) -> None:
        from .batch import TaggedReporter

        self.args = args
        self.out = stdout or sys.stdout
        self.lock = threading.Lock()
        self.root = TaggedReporter(self.out, {}, self.lock, on_broken=self._exit_quietly)
        self.queue: queue.Queue[Optional[Request]] = queue.Queue()
        self.requests: dict[Any, Request] = {}  # queued or running
        self.running: Optional[Request] = None
        self.models: Optional[ModelCache] = None

    # -- output
    def reporter(self, req: Request, stages: Optional[dict] = None):
        from .batch import TaggedReporter

        return TaggedReporter(self.out, {"id": req.id}, self.lock, stages=stages,
                              gate=lambda: not req.final_sent, on_broken=self._exit_quietly)

    def finish(self, req: Request, event: str, **fields: Any) -> bool:
        """Send the request's one final event (result, error or cancelled); False if it has one already."""
        with req.lock:
            if req.final_sent:
                return False
            self.reporter(req).emit(event, **fields)
            req.final_sent = True
        self.requests.pop(req.id, None)
        return True

    def _exit_quietly(self) -> None:
        """Nobody reads our output any more: the client is gone."""
        self._abort_all()
        os._exit(0)

    # -- control (main thread)
    def serve(self) -> int:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.root.emit("start", command="serve", version=__version__, pid=os.getpid())
        threading.Thread(target=self._work, daemon=True, name="dinomix-serve").start()
        watch = ParentWatch(getattr(self.args, "parent_pid", None))
        threading.Thread(target=watch.run, args=(self._parent_gone,), daemon=True, name="dinomix-parent").start()
        for raw in sys.stdin:
            line = raw.strip()
            if line:
                self.handle(line)
        # stdin closed: the client has ended (or closed the pipe): so do we, at once, without waiting for
        # a computation in native code (os._exit; every request's temporary files are removed first).
        self._abort_all()
        self.root.emit("shutdown", reason="stdin closed")
        os._exit(0)

    def handle(self, line: str) -> None:
        try:
            req = parse_request(line)
        except RequestError as exc:
            rid = _id_of(line)
            self.root.emit("error", id=rid, message=str(exc), kind="RequestError")
            return
        command = req["command"]
        if command == "segment":
            self.submit(req)
        elif command == "cancel":
            self.cancel(req["id"], "cancelled by request")
        elif command == "ping":
            self.root.emit("pong", **({"id": req["id"]} if "id" in req else {}),
                           busy=self.running.id if self.running else None, queued=self.queue.qsize(),
                           models=self.models.loaded() if self.models else [])
        elif command == "shutdown":
            self._abort_all()
            self.root.emit("shutdown", reason="shutdown request")
            os._exit(0)

    def _parent_gone(self, why: str) -> None:
        """The client's process has ended without closing our stdin: end as if it had."""
        self._abort_all()
        self.root.emit("shutdown", reason=why)
        os._exit(0)

    def submit(self, fields: dict) -> None:
        rid = fields["id"]
        if rid in self.requests:
            self.root.emit("error", id=rid, message=f"a request with id {rid!r} is already queued or running",
                           kind="RequestError")
            return
        req = Request(rid, fields)
        self.requests[rid] = req
        self.root.emit("queued", id=rid, ahead=self.queue.qsize() + (1 if self.running else 0))
        self.queue.put(req)

    def cancel(self, rid: Any, why: str) -> None:
        req = self.requests.get(rid)
        if req is None:
            self.root.emit("log", id=rid, level="warning", message=f"nothing to cancel: request {rid!r} is not "
                                                                    "queued or running")
            return
        req.cancel_event.set()
        # Its temporary files go now, and nothing of it is committed after this; once committed, the
        # request has succeeded and its result stands.
        if req.writer is None or req.writer.abort():
            self.finish(req, "cancelled", message=why)

    def _abort_all(self) -> None:
        for req in list(self.requests.values()):
            req.cancel_event.set()
            if req.writer is not None:
                req.writer.abort()

    # A signal handler runs in the main thread between any two steps, maybe while that thread holds the
    # output lock: the handlers only start a thread that does the work with the locks taken normally.
    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002
        """SIGINT cancels the running request, not the server."""
        running = self.running
        if running is not None:
            threading.Thread(target=self.cancel, args=(running.id, f"cancelled by signal {signum}"),
                             daemon=True).start()

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        threading.Thread(target=self._terminate, args=(signum,), daemon=True).start()

    def _terminate(self, signum: int) -> None:
        from .job import CANCEL_EXIT

        self._abort_all()
        for req in list(self.requests.values()):
            self.finish(req, "cancelled", message=f"cancelled by signal {signum}: the server ends")
        os._exit(CANCEL_EXIT)

    # -- work (worker thread)
    def _work(self) -> None:
        self._preload()
        while True:
            req = self.queue.get()
            if req is None:
                return
            if req.cancel_event.is_set():
                continue
            self.running = req
            try:
                self._run(req)
            finally:
                self.running = None

    def _preload(self) -> None:
        """Imports and the default model, before the first request (which then finds the engine warm)."""
        from .. import outputs, preprocessing  # noqa: F401  -- imported here, once, not per request

        self.models = ModelCache(self.args.device)
        if self.args.no_preload:
            self.root.emit("ready", model=None, load_s=0.0)
            return
        t = time.perf_counter()
        try:
            seg, _ = self.models.get(self.args.model)
            self.root.emit("ready", model=seg.meta.model_id, load_s=round(time.perf_counter() - t, 3))
        except Exception as exc:  # the requests will say what is wrong with the model, each in its error
            self.root.emit("log", level="warning", message=f"the default model did not load: {exc}")
            self.root.emit("ready", model=None, load_s=0.0)

    def _run(self, req: Request) -> None:
        from ..imageio import AtomicWriter
        from .job import describe_error
        from .pipeline import add_model_stages, machine_memory, prepare_outputs, read_input, segment_image

        rep = self.reporter(req, stages={"read": 0.05})
        rep.emit("start", command="segment", version=__version__, pid=os.getpid())
        t0 = time.perf_counter()
        req.writer = AtomicWriter()
        try:
            req.check()  # cancelled between the queue and here
            args = segment_args(req.fields, self.args)
            paths, wanted = prepare_outputs(args, rep)
            limit = args.max_memory or machine_memory()
            image, notes = read_input(args, rep, limit)
            req.check()
            assert self.models is not None, "the model cache is made before the first request is read"
            seg, load_s = self.models.get(args.model)
            if load_s:
                rep.log(f"loaded model '{seg.meta.model_id}' in {load_s:.1f} s")
            add_model_stages(rep)
            _, summary = segment_image(args, seg, image, notes, paths, wanted, req.writer, rep, req.check,
                                       limit, t0)
            del image
            self.finish(req, "result", **summary, warm=load_s == 0.0, model_load_s=round(load_s, 3),
                        queued_s=round(t0 - req.received, 3), request_s=round(time.perf_counter() - req.received, 3))
        except BaseException as exc:  # every failure is this request's, never the server's
            req.writer.abort()
            msg, kind, _ = describe_error(exc, traceback.format_exc())
            if kind == "Cancelled" or req.cancel_event.is_set():
                self.finish(req, "cancelled", message="cancelled")
            else:
                self.finish(req, "error", message=msg, kind=kind)


class ParentWatch:
    """Tells when the client process has ended: the process `pid` (checked with its start time, so a reused
    pid does not count as alive), or on POSIX this process's parent (the parent pid changes when orphaned).
    Polls twice a second in a daemon thread of the server; costs nothing measurable."""

    INTERVAL_S = 0.5

    def __init__(self, pid: Optional[int]) -> None:
        self.pid = pid
        self.ppid = os.getppid() if os.name == "posix" else None
        self.created = _create_time(pid) if pid else None

    def gone(self) -> Optional[str]:
        """Why the client is gone, or None while it lives."""
        if self.pid:
            if not pid_alive(self.pid) or (self.created is not None and _create_time(self.pid) != self.created):
                return f"parent process {self.pid} ended"
        if self.ppid is not None and os.getppid() != self.ppid:
            return f"parent process {self.ppid} ended (orphaned)"
        return None

    def run(self, on_gone) -> None:
        while True:
            why = self.gone()
            if why:
                on_gone(why)
                return
            time.sleep(self.INTERVAL_S)


def _create_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no psutil, or the process is gone (then _pid_alive says so)
        return None


def pid_alive(pid: int) -> bool:
    try:
        import psutil

        if not psutil.pid_exists(pid):
            return False
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # vanished between the two calls
        return False
    if os.name != "posix":
        return True  # (os.kill(pid, 0) would send a signal on Windows); without psutil: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _id_of(line: str) -> Any:
    try:
        rid = json.loads(line).get("id")
        return rid if isinstance(rid, (str, int)) else None
    except (ValueError, AttributeError):
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    return Server(args).serve()


def register(sub) -> None:
    from .options import add_device_option

    s = sub.add_parser("serve", help="a warm engine: segment requests (JSON lines) on stdin, events on stdout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default=None, help="default model of requests that name none (registry name or file)")
    add_device_option(s)
    s.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="refuse inputs whose segmentation needs more memory, e.g. 8G (default: this machine's memory)")
    s.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="exit when this process ends (the client, e.g. Slicer), even if stdin stays open")
    s.add_argument("--no-preload", action="store_true",
                   help="load the default model with the first request, not at start")
    s.set_defaults(func=cmd_serve)


def _size(text: str) -> int:
    from .options import parse_size

    return parse_size(text)
