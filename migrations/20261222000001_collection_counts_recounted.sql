-- The collections' document and chunk counts (20261220000001), counted once more with the
-- locks taken in the order a collection's delete takes them: the collection, then its
-- documents. 20261220000001 locked the documents alone before its one-time count, so a
-- collection deleted while it ran could deadlock it (it failed, and ran again at the next
-- start); a version that locked the collections first ran on some deployments. Counted here
-- again, every deployment's counts are the documents' own, whichever ran.
--
-- Writers of collections and documents wait until this migration commits; the triggers keep
-- the counts from then on.
LOCK TABLE collections IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE documents IN SHARE ROW EXCLUSIVE MODE;

UPDATE collections c
SET documents = counted.documents, chunks = counted.chunks
FROM (SELECT k.id, count(d.collection_id) AS documents, coalesce(sum(d.chunks), 0) AS chunks
      FROM collections k LEFT JOIN documents d ON d.collection_id = k.id
      GROUP BY k.id) counted
WHERE c.id = counted.id
  AND (c.documents, c.chunks) IS DISTINCT FROM (counted.documents, counted.chunks);
