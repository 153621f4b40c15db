"""Everyday operations on a registered deployment model, each one command that registers a new candidate version
with its lineage (pipeline.lineage): a product added without retraining, inspectors' verdicts, an operating point."""
