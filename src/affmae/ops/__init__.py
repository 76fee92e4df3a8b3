"""Stateless tensor functions and kernels (no nn.Parameter lives here)."""
