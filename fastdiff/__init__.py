"""fastdiff: distil slow diffusion models into few-step samplers."""
__version__ = "0.1.0"
