"""Quality benchmark: what the sliding window + group summaries (and ADR / DSSE) buy in accuracy.

``python -m benchmarks.quality`` (also ``python -m benchmarks --only quality``) trains small
``dasg_model`` decoders on tasks generated on the fly and reports accuracy by distance to
the answer, loss, tokens/s, peak memory and routing statistics, as
``benchmarks/results/quality-<device>.{jsonl,json,md}`` and PNG plots.

Layout:

- ``tasks.py``     the task generators (MQAR, ListOps, selective copying, passkey, byte-level LM
                   on the standard library's sources), deterministic by seed
- ``variants.py``  the attention (dense SDPA, sliding window, DASG, summaries only) and expert
                   (dense FFN, top-k, ADR, DSSE) variants at matched sizes
- ``train.py``     one training run and its evaluation
- ``grids.py``     the task defaults and the quick / CPU / GPU grids
- ``report.py``    aggregation over seeds, Markdown, plots
- ``cli.py``       the command line (``__main__.py`` calls it)
"""
