//! The search statement at the database: the tenant check inside it, the sessions' HNSW
//! settings (iterative scans, one round trip), the half-precision index. On a database of
//! its own, with random unit vectors; no API process.

use contracts::ingest::collections::{self as store, Filter, Search, SearchMode};
use shared::testing::TestDatabase;
use uuid::Uuid;

/// `chunks` unit vectors of 384 dimensions in a new collection of `tenant`, from a seed.
async fn collection_with(db: &TestDatabase, tenant: Uuid, chunks: usize, seed: u64) -> Uuid {
    let collection = Uuid::now_v7();
    sqlx::query("INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap) VALUES ($1, $2, $3, 'all-MiniLM-L6-v2', 200, 32)")
        .bind(collection)
        .bind(tenant)
        .bind(collection.to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO documents (collection_id, id, content_hash, chunks, job_id) VALUES ($1, 'doc', 'x', $2, $1)")
        .bind(collection)
        .bind(chunks as i32)
        .execute(&db.pool)
        .await
        .unwrap();
    let vectors: Vec<pgvector::Vector> = (0..chunks)
        .map(|i| pgvector::Vector::from(unit_vector(seed * 1_000_003 + i as u64)))
        .collect();
    let ordinals: Vec<i32> = (0..chunks as i32).collect();
    sqlx::query(
        "INSERT INTO chunks (collection_id, document_id, ordinal, text, embedding)
         SELECT $1, 'doc', o, 'chunk ' || o, v FROM unnest($2::int4[], $3::vector[]) AS u(o, v)",
    )
    .bind(collection)
    .bind(&ordinals)
    .bind(&vectors)
    .execute(&db.pool)
    .await
    .unwrap();
    collection
}

/// A pseudo-random unit vector (splitmix64), the same for the same seed.
pub(crate) fn unit_vector(seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut v: Vec<f32> = (0..384)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) as f64 / u64::MAX as f64 - 0.5) as f32
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Gives the collection's chunks chosen by each of `rows` (in turn, one update each) the text
/// `text` and the vector opposite the searches' query, so that words alone bring them up; then
/// refreshes the planner's statistics.
async fn rewrite_far(db: &TestDatabase, collection: Uuid, text: &str, rows: &[&str]) {
    let far: Vec<f32> = unit_vector(42).iter().map(|x| -x).collect();
    for condition in rows {
        sqlx::query(&format!(
            "UPDATE chunks SET text = {text}, embedding = $2 WHERE collection_id = $1 AND ({condition})"
        ))
        .bind(collection)
        .bind(pgvector::Vector::from(far.clone()))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    sqlx::query("ANALYZE chunks")
        .execute(&db.pool)
        .await
        .unwrap();
}

fn vector_search<'a>(tenant: Uuid, collection: Uuid, k: i64, filter: &'a Filter) -> Search<'a> {
    Search {
        tenant,
        collection,
        query: "chunk",
        vector: Some(unit_vector(42)),
        k,
        mode: SearchMode::Vector,
        filter,
    }
}

/// Another tenant's collection id finds nothing, in every mode: the statement checks the
/// tenant, not only the route.
#[tokio::test]
async fn search_statement_finds_nothing_in_another_tenants_collection() {
    let db = TestDatabase::new().await;
    let (owner, intruder) = (db.tenant().await, db.tenant().await);
    let collection = collection_with(&db, owner, 50, 1).await;
    let filter = Filter::new();
    let found = store::search(&db.pool, vector_search(owner, collection, 5, &filter))
        .await
        .unwrap();
    assert_eq!(found.len(), 5);
    for mode in [SearchMode::Vector, SearchMode::Keyword, SearchMode::Hybrid] {
        for k in [5, 50] {
            let search = Search {
                mode,
                ..vector_search(intruder, collection, k, &filter)
            };
            let stolen = store::search(&db.pool, search).await.unwrap();
            assert!(stolen.is_empty(), "{mode:?} k={k}: {} chunks", stolen.len());
        }
    }
    assert!(store::collection_exists(&db.pool, owner, collection)
        .await
        .unwrap());
    assert!(!store::collection_exists(&db.pool, intruder, collection)
        .await
        .unwrap());
}

