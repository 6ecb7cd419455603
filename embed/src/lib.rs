//! The embedding model: a BERT sentence encoder (all-MiniLM-L6-v2 by default; weights read with
//! candle, run on the CPU by `bert.rs`), pooled and normalised exactly as sentence-transformers
//! does it (mean of the token vectors under the attention mask, then L2 normalisation).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};
use tokenizers::{Tokenizer, TruncationParams};

mod bert;
use bert::{Bert, Config};

/// The only model this build serves; collections name it.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// Length of its vectors.
pub const DIMENSIONS: usize = 384;

/// Texts tokenized and embedded together.
const ENCODE_BATCH: usize = 256;
/// The model's `max_seq_length` (sentence_bert_config.json), special tokens included. The
/// shipped tokenizer.json truncates at 128 and pads to 128: both are overridden.
pub const MAX_SEQUENCE: usize = 256;

/// candle's element-wise ops on the calling thread, unless the operator has set
/// `CANDLE_NUM_THREADS`. candle splits every op over 64k elements across a pool of its own
/// whose threads spin at a barrier: on cores shared with other jobs, a spinning thread holds
/// a core the waited-for thread needs (a CTGAN test fit: 52 s with the pool, 36 s without,
/// beside a build), and the embedder, whose time is in matrix products (still on every core,
/// through rayon), runs as fast without it (1,500 sentences: 16.8 s either way). Call at the
/// start of `main`, before any thread exists: it sets an environment variable.
pub fn set_thread_defaults() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Why the model could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error(
    "the embedding model could not be loaded from {dir} (CONVEYOR_MODEL_DIR): {reason}; \
     `scripts/model` installs it"
)]
pub struct ModelError {
    pub dir: PathBuf,
    pub reason: String,
}

pub struct Embedder {
    model: Bert,
    /// Truncates at [`MAX_SEQUENCE`], as the model needs.
    tokenizer: Tokenizer,
    /// The same without truncation, to count and split whole documents.
    counter: Tokenizer,
}

impl Embedder {
    /// Reads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let fail = |reason: String| ModelError {
            dir: dir.to_owned(),
            reason,
        };
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            if !dir.join(file).is_file() {
                return Err(fail(format!("{file} is missing")));
            }
        }
        let config = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| fail(format!("config.json: {e}")))?;
        let config: Config =
            serde_json::from_str(&config).map_err(|e| fail(format!("config.json: {e}")))?;
        let mut counter = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        // No padding at all: the model packs each batch's texts end to end (see bert.rs).
        counter.with_padding(None);
        counter
            .with_truncation(None)
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        let mut tokenizer = counter.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_SEQUENCE,
                ..Default::default()
            }))
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        // SAFETY: the weights file is only read, and scripts/model never rewrites it in place.
        let weights = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let model = Bert::load(weights, &config).map_err(|e| fail(format!("weights: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            counter,
        })
    }

    /// The model's tokenizer without truncation: chunking counts and splits with it.
    pub fn counter(&self) -> &Tokenizer {
        &self.counter
    }

    /// One unit vector per text, in order.
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        // A slice's encodings at a time (about 100 bytes a token): a large document's
        // chunks, encoded at once, held GBs.
        let mut vectors = Vec::with_capacity(texts.len());
        for slice in texts.chunks(ENCODE_BATCH) {
            let encodings = self
                .tokenizer
                .encode_batch(slice.to_vec(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
            vectors.extend(self.model.mean_pooled(&ids).into_iter().map(normalized));
        }
        Ok(vectors)
    }
}

/// torch.nn.functional.normalize: x / max(‖x‖, 1e-12).
fn normalized(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}

/// The model, loaded on first use and shared by everything in the process after that.
pub struct SharedEmbedder {
    dir: PathBuf,
    cell: tokio::sync::OnceCell<Arc<Embedder>>,
}

impl SharedEmbedder {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cell: tokio::sync::OnceCell::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded model; the first call loads it (off the async threads). A failed load is
    /// not remembered: a later call tries again.
    pub async fn get(&self) -> Result<Arc<Embedder>, ModelError> {
        self.cell
            .get_or_try_init(|| async {
                let dir = self.dir.clone();
                let loaded = tokio::task::spawn_blocking(move || Embedder::load(&dir)).await;
                loaded
                    .map_err(|e| ModelError {
                        dir: self.dir.clone(),
                        reason: format!("loading panicked: {e}"),
                    })?
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

/// For tests of this crate and its users: the model loaded once per process.
pub mod testing {
    use super::*;

    /// Where `scripts/model` installed the model in this checkout (or `CONVEYOR_MODEL_DIR`).
    pub fn model_dir() -> PathBuf {
        std::env::var("CONVEYOR_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/models/all-MiniLM-L6-v2")
            })
    }

    /// The installed model.
    pub fn installed_model() -> Arc<Embedder> {
        static MODEL: std::sync::OnceLock<Arc<Embedder>> = std::sync::OnceLock::new();
        MODEL
            .get_or_init(|| {
                Arc::new(Embedder::load(&model_dir()).unwrap_or_else(|e| panic!("{e}")))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::installed_model;
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Reference {
        max_seq_length: usize,
        sentences: Vec<Sentence>,
    }

    #[derive(Deserialize)]
    struct Sentence {
        text: String,
        vector: Vec<f32>,
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn vectors_match_sentence_transformers() {
        let reference: Reference =
            serde_json::from_str(include_str!("../fixtures/reference_embeddings.json")).unwrap();
        assert_eq!(reference.max_seq_length, MAX_SEQUENCE);
        assert_eq!(reference.sentences.len(), 50);
        let texts: Vec<&str> = reference
            .sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        let vectors = installed_model().embed(&texts).unwrap();
        for (sentence, vector) in reference.sentences.iter().zip(&vectors) {
            assert_eq!(vector.len(), DIMENSIONS);
            let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "not unit length: {norm}");
            let similarity = cosine(vector, &sentence.vector);
            assert!(
                similarity >= 0.999,
                "cosine {similarity} for {:?}",
                sentence.text
            );
        }
        // Alone or in a batch of others, a text gets the same vector.
        let alone = installed_model().embed(&texts[47..48]).unwrap();
        assert!(cosine(&alone[0], &vectors[47]) > 0.99999);
    }

    /// An activation the encoder does not compute is refused, not run as GELU.
    #[test]
    fn a_model_with_another_activation_is_refused() {
        let dir = std::env::temp_dir().join(format!("relu-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let installed = super::testing::model_dir();
        for file in ["tokenizer.json", "model.safetensors"] {
            let _ = std::fs::remove_file(dir.join(file));
            std::os::unix::fs::symlink(installed.join(file), dir.join(file)).unwrap();
        }
        let config = std::fs::read_to_string(installed.join("config.json")).unwrap();
        let config = config.replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\"");
        assert!(config.contains("relu"));
        std::fs::write(dir.join("config.json"), config).unwrap();
        let error = Embedder::load(&dir).err().expect("relu is refused");
        std::fs::remove_dir_all(&dir).unwrap();
        let message = error.to_string();
        assert!(message.contains("config.json"), "{message}");
        assert!(message.contains("relu"), "{message}");
    }

    #[test]
    fn a_missing_model_names_the_directory_and_the_fix() {
        let error = Embedder::load(Path::new("/nonexistent/model"))
            .err()
            .expect("no model there");
        let message = error.to_string();
        assert!(message.contains("/nonexistent/model"), "{message}");
        assert!(message.contains("config.json is missing"), "{message}");
        assert!(message.contains("scripts/model"), "{message}");
    }
}
