"""The networks: the Siamese VGG-M 3D encoder and its losses (Jamaludin et al. 2017), the disc classifier trained end
to end, and the probes' heads. Imports from core only."""
