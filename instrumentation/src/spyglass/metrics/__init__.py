"""Metric storage, instruments, collectors and the exposition endpoint."""
