-- One row per key (bucket, name, generation, model_version) of the embeddings table, which can
-- briefly hold two copies of a key when two writers appended it in the same instant (as
-- distinct_predictions does for predictions; README "Delivery guarantees"). Of the copies, the
-- earliest processed_at wins. The similar_* views need the embeddings table: a dataset
-- provisioned before it existed gets them from `python -m deploy apply`.
CREATE OR REPLACE VIEW `{project}.{dataset}.distinct_embeddings` AS
SELECT *
FROM `{project}.{dataset}.{embeddings}`
WHERE TRUE  -- BigQuery accepts QUALIFY only alongside WHERE, GROUP BY or HAVING
QUALIFY ROW_NUMBER() OVER (PARTITION BY bucket, name, generation, model_version
                           ORDER BY processed_at, batch_id, message_id) = 1
