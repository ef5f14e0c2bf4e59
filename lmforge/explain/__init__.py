"""Interpretability: which input tokens drove a run's output, how faithful that is, and how it is shown.

- ``attribution.py``: the methods (Integrated Gradients, gradient x input and occlusion through Captum; attention
  maps and rollout written here) on one scalar function of the ids, aligned to character offsets;
- ``targets.py``: what is explained for each task (its TASKS entry's ``explaining``), and ``explain(run, example)``;
- ``faithfulness.py``: deletion curves and ERASER's comprehensiveness / sufficiency;
- ``views.py``: the self-contained HTML page and the PNG (matplotlib with a CJK font);
- ``report.py``: the examples a fine-tune's report.md explains, and ``lmforge explain``'s files.

A ``Run`` (``lmforge/rundir``) is all it needs: it imports no recipe and no run-directory code.
"""
