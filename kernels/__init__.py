"""Triton kernels, each beside its pure-torch reference (installed as ``fastloc.kernels``)."""
