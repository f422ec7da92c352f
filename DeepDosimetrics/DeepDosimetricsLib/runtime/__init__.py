"""Shared runtime helpers: errors, progress, atomic files, devices, worker pools, the process runner."""
