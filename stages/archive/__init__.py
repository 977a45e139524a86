"""Reading a cohort in: DICOM headers and series classification, series to volumes, pseudonymisation, landmark
tables at ingest, label maps' numbering (label schemes), and the manifest every ingest stage writes. Imports from core
and anatomy."""
