//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE): an encoder from images in [-1, 1] to a
//! diagonal Gaussian over latents, and a decoder back. Struct fields follow the checkpoint keys
//! (`encoder.down_blocks.0.resnets.0.conv1.weight`, `decoder.up_blocks.1.upsamplers.0.conv.bias`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::{Attention, Conv2d, GroupNorm, ResnetBlock2D};
use crate::params::{ParamPath, ParamStore};
use crate::tensor::Tensor;

/// diffusers hard-codes this eps for every norm of the VAE.
const EPS: f32 = 1e-6;

/// `sample_size`: one number (square) or (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

/// `config.json` of an `AutoencoderKL`. Unknown keys are ignored; values vipo cannot run are
/// rejected by [`AutoencoderKLConfig::validate`] naming the key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f32,
    /// Subtracted before scaling (SD3, Flux); null for SD 1.x / 2.x / XL.
    #[serde(default)]
    pub shift_factor: Option<f32>,
    /// Per-channel latent statistics some pipelines apply (Playground); not supported.
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_channels() -> Vec<usize> {
    vec![64]
}
fn default_act() -> String {
    "silu".into()
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f32 {
    0.18215
}

fn bad_config(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("AutoencoderKL config: `{key}` {msg}"))
}

impl AutoencoderKLConfig {
    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<AutoencoderKLConfig> {
        let c: AutoencoderKLConfig = serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("AutoencoderKL config: not a valid config.json ({e})")))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates `path`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<AutoencoderKLConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        AutoencoderKLConfig::from_json(&text).map_err(|e| Error::File { path: path.to_path_buf(), msg: e.to_string() })
    }

    /// Rejects what this implementation cannot run, naming the key and the value.
    pub fn validate(&self) -> Result<()> {
        if let Some(c) = &self.class_name {
            if c != "AutoencoderKL" {
                return Err(bad_config("_class_name", format!("is {c:?}; this loader reads AutoencoderKL")));
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(bad_config("block_out_channels", "is empty"));
        }
        for (key, types, want) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(bad_config(key, format!("has {} entries but `block_out_channels` has {n}", types.len())));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != want) {
                return Err(bad_config(&format!("{key}[{i}]"), format!("= {t:?} is not supported (only {want})")));
            }
        }
        if self.act_fn != "silu" {
            return Err(bad_config("act_fn", format!("= {:?} is not supported (only \"silu\")", self.act_fn)));
        }
        if self.norm_num_groups == 0 {
            return Err(bad_config("norm_num_groups", "is 0"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return Err(bad_config(
                "block_out_channels",
                format!("holds {c}, which does not split into `norm_num_groups` = {} groups", self.norm_num_groups),
            ));
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            if v == 0 {
                return Err(bad_config(key, "is 0"));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(bad_config("scaling_factor", format!("= {} must be finite and non-zero", self.scaling_factor)));
        }
        if let Some(s) = self.shift_factor {
            if !s.is_finite() {
                return Err(bad_config("shift_factor", format!("= {s} is not finite")));
            }
        }
        for (key, v) in [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(bad_config(key, "is set; per-channel latent statistics are not supported (expected null)"));
            }
        }
        Ok(())
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior over latents, logvar
/// already clamped to [-30, 20].
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,   // (B, latent, h, w)
    pub logvar: Tensor, // (B, latent, h, w)
}

impl DiagonalGaussian {
    /// moments (B, 2 * latent, h, w) = cat(mean, logvar) along channels.
    pub fn from_moments(moments: &Tensor) -> Result<DiagonalGaussian> {
        let &[_, c2, _, _] = moments.shape() else {
            return Err(Error::shape(
                "DiagonalGaussian",
                format!("moments {:?}: expected (B, 2C, h, w)", moments.shape()),
            ));
        };
        if c2 % 2 != 0 {
            return Err(Error::shape("DiagonalGaussian", format!("moments {:?}: odd channel count", moments.shape())));
        }
        let c = c2 / 2;
        Ok(DiagonalGaussian { mean: moments.slice(1, 0, c)?, logvar: moments.slice(1, c, c)?.clamp(-30.0, 20.0)? })
    }

    /// exp(logvar / 2).
    pub fn std(&self) -> Result<Tensor> {
        self.logvar.mul_scalar(0.5)?.exp()
    }

    pub fn var(&self) -> Result<Tensor> {
        self.logvar.exp()
    }

    /// mean + std * noise, noise (B, latent, h, w) standard normal.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.shape() != self.mean.shape() {
            return Err(Error::shape(
                "DiagonalGaussian::sample",
                format!("noise {:?} for a distribution of shape {:?}", noise.shape(), self.mean.shape()),
            ));
        }
        self.mean.add(&self.std()?.mul(noise)?)
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

fn dims4(op: &'static str, x: &Tensor) -> Result<[usize; 4]> {
    match *x.shape() {
        [b, c, h, w] => Ok([b, c, h, w]),
        _ => Err(Error::shape(op, format!("expected (B, C, H, W), got {:?}", x.shape()))),
    }
}

/// diffusers' `Downsample2D` with `padding=0`: zeros on the right and bottom, then a 3x3
/// stride-2 conv without padding (LDM's layout; not symmetric padding 1).
#[derive(Clone)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    pub fn load(vb: &ParamPath, channels: usize) -> Result<Downsample2D> {
        Ok(Downsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, 0)? })
    }

    /// x (B, C, H, W) -> (B, C, H / 2, W / 2) (rounded like the conv).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&x.pad_axis(3, 0, 1)?.pad_axis(2, 0, 1)?)
    }
}

