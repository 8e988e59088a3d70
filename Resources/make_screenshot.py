"""Make the extension's screenshot with Slicer's own rendering: slice views and a 3D view drawn offscreen by
slicer-core's MRML displayable managers, on a real CT segmented through the Segmentation module's logic.

    pip install -e ".[screenshot]"   # slicer-core (MRML, displayable managers, VTK) and Pillow
    python Resources/make_screenshot.py [../shared/data/btcv/btcv_img0031_ct.nii.gz] \
        [--model NAME|FILE] [--mode fast|full] [-o Resources/Screenshots/DINOMixSegmentation-slicer.png]

(in the project's virtual environment: slicer-core and vtk; no display needed, VTK renders through EGL or
OSMesa). What it does:

1. loads the CT with Slicer's volume reader into a real MRML scene and runs "Segment abdomen" exactly as the
   module does (`DINOMixSegmentationLib.SegmentationRun` with 3D surfaces: the engine process segments and
   builds the closed surfaces, the module's import code names and colours the segments);
2. renders an axial and a coronal slice view (`vtkMRMLSliceLogic` reslices and blends the CT as a slice view
   does; `vtkMRMLSegmentationsDisplayableManager2D` draws the segments' fill and outline) and a 3D view
   (`vtkMRMLSegmentationsDisplayableManager3D` with the camera and view displayable managers), each in its own
   offscreen render window;
3. puts the three views side by side with a legend of the segments (names and colours read back from the
   segmentation node) and writes a PNG (256 colours, kept under 300 KB).

A rendering of a CT is a derivative of it: a PNG made from the project's shared data (BTCV, TotalSegmentator
examples, CHAOS) must not be committed (their licences do not allow redistribution); Resources/Screenshots/ is
git-ignored for that reason. For the extension index, render a CT whose licence allows it (Slicer's CTA abdomen
sample) and add the PNG with `git add -f`.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DINOMixSegmentation"))

import numpy as np  # noqa: E402
import slicer  # noqa: E402  (slicer-core: the MRML classes and displayable managers)
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

DEFAULT_CT = ROOT.parent / "shared" / "data" / "btcv" / "btcv_img0031_ct.nii.gz"
DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "DINOMixSegmentation-slicer.png"  # git-ignored
MAX_BYTES = 300_000
VIEW_PX = 420  # each view is VIEW_PX x VIEW_PX
SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)
THREED_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                   "vtkMRMLModelDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D")


def make_scene():
    """A scene with the logics Slicer's application sets on it (as tests/modules/slicer_support.py)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.SetSliceLogics(vtk.vtkCollection())  # Slicer's layout manager fills it with its slice views' logics
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app_logic)
    colors.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", colors)
    keep = [colors]
    for cls in (slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerVolumesLogic):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        keep.append(logic)
    return scene, app_logic, keep


def segment(scene, ct: Path, model: str | None, mode: str):
    """'Segment abdomen' through the module's logic: the engine, the import, the 3D surfaces."""
    from DINOMixSegmentationLib import SegmentationRun, SegmentRequest

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", ct.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(ct))
    if not storage.ReadData(volume):
        raise SystemExit(f"Slicer could not read {ct}")
    volume.CreateDefaultDisplayNodes()  # as Slicer's volume loading does: grey colour table, abdomen window
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400, 40)
    run = SegmentationRun(volume, SegmentRequest(model=model, mode=mode, show_3d=True)).start()
    state = run.wait(timeout=3600, interval=0.15)
    if state != "done":
        raise SystemExit(f"segmentation {state}: {run.error}\n" + "\n".join(run.log[-10:]))
    return volume, run


def managers_group(factory_cls, app_logic, names, renderer):
    factory = factory_cls.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for name in names:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


def offscreen_window(renderer, size: int = VIEW_PX):
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(size, size)
    window.AddRenderer(renderer)
    interactor = vtk.vtkGenericRenderWindowInteractor()  # the displayable managers observe the interactor
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window


def grab(window) -> np.ndarray:
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
    return np.ascontiguousarray(rgb[::-1])  # VTK's rows go bottom-up


def slice_view(scene, app_logic, name: str, orientation: str, volume, offset_ras: float, keep: list) -> np.ndarray:
    """One slice view as Slicer draws it: the slice logic's blended image plus the 2D displayable managers."""
    renderer = vtk.vtkRenderer()
    renderer.GetActiveCamera().ParallelProjectionOn()
    window = offscreen_window(renderer)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    app_logic.GetSliceLogics().AddItem(logic)
    node = logic.AddSliceNode(name)
    node.SetOrientation(orientation)
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    group = managers_group(slicer.vtkMRMLSliceViewDisplayableManagerFactory, app_logic, SLICE_MANAGERS, renderer)
    group.SetMRMLDisplayableNode(node)
    logic.ResizeSliceNode(VIEW_PX, VIEW_PX)
    logic.FitSliceToBackground()
    logic.SetSliceOffset(offset_ras)
    logic.SnapSliceOffsetToIJK()
    mapper = vtk.vtkImageMapper()  # Slicer's slice view shows the logic's RGBA slice with a 2D image actor
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    mapper.SetInputConnection(logic.GetImageDataConnection())
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    actor.GetProperty().SetDisplayLocationToBackground()
    renderer.AddViewProp(actor)
    group.RequestRender()
    keep += [logic, group, window, renderer]
    return grab(window)


