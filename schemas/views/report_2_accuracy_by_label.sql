-- Top-1 and top-5 accuracy per true label over the newest generation of each object, judged
-- through class_mapping: a prediction is correct when its ImageNet class is one mapped to the
-- object's dataset class (by class id).
--   mapping = 'mapped'            scored; accuracy = correct / classified
--   mapping = 'no_imagenet_class' ImageNet-1k has no class for it (the TF flowers set's
--                                 dandelion, roses, sunflowers, tulips; astronaut, person,
--                                 coins): accuracy NULL, counted in images/classified, never
--                                 scored as wrong
--   mapping = 'not_in_mapping'    a class folder class_mapping does not know yet: as above
-- Rows that failed (no top-1 prediction) count in images, not in classified.
CREATE OR REPLACE VIEW `{project}.{dataset}.accuracy_by_label` AS
WITH mapped AS (
  SELECT true_label, class_id
  FROM `{project}.{dataset}.class_mapping`
  WHERE class_id IS NOT NULL
),
labels AS (
  SELECT true_label, LOGICAL_OR(class_id IS NOT NULL) AS mappable
  FROM `{project}.{dataset}.class_mapping`
  GROUP BY true_label
),
latest AS (
  SELECT bucket, name, generation, true_label, top1_class_id, top5
  FROM `{project}.{dataset}.latest_predictions`
  WHERE true_label IS NOT NULL
),
top5_hits AS (  -- objects with a mapped class anywhere in their top-k
  SELECT DISTINCT p.bucket, p.name, p.generation
  FROM latest AS p
  CROSS JOIN UNNEST(p.top5) AS t
  JOIN mapped AS m ON m.true_label = p.true_label AND m.class_id = t.class_id
),
scored AS (  -- 0/1 flags summed below (bqemulator mis-binds COUNTIF after an UNNEST)
  SELECT
    p.true_label,
    IF(p.top1_class_id IS NOT NULL, 1, 0) AS classified,
    IF(m.class_id IS NOT NULL, 1, 0) AS top1_hit,
    IF(h.name IS NOT NULL, 1, 0) AS top5_hit
  FROM latest AS p
  LEFT JOIN mapped AS m ON m.true_label = p.true_label AND m.class_id = p.top1_class_id
  LEFT JOIN top5_hits AS h
    ON h.bucket = p.bucket AND h.name = p.name AND h.generation = p.generation
)
SELECT
  s.true_label,
  CASE
    WHEN l.true_label IS NULL THEN 'not_in_mapping'
    WHEN l.mappable THEN 'mapped'
    ELSE 'no_imagenet_class'
  END AS mapping,
  COUNT(*) AS images,
  SUM(s.classified) AS classified,
  IF(l.mappable, SUM(s.top1_hit), NULL) AS top1_correct,
  IF(l.mappable, SUM(s.top5_hit), NULL) AS top5_correct,
  IF(l.mappable, SAFE_DIVIDE(SUM(s.top1_hit), SUM(s.classified)), NULL) AS top1_accuracy,
  IF(l.mappable, SAFE_DIVIDE(SUM(s.top5_hit), SUM(s.classified)), NULL) AS top5_accuracy
FROM scored AS s
LEFT JOIN labels AS l ON l.true_label = s.true_label
GROUP BY s.true_label, l.true_label, l.mappable
