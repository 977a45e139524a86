"""The synthetic demo cohort's parts: the phantom (anatomy, degeneration, scanner contrasts) and the DICOM writer and
reader it is written and read back with. Imports from core only."""
