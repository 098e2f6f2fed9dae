-- Top-1 and top-5 accuracy per true label and scoring kind (see scored_predictions for what
-- each mapping value means), over the newest generation of each object:
--   'own_label', 'mapped'                              scored; accuracy = correct / classified
--   'no_imagenet_class', 'not_in_mapping', 'not_a_model_label'
--                                                      accuracy NULL, counted in
--                                                      images/classified, never scored as wrong
-- A true label scored by two kinds of model (e.g. an ImageNet model and a trained bundle) has a
-- row per kind. Rows that failed (no top-1 prediction) count in images, not in classified.
CREATE OR REPLACE VIEW `{project}.{dataset}.accuracy_by_label` AS
SELECT
  true_label,
  mapping,
  COUNT(*) AS images,
  SUM(classified) AS classified,
  SUM(top1_hit) AS top1_correct,  -- NULL for the unscored kinds: their hits are NULL
  SUM(top5_hit) AS top5_correct,
  SAFE_DIVIDE(SUM(top1_hit), SUM(scored)) AS top1_accuracy,
  SAFE_DIVIDE(SUM(top5_hit), SUM(scored)) AS top5_accuracy
FROM `{project}.{dataset}.scored_predictions`
GROUP BY true_label, mapping