def threed_view(scene, app_logic, keep: list) -> np.ndarray:
    renderer = vtk.vtkRenderer()
    window = offscreen_window(renderer)
    view = scene.AddNewNodeByClass("vtkMRMLViewNode")
    view.SetBackgroundColor(0.0, 0.0, 0.0)
    view.SetBackgroundColor2(0.0, 0.0, 0.0)
    view.SetBoxVisible(False)
    view.SetAxisLabelsVisible(False)
    group = managers_group(slicer.vtkMRMLThreeDViewDisplayableManagerFactory, app_logic, THREED_MANAGERS, renderer)
    group.SetMRMLDisplayableNode(view)
    window.Render()
    camera = renderer.GetActiveCamera()  # Slicer's default 3D view: from the front (anterior), head up
    renderer.ResetCamera()
    focal = np.array(camera.GetFocalPoint())
    distance = camera.GetDistance()
    camera.SetPosition(*(focal + np.array([0.0, distance, 0.0])))
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer.ResetCamera()
    camera.Zoom(1.35)
    renderer.ResetCameraClippingRange()
    keep += [group, window, renderer]
    return grab(window)


def segments_of(seg_node) -> list[tuple[str, tuple[float, float, float]]]:
    s = seg_node.GetSegmentation()
    out = []
    for i in range(s.GetNumberOfSegments()):
        segment = s.GetNthSegment(i)
        out.append((segment.GetName(), tuple(segment.GetColor())))
    return out


def compose(views: list[tuple[str, np.ndarray]], legend: list, title: str):
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    pad, top, legend_w = 6, 30, 230
    w = len(views) * (VIEW_PX + pad) + pad + legend_w
    h = top + VIEW_PX + pad
    canvas = Image.new("RGB", (w, h), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 7), title, fill=(235, 235, 235), font=font)
    x = pad
    for label, rgb in views:
        canvas.paste(Image.fromarray(rgb), (x, top))
        draw.text((x + 6, top + 5), label, fill=(250, 220, 90), font=small)
        x += VIEW_PX + pad
    y = top + 4
    step = min(24, (VIEW_PX - 8) // max(1, len(legend)))
    for name, color in legend:
        c = tuple(int(round(255 * v)) for v in color)
        draw.rectangle([x + 4, y + 3, x + 18, y + 15], fill=c, outline=(200, 200, 200))
        draw.text((x + 26, y + 1), name, fill=(235, 235, 235), font=small)
        y += step
    return canvas


def save_small(image, out: Path) -> int:
    """A 256-colour PNG (a screenshot needs no more), reduced if still over MAX_BYTES."""
    for colors in (256, 128, 64):
        buf = io.BytesIO()
        image.quantize(colors=colors, dither=0).save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_BYTES:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return buf.tell()


def organ_center(seg_node, volume, names: tuple[str, ...]) -> np.ndarray:
    """RAS centre of the first of `names` that the segmentation has (else the volume's centre)."""
    s = seg_node.GetSegmentation()
    for name in names:
        sid = s.GetSegmentIdBySegmentName(name)
        if sid:
            b = [0.0] * 6
            s.GetSegment(sid).GetBounds(b)
            if b[1] > b[0]:
                return np.array([(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2])
    b = [0.0] * 6
    volume.GetRASBounds(b)
    return np.array([(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ct", nargs="?", type=Path, default=DEFAULT_CT)
    ap.add_argument("--model", default=None, help="registry name or model file (default: the current model)")
    ap.add_argument("--mode", default="fast", choices=("fast", "full"))
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    scene, app_logic, keep = make_scene()
    volume, run = segment(scene, args.ct, args.model, args.mode)
    seg = run.segmentation_node
    display = seg.GetDisplayNode()
    display.SetOpacity2DFill(0.45)
    display.SetOpacity2DOutline(1.0)
    display.SetOpacity3D(1.0)
    centre = organ_center(seg, volume, ("pancreas", "Pancreas", "left kidney", "Left kidney"))
    kidney = organ_center(seg, volume, ("left kidney", "Left kidney", "right kidney", "Right kidney"))
    views = [("Axial", slice_view(scene, app_logic, "Red", "Axial", volume, float(centre[2]), keep)),
             ("Coronal", slice_view(scene, app_logic, "Green", "Coronal", volume, float(kidney[1]), keep)),
             ("3D", threed_view(scene, app_logic, keep))]
    summary = run.summary or {}
    model = summary.get("model") or args.model or "the current model"
    if isinstance(model, dict):
        model = model.get("name") or model.get("id") or "model"
    title = (f"DINOMix Segmentation in 3D Slicer: {args.ct.name.split('.')[0]}, {len(segments_of(seg))} organs "
             f"({model}, {args.mode} mode), rendered by Slicer's displayable managers")
    image = compose(views, segments_of(seg), title)
    n = save_small(image, args.output)
    print(f"wrote {args.output} ({image.size[0]} x {image.size[1]}, {n} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
