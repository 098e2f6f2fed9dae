-- Rows written per minute of processed_at (every generation: this is work done). Minutes with
-- no rows are absent; the report fills them with zeros when it plots.
CREATE OR REPLACE VIEW `{project}.{dataset}.throughput_per_minute` AS
SELECT
  TIMESTAMP_TRUNC(processed_at, MINUTE) AS minute,
  COUNT(*) AS images,
  COUNTIF(top1_class_id IS NOT NULL) AS classified,
  COUNTIF(status NOT IN ({classified})) AS errors,
  COUNT(*) / 60 AS images_per_s
FROM `{project}.{dataset}.distinct_predictions`
GROUP BY minute
