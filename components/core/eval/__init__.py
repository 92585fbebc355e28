"""Layer 6, evaluation: judges, figures and the HTML report. Imports the layers below.
"""
