"""Downstream evaluation: probe tasks, label subsets and the probe run layout, and the metrics. Imports from core
and nets (the end-to-end trainer's settings)."""
