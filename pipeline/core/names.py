"""Names shared by every layer: the stages of the chain, in the order the pipeline runs them.

Each name is a DVC stage in dvc.yaml, a module `pipeline.stages.<name>`, a Prefect task of
the flow and an MLflow child run; `tests/test_dvc_deps.py` checks dvc.yaml against it.
"""

STAGES = ("validate", "synthesize", "tokenizer", "pretrain", "finetune", "evaluate", "register")
