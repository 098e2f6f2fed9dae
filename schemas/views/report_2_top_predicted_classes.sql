-- How often each ImageNet class is the top-1 prediction, over the newest generation of each
-- object; frequency_rank 1 is the most frequent (ties share a rank).
CREATE OR REPLACE VIEW `{project}.{dataset}.top_predicted_classes` AS
SELECT
  top1_class_id AS class_id,
  top1_label AS label,
  COUNT(*) AS predictions,
  AVG(top1_prob) AS mean_prob,
  RANK() OVER (ORDER BY COUNT(*) DESC) AS frequency_rank
FROM `{project}.{dataset}.latest_predictions`
WHERE top1_class_id IS NOT NULL
GROUP BY class_id, label
