"""spine-ssl's stages and library.

Each module directly in this package is a stage: a command-line program run as ``python -m stages.<name>`` by one
workflow rule, over typed functions that the tests import. No stage imports another stage. The library lives in the
subpackages, by concern, each importing only from the layers below it:

- ``core``: the config and its schema, the command-line helpers, level names, shards, seeds, the device choice, the
  shared error types, and the local imports of a module (the rules' code inputs).
- ``anatomy``: spine structures from label maps and landmarks, the learned localiser, crop geometry.
- ``demo``: the synthetic demo cohort's anatomy (phantom) and its DICOM writer.
- ``archive``: reading a cohort in: DICOM indexing and volumes, pseudonymisation, landmark tables, the manifest.
- ``nets``: the networks (Siamese VGG-M 3D encoder and its losses, disc classifier, probe heads).
- ``training``: the method-agnostic pretraining harness, its array store, the augmentations and the methods.
- ``evaluation``: probe data and label subsets, metrics.
"""
