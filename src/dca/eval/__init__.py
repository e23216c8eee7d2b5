"""Evaluation: the paper's Table 1 (perplexity by position) and Table 2 (benchmarks), and the lm-eval model."""
