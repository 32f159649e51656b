"""Analyses of looped runs: fixed points, attention stabilisation, lenses and stages.

Each function takes a model and a LoopCache (or prompts) and returns a small result object with
the tensors, a tidy `to_frame()` and a `plot()`. Iterations are counted from 0 (the paper
counts from 1).
"""
