"""Memorization tables for any model, checkpoint and corpus: corpus readers, exact window counts on
Dask, greedy labels, and the check that never pairs one checkpoint's attention with another's labels.

Modules: `corpus` (Megatron .bin/.idx, .npy, text/jsonl), `samples` (windows drawn from a corpus),
`windows` (rolling hashes, exact confirmation), `count` (the Dask job), `relabel` (who labelled a
table; relabelling), `build` (the table and its manifest; `experiments/build_table.py`),
`checkpoints` (the study across checkpoints; `experiments/checkpoints.py`).
"""
