//! The synthesis pipeline outside the job system, for `scripts/bench/synthesis`.
//!
//! ```text
//! synthesis fit <input.csv> <rows> <gaussian_copula|tvae> <output.csv> [epochs]
//!     fits on every row (or holds out $HOLDOUT of them), seeded by $SEED (default 0),
//!     samples, writes the CSV, prints the report as JSON
//! synthesis score <real.csv> <synthetic.csv> <roles.json>
//!     prints the Quality Report of any synthetic CSV (roles: {"column": "numerical", ...})
//! ```

use conveyor_jobs::{
    limits::Cap,
    synthesis::{metrics, profile::Role, synthesize, table, Quiet, SynthesisPayload, Synthesizer},
};
use shared::datasets::{Compression, Format};
use std::{collections::BTreeMap, path::Path};

fn read(path: &str) -> table::Table {
    // A benchmark's own file: no cap worth having.
    let cap = Cap::new(u64::MAX, "none", "the file");
    table::read(Path::new(path), Format::Csv, Compression::None, cap).expect("readable CSV")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fit") if args.len() >= 5 => {
            let input = read(&args[1]);
            let synthesizer = match args[3].as_str() {
                "tvae" => Synthesizer::Tvae,
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
            let quality = metrics::quality(&real, &read(&args[2]), &roles);
            println!("{}", serde_json::to_string(&quality).expect("JSON"));
        }
        _ => {
            eprintln!(
                "usage: synthesis fit <input.csv> <rows> <synthesizer> <output.csv> [epochs]"
            );
            eprintln!("       synthesis score <real.csv> <synthetic.csv> <roles.json>");
            std::process::exit(2);
        }
    }
}
