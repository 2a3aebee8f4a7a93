//! diffusers' `UNet2DConditionModel` as Stable Diffusion 1.x and 2.x configure it: config
//! parsing (`config.json`), loading from checkpoint keys, and the forward pass.
//!
//! Heads follow diffusers' legacy naming exactly: `num_attention_heads = num_attention_heads
//! or attention_head_dim`, and diffusers' `UNet2DConditionModel` refuses a set
//! `num_attention_heads`, so `attention_head_dim` is the number of heads per block (SD1.5: 8;
//! SD2.x: `[5, 10, 20, 20]`, i.e. 64-wide heads), and the head width is `channels / heads`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::unet_2d_blocks::{AttnOpts, BlockOpts, DownBlock, UNetMidBlock2DCrossAttn, UpBlock};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::{Attention, Conv2d, GroupNorm, Linear};
use crate::params::{ParamPath, ParamStore};
use crate::tensor::Tensor;

/// A value given once for every block, or per block (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// One value per block; a list must have `n` entries.
    pub fn expand(&self, key: &str, n: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(config_err(format!("`{key}` = {v:?} has {} entries for {n} blocks", v.len()))),
        }
    }
}

fn config_err(msg: String) -> Error {
    Error::Invalid(format!("unet config: {msg}"))
}

/// diffusers' `UNet2DConditionModel` config (`config.json`). Keys absent take diffusers'
/// defaults; unknown keys are ignored; options vipo cannot run are refused by [`Self::validate`]
/// with an error naming the key.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Latent size the model was trained at (64 for SD1.5 at 512 px), a number or [h, w].
    pub sample_size: Option<PerBlock<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f32,
    pub dropout: f32,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f32,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Heads per block (diffusers' legacy name; see the module docs).
    pub attention_head_dim: PerBlock<usize>,
    /// Refused when set, as diffusers' `UNet2DConditionModel` does.
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    /// Only the precision of the attention scores; vipo computes them in f32 anyway.
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
    // Options whose only supported value is null (checked in `validate`).
    pub class_embed_type: Option<serde_json::Value>,
    pub num_class_embeds: Option<serde_json::Value>,
    pub addition_embed_type: Option<serde_json::Value>,
    pub time_embedding_act_fn: Option<serde_json::Value>,
    pub timestep_post_act: Option<serde_json::Value>,
    pub time_cond_proj_dim: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<serde_json::Value>,
    pub encoder_hid_dim_type: Option<serde_json::Value>,
    pub cross_attention_norm: Option<serde_json::Value>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    // Read by block types vipo does not build (simple cross-attention, K-blocks) or by the
    // class/addition embeddings refused above, so any value runs the same here.
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f32,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' constructor defaults (an SD1.x-sized UNet).
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        UNet2DConditionConfig {
            class_name: None,
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("DownBlock2D"),
            ],
            mid_block_type: Some(s("UNetMidBlock2DCrossAttn")),
            up_block_types: vec![
                s("UpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
            ],
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: s("default"),
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: s("default"),
            class_embed_type: None,
            num_class_embeds: None,
            addition_embed_type: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            cross_attention_norm: None,
            reverse_transformer_layers_per_block: None,
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
        }
    }
}

/// Down-block kinds vipo builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

/// Up-block kinds vipo builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

/// The config resolved per block, as diffusers' constructor resolves it.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetPlan {
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub has_mid_block: bool,
    /// Per down block (the up blocks take them reversed).
    pub layers_per_block: Vec<usize>,
    pub num_attention_heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub groups: usize,
    pub temb_channels: usize,
}

impl UNetPlan {
    /// Width of each head of block `i`'s attention: `block_out_channels[i] / heads[i]`.
    pub fn head_dims(&self, block_out_channels: &[usize]) -> Vec<usize> {
        block_out_channels.iter().zip(&self.num_attention_heads).map(|(c, h)| c / (*h).max(1)).collect()
    }
}

