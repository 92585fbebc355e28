"""Layer 3, the math as pure functions: preference losses, RL advantages and policy losses, statistics, reward
functions. Imports data, ops and config.
"""
