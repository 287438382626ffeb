"""Training side: multi-exit architectures, EED and comparison losses, datasets, FLOPs, export."""
