"""The streaming job: the Pub/Sub data source, triage, fetch, the executors' classify step, the
driver's batch processing (``job``), Spark session and metrics. May import the core modules,
``pipeline.model`` and ``pipeline.bigquery``."""
