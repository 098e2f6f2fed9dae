-- Drift per window of object_created ({drift_window_seconds} s, BUCKETLENS_DRIFT_WINDOW) against
-- the baseline window (the second one with rows — the first, where uploads began, is rarely
-- whole — or the one holding BUCKETLENS_DRIFT_BASELINE), over classified
-- rows: class_mix is the Jensen–Shannon divergence (base 2, 0 = same mix, 1 = disjoint) of the
-- top-1 label shares; confidence_p10/p50/p90 are top-1 probability quantiles and
-- confidence_drop the baseline's median minus the window's; low_margin_share is the share of
-- rows whose top-1 and top-2 probabilities are closer than {low_margin}, low_margin_rise the
-- window's minus the baseline's. What the stream's drift rules judge (pipeline.drift).
CREATE OR REPLACE VIEW `{project}.{dataset}.drift_windows` AS
WITH runner_up AS (  -- each key's top-2 probability (every copy of a key has the same top5)
  SELECT r.bucket, r.name, r.generation, MAX(t.prob) AS prob
  FROM `{project}.{dataset}.{table}` AS r
  CROSS JOIN UNNEST(r.top5) AS t WITH OFFSET AS o
  WHERE o = 1
  GROUP BY r.bucket, r.name, r.generation
),
classified AS (
  SELECT d.bucket, d.name, d.generation, d.object_created, d.top1_label, d.top1_prob
  FROM `{project}.{dataset}.distinct_predictions` AS d
  WHERE d.status IN ({classified})
),
scored AS (
  SELECT
    TIMESTAMP_SECONDS(DIV(UNIX_SECONDS(c.object_created), {drift_window_seconds})
                      * {drift_window_seconds}) AS window_start,
    c.top1_label,
    c.top1_prob,
    IF(c.top1_prob - IFNULL(r.prob, 0) < {low_margin}, 1, 0) AS low_margin
  FROM classified AS c
  LEFT JOIN runner_up AS r
    ON r.bucket = c.bucket AND r.name = c.name AND r.generation = c.generation
),
stats AS (
  SELECT
    window_start,
    COUNT(*) AS images,
    APPROX_QUANTILES(top1_prob, 10) AS q,
    AVG(low_margin) AS low_margin_share
  FROM scored
  GROUP BY window_start
),
ranked AS (
  SELECT window_start, ROW_NUMBER() OVER (ORDER BY window_start) AS n, COUNT(*) OVER () AS windows
  FROM stats
),
baseline AS (
  SELECT {drift_baseline} AS baseline_start FROM ranked
),
shares AS (
  SELECT window_start, top1_label, COUNT(*) AS n
  FROM scored
  GROUP BY window_start, top1_label
),
mix AS (
  -- every window against every label seen: pw its share in the window, pb in the baseline
  SELECT
    s.window_start,
    IFNULL(w.n, 0) / s.images AS pw,
    IFNULL(b.n, 0) / bs.images AS pb
  FROM stats AS s
  CROSS JOIN baseline
  JOIN stats AS bs ON bs.window_start = baseline.baseline_start
  CROSS JOIN (SELECT DISTINCT top1_label FROM shares) AS l
  LEFT JOIN shares AS w ON w.window_start = s.window_start AND w.top1_label = l.top1_label
  LEFT JOIN shares AS b ON b.window_start = baseline.baseline_start AND b.top1_label = l.top1_label
),
js AS (
  SELECT
    window_start,
    SUM(IF(pw > 0, pw * LOG(2 * pw / (pw + pb), 2), 0)
        + IF(pb > 0, pb * LOG(2 * pb / (pw + pb), 2), 0)) / 2
      AS class_mix
  FROM mix
  GROUP BY window_start
)
SELECT
  s.window_start,
  baseline.baseline_start,
  s.images,
  js.class_mix,
  s.q[OFFSET(1)] AS confidence_p10,
  s.q[OFFSET(5)] AS confidence_p50,
  s.q[OFFSET(9)] AS confidence_p90,
  bs.q[OFFSET(5)] - s.q[OFFSET(5)] AS confidence_drop,
  s.low_margin_share,
  s.low_margin_share - bs.low_margin_share AS low_margin_rise
FROM stats AS s
CROSS JOIN baseline
JOIN stats AS bs ON bs.window_start = baseline.baseline_start
JOIN js ON js.window_start = s.window_start
