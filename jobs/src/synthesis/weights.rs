//! A network's weights as a saved model keeps them: each tensor's f32 values, little-endian,
//! in base64 (exact, and a third the size of JSON numbers).

use base64::{engine::general_purpose::STANDARD, Engine};
use candle_core::{Device, Tensor};
use candle_nn::Linear;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A vector of f32 written as base64.
#[derive(Clone, Debug, PartialEq)]
pub struct Floats(pub Vec<f32>);

impl Serialize for Floats {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|v| v.to_le_bytes()).collect();
        serializer.serialize_str(&STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Floats {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = STANDARD.decode(text).map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom("weights are not whole f32 values"));
        }
        Ok(Floats(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }
}

impl Floats {
    pub fn of(tensor: &Tensor) -> candle_core::Result<Floats> {
        Ok(Floats(tensor.flatten_all()?.to_vec1::<f32>()?))
    }

    /// A vector of `len` values.
    pub fn vector(&self, len: usize) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.0.clone(), len, &Device::Cpu)
    }
}

/// A linear layer: `outputs` × `inputs` weights and `outputs` biases.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerFile {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: Floats,
    pub bias: Floats,
}

impl LayerFile {
    pub fn of(linear: &Linear) -> candle_core::Result<LayerFile> {
        let (outputs, inputs) = linear.weight().dims2()?;
        let bias = match linear.bias() {
            Some(bias) => Floats::of(bias)?,
            None => Floats(vec![0.0; outputs]),
        };
        Ok(LayerFile {
            inputs,
            outputs,
            weight: Floats::of(linear.weight())?,
            bias,
        })
    }

    /// The layer, refusing weights of the wrong size.
    pub fn linear(&self) -> candle_core::Result<Linear> {
        let weight = Tensor::from_vec(
            self.weight.0.clone(),
            (self.outputs, self.inputs),
            &Device::Cpu,
        )?;
        Ok(Linear::new(weight, Some(self.bias.vector(self.outputs)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Module;

    #[test]
    fn a_layer_survives_the_file_exactly() {
        let weight = Tensor::from_vec(
            vec![0.1f32, -2.5, 3.0e-8, f32::MAX, 1.0, 7.25],
            (2, 3),
            &Device::Cpu,
        )
        .unwrap();
        let bias = Tensor::from_vec(vec![0.5f32, -0.5], 2, &Device::Cpu).unwrap();
        let layer = Linear::new(weight, Some(bias));
        let json = serde_json::to_string(&LayerFile::of(&layer).unwrap()).unwrap();
        let read: LayerFile = serde_json::from_str(&json).unwrap();
        let x = Tensor::from_vec(vec![1f32, 2.0, 3.0], (1, 3), &Device::Cpu).unwrap();
        assert_eq!(
            layer.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            read.linear()
                .unwrap()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
        let truncated = json.replace(&serde_json::to_string(&read.bias).unwrap(), "\"AAAAAA==\"");
        let short: LayerFile = serde_json::from_str(&truncated).unwrap();
        assert!(
            short.linear().is_err(),
            "a bias of the wrong length is refused"
        );
        assert!(serde_json::from_str::<Floats>("\"AAA=\"").is_err());
    }
}
