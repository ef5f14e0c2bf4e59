"""Operators that are not models or tasks: the fused linear + cross-entropy, and the CPU features that choose
the int8 and bf16 paths at run time."""
