"""Layer 2, data: readers of the public file formats, their normalisation, chat templates and token ids, the
tokenised artifact, packing. Imports ops and config.
"""
