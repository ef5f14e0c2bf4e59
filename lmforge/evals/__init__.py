"""Evaluating language models (``lmforge evaluate --task``): perplexity, multiple choice by log-likelihood and
generation tasks on a decoder, defined as lm-evaluation-harness defines them.

``tasks.py`` holds the tasks (a user's JSONL or text file, and the built-in tasks made from lmforge's data),
``scoring.py`` the log-likelihoods (the harness's context / continuation split, windows), ``run.py`` the runners
and the checks made before any work.
"""
