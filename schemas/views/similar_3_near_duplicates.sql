-- Pairs of objects (newest generations, same model version) whose embeddings are closer than
-- pipeline.bigquery.catalog.NEAR_DUPLICATE_DISTANCE in cosine distance: the same photo under two names
-- (distance ~0), or resized, recompressed or lightly edited copies. Each pair once, the
-- (bucket, name)-smaller object first, nearest pairs first when ordered by distance.
-- A self-join: n^2 / 2 distances, fine for tens of thousands of objects. For millions, run
-- VECTOR_SEARCH with the table as the query table too (batch search; README "Similar images").
CREATE OR REPLACE VIEW `{project}.{dataset}.near_duplicates` AS
SELECT
  a.model_version,
  a.bucket, a.name, a.generation, a.label,
  b.bucket AS other_bucket, b.name AS other_name, b.generation AS other_generation,
  b.label AS other_label,
  COSINE_DISTANCE(a.embedding, b.embedding) AS distance
FROM `{project}.{dataset}.latest_embeddings` AS a
JOIN `{project}.{dataset}.latest_embeddings` AS b
  ON a.model_version = b.model_version AND a.dimensions = b.dimensions
  AND (a.bucket < b.bucket OR (a.bucket = b.bucket AND a.name < b.name))
WHERE COSINE_DISTANCE(a.embedding, b.embedding) < {near_duplicate_distance}
