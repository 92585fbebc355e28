"""Layer 7, release: the MLflow registry and the promotion gate. Imports the layers below.
"""
