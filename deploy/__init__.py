"""Deployment files: Prefect deployments (prefect.yaml, prefect-k8s.yaml), the Kubernetes job template, the
authenticated server's script and settings, and accelerate's launch config (accelerate/ddp.yaml).

A package only so that they install with the pipeline as package data: the train stage finds accelerate/ddp.yaml
through importlib.resources, from a checkout and from an installed wheel alike. serve/ (vLLM's check and lock)
and the Dockerfile are for a checkout and do not ship."""
