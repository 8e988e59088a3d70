"""Networks: the 3D student U-Net and its CPU kernel, SegDINO, and the DINOv3 ViT with its weight loading."""
