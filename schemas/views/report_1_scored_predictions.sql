-- The one definition of "correct": every labelled object (newest generation), its scoring kind
-- and 0/1 flags that the accuracy views only sum (accuracy_by_label, accuracy_summary,
-- accuracy_by_model_version).
--   mapping = 'own_label'         true_label names one of the model's own labels
--                                 (true_model_label; case, '_' vs space normalised): top-1
--                                 correct when top1_label = true_model_label, top-5 when any
--                                 top-k label is; ImageNet models and trained bundles alike
--   mapping = 'mapped'            an ImageNet row (label_set imagenet-1k, or NULL on rows written
--                                 before the column existed) judged through class_mapping: a
--                                 prediction is correct when its class id is one mapped to the
--                                 object's class folder
--   mapping = 'no_imagenet_class' ImageNet-1k has no class for it (the TF flowers set's
--                                 dandelion, roses, sunflowers, tulips; astronaut, person, coins)
--   mapping = 'not_in_mapping'    an ImageNet row whose class folder class_mapping does not know
--   mapping = 'not_a_model_label' a trained bundle's row (label_set 'own') whose true label is
--                                 none of its labels; class_mapping never applies to a bundle:
--                                 its class ids index its own labels, not ImageNet's
-- Only 'own_label' and 'mapped' are scored; the others have NULL hits and never count as wrong.
-- classified: the row has a top-1 prediction; scored: classified and of a scored kind.
CREATE OR REPLACE VIEW `{project}.{dataset}.scored_predictions` AS
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
kinds AS (
  SELECT
    p.bucket, p.name, p.generation, p.status, p.processed_at, p.model, p.model_version,
    IFNULL(p.label_set, 'imagenet-1k') AS label_set,
    p.true_label, p.true_model_label, p.top1_class_id, p.top1_label, p.top5,
    CASE
      WHEN p.true_model_label IS NOT NULL THEN 'own_label'
      WHEN IFNULL(p.label_set, 'imagenet-1k') != 'imagenet-1k' THEN 'not_a_model_label'
      WHEN l.true_label IS NULL THEN 'not_in_mapping'
      WHEN l.mappable THEN 'mapped'
      ELSE 'no_imagenet_class'
    END AS mapping
  FROM `{project}.{dataset}.latest_predictions` AS p
  LEFT JOIN labels AS l ON l.true_label = p.true_label
  WHERE p.true_label IS NOT NULL
),
top5_hits AS (  -- objects whose top-k holds the right class, by either kind of scoring
  SELECT DISTINCT k.bucket, k.name, k.generation
  FROM kinds AS k
  CROSS JOIN UNNEST(k.top5) AS t
  LEFT JOIN mapped AS m ON m.true_label = k.true_label AND m.class_id = t.class_id
  WHERE (k.mapping = 'own_label' AND t.label = k.true_model_label)
     OR (k.mapping = 'mapped' AND m.class_id IS NOT NULL)
)
SELECT  -- 0/1 flags that the accuracy views sum (bqemulator mis-binds COUNTIF after an UNNEST)
  k.bucket, k.name, k.generation, k.status, k.processed_at, k.model, k.model_version,
  k.label_set, k.true_label, k.true_model_label, k.top1_class_id, k.top1_label, k.mapping,
  IF(k.top1_class_id IS NOT NULL, 1, 0) AS classified,
  IF(k.mapping IN ('own_label', 'mapped') AND k.top1_class_id IS NOT NULL, 1, 0) AS scored,
  CASE k.mapping
    WHEN 'own_label' THEN IF(k.top1_label = k.true_model_label, 1, 0)
    WHEN 'mapped' THEN IF(m.class_id IS NOT NULL, 1, 0)
  END AS top1_hit,
  IF(k.mapping IN ('own_label', 'mapped'), IF(h.name IS NOT NULL, 1, 0), NULL) AS top5_hit
FROM kinds AS k
LEFT JOIN mapped AS m
  ON k.mapping = 'mapped' AND m.true_label = k.true_label AND m.class_id = k.top1_class_id
LEFT JOIN top5_hits AS h
  ON h.bucket = k.bucket AND h.name = k.name AND h.generation = k.generation
