"""Draw the extension and module icons (128 x 128 PNG) with PIL. Run from the repository root:

    python Resources/Icons/draw_icons.py

Writes Resources/Icons/DINOMix.png, DINOMixSegmentation/Resources/Icons/DINOMixSegmentation.png and
DINOMixTrainer/Resources/Icons/DINOMixTrainer.png. Organ colours are the ones the model uses.
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
S = 4  # supersampling
N = 128 * S


def base() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGBA", (N, N), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([2 * S, 2 * S, N - 2 * S, N - 2 * S], radius=22 * S, fill=(24, 38, 62, 255))
    # axial abdomen: body outline, spine
    d.ellipse([14 * S, 26 * S, 114 * S, 104 * S], fill=(208, 200, 188, 255))
    d.ellipse([56 * S, 82 * S, 72 * S, 98 * S], fill=(245, 245, 240, 255))
    return img, d


def organs(d: ImageDraw.ImageDraw) -> None:
    # image left = patient's right (radiological convention)
    d.ellipse([20 * S, 34 * S, 62 * S, 80 * S], fill=(221, 130, 101, 255))      # liver
    d.ellipse([60 * S, 38 * S, 88 * S, 62 * S], fill=(216, 132, 105, 255))      # stomach
    d.ellipse([86 * S, 46 * S, 106 * S, 72 * S], fill=(157, 108, 162, 255))     # spleen
    d.ellipse([38 * S, 74 * S, 54 * S, 94 * S], fill=(185, 102, 83, 255))       # right kidney
    d.ellipse([74 * S, 74 * S, 90 * S, 94 * S], fill=(185, 102, 83, 255))       # left kidney
    d.ellipse([66 * S, 70 * S, 74 * S, 78 * S], fill=(224, 97, 76, 255))        # aorta
    d.ellipse([55 * S, 68 * S, 64 * S, 78 * S], fill=(0, 151, 206, 255))        # IVC
    d.rounded_rectangle([58 * S, 62 * S, 86 * S, 68 * S], radius=3 * S, fill=(249, 180, 111, 255))  # pancreas


def label(d: ImageDraw.ImageDraw, text: str) -> None:
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 17 * S)
    except OSError:
        font = ImageFont.load_default()
    w = d.textlength(text, font=font)
    d.text(((N - w) / 2, 5 * S), text, font=font, fill=(255, 255, 255, 255))


def badge(d: ImageDraw.ImageDraw, kind: str) -> None:
    cx, cy, r = 104 * S, 104 * S, 18 * S
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 255, 255), outline=(24, 38, 62, 255), width=3 * S)
    if kind == "segment":  # a brush stroke
        d.line([cx - 9 * S, cy + 9 * S, cx + 9 * S, cy - 9 * S], fill=(221, 130, 101, 255), width=6 * S)
    else:  # a rising curve: learning
        pts = [(cx - 11 * S, cy + 8 * S), (cx - 4 * S, cy + 2 * S), (cx + 2 * S, cy - 1 * S),
               (cx + 11 * S, cy - 10 * S)]
        d.line(pts, fill=(0, 112, 165, 255), width=5 * S, joint="curve")


def save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((128, 128), Image.LANCZOS).save(path, optimize=True)
    print("wrote", path)


def main() -> None:
    img, d = base()
    organs(d)
    label(d, "DINOMix")
    save(img, ROOT / "Resources" / "Icons" / "DINOMix.png")
    for kind, module in (("segment", "DINOMixSegmentation"), ("train", "DINOMixTrainer")):
        img, d = base()
        organs(d)
        label(d, "DINOMix")
        badge(d, kind)
        save(img, ROOT / module / "Resources" / "Icons" / f"{module}.png")


if __name__ == "__main__":
    main()
