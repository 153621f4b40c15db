"""Batch anomaly detection for factory image archives (AnoPLe on a frozen CLIP, Ray, MLflow)."""
