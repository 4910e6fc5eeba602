"""Backends realise a DesiredState: as Kubernetes objects, or as processes on this machine."""
