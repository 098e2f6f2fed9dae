-- One row: accuracy over every mapped label together, with the unmappable images counted
-- beside it (not scored). Reads accuracy_by_label, so the two always agree.
CREATE OR REPLACE VIEW `{project}.{dataset}.accuracy_summary` AS
SELECT
  IFNULL(SUM(images), 0) AS labelled_images,
  IFNULL(SUM(IF(mapping = 'mapped', classified, 0)), 0) AS scored_images,
  IFNULL(SUM(IF(mapping = 'mapped', 0, images)), 0) AS unmappable_images,
  IFNULL(SUM(top1_correct), 0) AS top1_correct,
  IFNULL(SUM(top5_correct), 0) AS top5_correct,
  SAFE_DIVIDE(SUM(top1_correct), SUM(IF(mapping = 'mapped', classified, 0))) AS top1_accuracy,
  SAFE_DIVIDE(SUM(top5_correct), SUM(IF(mapping = 'mapped', classified, 0))) AS top5_accuracy
FROM `{project}.{dataset}.accuracy_by_label`
