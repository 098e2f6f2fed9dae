-- Accuracy per model version (a trained bundle's content hash, else its weights), over the
-- newest generation of each labelled object, scored as in scored_predictions: read in order of
-- first_processed_at, a model swap shows as a step. images counts labelled objects; scored
-- those of a scored kind with a prediction. Rows written before model_version existed share
-- one NULL version per model.
CREATE OR REPLACE VIEW `{project}.{dataset}.accuracy_by_model_version` AS
SELECT
  model,
  model_version,
  MIN(processed_at) AS first_processed_at,
  MAX(processed_at) AS last_processed_at,
  COUNT(*) AS images,
  SUM(scored) AS scored,
  IFNULL(SUM(top1_hit), 0) AS top1_correct,
  SAFE_DIVIDE(SUM(top1_hit), SUM(scored)) AS top1_accuracy,
  SAFE_DIVIDE(SUM(top5_hit), SUM(scored)) AS top5_accuracy
FROM `{project}.{dataset}.scored_predictions`
GROUP BY model, model_version
