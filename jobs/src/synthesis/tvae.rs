//! TVAE (Xu et al., 2019) with candle on the CPU: a variational autoencoder over the table's
//! rows, encoded as mode-specific normalised numbers and one-hot labels (`encoding.rs`), with
//! a learned noise scale on each continuous offset.
//!
//! Weights, batches and the latent noise come from one seeded RNG: a seed gives the same model.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{ops::log_softmax, Linear};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    adam::{Adam, Settings},
    copula::ColumnSpec,
    encoding::{
        append_columns, decode, decoded_rows, encode_columns, laid_out, training_fits, Encoded,
        Encoder,
    },
    matmul::dense,
    stats::standard_normal,
    table::{Column, Values},
    weights::LayerFile,
    JobError, Monitor,
};

const HIDDEN: usize = 128;
const LATENT: usize = 64;
const BATCH: usize = 500;
/// Weight of the reconstruction term against the KL term (TVAE's `loss_factor`).
const LOSS_FACTOR: f64 = 2.0;

#[derive(Clone, Debug)]
pub struct Tvae {
    encoders: Vec<Encoder>,
    width: usize,
    decoder: Vec<Linear>,
    /// Learned noise scale of each continuous offset, in row order.
    sigmas: Vec<f64>,
}

fn fail(e: candle_core::Error) -> JobError {
    JobError::Permanent(format!("tvae: {e}"))
}

/// A `fan_in`-uniform (PyTorch's default) linear layer whose weights are variables.
pub(super) fn layer(
    input: usize,
    output: usize,
    rng: &mut StdRng,
) -> candle_core::Result<(Linear, Vec<Var>)> {
    let bound = 1.0 / (input as f64).sqrt();
    let mut uniform = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let weight = Var::from_tensor(&Tensor::from_vec(
        uniform(input * output),
        (output, input),
        &Device::Cpu,
    )?)?;
    let bias = Var::from_tensor(&Tensor::from_vec(uniform(output), output, &Device::Cpu)?)?;
    let linear = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
    Ok((linear, vec![weight, bias]))
}

fn mlp(layers: &[Linear], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    for (i, layer) in layers.iter().enumerate() {
        x = dense(layer, &x)?;
        if i + 1 < layers.len() {
            x = x.relu()?;
        }
    }
    Ok(x)
}

impl Tvae {
    /// Trains for `epochs`, reporting each epoch's loss; stops between epochs when asked.
    pub fn fit(
        columns: &[(&Column, ColumnSpec)],
        epochs: usize,
        seed: u64,
        monitor: &dyn Monitor,
    ) -> Result<Tvae, JobError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let rows = columns.first().map_or(0, |(c, _)| c.values.len());
        let Encoded {
            encoders,
            width,
            data,
        } = encode_columns(columns, |_, width| {
            // Encoder width → 128 → 128 → 2·64, decoder 64 → 128 → 128 → width.
            let (w, h, l) = (width as u64, HIDDEN as u64, LATENT as u64);
            let weights = (w * h + h)
                + (h * h + h)
                + (h * 2 * l + 2 * l)
                + (l * h + h)
                + (h * h + h)
                + (h * w + w);
            training_fits("TVAE", weights, rows, width, monitor.memory_cap())
        })?;
        let scalars: Vec<usize> = encoders
            .iter()
            .filter_map(|e| match e {
                Encoder::Continuous { at, .. } => Some(*at),
                Encoder::Discrete { .. } => None,
            })
            .collect();
        let groups: Vec<(usize, usize)> = encoders.iter().map(Encoder::group).collect();

