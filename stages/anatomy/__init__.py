"""Anatomy and localisation: spine structures (bodies and discs) from label maps, landmark tables or the learned
heatmap localiser, and the crop geometry that cuts their volumes. Imports from core only."""
