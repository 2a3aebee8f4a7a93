//! `vipo sample --dry-run`: the memory a sampling run will need, from the configs and the
//! weight files' headers alone (no weights read), so users can check before a long load.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Parameters (floating-point elements) listed in a safetensors header; reads only the header.
pub fn header_param_count(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::File { path: path.to_path_buf(), msg };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("too short for a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(bad(format!("header of {n} bytes: not a safetensors file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| bad("truncated safetensors header".into()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let obj = json.as_object().ok_or_else(|| bad("safetensors header is not an object".into()))?;
    let mut total = 0u64;
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        if !matches!(dtype, "F32" | "F16" | "BF16" | "F64") {
            continue;
        }
        let shape =
            info.get("shape").and_then(|s| s.as_array()).ok_or_else(|| bad(format!("`{name}` has no shape")))?;
        total += shape.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>();
    }
    Ok(total)
}

/// Shapes that set the activation memory of a Stable Diffusion run.
#[derive(Debug, Clone)]
pub struct SdShapes {
    pub unet_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// The VAE's `block_out_channels`; empty for a pixel-space model (no VAE: no decoder term,
    /// and the UNet runs at the image size).
    pub vae_channels: Vec<usize>,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryEstimate {
    pub weight_bytes: u64,
    pub unet_activation_bytes: u64,
    pub vae_activation_bytes: u64,
    pub peak_bytes: u64,
    pub largest_tensor_bytes: u64,
}

/// Weights at `bytes_per_weight` plus the larger of the UNet's (guidance doubles the batch)
/// and the VAE decoder's (one image at a time, none in pixel space) working sets. A model of what the code keeps
/// alive: skip connections for the up path, plus a transformer block's tensors at the first
/// level (tokens, q/k/v/out, the GEGLU's 8C-wide projection), 4 bytes an element.
pub fn estimate(params: u64, bytes_per_weight: u64, s: &SdShapes) -> MemoryEstimate {
    let b2 = 2 * s.batch as u64;
    // 2^(levels - 1) pixels per latent (8 for SD); 1 without a VAE.
    let f = 1usize << s.vae_channels.len().saturating_sub(1);
    let (h, w) = ((s.height / f) as u64, (s.width / f) as u64);
    let level = |i: usize| (h >> i).max(1) * (w >> i).max(1);
    let c0 = *s.unet_channels.first().unwrap_or(&320) as u64;
    let f0 = b2 * c0 * level(0) * 4;
    let skips: u64 = s
        .unet_channels
        .iter()
        .enumerate()
        .map(|(i, &c)| (s.layers_per_block as u64 + 1) * b2 * c as u64 * level(i) * 4)
        .sum();
    let unet = skips + 20 * f0;
    let geglu = b2 * level(0) * 8 * c0 * 4;
    let cv = s.vae_channels.first().map_or(0, |&c| c as u64);
    let full = (s.height * s.width) as u64;
    let vae_tensor = cv * full * 4;
    let vae = 5 * vae_tensor;
    let weight_bytes = params * bytes_per_weight;
    MemoryEstimate {
        weight_bytes,
        unet_activation_bytes: unet,
        vae_activation_bytes: vae,
        peak_bytes: weight_bytes + unet.max(vae),
        largest_tensor_bytes: geglu.max(vae_tensor).max(f0),
    }
}

pub fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_at_512_is_in_the_expected_range() {
        // SD1.5: 860M UNet + 123M CLIP + 84M VAE parameters.
        let s = SdShapes {
            unet_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            vae_channels: vec![128, 256, 512, 512],
            width: 512,
            height: 512,
            batch: 1,
        };
        let e = estimate(1_066_000_000, 4, &s);
        assert!(e.weight_bytes > 4_000_000_000 && e.weight_bytes < 4_400_000_000);
        // The largest tensor is the decoder's 128-channel 512x512 map: exactly 128 MiB.
        assert_eq!(e.largest_tensor_bytes, 128 << 20);
        assert!(e.peak_bytes < 6 << 30, "{e:?}");
    }

    #[test]
    fn pixel_space_has_no_vae_terms_and_a_full_size_unet() {
        let mut s = SdShapes {
            unet_channels: vec![8, 8, 16, 16],
            layers_per_block: 2,
            vae_channels: vec![],
            width: 32,
            height: 32,
            batch: 1,
        };
        let px = estimate(1000, 4, &s);
        assert_eq!(px.vae_activation_bytes, 0);
        assert_eq!(px.peak_bytes, px.weight_bytes + px.unet_activation_bytes);
        // The same UNet behind an 8x VAE sees 64x fewer positions at the first level.
        s.vae_channels = vec![8, 8, 16, 16];
        s.width = 256;
        s.height = 256;
        let sd = estimate(1000, 4, &s);
        assert_eq!(sd.unet_activation_bytes, px.unet_activation_bytes);
    }
}