        let device = Device::Cpu;
        let mut vars = Vec::new();
        let mut stack = |sizes: &[usize], rng: &mut StdRng| -> candle_core::Result<Vec<Linear>> {
            let mut layers = Vec::new();
            for pair in sizes.windows(2) {
                let (linear, v) = layer(pair[0], pair[1], rng)?;
                layers.push(linear);
                vars.extend(v);
            }
            Ok(layers)
        };
        let encoder_net = stack(&[width, HIDDEN, HIDDEN, 2 * LATENT], &mut rng).map_err(fail)?;
        let decoder = stack(&[LATENT, HIDDEN, HIDDEN, width], &mut rng).map_err(fail)?;
        let log_sigma = Var::from_tensor(
            &Tensor::full((0.1f32).ln(), scalars.len().max(1), &device).map_err(fail)?,
        )
        .map_err(fail)?;
        vars.push(log_sigma.clone());
        let mut optimizer = Adam::new(
            vars,
            Settings {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-5,
            },
        );

        let scalar_index = Tensor::from_vec(
            scalars.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            scalars.len(),
            &device,
        )
        .map_err(fail)?;
        // Small tables get smaller batches, so that they still take enough steps.
        let batch_size = BATCH.min(rows.div_ceil(10).max(32)).min(rows).max(1);
        let mut order: Vec<usize> = (0..rows).collect();
        for epoch in 1..=epochs {
            monitor.checkpoint()?;
            order.shuffle(&mut rng);
            let mut total = 0.0;
            let mut batches = 0;
            for chunk in order.chunks(batch_size) {
                let mut batch = Vec::with_capacity(chunk.len() * width);
                for &row in chunk {
                    batch.extend_from_slice(&data[row * width..(row + 1) * width]);
                }
                let noise: Vec<f32> = (0..chunk.len() * LATENT)
                    .map(|_| standard_normal(&mut rng) as f32)
                    .collect();
                let loss = (|| -> candle_core::Result<Tensor> {
                    let x = Tensor::from_vec(batch, (chunk.len(), width), &device)?;
                    let eps = Tensor::from_vec(noise, (chunk.len(), LATENT), &device)?;
                    let h = mlp(&encoder_net, &x)?;
                    let mu = h.narrow(1, 0, LATENT)?;
                    let log_var = h.narrow(1, LATENT, LATENT)?;
                    let z = (&mu + (&eps * (&log_var * 0.5)?.exp()?)?)?;
                    let out = mlp(&decoder, &z)?;
                    let mut reconstruction = Tensor::zeros((), DType::F32, &device)?;
                    if !scalars.is_empty() {
                        let target = x.index_select(&scalar_index, 1)?;
                        let predicted = out.index_select(&scalar_index, 1)?.tanh()?;
                        let sigma = log_sigma.as_tensor().exp()?;
                        let squared = (target - predicted)?
                            .sqr()?
                            .broadcast_div(&(sigma.sqr()? * 2.0)?)?
                            .sum_all()?;
                        let log_terms = (log_sigma.as_tensor().sum_all()? * chunk.len() as f64)?;
                        reconstruction = (reconstruction + squared + log_terms)?;
                    }
                    for &(start, len) in &groups {
                        let logits = out.narrow(1, start, len)?;
                        let target = x.narrow(1, start, len)?;
                        let cross_entropy = (log_softmax(&logits, D::Minus1)? * target)?
                            .sum_all()?
                            .neg()?;
                        reconstruction = (reconstruction + cross_entropy)?;
                    }
                    let kl = ((log_var.exp()? + mu.sqr()? - &log_var)? - 1.0)?.sum_all()? * 0.5;
                    ((reconstruction * LOSS_FACTOR)? + kl)? / chunk.len() as f64
                })()
                .map_err(fail)?;
                optimizer.backward_step(&loss).map_err(fail)?;
                // The noise scale stays in TVAE's range.
                let clamped = log_sigma
                    .as_tensor()
                    .clamp((0.01f32).ln(), 0.0f32)
                    .map_err(fail)?;
                log_sigma.set(&clamped).map_err(fail)?;
                total += loss.to_scalar::<f32>().map_err(fail)? as f64;
                batches += 1;
            }
            monitor.epoch(epoch, epochs, total / batches.max(1) as f64);
        }
        let sigmas = log_sigma
            .as_tensor()
            .exp()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(fail)?
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Tvae {
            encoders,
            width,
            decoder,
            sigmas,
        })
    }

    /// `rows` synthetic rows, one column per learned column.
    pub fn sample(&self, rows: usize, seed: u64) -> Result<Vec<Values>, JobError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut columns = Vec::with_capacity(self.encoders.len());
        let chunk = decoded_rows(&self.encoders);
        let mut left = rows;
        loop {
            let n = left.min(chunk);
            let decoded = self.generate(n, &mut rng)?;
            let mut sigma = self.sigmas.iter();
            let part = self
                .encoders
                .iter()
                .map(|encoder| {
                    let sigma = match encoder {
                        Encoder::Continuous { .. } => *sigma.next().unwrap_or(&0.0),
                        Encoder::Discrete { .. } => 0.0,
                    };
                    decode(encoder, &decoded, sigma, false, &mut rng)
                })
                .collect();
            append_columns(&mut columns, part);
            left -= n;
            if left == 0 {
                return Ok(columns);
            }
        }
    }

    /// The decoder's raw outputs for `rows` rows.
    fn generate(&self, rows: usize, rng: &mut StdRng) -> Result<Vec<Vec<f32>>, JobError> {
        let mut decoded: Vec<Vec<f32>> = Vec::with_capacity(rows);
        let mut done = 0;
        while done < rows {
            let n = (rows - done).min(1000);
            let z: Vec<f32> = (0..n * LATENT)
                .map(|_| standard_normal(rng) as f32)
                .collect();
            let out = Tensor::from_vec(z, (n, LATENT), &Device::Cpu)
                .and_then(|z| mlp(&self.decoder, &z))
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(fail)?;
            decoded.extend(out);
            done += n;
        }
        Ok(decoded)
    }

    /// Width of an encoded row.
    pub fn width(&self) -> usize {
        self.width
    }

    pub(super) fn encoders(&self) -> &[Encoder] {
        &self.encoders
    }
}

