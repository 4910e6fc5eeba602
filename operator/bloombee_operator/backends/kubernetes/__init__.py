"""Kubernetes backend: the desired state rendered as objects (objects.py, pure) and applied to
every cluster (backend.py)."""
