//! The synthesis pipeline outside the job system, for `scripts/bench/synthesis`.
//!
//! ```text
//! synthesis fit <input.csv> <rows> <gaussian_copula|tvae|ctgan> <output.csv> [epochs]
//!     fits on every row (or holds out $HOLDOUT of them), seeded by $SEED (default 0),
//!     samples, writes the CSV, prints the report as JSON
//! synthesis score <real.csv> <synthetic.csv> <roles.json>
//!     prints the Quality Report of any synthetic CSV (roles: {"column": "numerical", ...})
//! synthesis sample <input.csv> <rows> <output.parquet> [conditions JSON]
//!     fits a model on every row ($SYNTHESIZER, default gaussian_copula; a network for
//!     $EPOCHS, default 1) and saves it, reads the saved model back (as a `sample` job
//!     does), samples <rows> rows under the conditions and writes them; prints the timings
//!     of the sampling step and of the writing apart, as JSON
//! ```

use conveyor_jobs::{
    limits::Cap,
    synthesis::{
        metrics,
        profile::Role,
        saved::{ConditionMap, ModelFile, Sampler},
        synthesize, table, Quiet, SynthesisPayload, Synthesizer,
    },
};
use shared::datasets::{Compression, Format};
use std::{collections::BTreeMap, path::Path, time::Instant};

fn read(path: &str) -> table::Table {
    // A benchmark's own file: no cap worth having.
    let cap = Cap::new(u64::MAX, "none", "the file");
    table::read(Path::new(path), Format::Csv, Compression::None, cap).expect("readable CSV")
}

fn main() {
    // As the worker runs jobs.
    embed::set_thread_defaults();
    shared::memory::keep_freed_blocks();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fit") if args.len() >= 5 => {
            let input = read(&args[1]);
            let synthesizer = match args[3].as_str() {
                "tvae" => Synthesizer::Tvae,
                "ctgan" => Synthesizer::Ctgan,
                _ => Synthesizer::GaussianCopula,
            };
            let payload = SynthesisPayload {
                dataset_id: uuid::Uuid::nil(),
                rows: args[2].parse().expect("rows"),
                synthesizer,
                epsilon: std::env::var("EPSILON")
                    .ok()
                    .map(|e| e.parse().expect("EPSILON")),
                seed: Some(0),
                // Fit on every row, as the peer does, unless told otherwise.
                holdout_fraction: std::env::var("HOLDOUT")
                    .map_or(0.0, |h| h.parse().expect("HOLDOUT")),
                output_format: Default::default(),
                columns: BTreeMap::new(),
                epochs: args.get(5).map(|e| e.parse().expect("epochs")),
                constraints: Vec::new(),
                save_model: false,
                model_name: None,
            };
            let seed = std::env::var("SEED").map_or(0, |s| s.parse().expect("SEED"));
            let synthesis = synthesize(&input, &payload, seed, &Quiet).expect("synthesis");
            table::write(&synthesis.table, Path::new(&args[4]), false).expect("written");
            println!("{}", synthesis.report);
        }
        Some("score") if args.len() == 4 => {
            let roles: BTreeMap<String, Role> =
                serde_json::from_str(&std::fs::read_to_string(&args[3]).expect("roles file"))
                    .expect("roles JSON");
            let real = read(&args[1]);
            let roles: Vec<(String, Role)> = real
                .columns
                .iter()
                .filter_map(|c| Some((c.name.clone(), *roles.get(&c.name)?)))
                .collect();
            let quality = metrics::quality(&real, &read(&args[2]), &roles, &|| false);
            println!("{}", serde_json::to_string(&quality).expect("JSON"));
        }
        Some("sample") if args.len() >= 4 => {
            let input = read(&args[1]);
            let synthesizer =
                std::env::var("SYNTHESIZER").unwrap_or_else(|_| "gaussian_copula".into());
            let mut payload = serde_json::json!({
                "dataset_id": uuid::Uuid::nil(), "rows": 1, "holdout_fraction": 0.0,
                "save_model": true, "synthesizer": synthesizer,
            });
            if synthesizer != "gaussian_copula" {
                let epochs: u32 = std::env::var("EPOCHS").map_or(1, |e| e.parse().expect("EPOCHS"));
                payload["epochs"] = epochs.into();
            }
            let payload: SynthesisPayload = serde_json::from_value(payload).expect("payload");
            let model = synthesize(&input, &payload, 0, &Quiet)
                .expect("fit")
                .model
                .expect("saved");
            let bytes = model.to_bytes();
            let model = ModelFile::from_bytes(&bytes).expect("model reads back");
            let conditions: ConditionMap = match args.get(4) {
                Some(json) => serde_json::from_str(json).expect("conditions JSON"),
                None => ConditionMap::new(),
            };
            let rows: usize = args[2].parse().expect("rows");
            let started = Instant::now();
            let sampled = Sampler::new(&model, 0)
                .sample(rows, &conditions)
                .expect("sample");
            let sample_seconds = started.elapsed().as_secs_f64();
            let written = Instant::now();
            table::write(&sampled, Path::new(&args[3]), true).expect("written");
            println!(
                "{}",
                serde_json::json!({
                    "rows": sampled.rows(),
                    "columns": sampled.columns.len(),
                    "model_bytes": bytes.len(),
                    "sample_seconds": sample_seconds,
                    "write_seconds": written.elapsed().as_secs_f64(),
                    "rows_per_second": rows as f64 / sample_seconds,
                    "threads": rayon::current_num_threads(),
                })
            );
        }
        _ => {
            eprintln!(
                "usage: synthesis fit <input.csv> <rows> <synthesizer> <output.csv> [epochs]"
            );
            eprintln!("       synthesis score <real.csv> <synthetic.csv> <roles.json>");
            eprintln!("       synthesis sample <input.csv> <rows> <output.parquet> [conditions]");
            std::process::exit(2);
        }
    }
}