impl UNet2DConditionConfig {
    /// Parses `config.json` text; a value of the wrong type is an error naming its key.
    pub fn from_json_str(text: &str) -> Result<UNet2DConditionConfig> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| config_err(format!("not valid JSON: {e}")))?;
        let Some(map) = value.as_object() else {
            return Err(config_err("expected a JSON object".into()));
        };
        match serde_json::from_value::<UNet2DConditionConfig>(value.clone()) {
            Ok(c) => Ok(c),
            Err(e) => {
                // serde names no key for untagged enums: find the one that fails on its own.
                for (k, v) in map {
                    let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                    if let Err(e1) = serde_json::from_value::<UNet2DConditionConfig>(one) {
                        return Err(config_err(format!("`{k}` = {v}: {e1}")));
                    }
                }
                Err(config_err(e.to_string()))
            }
        }
    }

    /// Reads and validates `path` (a `config.json`); errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<UNet2DConditionConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file_err = |e: Error| Error::File { path: path.to_path_buf(), msg: e.to_string() };
        let config = Self::from_json_str(&text).map_err(file_err)?;
        config.validate().map_err(file_err)?;
        Ok(config)
    }

    /// Checks that vipo can run this config and resolves it per block.
    pub fn validate(&self) -> Result<UNetPlan> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, why: &str| {
            Err(config_err(format!("`{key}` = {value:?} is not supported: {why}")))
        };
        if let Some(c) = &self.class_name {
            if c != "UNet2DConditionModel" {
                return bad("_class_name", c, "this loader reads UNet2DConditionModel");
            }
        }
        let null_only: [(&str, &Option<serde_json::Value>); 10] = [
            ("class_embed_type", &self.class_embed_type),
            ("num_class_embeds", &self.num_class_embeds),
            ("addition_embed_type", &self.addition_embed_type),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("cross_attention_norm", &self.cross_attention_norm),
            ("reverse_transformer_layers_per_block", &self.reverse_transformer_layers_per_block),
        ];
        for (key, v) in null_only {
            if let Some(v) = v {
                return Err(config_err(format!("`{key}` = {v} is not supported (only null)")));
            }
        }
        if self.time_embedding_type != "positional" {
            return bad("time_embedding_type", &self.time_embedding_type, "only \"positional\"");
        }
        if self.resnet_time_scale_shift != "default" {
            return bad("resnet_time_scale_shift", &self.resnet_time_scale_shift, "only \"default\"");
        }
        if self.attention_type != "default" {
            return bad("attention_type", &self.attention_type, "only \"default\"");
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return bad("act_fn", &self.act_fn, "only \"silu\"");
        }
        if self.dual_cross_attention {
            return bad("dual_cross_attention", &true, "only false");
        }
        if self.dropout != 0.0 {
            return bad("dropout", &self.dropout, "vipo has no dropout (only 0)");
        }
        if let Some(h) = &self.num_attention_heads {
            return bad(
                "num_attention_heads",
                h,
                "diffusers' UNet2DConditionModel refuses it too; give the heads in `attention_head_dim`",
            );
        }
        let Some(groups) = self.norm_num_groups else {
            return bad("norm_num_groups", &None::<usize>, "the resnets need a group count");
        };
        for (key, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k % 2 == 0 {
                return bad(key, &k, "only odd kernel sizes");
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(config_err(format!(
                "`block_out_channels` {:?}, `down_block_types` {:?} and `up_block_types` {:?} must have the same, nonzero length",
                self.block_out_channels, self.down_block_types, self.up_block_types
            )));
        }
        if self.only_cross_attention.expand("only_cross_attention", n)?.iter().any(|&b| b) {
            return bad("only_cross_attention", &self.only_cross_attention, "only false");
        }
        // diffusers strips a `UNetRes` prefix from block type names.
        let strip = |t: &str| t.strip_prefix("UNetRes").unwrap_or(t).to_string();
        let mut down_block_types = Vec::with_capacity(n);
        for (i, t) in self.down_block_types.iter().enumerate() {
            down_block_types.push(match strip(t).as_str() {
                "CrossAttnDownBlock2D" => DownBlockType::CrossAttnDownBlock2D,
                "DownBlock2D" => DownBlockType::DownBlock2D,
                _ => return bad(&format!("down_block_types[{i}]"), t, "supported: CrossAttnDownBlock2D, DownBlock2D"),
            });
        }
        let mut up_block_types = Vec::with_capacity(n);
        for (i, t) in self.up_block_types.iter().enumerate() {
            up_block_types.push(match strip(t).as_str() {
                "CrossAttnUpBlock2D" => UpBlockType::CrossAttnUpBlock2D,
                "UpBlock2D" => UpBlockType::UpBlock2D,
                _ => return bad(&format!("up_block_types[{i}]"), t, "supported: CrossAttnUpBlock2D, UpBlock2D"),
            });
        }
        let has_mid_block = match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            None => false,
            Some(t) => return bad("mid_block_type", &t, "supported: UNetMidBlock2DCrossAttn, null"),
        };
        let plan = UNetPlan {
            down_block_types,
            up_block_types,
            has_mid_block,
            layers_per_block: self.layers_per_block.expand("layers_per_block", n)?,
            num_attention_heads: self.attention_head_dim.expand("attention_head_dim", n)?,
            cross_attention_dim: self.cross_attention_dim.expand("cross_attention_dim", n)?,
            transformer_layers_per_block: self
                .transformer_layers_per_block
                .expand("transformer_layers_per_block", n)?,
            groups,
            temb_channels: self.time_embedding_dim.unwrap_or(4 * self.block_out_channels[0]),
        };
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&plan.num_attention_heads).enumerate() {
            if h == 0 || c < h {
                return bad(&format!("attention_head_dim[{i}]"), &h, &format!("{c} channels cannot take {h} heads"));
            }
            if c % groups != 0 {
                return bad("norm_num_groups", &groups, &format!("block {i} has {c} channels"));
            }
        }
        if plan.layers_per_block.contains(&0) {
            return bad("layers_per_block", &self.layers_per_block, "every block needs a resnet");
        }
        Ok(plan)
    }
}

