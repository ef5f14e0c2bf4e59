"""The recipes that produce run directories (pretraining, the one fine-tuning recipe, demo, compare), the
run-directory layout and its loader, and the rendering of results; see docs/ARCHITECTURE.md."""
