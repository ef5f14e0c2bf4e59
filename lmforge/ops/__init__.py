"""Operators that are not models or tasks: the fused linear + cross-entropy."""
