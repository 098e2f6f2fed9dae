"""Dataset discovery/download (``producer.datasets``) and steady-rate shuffled replay into a
bucket (``producer.replay``); import those modules directly. Importing this package loads
neither, so the ``bucketlens`` parser (which registers ``produce``) stays free of the Google
clients until a command runs.
"""

import pipeline  # noqa: F401  (sets gRPC fork safety before any client import)
