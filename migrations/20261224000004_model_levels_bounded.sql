-- A model's schema lists at most 1,000 levels a column, each at most 256 bytes as JSON, with
-- `more_levels` set where it left some out (`shared::saved_models::ModelColumn::with_levels`).
-- Models saved before held every level (millions, for a categorical of unique values), and
-- every list, read and sample submission read them whole: trimmed here the same way.
UPDATE models m
SET schema = (
    SELECT jsonb_agg(
               CASE WHEN jsonb_typeof(c -> 'levels') = 'array'
                         AND (jsonb_array_length(c -> 'levels') > 1000
                              OR EXISTS (SELECT 1 FROM jsonb_array_elements(c -> 'levels') l
                                         WHERE octet_length(l::text) > 256))
                    THEN c || jsonb_build_object(
                        'levels',
                        (SELECT coalesce(jsonb_agg(kept.l ORDER BY kept.n), '[]'::jsonb)
                         FROM (SELECT l, n
                               FROM jsonb_array_elements(c -> 'levels') WITH ORDINALITY AS e(l, n)
                               WHERE octet_length(l::text) <= 256
                               ORDER BY n
                               LIMIT 1000) AS kept),
                        'more_levels', true)
                    ELSE c END
               ORDER BY at)
    FROM jsonb_array_elements(m.schema) WITH ORDINALITY AS t(c, at)
)
WHERE jsonb_typeof(m.schema) = 'array'
  AND EXISTS (SELECT 1 FROM jsonb_array_elements(m.schema) c
              WHERE jsonb_typeof(c -> 'levels') = 'array'
                AND (jsonb_array_length(c -> 'levels') > 1000
                     OR EXISTS (SELECT 1 FROM jsonb_array_elements(c -> 'levels') l
                                WHERE octet_length(l::text) > 256)));
