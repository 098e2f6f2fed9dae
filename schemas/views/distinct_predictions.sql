-- One row per key (bucket, name, generation): the raw table can briefly hold two copies of a
-- key when two writers appended it in the same instant (README "Delivery guarantees"; removed
-- by `bucketlens compact`). Every other view reads predictions through this one, so a key is
-- counted once regardless. Of the copies, the earliest processed_at wins (as the MERGE's did).
CREATE OR REPLACE VIEW `{project}.{dataset}.distinct_predictions` AS
SELECT *
FROM `{project}.{dataset}.{table}`
WHERE TRUE  -- BigQuery accepts QUALIFY only alongside WHERE, GROUP BY or HAVING
QUALIFY ROW_NUMBER() OVER (PARTITION BY bucket, name, generation
                           ORDER BY processed_at, batch_id, message_id) = 1
