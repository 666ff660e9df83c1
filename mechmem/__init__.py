"""mechmem: classify and localize verbatim memorization from attention patterns.

Stages, one module each: models (loading hooked models), data (memorization tables),
heuristics, memorization (greedy continuation), taxonomy, features (pooled attention and
the feature store), cnn, alignment, localize, ablation, viz, testbed.
"""

__version__ = "0.1.0"
