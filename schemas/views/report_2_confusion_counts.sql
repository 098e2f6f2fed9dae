-- Confusion counts: objects per (true label, top-1 predicted label), newest generation of each
-- object, classified rows with a true label only. true_model_label is the model's own label the
-- true label names (NULL when none: then read it with class_mapping); the report puts it on the
-- diagonal. Labels of every model are counted together, by their text.
CREATE OR REPLACE VIEW `{project}.{dataset}.confusion_counts` AS
SELECT
  true_label,
  true_model_label,
  top1_class_id AS predicted_class_id,
  top1_label AS predicted_label,
  COUNT(*) AS images
FROM `{project}.{dataset}.latest_predictions`
WHERE true_label IS NOT NULL AND top1_class_id IS NOT NULL
GROUP BY true_label, true_model_label, predicted_class_id, predicted_label