/// A small collection beside a large one: an HNSW scan without iterative scans returns its
/// ef_search nearest of all rows and keeps the few that are the small collection's. Every
/// session starts with iterative scans on (no `set_config` round trip before the search), so
/// k results come back, in exact order, with and without a larger k's own candidate list.
#[tokio::test]
async fn search_in_a_small_collection_beside_a_large_one_returns_k_in_order() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    collection_with(&db, tenant, 3000, 2).await;
    let small = collection_with(&db, tenant, 60, 3).await;
    let settings: (String, String) = sqlx::query_as(
        "SELECT current_setting('hnsw.iterative_scan'), current_setting('hnsw.ef_search')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(settings, ("relaxed_order".to_owned(), "100".to_owned()));
    let filter = Filter::new();
    for k in [10, 40] {
        let found = store::search(&db.pool, vector_search(tenant, small, k, &filter))
            .await
            .unwrap();
        assert_eq!(found.len(), k as usize, "k={k}");
        let exact: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM chunks WHERE collection_id = $1 ORDER BY embedding <=> $2, id LIMIT $3",
        )
        .bind(small)
        .bind(pgvector::Vector::from(unit_vector(42)))
        .bind(k)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let got: Vec<i64> = found.iter().map(|h| h.chunk_id).collect();
        let overlap = got.iter().filter(|id| exact.contains(id)).count();
        assert!(
            overlap * 10 >= got.len() * 9,
            "k={k}: {overlap} of {k} exact"
        );
        assert!(found.windows(2).all(|w| w[0].score >= w[1].score));
    }
    // The larger k's candidate list was its transaction's only.
    let after: String = sqlx::query_scalar("SELECT current_setting('hnsw.ef_search')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, "100");
}

/// The search's nearest-neighbour scan is the half-precision HNSW index's (on so few rows the
/// planner would rather scan and sort: it is told not to).
#[tokio::test]
async fn search_uses_the_half_precision_index() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let collection = collection_with(&db, tenant, 200, 4).await;
    let one = shared::db::connect(&db.url, 1).await.unwrap();
    for setting in ["enable_seqscan", "enable_bitmapscan", "enable_sort"] {
        sqlx::query(&format!("SET {setting} = off"))
            .execute(&one)
            .await
            .unwrap();
    }
    let filter = Filter::new();
    for mode in [SearchMode::Vector, SearchMode::Hybrid] {
        let search = Search {
            mode,
            ..vector_search(tenant, collection, 10, &filter)
        };
        let plan: Vec<String> = store::search_statement(&search, "EXPLAIN (COSTS OFF) ")
            .unwrap()
            .build_query_scalar()
            .fetch_all(&one)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using chunks_embedding_half on chunks"),
            "{mode:?}: {plan}"
        );
    }
    let found = store::search(&one, vector_search(tenant, collection, 10, &filter))
        .await
        .unwrap();
    assert_eq!(found.len(), 10);
}

/// Hybrid search's keyword list ranks the chunks holding two of the query's words (and the
/// vector candidates holding one), not every chunk sharing a word: 300 chunks hold "falcon",
/// one holds "amber falcon", all of them far from the query's vector, and no scan of `chunks`
/// by its words hands on more than a few rows. The two-word chunk comes second, tied
/// with the nearest chunk (keyword rank 1 against vector rank 1). Query text is never tsquery
/// syntax: quotes, backslashes and operators search as words.
#[tokio::test]
async fn hybrid_search_ranks_only_chunks_holding_two_query_words() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let collection = collection_with(&db, tenant, 500, 5).await;
    rewrite_far(
        &db,
        collection,
        "CASE WHEN ordinal = 499 THEN 'an amber falcon over the harbour'
         ELSE 'a falcon numbered ' || ordinal END",
        &["ordinal < 300 OR ordinal = 499"],
    )
    .await;
    let filter = Filter::new();
    let hybrid = |query| Search {
        mode: SearchMode::Hybrid,
        query,
        ..vector_search(tenant, collection, 10, &filter)
    };
    let found = store::search(&db.pool, hybrid("amber falcon"))
        .await
        .unwrap();
    let two_words: i64 =
        sqlx::query_scalar("SELECT id FROM chunks WHERE collection_id = $1 AND ordinal = 499")
            .bind(collection)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(found.len(), 10);
    assert_eq!(found[1].chunk_id, two_words, "{found:?}");

    let plan: Vec<sqlx::types::Json<serde_json::Value>> = store::search_statement(
        &hybrid("amber falcon"),
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, FORMAT JSON) ",
    )
    .unwrap()
    .build_query_scalar()
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut nodes = vec![plan[0].0[0]["Plan"].clone()];
    let mut widest = 0;
    while let Some(node) = nodes.pop() {
        let matches_words = ["Filter", "Recheck Cond"]
            .iter()
            .any(|key| node[key].as_str().is_some_and(|c| c.contains("tsv @@")));
        if node["Relation Name"] == "chunks" && matches_words {
            widest = widest.max(node["Actual Rows"].as_f64().unwrap() as i64);
        }
        if let Some(children) = node["Plans"].as_array() {
            nodes.extend(children.iter().cloned());
        }
    }
    assert!(
        widest <= 10,
        "a scan of chunks by words handed on {widest} rows: {}",
        plan[0].0
    );

    for hostile in [
        r"it's a \ back'slash",
        "falcon & ! | ( ) <-> :* 'amber'",
        "''' \\' ''",
        "the of and",
    ] {
        store::search(&db.pool, hybrid(hostile))
            .await
            .unwrap_or_else(|e| panic!("{hostile:?}: {e}"));
    }
}

