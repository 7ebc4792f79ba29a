"""Shared plumbing for data_prep, trainer, sampler and retrieval: typed configs, the distributed
environment, logging, atomic files and seeds. Nothing in here knows about CLIP or diffusion."""

__version__ = "0.1.0"
