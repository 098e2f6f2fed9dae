-- Dataset class (predictions.true_label, the class folder) → the ImageNet-1k classes that count
-- as a correct prediction for it, by ImageNet class index (the order every torchvision and
-- EfficientNet ImageNet model uses). Documented source: schemas/class_mapping.json, with a note
-- per class; the rows below are generated from it and tests/test_views.py checks they agree.
--
-- A NULL class_id means ImageNet-1k has NO class for that label. Of the TF flowers set only
-- daisy has one (class 985 'daisy'): rose(s), tulip(s), sunflower(s) and dandelion have none,
-- nor do the sample photos' astronaut, person and coins. The accuracy views report such labels
-- as unmappable (accuracy NULL, counted separately), never as wrong. match_kind 'nearest' marks
-- stand-ins (ImageNet has no motorcycle or rocket class: moped/motor scooter, missile/projectile).
CREATE OR REPLACE VIEW `{project}.{dataset}.class_mapping` AS
-- BEGIN rows generated from schemas/class_mapping.json by pipeline.commands.report.mapping_rows_sql
SELECT 'astronaut' AS true_label, CAST(NULL AS INT64) AS class_id, CAST(NULL AS STRING) AS imagenet_label, 'none' AS match_kind
UNION ALL SELECT 'camera', 732, 'Polaroid camera', 'exact'
UNION ALL SELECT 'camera', 759, 'reflex camera', 'exact'
UNION ALL SELECT 'cat', 281, 'tabby', 'exact'
UNION ALL SELECT 'cat', 282, 'tiger cat', 'exact'
UNION ALL SELECT 'cat', 283, 'Persian cat', 'exact'
UNION ALL SELECT 'cat', 284, 'Siamese cat', 'exact'
UNION ALL SELECT 'cat', 285, 'Egyptian cat', 'exact'
UNION ALL SELECT 'coffee', 504, 'coffee mug', 'exact'
UNION ALL SELECT 'coffee', 967, 'espresso', 'exact'
UNION ALL SELECT 'coffee', 968, 'cup', 'exact'
UNION ALL SELECT 'coins', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'daisy', 985, 'daisy', 'exact'
UNION ALL SELECT 'dandelion', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'motorcycle', 665, 'moped', 'nearest'
UNION ALL SELECT 'motorcycle', 670, 'motor scooter', 'nearest'
UNION ALL SELECT 'palace', 698, 'palace', 'exact'
UNION ALL SELECT 'person', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'rocket', 657, 'missile', 'nearest'
UNION ALL SELECT 'rocket', 744, 'projectile', 'nearest'
UNION ALL SELECT 'rose', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'roses', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'sunflower', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'sunflowers', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'tulip', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
UNION ALL SELECT 'tulips', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'
-- END generated rows
