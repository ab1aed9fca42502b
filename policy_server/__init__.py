"""The serving machinery behind server.py: configuration, model loading, inference, HTTP plumbing.

Modules import torch only inside functions that run in a gunicorn worker, never at import
time, so the gunicorn master stays free of torch and CUDA.
"""
