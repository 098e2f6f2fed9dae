-- Confusion counts: objects per (true label, top-1 predicted ImageNet class), newest generation
-- of each object, classified rows with a true label only. True labels are dataset classes and
-- predictions are ImageNet classes, so this is not square: read it with class_mapping.
CREATE OR REPLACE VIEW `{project}.{dataset}.confusion_counts` AS
SELECT
  true_label,
  top1_class_id AS predicted_class_id,
  top1_label AS predicted_label,
  COUNT(*) AS images
FROM `{project}.{dataset}.latest_predictions`
WHERE true_label IS NOT NULL AND top1_class_id IS NOT NULL
GROUP BY true_label, predicted_class_id, predicted_label
