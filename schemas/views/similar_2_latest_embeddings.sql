-- The embedding of each object's newest generation (one row per object and model version),
-- with its labels: what `bucketlens similar` searches and the report's embedding map draws.
-- Joining latest_predictions drops embeddings of overwritten generations, so an object whose
-- newest upload is not an image (status corrupt, ...) has no embedding here at all.
-- label: the true label (class folder) where there is one, else the top-1 prediction.
CREATE OR REPLACE VIEW `{project}.{dataset}.latest_embeddings` AS
SELECT
  e.bucket, e.name, e.generation, e.model, e.model_version, e.dimensions, e.embedding,
  e.object_created, e.processed_at,
  p.true_label, p.top1_label, COALESCE(p.true_label, p.top1_label) AS label
FROM `{project}.{dataset}.distinct_embeddings` AS e
JOIN `{project}.{dataset}.latest_predictions` AS p
  ON p.bucket = e.bucket AND p.name = e.name AND p.generation = e.generation
