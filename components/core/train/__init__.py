"""Layer 5, training machinery: the accelerator and loop plumbing, checkpoints and resume, the online-RL
machinery (prompt sampler, rollouts). Imports the layers below.
"""
