"""Bridges between fastdiff and other libraries' model formats.

Each submodule imports its library lazily, so `import fastdiff` (and this package) works
without them installed:

- `fastdiff.integrations.diffusers`: a Hugging Face diffusers UNet + DDPM/DDIM scheduler as a
  fastdiff teacher (`from_diffusers`, `load_diffusers_teacher`) and a distilled student back
  as a diffusers folder (`export_diffusers`). Needs `pip install fastdiff[diffusers]`.
"""