/// diffusers' `Upsample2D`: nearest 2x, then a 3x3 conv.
#[derive(Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: &ParamPath, channels: usize) -> Result<Upsample2D> {
        Ok(Upsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    /// x (B, C, H, W) -> (B, C, 2H, 2W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&x.upsample_nearest2x()?)
    }
}

/// The mid block's attention (diffusers' `Attention` with `group_norm`, one head,
/// `residual_connection`): group norm, self-attention over the H * W positions, plus the input.
/// `attention`'s `to_q/to_k/to_v/to_out.0` sit directly under this block's prefix.
#[derive(Clone)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub attention: Attention,
}

impl VaeAttention {
    pub fn load(vb: &ParamPath, channels: usize, groups: usize) -> Result<VaeAttention> {
        Ok(VaeAttention {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, EPS)?,
            attention: Attention::load(vb, channels, channels, 1, channels, true)?,
        })
    }

    /// x (B, C, H, W) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = dims4("VaeAttention", x)?;
        let tokens = self.group_norm.forward(x)?.reshape_to(&[b, c, h * w])?.permute(&[0, 2, 1])?; // (B, HW, C)
        let o = self.attention.forward(&tokens, None)?; // (B, HW, C)
        x.add(&o.permute(&[0, 2, 1])?.reshape_to(&[b, c, h, w])?)
    }
}

/// diffusers' `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Clone)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<VaeAttention>,
}

impl UNetMidBlock2D {
    pub fn load(vb: &ParamPath, channels: usize, groups: usize, add_attention: bool) -> Result<UNetMidBlock2D> {
        let r = vb.pp("resnets");
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::load(&r.pp(i), channels, channels, None, groups, EPS))
            .collect::<Result<Vec<_>>>()?;
        let attentions = match add_attention {
            true => vec![VaeAttention::load(&vb.pp("attentions").pp(0), channels, groups)?],
            false => Vec::new(),
        };
        Ok(UNetMidBlock2D { resnets, attentions })
    }

    /// x (B, C, h, w) -> (B, C, h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((first, rest)) = self.resnets.split_first() else {
            return Err(Error::Invalid("UNetMidBlock2D: no resnets".into()));
        };
        let mut h = first.forward(x, None)?;
        for a in &self.attentions {
            h = a.forward(&h)?;
        }
        for r in rest {
            h = r.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// `DownEncoderBlock2D`: resnets, then a downsampler except on the last level.
#[derive(Clone)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn load(
        vb: &ParamPath,
        cin: usize,
        cout: usize,
        layers: usize,
        groups: usize,
        downsample: bool,
    ) -> Result<DownEncoderBlock2D> {
        let r = vb.pp("resnets");
        let resnets = (0..layers)
            .map(|i| ResnetBlock2D::load(&r.pp(i), if i == 0 { cin } else { cout }, cout, None, groups, EPS))
            .collect::<Result<Vec<_>>>()?;
        let downsamplers = match downsample {
            true => vec![Downsample2D::load(&vb.pp("downsamplers").pp(0), cout)?],
            false => Vec::new(),
        };
        Ok(DownEncoderBlock2D { resnets, downsamplers })
    }

    /// x (B, Cin, H, W) -> (B, Cout, H', W').
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        for d in &self.downsamplers {
            h = d.forward(&h)?;
        }
        Ok(h)
    }
}

