//! The embedding model: a BERT sentence encoder (all-MiniLM-L6-v2 by default) run with candle
//! on the CPU, pooled and normalised exactly as sentence-transformers does it (mean of the
//! token vectors under the attention mask, then L2 normalisation).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

/// The only model this build serves; collections name it.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// Length of its vectors.
pub const DIMENSIONS: usize = 384;
/// The model's `max_seq_length` (sentence_bert_config.json), special tokens included. The
/// shipped tokenizer.json truncates at 128 and pads to 128: both are overridden.
pub const MAX_SEQUENCE: usize = 256;
/// Token positions per forward pass (texts × padded length): large enough to keep the matrix
/// products efficient, small enough that the activations stay in cache-friendly sizes.
const BATCH_TOKENS: usize = 4096;
const MAX_BATCH_TEXTS: usize = 64;

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
    model: BertModel,
    /// Truncates at [`MAX_SEQUENCE`], as the model needs.
    tokenizer: Tokenizer,
    /// The same without truncation, to count and split whole documents.
    counter: Tokenizer,
    device: Device,
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
        // Each batch is padded to its own longest text (see `forward`), never to a fixed 128.
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
        let device = Device::Cpu;
        // SAFETY: the weights file is only read, and scripts/model never rewrites it in place.
        let weights = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DTYPE, &device)
        }
        .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(weights, &config).map_err(|e| fail(format!("weights: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            counter,
            device,
        })
    }

    /// The model's tokenizer without truncation: chunking counts and splits with it.
    pub fn counter(&self) -> &Tokenizer {
        &self.counter
    }

    /// One unit vector per text, in order.
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        // Texts of similar length share a batch, so little of each batch is padding.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let mut vectors = vec![Vec::new(); encodings.len()];
        let mut rest = &order[..];
        while !rest.is_empty() {
            let mut size = 1;
            while size < rest.len()
                && size < MAX_BATCH_TEXTS
                && (size + 1) * encodings[rest[size]].len() <= BATCH_TOKENS
            {
                size += 1;
            }
            let (batch, tail) = rest.split_at(size);
            let batch_encodings: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
            for (&i, vector) in batch.iter().zip(self.forward(&batch_encodings)?) {
                vectors[i] = vector;
            }
            rest = tail;
        }
        Ok(vectors)
    }

    /// One forward pass over texts padded to the longest of them.
    fn forward(&self, encodings: &[&Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = encodings.len();
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; rows * len];
        let mut mask = vec![0u32; rows * len];
        for (row, encoding) in encodings.iter().enumerate() {
            let at = row * len;
            ids[at..at + encoding.len()].copy_from_slice(encoding.get_ids());
            mask[at..at + encoding.len()].copy_from_slice(encoding.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (rows, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, len), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;
        // Mean pooling over real tokens, as sentence-transformers' Pooling(mean) does.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        // torch.nn.functional.normalize: x / max(‖x‖, 1e-12).
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2()
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Deserialize;

    /// The model `scripts/model` installed in this checkout (or `CONVEYOR_MODEL_DIR`).
    pub(crate) fn installed_model() -> Arc<Embedder> {
        static MODEL: std::sync::OnceLock<Arc<Embedder>> = std::sync::OnceLock::new();
        MODEL
            .get_or_init(|| {
                let dir = std::env::var("CONVEYOR_MODEL_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| {
                        Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("../.data/models/all-MiniLM-L6-v2")
                    });
                Arc::new(Embedder::load(&dir).unwrap_or_else(|e| panic!("{e}")))
            })
            .clone()
    }

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
        let reference: Reference = serde_json::from_str(include_str!(
            "../../fixtures/ingest/reference_embeddings.json"
        ))
        .unwrap();
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
