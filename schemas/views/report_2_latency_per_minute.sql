-- Latency percentiles per minute of processed_at, to see the pipeline fall behind or catch up.
-- APPROX_QUANTILES(x, 100) returns 101 boundaries; OFFSET(n) is the n-th percentile.
CREATE OR REPLACE VIEW `{project}.{dataset}.latency_per_minute` AS
SELECT
  minute,
  COUNT(*) AS images,
  APPROX_QUANTILES(latency_s, 100)[OFFSET(50)] AS p50_s,
  APPROX_QUANTILES(latency_s, 100)[OFFSET(95)] AS p95_s,
  APPROX_QUANTILES(latency_s, 100)[OFFSET(99)] AS p99_s,
  MAX(latency_s) AS max_s
FROM `{project}.{dataset}.processing_latency`
GROUP BY minute