/// Chunks tied in keyword rank (the same words, as repeated sentences are) are taken by age,
/// lowest id first, in keyword and in hybrid search, whatever order the heap holds them in: the
/// same query gives the same hits. The rewritten rows put the oldest chunks last in the heap,
/// where a limit over the rank alone keeps the ones it read first.
#[tokio::test]
async fn chunks_tied_in_keyword_rank_are_taken_oldest_first() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let collection = collection_with(&db, tenant, 500, 6).await;
    rewrite_far(
        &db,
        collection,
        "'an amber falcon numbered ' || ordinal",
        &["ordinal >= 150 AND ordinal < 300", "ordinal < 150"],
    )
    .await;
    let oldest: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM chunks WHERE collection_id = $1 AND ordinal < 300 ORDER BY id LIMIT 10",
    )
    .bind(collection)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let filter = Filter::new();
    let search = |mode| Search {
        mode,
        query: "amber falcon",
        ..vector_search(tenant, collection, 10, &filter)
    };

    let keyword = store::search(&db.pool, search(SearchMode::Keyword))
        .await
        .unwrap();
    let got: Vec<i64> = keyword.iter().map(|h| h.chunk_id).collect();
    assert_eq!(got, oldest, "keyword");

    // Fused: the keyword list's first five (tied at the top with the vector list's first five).
    let hybrid = store::search(&db.pool, search(SearchMode::Hybrid))
        .await
        .unwrap();
    let words: Vec<i64> = hybrid
        .iter()
        .filter(|h| h.text.starts_with("an amber falcon"))
        .map(|h| h.chunk_id)
        .collect();
    assert_eq!(words, oldest[..5], "hybrid: {hybrid:?}");
}

/// A keyword query matches and ranks by its first 32 lexemes, in its own order: ranking by
/// cover density costs the square of the query's words on every chunk that matches one, and a
/// query of 2,000 characters holds hundreds. A chunk holding only the query's fortieth word is
/// not found; one holding its first is.
#[tokio::test]
async fn a_keyword_query_counts_its_first_32_words() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let collection = collection_with(&db, tenant, 10, 9).await;
    sqlx::query(
        "UPDATE chunks SET text = CASE ordinal WHEN 0 THEN 'term00 here' ELSE 'term39 here' END
         WHERE collection_id = $1 AND ordinal < 2",
    )
    .bind(collection)
    .execute(&db.pool)
    .await
    .unwrap();
    let query: Vec<String> = (0..40).map(|i| format!("term{i:02}")).collect();
    let query = query.join(" ");
    let filter = Filter::new();
    let search = Search {
        mode: SearchMode::Keyword,
        query: &query,
        ..vector_search(tenant, collection, 10, &filter)
    };
    let hits = store::search(&db.pool, search).await.unwrap();
    let texts: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
    assert_eq!(texts, ["term00 here"]);
}

/// Hybrid search's pairs are made of the query's first words in its own order, not the first
/// in the alphabet: a chunk holding two words from past the 32nd ("aa…" and "ab…", sorting
/// first) was a strong match, above chunks holding the query's first words.
#[tokio::test]
async fn hybrid_pairs_come_from_the_querys_first_words() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let collection = collection_with(&db, tenant, 200, 11).await;
    rewrite_far(&db, collection, "'zz00 zz01'", &["ordinal = 0"]).await;
    rewrite_far(&db, collection, "'aaword abword'", &["ordinal = 1"]).await;
    let mut words: Vec<String> = (0..38).map(|i| format!("zz{i:02}")).collect();
    words.extend(["aaword".into(), "abword".into()]);
    let query = words.join(" ");
    let filter = Filter::new();
    let search = Search {
        mode: SearchMode::Hybrid,
        query: &query,
        ..vector_search(tenant, collection, 10, &filter)
    };
    let hits = store::search(&db.pool, search).await.unwrap();
    let texts: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
    assert!(texts.contains(&"zz00 zz01"), "{texts:?}");
    assert!(!texts.contains(&"aaword abword"), "{texts:?}");
}
