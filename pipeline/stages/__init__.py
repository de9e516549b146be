"""The stages of the chain, one module each, in the order the pipeline runs them."""

STAGES = ("validate", "synthesize", "tokenizer", "pretrain", "finetune", "evaluate", "register")
