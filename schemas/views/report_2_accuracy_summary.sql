-- One row: accuracy over every scored object together ('own_label' and 'mapped', see
-- scored_predictions), with the unscored labelled images counted beside it (not scored). Sums
-- the same flags as accuracy_by_label, so the two always agree.
CREATE OR REPLACE VIEW `{project}.{dataset}.accuracy_summary` AS
SELECT
  COUNT(*) AS labelled_images,
  IFNULL(SUM(scored), 0) AS scored_images,
  IFNULL(SUM(IF(mapping IN ('own_label', 'mapped'), 0, 1)), 0) AS unmappable_images,
  IFNULL(SUM(top1_hit), 0) AS top1_correct,
  IFNULL(SUM(top5_hit), 0) AS top5_correct,
  SAFE_DIVIDE(SUM(top1_hit), SUM(scored)) AS top1_accuracy,
  SAFE_DIVIDE(SUM(top5_hit), SUM(scored)) AS top5_accuracy
FROM `{project}.{dataset}.scored_predictions`
