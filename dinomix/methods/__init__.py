"""DINO-Mix method components used by the semi-supervised trainer (dinomix/training/semi.py)."""
