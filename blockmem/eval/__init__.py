"""Evaluation: task generators (`tasks/`), metrics, perplexity, the systems compared (blockmem
methods and peers), the `blockmem eval` runner, `blockmem bench` and `blockmem report`.
See docs/eval.md."""
