//! Embeds the lines of a file with the worker's embedder (for `scripts/bench/embed`).
//!
//! `embed MODEL_DIR SENTENCES OUT`: reads one sentence per line, embeds them all (tokenizing
//! included, model loading not), writes the vectors to OUT as little-endian f32 rows, and
//! prints `{"sentences": n, "seconds": s}`.

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // As the worker runs jobs.
    conveyor_embed::set_thread_defaults();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: embed MODEL_DIR SENTENCES OUT");
    let model = conveyor_embed::Embedder::load(args[1].as_ref())?;
    let text = std::fs::read_to_string(&args[2])?;
    let sentences: Vec<&str> = text.lines().collect();
    model.embed(&sentences[..sentences.len().min(16)])?; // warm-up, as for the reference
    let started = Instant::now();
    let vectors = model.embed(&sentences)?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes: Vec<u8> = vectors
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    std::fs::write(&args[3], bytes)?;
    println!(
        "{}",
        serde_json::json!({"sentences": sentences.len(), "seconds": seconds})
    );
    Ok(())
}
