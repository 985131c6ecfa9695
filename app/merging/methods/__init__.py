"""Merge methods: one module per method, each a pure function over tensors with its math in the docstring."""
