"""Hydra config tree of ``slapo-train`` (a package so Hydra finds it via ``pkg://`` once installed)."""
