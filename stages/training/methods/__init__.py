"""The pretraining methods, one module each, registered by name in stages/training/registry.py."""
