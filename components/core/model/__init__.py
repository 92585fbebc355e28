"""Layer 4, models: loading and precision, FSDP2 sharding, log-probs, scalar heads (reward and value models),
generation. Imports the layers below.
"""
