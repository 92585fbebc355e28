"""Layer 1, operations: atomic file writes, logging and input errors, the launcher, placeholders of disabled
stages, MLflow tracking, the code identity of a stage, fault injection. Imports only config.
"""
