-- The newest generation of each object: an overwrite adds a row for its new generation (the
-- sink never updates rows), so analytics that mean "what is in the bucket now" read this view.
-- It reads distinct_predictions, so a key appended twice is still one row.
-- Placeholders {project}, {dataset}, {table} are filled in by pipeline.bigquery.views.create_views.
CREATE OR REPLACE VIEW `{project}.{dataset}.latest_predictions` AS
SELECT *
FROM `{project}.{dataset}.distinct_predictions`
WHERE TRUE  -- BigQuery accepts QUALIFY only alongside WHERE, GROUP BY or HAVING
QUALIFY ROW_NUMBER() OVER (PARTITION BY bucket, name ORDER BY generation DESC) = 1
