"""Training: supervised (this package) and, built on it, the semi-supervised DINO-Mix trainer."""
