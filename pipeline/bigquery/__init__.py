"""BigQuery: the table registry and schemas (``catalog``), rows, SQL, views, the sinks, the
Storage Write API client and compaction. Imports the core modules only."""
