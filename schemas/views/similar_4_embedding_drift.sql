-- How far each window's mean embedding moved from the baseline window's (windows and baseline as
-- in drift_windows): embedding_shift is the cosine distance between the two centroids (0 = same
-- direction). Compare within one model: embeddings of different models do not share a space.
CREATE OR REPLACE VIEW `{project}.{dataset}.embedding_drift` AS
WITH flat AS (
  SELECT
    TIMESTAMP_SECONDS(DIV(UNIX_SECONDS(e.object_created), {drift_window_seconds})
                      * {drift_window_seconds}) AS window_start,
    o + 0 AS dim,  -- a plain column: bqemulator rewrites OFFSET aliases it meets in joins
    x
  FROM `{project}.{dataset}.distinct_embeddings` AS e
  CROSS JOIN UNNEST(e.embedding) AS x WITH OFFSET AS o
),
centroids AS (
  SELECT window_start, dim, AVG(x) AS x
  FROM flat
  GROUP BY window_start, dim
),
ranked AS (
  SELECT window_start, ROW_NUMBER() OVER (ORDER BY window_start) AS n, COUNT(*) OVER () AS windows
  FROM (SELECT DISTINCT window_start FROM flat)
),
baseline AS (
  SELECT {drift_baseline} AS baseline_start FROM ranked
),
pairs AS (
  SELECT c.window_start, SUM(c.x * b.x) AS dot, SUM(c.x * c.x) AS cc, SUM(b.x * b.x) AS bb
  FROM centroids AS c
  CROSS JOIN baseline
  JOIN centroids AS b ON b.window_start = baseline.baseline_start AND b.dim = c.dim
  GROUP BY c.window_start
)
SELECT window_start, baseline_start, 1 - dot / SQRT(cc * bb) AS embedding_shift
FROM pairs
CROSS JOIN baseline
