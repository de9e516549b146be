"""Serving: text in/text out, the MLflow pyfunc, the registry, the model card, HF export."""
