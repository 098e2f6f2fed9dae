"""Provisioning and the embedded local stack."""

import pipeline  # noqa: F401  (sets gRPC fork safety before any client import)
