"""The stages of the chain, one module each: `python -m pipeline.stages.<name>`.

Their names and order are `pipeline.core.names.STAGES`.
"""