/// `UpDecoderBlock2D`: resnets, then an upsampler except on the last level.
#[derive(Clone)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn load(
        vb: &ParamPath,
        cin: usize,
        cout: usize,
        layers: usize,
        groups: usize,
        upsample: bool,
    ) -> Result<UpDecoderBlock2D> {
        let r = vb.pp("resnets");
        let resnets = (0..layers)
            .map(|i| ResnetBlock2D::load(&r.pp(i), if i == 0 { cin } else { cout }, cout, None, groups, EPS))
            .collect::<Result<Vec<_>>>()?;
        let upsamplers = match upsample {
            true => vec![Upsample2D::load(&vb.pp("upsamplers").pp(0), cout)?],
            false => Vec::new(),
        };
        Ok(UpDecoderBlock2D { resnets, upsamplers })
    }

    /// x (B, Cin, h, w) -> (B, Cout, h', w').
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        for u in &self.upsamplers {
            h = u.forward(&h)?;
        }
        Ok(h)
    }
}

/// The VAE's `Encoder`: image -> moments (2 * latent channels).
#[derive(Clone)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn load(vb: &ParamPath, cfg: &AutoencoderKLConfig) -> Result<Encoder> {
        let ch = &cfg.block_out_channels;
        let (g, top) = (cfg.norm_num_groups, ch[ch.len() - 1]);
        let db = vb.pp("down_blocks");
        let down_blocks = (0..ch.len())
            .map(|i| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                DownEncoderBlock2D::load(&db.pp(i), cin, ch[i], cfg.layers_per_block, g, i + 1 < ch.len())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: UNetMidBlock2D::load(&vb.pp("mid_block"), top, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, top, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), top, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    /// x (B, in, H, W) -> (B, 2 * latent, h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The VAE's `Decoder`: latents -> image.
#[derive(Clone)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: UNetMidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    pub fn load(vb: &ParamPath, cfg: &AutoencoderKLConfig) -> Result<Decoder> {
        // diffusers walks the channels from the deepest level up.
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let ub = vb.pp("up_blocks");
        let up_blocks = (0..rev.len())
            .map(|i| {
                let cin = if i == 0 { rev[0] } else { rev[i - 1] };
                UpDecoderBlock2D::load(&ub.pp(i), cin, rev[i], cfg.layers_per_block + 1, g, i + 1 < rev.len())
            })
            .collect::<Result<Vec<_>>>()?;
        let bottom = rev[rev.len() - 1];
        Ok(Decoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid_block: UNetMidBlock2D::load(&vb.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, bottom, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), bottom, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// z (B, latent, h, w) -> (B, out, H, W).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// Old diffusers names of the mid-block attention's projections (before 0.14) -> current ones.
const LEGACY_ATTENTION_NAMES: [(&str, &str); 4] =
    [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];

/// The current name of a legacy attention key (`...attentions.0.query.weight` ->
/// `...attentions.0.to_q.weight`), or None when `key` is not one.
fn legacy_attention_rename(key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    let i = parts.iter().position(|&p| p == "attentions")?;
    let old = *parts.get(i + 2)?;
    let (_, new) = LEGACY_ATTENTION_NAMES.iter().find(|(o, _)| *o == old)?;
    let mut out: Vec<&str> = parts[..i + 2].to_vec();
    out.push(new);
    out.extend(&parts[i + 3..]);
    Some(out.join("."))
}

/// Renames old attention keys (`query/key/value/proj_attn`) to diffusers' current
/// `to_q/to_k/to_v/to_out.0`, as diffusers does when it loads such a checkpoint. A store without
/// old keys comes back unchanged; a store with both spellings of one key is an error.
pub fn convert_legacy_attention_keys(store: ParamStore) -> Result<ParamStore> {
    if !store.iter().any(|(k, _)| legacy_attention_rename(k).is_some()) {
        return Ok(store);
    }
    let mut out = ParamStore::new();
    for (k, p) in store.iter() {
        let name = legacy_attention_rename(k).unwrap_or_else(|| k.to_string());
        if out.contains(&name) || (name != k && store.contains(&name)) {
            return Err(Error::Invalid(format!("AutoencoderKL: the checkpoint holds both `{k}` and `{name}`")));
        }
        out.insert(name, p.frozen_value(), p.is_trainable())?;
    }
    Ok(out)
}

/// diffusers' `AutoencoderKL`. Owns the store its layers were built from.
pub struct AutoencoderKL {
    pub config: AutoencoderKLConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    store: ParamStore,
}

impl AutoencoderKL {
    /// Builds the model from diffusers' keys in `store` (old attention names are converted
    /// first); a missing, wrongly shaped or unused key is an error naming it.
    pub fn load(store: ParamStore, config: &AutoencoderKLConfig) -> Result<AutoencoderKL> {
        config.validate()?;
        let config = config.clone();
        let store = convert_legacy_attention_keys(store)?;
        let root = store.pp("");
        let latent2 = 2 * config.latent_channels;
        let encoder = Encoder::load(&store.pp("encoder"), &config)?;
        let decoder = Decoder::load(&store.pp("decoder"), &config)?;
        let quant_conv = match config.use_quant_conv {
            true => Some(Conv2d::load(&root.pp("quant_conv"), latent2, latent2, 1, 1, 0)?),
            false => None,
        };
        let post_quant_conv = match config.use_post_quant_conv {
            true => {
                let l = config.latent_channels;
                Some(Conv2d::load(&root.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            }
            false => None,
        };
        store.check_all_used()?;
        Ok(AutoencoderKL { config, encoder, decoder, quant_conv, post_quant_conv, store })
    }

    /// Loads a diffusers folder: `config.json` and `diffusion_pytorch_model[.variant].safetensors`
    /// (or `model[.variant].safetensors`), e.g. `variant = Some("fp16")`; half-precision weights
    /// widen to f32. Params load trainable, like `ParamStore::load_safetensors`:
    /// `vae.store().freeze_all()` when only latents need gradients.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device, variant: Option<&str>) -> Result<AutoencoderKL> {
        let dir = dir.as_ref();
        let config = AutoencoderKLConfig::from_file(dir.join("config.json"))?;
        let names: Vec<String> = ["diffusion_pytorch_model", "model"]
            .iter()
            .map(|stem| match variant {
                Some(v) => format!("{stem}.{v}.safetensors"),
                None => format!("{stem}.safetensors"),
            })
            .collect();
        let Some(path) = names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) else {
            return Err(Error::File {
                path: dir.join(&names[0]),
                msg: format!("no weights file: neither {} exists in {}", names.join(" nor "), dir.display()),
            });
        };
        let store = ParamStore::load_safetensors(&path, device)?;
        AutoencoderKL::load(store, &config).map_err(|e| in_file(&path, e))
    }

    /// The params, by checkpoint key (freeze, move, save).
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Every param in key order.
    pub fn params(&self) -> Vec<std::sync::Arc<crate::params::Param>> {
        self.store.params()
    }

    pub fn device(&self) -> Device {
        self.encoder.conv_in.weight.device()
    }

    pub fn scaling_factor(&self) -> f32 {
        self.config.scaling_factor
    }

    pub fn shift_factor(&self) -> f32 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// x (B, in, H, W) in [-1, 1] -> the posterior over latents (B, latent, H / f, W / f).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let [_, c, _, _] = dims4("AutoencoderKL::encode", x)?;
        if c != self.config.in_channels {
            return Err(Error::shape(
                "AutoencoderKL::encode",
                format!("input {:?} has {c} channels, the model takes {}", x.shape(), self.config.in_channels),
            ));
        }
        let h = self.encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// z (B, latent, h, w), unscaled -> image (B, out, H, W), roughly in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let [_, c, _, _] = dims4("AutoencoderKL::decode", z)?;
        if c != self.config.latent_channels {
            return Err(Error::shape(
                "AutoencoderKL::decode",
                format!("latents {:?} have {c} channels, the model takes {}", z.shape(), self.config.latent_channels),
            ));
        }
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// The diffusion model's latents of an image: encode, sample with `noise` (or take the mean
    /// when None), then `(z - shift_factor) * scaling_factor`. x (B, in, H, W) in [-1, 1].
    pub fn latents_from_image(&self, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let dist = self.encode(x)?;
        let z = match noise {
            Some(n) => dist.sample(n)?,
            None => dist.mean,
        };
        z.affine(self.scaling_factor(), -self.shift_factor() * self.scaling_factor())
    }

    /// The image of diffusion latents: `z / scaling_factor + shift_factor`, then decode.
    pub fn image_from_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&latents.affine(1.0 / self.scaling_factor(), self.shift_factor())?)
    }
}

/// Names the weights file in errors that do not already name one (a converted store has no source).
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::File { .. } | Error::Io { .. } => e,
        other => {
            let msg = other.to_string();
            let path: PathBuf = path.to_path_buf();
            if msg.contains(&path.display().to_string()) {
                other
            } else {
                Error::File { path, msg }
            }
        }
    }
}
