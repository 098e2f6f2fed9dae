-- Rows per status over every processed generation (ok, low_confidence, and each failure kind);
-- share is the fraction of all rows.
CREATE OR REPLACE VIEW `{project}.{dataset}.status_counts` AS
SELECT
  status,
  COUNT(*) AS images,
  COUNT(*) / SUM(COUNT(*)) OVER () AS share
FROM `{project}.{dataset}.distinct_predictions`
GROUP BY status
