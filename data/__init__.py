"""Dataset preparation: data/<name>/prepare.py scripts and their shared helpers in data/common.py.

A regular package (not a namespace one) so that `import data.common` cannot be shadowed by some
other installed top-level `data` package: namespace portions lose to any regular package.
"""
