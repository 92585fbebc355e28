"""Shared machinery of the stages, in layers that import only downward (checked by tests/unit/test_layout.py):

    config, sorting (the embedded task)  <  ops  <  data  <  algos  <  model  <  train  <  eval  <  release

A stage (components/<stage>.py) imports from any layer; no module here imports a stage or flows/.
"""
