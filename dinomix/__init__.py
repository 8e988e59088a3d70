"""DINOMix engine: abdominal CT organ segmentation, semi-supervised fine-tuning, model files.

No Slicer import anywhere in this package: the Slicer modules run it as a background process.
"""

__version__ = "0.1.0"
