-- The whole latency distribution as 101 percentile boundaries (0 = fastest, 100 = slowest):
-- enough to draw a CDF without reading every row. No rows when nothing has a latency yet.
CREATE OR REPLACE VIEW `{project}.{dataset}.latency_distribution` AS
SELECT
  offset_ AS percentile,  -- aliased here: bqemulator drops a WITH OFFSET alias selected as is
  latency_s
FROM (
  SELECT APPROX_QUANTILES(latency_s, 100) AS boundaries
  FROM `{project}.{dataset}.processing_latency`
) AS q,
UNNEST(q.boundaries) AS latency_s WITH OFFSET AS offset_
