"""The scaling-law sweep's pure parts (the Prefect flow is flows/scaling_flow.py).

- `grid`: sizes x budgets, each point's folders and `--set` overrides, the pre-flight plan;
- `inputs`: the tokenizer's shards and the story world's entropy rate, read from disk;
- `fit`: L(N, D) = E + A / N^alpha + B / D^beta by bounded least squares (scipy, lazily);
- `report`: E against the entropy rate, the markdown report and the plot.
"""
