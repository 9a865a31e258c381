"""The sandbox: the worker process that runs code, and the isolation applied to it.

Modules here import only the standard library: the worker loads them without importing
the rest of the package (or Gymnasium, or NumPy).
"""