/// The sinusoidal timestep projection (`time_proj`, no weights).
#[derive(Clone, Debug)]
pub struct Timesteps {
    pub num_channels: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
}

impl Timesteps {
    /// t (B,) -> (B, num_channels).
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        Tensor::timestep_embedding(t, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, 10000.0)
    }
}

/// `time_embedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Clone)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// x (B, in) -> (B, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// diffusers' `UNet2DConditionModel` (SD1.x / SD2.x layouts).
#[derive(Clone)]
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    pub plan: UNetPlan,
    pub conv_in: Conv2d,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Activation checkpointing of every resnet and transformer in training forwards (shared
    /// by clones of the model).
    pub gradient_checkpointing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Outputs of the top-level modules, named as diffusers names them (`conv_in`,
/// `down_blocks.0`, ...; `time_proj`, `time_embedding`; `conv_norm_out` before the SiLU).
pub type Intermediates = Vec<(String, Tensor)>;

impl UNet2DConditionModel {
    /// Builds the model from the keys under `vb` (on the store's device). Does not check for
    /// unused keys: [`Self::load`] does.
    pub fn load_path(vb: &ParamPath, config: &UNet2DConditionConfig) -> Result<UNet2DConditionModel> {
        let plan = config.validate()?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let opts = BlockOpts {
            temb_channels: plan.temb_channels,
            groups: plan.groups,
            eps: config.norm_eps,
            use_linear_projection: config.use_linear_projection,
        };
        let attn_opts = |i: usize| AttnOpts {
            heads: plan.num_attention_heads[i],
            cross_attention_dim: plan.cross_attention_dim[i],
            layers: plan.transformer_layers_per_block[i],
        };
        let conv_in = Conv2d::load(
            &vb.pp("conv_in"),
            config.in_channels,
            ch[0],
            config.conv_in_kernel,
            1,
            config.conv_in_kernel / 2,
        )?;
        let te = vb.pp("time_embedding");
        let time_embedding = TimestepEmbedding {
            linear_1: Linear::load(&te.pp("linear_1"), ch[0], plan.temb_channels, true)?,
            linear_2: Linear::load(&te.pp("linear_2"), plan.temb_channels, plan.temb_channels, true)?,
        };
        let mut down_blocks = Vec::with_capacity(n);
        let dvb = vb.pp("down_blocks");
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let down = (i + 1 < n).then_some(config.downsample_padding);
            let a = attn_opts(i);
            let attn = (plan.down_block_types[i] == DownBlockType::CrossAttnDownBlock2D).then_some(&a);
            down_blocks.push(DownBlock::load(&dvb.pp(i), plan.layers_per_block[i], cin, ch[i], down, &opts, attn)?);
        }
        let mid_block = if plan.has_mid_block {
            Some(UNetMidBlock2DCrossAttn::load(
                &vb.pp("mid_block"),
                ch[n - 1],
                config.mid_block_scale_factor,
                &opts,
                &attn_opts(n - 1),
            )?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(n);
        let uvb = vb.pp("up_blocks");
        for i in 0..n {
            let r = n - 1 - i; // the down block this up block mirrors
            let cout = ch[r];
            let prev_out = ch[(r + 1).min(n - 1)];
            let cin = ch[r.saturating_sub(1)];
            let a = attn_opts(r);
            let attn = (plan.up_block_types[i] == UpBlockType::CrossAttnUpBlock2D).then_some(&a);
            let layers = plan.layers_per_block[r] + 1;
            up_blocks.push(UpBlock::load(&uvb.pp(i), layers, cin, cout, prev_out, i + 1 < n, &opts, attn)?);
        }
        let conv_norm_out = GroupNorm::load(&vb.pp("conv_norm_out"), plan.groups, ch[0], config.norm_eps)?;
        let conv_out = Conv2d::load(
            &vb.pp("conv_out"),
            ch[0],
            config.out_channels,
            config.conv_out_kernel,
            1,
            config.conv_out_kernel / 2,
        )?;
        Ok(UNet2DConditionModel {
            gradient_checkpointing: Default::default(),
            config: config.clone(),
            time_proj: Timesteps {
                num_channels: ch[0],
                flip_sin_to_cos: config.flip_sin_to_cos,
                downscale_freq_shift: config.freq_shift,
            },
            plan,
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Moves `store` to `device` (in place), builds the model from its keys (diffusers
    /// names, no prefix) and checks that every key was used: a missing, unused or wrongly
    /// shaped key is an error naming it. The model shares the store's params, so freezing,
    /// optimising or moving them through the store acts on the model.
    pub fn load(store: &ParamStore, config: &UNet2DConditionConfig, device: &Device) -> Result<UNet2DConditionModel> {
        store.to(device)?;
        let model = Self::load_path(&store.pp(""), config)?;
        store.check_all_used()?;
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.conv_in.weight.device()
    }

    /// A randomly initialised model for `config` on `device` (for training from scratch), and
    /// the store holding its params under diffusers' names (all trainable; `save_safetensors`
    /// writes a `diffusion_pytorch_model.safetensors` that [`Self::from_dir`] reads). The same
    /// `seed` gives the same weights; see [`ParamStore::init_random`] for the values.
    pub fn init_params(
        config: &UNet2DConditionConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(UNet2DConditionModel, ParamStore)> {
        let store = ParamStore::init_random(seed, device, |s| Self::load_path(&s.pp(""), config).map(|_| ()))?;
        let model = Self::load(&store, config, device)?;
        Ok((model, store))
    }

    /// Reads a diffusers folder: `config.json` and `diffusion_pytorch_model[.variant].safetensors`
    /// (or `model[.variant].safetensors`), e.g. `variant = Some("fp16")`; half-precision
    /// weights widen to f32. Returns the model and the store holding its params (all
    /// trainable; `freeze_all` / `set_trainable_where` change that).
    pub fn from_dir(
        dir: impl AsRef<Path>,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<(UNet2DConditionModel, ParamStore)> {
        let dir = dir.as_ref();
        let config = UNet2DConditionConfig::from_file(dir.join("config.json"))?;
        let names: Vec<PathBuf> = ["diffusion_pytorch_model", "model"]
            .iter()
            .map(|stem| match variant {
                Some(v) => dir.join(format!("{stem}.{v}.safetensors")),
                None => dir.join(format!("{stem}.safetensors")),
            })
            .collect();
        let Some(path) = names.iter().find(|p| p.is_file()) else {
            let list: Vec<String> = names.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::File {
                path: dir.to_path_buf(),
                msg: format!("no UNet weights: none of {} exists", list.join(", ")),
            });
        };
        let store = ParamStore::load_safetensors(path, device)?;
        // The store knows its file, so key errors already name it.
        let model = Self::load(&store, &config, device)?;
        Ok((model, store))
    }

    /// Every attention module by its checkpoint prefix
    /// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`), in forward order.
    pub fn attention_modules(&self) -> Vec<(String, &Attention)> {
        let transformers = self
            .down_blocks
            .iter()
            .flat_map(|b| b.attentions())
            .chain(self.mid_block.iter().flat_map(|m| &m.attentions))
            .chain(self.up_blocks.iter().flat_map(|b| b.attentions()));
        let mut out = Vec::new();
        for t in transformers {
            for b in &t.transformer_blocks {
                out.push((format!("{}.attn1", b.prefix), &b.attn1));
                out.push((format!("{}.attn2", b.prefix), &b.attn2));
            }
        }
        out
    }

    /// sample (B, in, H, W), timesteps (B,) or (1,) f32, encoder_hidden_states
    /// (B, L, cross_attention_dim) -> (B, out, H, W).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.run(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] plus the output of every top-level module (see [`Intermediates`]).
    pub fn forward_with_intermediates(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<(Tensor, Intermediates)> {
        let mut inter = Vec::new();
        let out = self.run(sample, timesteps, encoder_hidden_states, Some(&mut inter))?;
        Ok((out, inter))
    }

    fn check_inputs(&self, sample: &Tensor, timesteps: &Tensor, ehs: &Tensor) -> Result<usize> {
        let cfg = &self.config;
        let ss = sample.shape();
        if ss.len() != 4 || ss[1] != cfg.in_channels {
            return Err(Error::shape("unet", format!("sample {ss:?}: expected (B, {}, H, W)", cfg.in_channels)));
        }
        let b = ss[0];
        let ts = timesteps.shape();
        if ts.len() != 1 || (ts[0] != b && ts[0] != 1) {
            return Err(Error::shape("unet", format!("timesteps {ts:?} for sample {ss:?}: expected ({b},) or (1,)")));
        }
        let es = ehs.shape();
        let ctx_dims = &self.plan.cross_attention_dim;
        if es.len() != 3 || es[0] != b || !ctx_dims.contains(&es[2]) {
            return Err(Error::shape(
                "unet",
                format!("encoder_hidden_states {es:?} for sample {ss:?}: expected ({b}, L, {})", ctx_dims[0]),
            ));
        }
        Ok(b)
    }

    /// Recompute each resnet's and transformer's forward in the backward instead of keeping
    /// their activations (less memory, about one more forward of compute per step).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.gradient_checkpointing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ehs: &Tensor,
        mut inter: Option<&mut Intermediates>,
    ) -> Result<Tensor> {
        let b = self.check_inputs(sample, timesteps, ehs)?;
        let _ckpt = crate::models::unet_2d_blocks::checkpointing(
            self.gradient_checkpointing.load(std::sync::atomic::Ordering::Relaxed),
        );
        // The norm before the last conv is fused with its SiLU unless its output is wanted.
        let wanted = inter.is_some();
        let mut keep = |name: &str, t: &Tensor| {
            if let Some(v) = inter.as_deref_mut() {
                v.push((name.to_string(), t.clone()));
            }
        };
        let sample = if self.config.center_input_sample { sample.affine(2.0, -1.0)? } else { sample.clone() };

        // 1. time
        let mut t_emb = self.time_proj.forward(timesteps)?; // (1 or B, C0)
        if t_emb.shape()[0] != b {
            t_emb = t_emb.broadcast_to(&[b, t_emb.shape()[1]])?;
        }
        keep("time_proj", &t_emb);
        let emb = self.time_embedding.forward(&t_emb)?; // (B, T)
        keep("time_embedding", &emb);

        // 2. pre-process
        let mut h = self.conv_in.forward(&sample)?;
        keep("conv_in", &h);

        // 3. down
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res) = block.forward(&h, &emb, ehs)?;
            h = out;
            skips.extend(res);
            keep(&format!("down_blocks.{i}"), &h);
        }

        // 4. mid
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, ehs)?;
            keep("mid_block", &h);
        }

        // 5. up: each block takes as many skips as it has resnets, from the end; its
        // upsampler targets the size of the next skip (diffusers' `upsample_size`).
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.resnets().len();
            if skips.len() < k {
                return Err(Error::shape(
                    "unet",
                    format!("up_blocks.{i} needs {k} skip tensors, {} left", skips.len()),
                ));
            }
            let res = skips.split_off(skips.len() - k);
            let size = skips.last().map(|s| (s.shape()[2], s.shape()[3]));
            h = block.forward(&h, &res, &emb, ehs, size)?;
            keep(&format!("up_blocks.{i}"), &h);
        }

        // 6. post-process
        let h = if wanted {
            let h = self.conv_norm_out.forward(&h)?;
            keep("conv_norm_out", &h);
            h.silu()?
        } else {
            self.conv_norm_out.forward_silu(&h)?
        };
        let out = self.conv_out.forward(&h)?;
        keep("conv_out", &out);
        Ok(out)
    }
}
