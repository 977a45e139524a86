"""Pretraining: the method-agnostic harness (loop, checkpoints and exact resume, DDP, device and autocast, progress,
logging), its array store, the augmentations, and the methods. Imports from core and nets."""