/// A fitted TVAE as a saved model keeps it: the columns' encodings, the decoder and the
/// noise scales (the encoder network only serves training).
#[derive(Serialize, Deserialize)]
struct TvaeFile {
    encoders: Vec<Encoder>,
    width: usize,
    decoder: Vec<LayerFile>,
    sigmas: Vec<f64>,
}

impl Serialize for Tvae {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let decoder = self
            .decoder
            .iter()
            .map(LayerFile::of)
            .collect::<candle_core::Result<_>>()
            .map_err(serde::ser::Error::custom)?;
        TvaeFile {
            encoders: self.encoders.clone(),
            width: self.width,
            decoder,
            sigmas: self.sigmas.clone(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Tvae {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let file = TvaeFile::deserialize(deserializer)?;
        let sizes: Vec<(usize, usize)> =
            file.decoder.iter().map(|l| (l.inputs, l.outputs)).collect();
        let chained = sizes.windows(2).all(|pair| pair[0].1 == pair[1].0);
        if !chained
            || sizes.first().map(|s| s.0) != Some(LATENT)
            || sizes.last().map(|s| s.1) != Some(file.width)
            || laid_out(&file.encoders) != Some(file.width)
        {
            return Err(serde::de::Error::custom(
                "the decoder's layers do not fit the model's columns",
            ));
        }
        let decoder = file
            .decoder
            .iter()
            .map(LayerFile::linear)
            .collect::<candle_core::Result<_>>()
            .map_err(serde::de::Error::custom)?;
        Ok(Tvae {
            encoders: file.encoders,
            width: file.width,
            decoder,
            sigmas: file.sigmas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::{copula::plain_specs, stats::pearson, Quiet};
    use polars::prelude::DataType;
    use std::sync::Mutex;

    fn columns(n: usize) -> Vec<Column> {
        let mut rng = StdRng::seed_from_u64(11);
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut c = Vec::new();
        for i in 0..n {
            // Bimodal x; y follows x; the label follows the mode.
            let high = i % 3 == 0;
            let v = if high { 100.0 } else { 10.0 } + standard_normal(&mut rng) * 2.0;
            x.push(Some(v));
            y.push((i % 10 != 0).then_some(v * 0.5 + standard_normal(&mut rng)));
            c.push(Some(if high { "big" } else { "small" }.to_owned()));
        }
        vec![
            Column::numbers("x", DataType::Float64, x),
            Column::numbers("y", DataType::Float64, y),
            Column::labels("c", c),
        ]
    }

    struct Losses(Mutex<Vec<f64>>);

    impl Monitor for Losses {
        fn stage(&self, _: f32, _: &str) {}
        fn epoch(&self, _: usize, _: usize, loss: f64) {
            self.0.lock().unwrap().push(loss);
        }
        fn checkpoint(&self) -> Result<(), shared::Cancelled> {
            Ok(())
        }
    }

    #[test]
    fn trains_reports_each_epoch_and_reproduces_the_structure() {
        let data = columns(600);
        let losses = Losses(Mutex::new(Vec::new()));
        let model = Tvae::fit(&plain_specs(&data), 40, 5, &losses).unwrap();
        let losses = losses.0.into_inner().unwrap();
        assert_eq!(losses.len(), 40);
        assert!(losses[39] < losses[0], "{losses:?}");

        let sample = model.sample(600, 6).unwrap();
        let Values::Numbers(x) = &sample[0] else {
            panic!()
        };
        let Values::Numbers(y) = &sample[1] else {
            panic!()
        };
        let Values::Labels(c) = &sample[2] else {
            panic!()
        };
        let big = c.iter().filter(|v| v.as_deref() == Some("big")).count() as f64 / 600.0;
        assert!((big - 1.0 / 3.0).abs() < 0.12, "{big}");
        assert!(x.iter().flatten().all(|v| (-20.0..140.0).contains(v)));
        let r = pearson(x, y).unwrap();
        assert!(r > 0.7, "{r}");
        let missing = y.iter().filter(|v| v.is_none()).count();
        assert!(missing < 200, "{missing}");
        // Same seeds, same rows.
        assert_eq!(
            model.sample(50, 6).unwrap()[0],
            model.sample(50, 6).unwrap()[0]
        );
    }

    /// A sample decodes its rows a part at a time: the raw outputs of every requested row (a
    /// float per level of a wide column, and a vector per row) were held until all were drawn.
    #[test]
    fn a_large_sample_holds_the_raw_outputs_of_a_part_at_a_time() {
        let labels = (0..2000)
            .map(|i| Some(format!("level{}", i % 200)))
            .collect();
        let data = vec![Column::labels("c", labels)];
        let model = Tvae::fit(&plain_specs(&data), 1, 5, &Quiet).unwrap();
        assert!(model.width() >= 100, "{}", model.width());
        let rows = 150_000;
        let (sample, held) = crate::allocated::peak(|| model.sample(rows, 1).unwrap());
        assert_eq!(sample[0].len(), rows);
        // The sample's own labels take about 5 MB; one part's raw outputs 16 MiB.
        assert!(held < 32 << 20, "{} MB held", held >> 20);
    }

    #[test]
    fn stops_between_epochs_when_cancelled() {
        struct Stop;
        impl Monitor for Stop {
            fn stage(&self, _: f32, _: &str) {}
            fn epoch(&self, _: usize, _: usize, _: f64) {}
            fn checkpoint(&self) -> Result<(), shared::Cancelled> {
                Err(shared::Cancelled)
            }
        }
        let data = columns(50);
        assert!(matches!(
            Tvae::fit(&plain_specs(&data), 5, 1, &Stop),
            Err(JobError::Cancelled(_))
        ));
        assert!(Tvae::fit(&plain_specs(&data), 1, 1, &Quiet).is_ok());
    }
}
