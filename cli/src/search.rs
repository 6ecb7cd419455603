//! `conveyor search COLLECTION "query"`: a collection's ranked chunks, by vector, keyword or
//! hybrid search, optionally filtered on their metadata.

use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::process::ExitCode;
use uuid::Uuid;

use crate::{print_json, read_payload, table::Table, Client};

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    Vector,
    Keyword,
    Hybrid,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Vector => "vector",
            Mode::Keyword => "keyword",
            Mode::Hybrid => "hybrid",
        }
    }
}

#[derive(Args)]
pub struct Search {
    /// The collection's id or name.
    collection: String,
    query: String,
    #[arg(long, value_enum, default_value = "hybrid")]
    mode: Mode,
    /// How many chunks, 1-100.
    #[arg(short, long, default_value_t = 10)]
    k: i64,
    /// Metadata conditions, all of which must hold: `{"lang": "en"}` or
    /// `{"tag": {"in": ["a", "b"]}}` (inline JSON or a file).
    #[arg(long)]
    filter: Option<String>,
}

/// A chunk's text on one line, cut to `max` characters.
fn excerpt(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        line
    } else {
        format!("{}…", line.chars().take(max - 1).collect::<String>())
    }
}

/// The collection's id: the argument itself, or the id of the tenant's collection of that name.
async fn collection_id(client: &Client, collection: &str) -> anyhow::Result<Uuid> {
    if let Ok(id) = collection.parse() {
        return Ok(id);
    }
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "500".to_owned())];
        query.extend(cursor.map(|c| ("cursor", c)));
        let page = client
            .send(client.get("/v1/collections").query(&query))
            .await?;
        for c in page["collections"].as_array().into_iter().flatten() {
            if c["name"] == collection {
                return Ok(c["id"].as_str().unwrap_or_default().parse()?);
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => anyhow::bail!("no collection named {collection:?}"),
        }
    }
}

pub async fn search(client: &Client, args: Search) -> anyhow::Result<ExitCode> {
    let id = collection_id(client, &args.collection).await?;
    let mut body = json!({"query": args.query, "mode": args.mode.name(), "k": args.k});
    if let Some(filter) = &args.filter {
        body["filter"] = read_payload(filter)?;
    }
    let found = client
        .send(
            client
                .post(&format!("/v1/collections/{id}/search"))
                .json(&body),
        )
        .await?;
    if client.json {
        print_json(&found);
        return Ok(ExitCode::SUCCESS);
    }
    let hits = found["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if hits.is_empty() {
        out!("no chunks match");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(
        &["#", "SCORE", "DOCUMENT", "CHUNK", "METADATA", "TEXT"],
        &[true, true, false, true, false, false],
    );
    for (rank, hit) in hits.iter().enumerate() {
        let metadata = match &hit["metadata"] {
            Value::Object(m) if m.is_empty() => String::new(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        table.row(vec![
            (rank + 1).to_string(),
            format!("{:.4}", hit["score"].as_f64().unwrap_or(0.0)),
            hit["document_id"].as_str().unwrap_or("?").to_owned(),
            hit["chunk_id"].to_string(),
            excerpt(&metadata, 40),
            excerpt(hit["text"].as_str().unwrap_or(""), 80),
        ]);
    }
    put!("{}", table.render());
    Ok(ExitCode::SUCCESS)
}
