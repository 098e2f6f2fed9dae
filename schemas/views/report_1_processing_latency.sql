-- End-to-end latency of every processed row: GCS event (event_time) → row written
-- (processed_at), in seconds. Every generation counts (this measures the pipeline's work, not
-- what is in the bucket now); rows without an event_time have no latency and are left out.
-- create_views runs files in name order: report_<level>_* reads only views of a lower level.
CREATE OR REPLACE VIEW `{project}.{dataset}.processing_latency` AS
SELECT
  bucket,
  name,
  generation,
  status,
  event_time,
  processed_at,
  TIMESTAMP_TRUNC(processed_at, MINUTE) AS minute,
  TIMESTAMP_DIFF(processed_at, event_time, MILLISECOND) / 1000 AS latency_s
FROM `{project}.{dataset}.distinct_predictions`
WHERE event_time IS NOT NULL
