//! Single-file Stable Diffusion checkpoints in the original LDM/CompVis layout
//! (`v1-5-pruned-emaonly.safetensors`): one key table per component, generated from the
//! diffusers configs, maps every LDM name to its diffusers name and back.
//!
//! The rules are those of diffusers' `single_file_utils.convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint`, written as a full
//! enumeration of each model's parameters instead of string surgery: a key outside the table
//! is then an error naming it, and a key the file lacks is reported before any data is read.
//!
//! UNet (`model.diffusion_model.`): `input_blocks.0.0` = `conv_in`; then per level `i` and
//! layer `j` one `input_blocks.N` holding `[resnet, attention?]`, and (all levels but the last)
//! one more `input_blocks.N.0.op` = the downsampler; `middle_block.{0,1,2}` = resnet, attention,
//! resnet; `output_blocks.N` per up level and layer, the upsampler inside the level's last
//! block as `.1.conv` (or `.2.conv` after an attention). Resnets rename their layers
//! (`in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection`); transformer blocks
//! keep their inner names.
//!
//! VAE (`first_stage_model.`): `encoder.down.i.block.j`, `down.i.downsample.conv`,
//! `mid.block_1/attn_1/block_2`, `norm_out`, `nin_shortcut`; the decoder's `up.i` run in
//! reverse order of diffusers' `up_blocks`. The mid-block attention's q/k/v/proj_out are
//! (C, C, 1, 1) convs in LDM files and (C, C) linears in diffusers.
//!
//! CLIP (`cond_stage_model.transformer.`): `text_model.*` as in transformers; SD 1.x only
//! (SD 2.x's OpenCLIP and SDXL's two encoders use other layouts and are refused by name).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorView};
use serde::Deserialize;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::params::ParamStore;
use crate::tensor::{DType, Tensor};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// The three models a single-file checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Unet, Component::Vae, Component::TextEncoder];

    /// The diffusers sub-folder name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One parameter under both names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPair {
    pub diffusers: String,
    pub ldm: String,
    /// A (C, C) linear weight in diffusers stored as a (C, C, 1, 1) conv in LDM files.
    pub conv1x1: bool,
}

/// Every parameter of one component, under its diffusers and its LDM name.
#[derive(Clone, Debug)]
pub struct KeyTable {
    component: Component,
    pairs: Vec<KeyPair>,
    by_ldm: HashMap<String, usize>,
    by_diffusers: HashMap<String, usize>,
}

impl KeyTable {
    fn build(component: Component, pairs: Vec<KeyPair>) -> KeyTable {
        let by_ldm = pairs.iter().enumerate().map(|(i, p)| (p.ldm.clone(), i)).collect();
        let by_diffusers = pairs.iter().enumerate().map(|(i, p)| (p.diffusers.clone(), i)).collect();
        KeyTable { component, pairs, by_ldm, by_diffusers }
    }

    /// The UNet's table from a diffusers `unet/config.json` (text); `origin` names it in errors.
    pub fn unet(config_json: &str, origin: &str) -> Result<KeyTable> {
        let cfg: UnetKeyConfig = parse_config(config_json, origin)?;
        Ok(KeyTable::build(Component::Unet, unet_pairs(&cfg, origin)?))
    }

    /// The VAE's table from a diffusers `vae/config.json` (text).
    pub fn vae(config_json: &str, origin: &str) -> Result<KeyTable> {
        let cfg: VaeKeyConfig = parse_config(config_json, origin)?;
        Ok(KeyTable::build(Component::Vae, vae_pairs(&cfg, origin)?))
    }

    /// The CLIP text encoder's table from a transformers `text_encoder/config.json` (text).
    pub fn text_encoder(config_json: &str, origin: &str) -> Result<KeyTable> {
        let cfg: ClipKeyConfig = parse_config(config_json, origin)?;
        Ok(KeyTable::build(Component::TextEncoder, clip_pairs(&cfg)))
    }

    pub fn component(&self) -> Component {
        self.component
    }
    pub fn pairs(&self) -> &[KeyPair] {
        &self.pairs
    }
    pub fn len(&self) -> usize {
        self.pairs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The pair whose LDM name is `ldm`.
    pub fn by_ldm(&self, ldm: &str) -> Option<&KeyPair> {
        self.by_ldm.get(ldm).map(|&i| &self.pairs[i])
    }

    /// The pair whose diffusers name is `diffusers`. Text-encoder names are also found
    /// without their `text_model.` prefix (transformers accepts both).
    pub fn by_diffusers(&self, diffusers: &str) -> Option<&KeyPair> {
        let i = self.by_diffusers.get(diffusers).or_else(|| match self.component {
            Component::TextEncoder => self.by_diffusers.get(&format!("text_model.{diffusers}")),
            _ => None,
        })?;
        Some(&self.pairs[*i])
    }
}

/// What a key of an LDM file is.
#[derive(Clone, Copy, Debug)]
pub enum LdmKey<'a> {
    /// A parameter of `Component`, with both names.
    Param(Component, &'a KeyPair),
    /// A key real LDM files carry that no diffusers model uses (DDPM schedule buffers,
    /// `model_ema.*`, `position_ids`, OpenCLIP's `text_projection`/`logit_scale`).
    Skipped,
}

/// The key tables of the three components, from one set of configs.
#[derive(Clone, Debug)]
pub struct LdmKeyTables {
    pub unet: KeyTable,
    pub vae: KeyTable,
    pub text_encoder: KeyTable,
}

impl LdmKeyTables {
    pub fn new(configs: &SingleFileConfigs) -> Result<LdmKeyTables> {
        Ok(LdmKeyTables {
            unet: KeyTable::unet(&configs.unet, &configs.origin(Component::Unet))?,
            vae: KeyTable::vae(&configs.vae, &configs.origin(Component::Vae))?,
            text_encoder: KeyTable::text_encoder(&configs.text_encoder, &configs.origin(Component::TextEncoder))?,
        })
    }

    pub fn table(&self, c: Component) -> &KeyTable {
        match c {
            Component::Unet => &self.unet,
            Component::Vae => &self.vae,
            Component::TextEncoder => &self.text_encoder,
        }
    }

    /// Classifies an LDM key; an unknown key gives the reason, for the caller's error.
    pub fn classify(&self, ldm: &str) -> std::result::Result<LdmKey<'_>, String> {
        if is_skipped_ldm_key(ldm) {
            return Ok(LdmKey::Skipped);
        }
        let (c, rest) = if let Some(rest) = ldm.strip_prefix(UNET_PREFIX) {
            (Component::Unet, rest)
        } else if let Some(rest) = ldm.strip_prefix(VAE_PREFIX) {
            (Component::Vae, rest)
        } else if let Some(rest) = ldm.strip_prefix(CLIP_PREFIX) {
            (Component::TextEncoder, rest)
        } else if ldm.starts_with("cond_stage_model.model.") {
            return Err("an OpenCLIP text-encoder key (Stable Diffusion 2.x); only SD 1.x's CLIP converts".into());
        } else if ldm.starts_with("conditioner.embedders.") {
            return Err("an SDXL text-encoder key; only SD 1.x's layout converts".into());
        } else {
            return Err(format!("not under {UNET_PREFIX}, {VAE_PREFIX} or {CLIP_PREFIX}, and not a known extra key"));
        };
        let table = self.table(c);
        if let Some(p) = table.by_ldm(ldm) {
            return Ok(LdmKey::Param(c, p));
        }
        // Files written with transformers < 4.11 lack the `text_model.` level.
        if c == Component::TextEncoder && !rest.starts_with("text_model.") {
            if let Some(p) = table.by_ldm(&format!("{CLIP_PREFIX}text_model.{rest}")) {
                return Ok(LdmKey::Param(c, p));
            }
        }
        Err(format!("no {c} parameter of these configs has this name"))
    }
}

/// Keys real LDM files carry that diffusers does not load.
pub fn is_skipped_ldm_key(key: &str) -> bool {
    const SCHEDULE: [&str; 13] = [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    ];
    let last = key.rsplit('.').next().unwrap_or(key);
    SCHEDULE.contains(&key)
        || key.starts_with("model_ema.")
        || last == "position_ids"
        // OpenCLIP stores these as bare parameters (no `.weight`); CLIP-L in SD 1.x has neither.
        || last == "text_projection"
        || last == "logit_scale"
}

// ---------------------------------------------------------------------------------------------
// Configs

/// The diffusers configs a single file is read with (the file itself holds none).
#[derive(Clone, Debug)]
pub struct SingleFileConfigs {
    /// `unet/config.json`, as text.
    pub unet: String,
    /// `vae/config.json`, as text.
    pub vae: String,
    /// `text_encoder/config.json`, as text.
    pub text_encoder: String,
    /// The folder they were read from; `None` for the embedded SD1.5 configs.
    pub dir: Option<PathBuf>,
}

impl SingleFileConfigs {
    /// Stable Diffusion 1.5's configs (`models/sd15/`, embedded at build time so a lone
    /// `v1-5-pruned-emaonly.safetensors` loads wherever the binary runs).
    pub fn sd15() -> SingleFileConfigs {
        SingleFileConfigs {
            unet: include_str!("../../models/sd15/unet/config.json").to_string(),
            vae: include_str!("../../models/sd15/vae/config.json").to_string(),
            text_encoder: include_str!("../../models/sd15/text_encoder/config.json").to_string(),
            dir: None,
        }
    }

    /// Reads `unet/config.json`, `vae/config.json` and `text_encoder/config.json` of a
    /// diffusers folder (a `model_index.json` folder; weights are not needed).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<SingleFileConfigs> {
        let dir = dir.as_ref();
        let read = |c: Component| {
            let path = dir.join(c.name()).join("config.json");
            std::fs::read_to_string(&path).map_err(|e| Error::io(path, e))
        };
        Ok(SingleFileConfigs {
            unet: read(Component::Unet)?,
            vae: read(Component::Vae)?,
            text_encoder: read(Component::TextEncoder)?,
            dir: Some(dir.to_path_buf()),
        })
    }

    /// `from_dir(dir)`, or the embedded SD1.5 configs when `dir` is `None`.
    pub fn from_dir_or_sd15(dir: Option<&Path>) -> Result<SingleFileConfigs> {
        dir.map_or_else(|| Ok(SingleFileConfigs::sd15()), SingleFileConfigs::from_dir)
    }

    /// The config text of one component.
    pub fn config(&self, c: Component) -> &str {
        match c {
            Component::Unet => &self.unet,
            Component::Vae => &self.vae,
            Component::TextEncoder => &self.text_encoder,
        }
    }

    /// Where a component's config came from, for error messages.
    pub fn origin(&self, c: Component) -> String {
        match &self.dir {
            Some(d) => d.join(c.name()).join("config.json").display().to_string(),
            None => format!("models/sd15/{}/config.json (embedded)", c.name()),
        }
    }
}

/// The `models/sd15` folder on disk (for what is not embedded: the tokenizer files,
/// `scheduler/`); see [`super::shipped_dir`] for where it is looked up.
pub fn sd15_config_dir() -> Result<PathBuf> {
    super::shipped_dir(
        "sd15",
        "unet/config.json",
        "the SD1.5 configs and tokenizer",
        "pass the config folder explicitly",
    )
}

fn parse_config<T: for<'de> Deserialize<'de>>(text: &str, origin: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Invalid(format!("{origin}: {e}")))
}

fn unsupported(origin: &str, key: &str, value: impl fmt::Debug, why: &str) -> Error {
    Error::Invalid(format!("{origin}: {key} = {value:?} is not supported by the single-file key conversion ({why})"))
}

/// A config value given as one number for every block or as a list (diffusers accepts both).
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, origin: &str, key: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(unsupported(origin, key, v, &format!("expected {n} entries, one per block"))),
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn mid_cross_attn() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn yes() -> bool {
    true
}

/// The UNet config fields that decide parameter names (everything else is ignored here).
#[derive(Deserialize, Debug)]
struct UnetKeyConfig {
    block_out_channels: Vec<usize>,
    layers_per_block: PerBlock,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "mid_cross_attn")]
    mid_block_type: Option<String>,
    #[serde(default = "one")]
    transformer_layers_per_block: PerBlock,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    time_embedding_type: Option<String>,
}

#[derive(Deserialize, Debug)]
struct VaeKeyConfig {
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "yes")]
    mid_block_add_attention: bool,
    #[serde(default = "yes")]
    use_quant_conv: bool,
    #[serde(default = "yes")]
    use_post_quant_conv: bool,
}

#[derive(Deserialize, Debug)]
struct ClipKeyConfig {
    num_hidden_layers: usize,
}

// ---------------------------------------------------------------------------------------------
// Tables

/// Collects pairs under the two prefixes of the model being enumerated.
struct Pairs {
    ldm_prefix: &'static str,
    out: Vec<KeyPair>,
}

impl Pairs {
    fn one(&mut self, d: &str, l: &str, conv1x1: bool) {
        self.out.push(KeyPair { diffusers: d.to_string(), ldm: format!("{}{l}", self.ldm_prefix), conv1x1 });
    }
    fn weight(&mut self, d: &str, l: &str) {
        self.one(&format!("{d}.weight"), &format!("{l}.weight"), false);
    }
    /// `.weight` and `.bias` of a layer.
    fn wb(&mut self, d: &str, l: &str) {
        self.weight(d, l);
        self.one(&format!("{d}.bias"), &format!("{l}.bias"), false);
    }

    /// A UNet `ResnetBlock2D` (with a time-embedding projection) and LDM's `ResBlock`.
    fn unet_resnet(&mut self, d: &str, l: &str, ch_in: usize, ch_out: usize) {
        for (dn, ln) in [
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("time_emb_proj", "emb_layers.1"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
        ] {
            self.wb(&format!("{d}.{dn}"), &format!("{l}.{ln}"));
        }
        if ch_in != ch_out {
            self.wb(&format!("{d}.conv_shortcut"), &format!("{l}.skip_connection"));
        }
    }

    /// A `Transformer2DModel` (LDM `SpatialTransformer`): same inner names in both layouts.
    fn transformer(&mut self, d: &str, l: &str, depth: usize) {
        let mut same = |s: &str, bias: bool| {
            let (d, l) = (format!("{d}.{s}"), format!("{l}.{s}"));
            if bias {
                self.wb(&d, &l)
            } else {
                self.weight(&d, &l)
            }
        };
        same("norm", true);
        same("proj_in", true);
        for k in 0..depth {
            let b = format!("transformer_blocks.{k}");
            for attn in ["attn1", "attn2"] {
                let norm = if attn == "attn1" { "norm1" } else { "norm2" };
                same(&format!("{b}.{norm}"), true);
                for qkv in ["to_q", "to_k", "to_v"] {
                    same(&format!("{b}.{attn}.{qkv}"), false);
                }
                same(&format!("{b}.{attn}.to_out.0"), true);
            }
            same(&format!("{b}.norm3"), true);
            same(&format!("{b}.ff.net.0.proj"), true);
            same(&format!("{b}.ff.net.2"), true);
        }
        same("proj_out", true);
    }

    /// A VAE `ResnetBlock2D` (no time embedding) and LDM's `ResnetBlock`.
    fn vae_resnet(&mut self, d: &str, l: &str, ch_in: usize, ch_out: usize) {
        for n in ["norm1", "conv1", "norm2", "conv2"] {
            self.wb(&format!("{d}.{n}"), &format!("{l}.{n}"));
        }
        if ch_in != ch_out {
            self.wb(&format!("{d}.conv_shortcut"), &format!("{l}.nin_shortcut"));
        }
    }

    /// The VAE mid-block attention: diffusers linears, LDM 1x1 convs.
    fn vae_attention(&mut self, d: &str, l: &str) {
        self.wb(&format!("{d}.group_norm"), &format!("{l}.norm"));
        for (dn, ln) in [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")] {
            self.one(&format!("{d}.{dn}.weight"), &format!("{l}.{ln}.weight"), true);
            self.one(&format!("{d}.{dn}.bias"), &format!("{l}.{ln}.bias"), false);
        }
    }

    fn vae_mid(&mut self, d: &str, l: &str, ch: usize, attention: bool) {
        self.vae_resnet(&format!("{d}.resnets.0"), &format!("{l}.block_1"), ch, ch);
        if attention {
            self.vae_attention(&format!("{d}.attentions.0"), &format!("{l}.attn_1"));
        }
        self.vae_resnet(&format!("{d}.resnets.1"), &format!("{l}.block_2"), ch, ch);
    }
}

fn unet_pairs(cfg: &UnetKeyConfig, origin: &str) -> Result<Vec<KeyPair>> {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    if n == 0 {
        return Err(unsupported(origin, "block_out_channels", boc, "no blocks"));
    }
    for (key, types) in [("down_block_types", &cfg.down_block_types), ("up_block_types", &cfg.up_block_types)] {
        if types.len() != n {
            return Err(unsupported(origin, key, types, &format!("block_out_channels has {n} entries")));
        }
    }
    for (key, v) in [("class_embed_type", &cfg.class_embed_type), ("addition_embed_type", &cfg.addition_embed_type)] {
        if let Some(v) = v {
            return Err(unsupported(origin, key, v, "SD 1.x/2.x UNets have none"));
        }
    }
    if let Some(t) = cfg.time_embedding_type.as_deref().filter(|t| *t != "positional") {
        return Err(unsupported(origin, "time_embedding_type", t, "only `positional` has LDM names here"));
    }
    if let Some(v) = cfg.reverse_transformer_layers_per_block.as_ref().filter(|v| !v.is_null()) {
        return Err(unsupported(origin, "reverse_transformer_layers_per_block", v, "not an SD 1.x/2.x option"));
    }
    let layers = cfg.layers_per_block.expand(n, origin, "layers_per_block")?;
    let depth = cfg.transformer_layers_per_block.expand(n, origin, "transformer_layers_per_block")?;
    let cross = |key: &str, i: usize, t: &str, with: &str, without: &str| match t {
        _ if t == with => Ok(true),
        _ if t == without => Ok(false),
        _ => Err(unsupported(origin, &format!("{key}[{i}]"), t, &format!("expected {with} or {without}"))),
    };

    let mut p = Pairs { ldm_prefix: UNET_PREFIX, out: Vec::new() };
    p.wb("conv_in", "input_blocks.0.0");
    p.wb("time_embedding.linear_1", "time_embed.0");
    p.wb("time_embedding.linear_2", "time_embed.2");

    // input_blocks: one per resnet (+ attention), one per downsampler.
    let (mut idx, mut ch) = (1, boc[0]);
    for (i, t) in cfg.down_block_types.iter().enumerate() {
        let attn = cross("down_block_types", i, t, "CrossAttnDownBlock2D", "DownBlock2D")?;
        for j in 0..layers[i] {
            p.unet_resnet(&format!("down_blocks.{i}.resnets.{j}"), &format!("input_blocks.{idx}.0"), ch, boc[i]);
            ch = boc[i];
            if attn {
                p.transformer(&format!("down_blocks.{i}.attentions.{j}"), &format!("input_blocks.{idx}.1"), depth[i]);
            }
            idx += 1;
        }
        if i + 1 < n {
            p.wb(&format!("down_blocks.{i}.downsamplers.0.conv"), &format!("input_blocks.{idx}.0.op"));
            idx += 1;
        }
    }

    let top = boc[n - 1];
    match cfg.mid_block_type.as_deref() {
        Some("UNetMidBlock2DCrossAttn") => {
            p.unet_resnet("mid_block.resnets.0", "middle_block.0", top, top);
            p.transformer("mid_block.attentions.0", "middle_block.1", depth[n - 1]);
            p.unet_resnet("mid_block.resnets.1", "middle_block.2", top, top);
        }
        other => return Err(unsupported(origin, "mid_block_type", other, "expected UNetMidBlock2DCrossAttn")),
    }

    // output_blocks: one per resnet (+ attention), the upsampler inside the level's last one.
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    let (rev_layers, rev_depth): (Vec<usize>, Vec<usize>) =
        (layers.iter().rev().copied().collect(), depth.iter().rev().copied().collect());
    let (mut idx, mut prev_out) = (0, rev[0]);
    for (i, t) in cfg.up_block_types.iter().enumerate() {
        let attn = cross("up_block_types", i, t, "CrossAttnUpBlock2D", "UpBlock2D")?;
        let (out, skip_in) = (rev[i], rev[(i + 1).min(n - 1)]);
        let m = rev_layers[i] + 1;
        for j in 0..m {
            let res_in = if j == 0 { prev_out } else { out };
            let skip = if j + 1 == m { skip_in } else { out };
            p.unet_resnet(&format!("up_blocks.{i}.resnets.{j}"), &format!("output_blocks.{idx}.0"), res_in + skip, out);
            if attn {
                p.transformer(
                    &format!("up_blocks.{i}.attentions.{j}"),
                    &format!("output_blocks.{idx}.1"),
                    rev_depth[i],
                );
            }
            if j + 1 == m && i + 1 < n {
                let slot = if attn { 2 } else { 1 };
                p.wb(&format!("up_blocks.{i}.upsamplers.0.conv"), &format!("output_blocks.{idx}.{slot}.conv"));
            }
            idx += 1;
        }
        prev_out = out;
    }

    p.wb("conv_norm_out", "out.0");
    p.wb("conv_out", "out.2");
    Ok(p.out)
}

fn vae_pairs(cfg: &VaeKeyConfig, origin: &str) -> Result<Vec<KeyPair>> {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    if n == 0 {
        return Err(unsupported(origin, "block_out_channels", boc, "no blocks"));
    }
    for (key, types, want) in [
        ("down_block_types", &cfg.down_block_types, "DownEncoderBlock2D"),
        ("up_block_types", &cfg.up_block_types, "UpDecoderBlock2D"),
    ] {
        if types.len() != n {
            return Err(unsupported(origin, key, types, &format!("block_out_channels has {n} entries")));
        }
        if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != want) {
            return Err(unsupported(origin, &format!("{key}[{i}]"), t, &format!("expected {want}")));
        }
    }
    let lpb = cfg.layers_per_block;
    let mut p = Pairs { ldm_prefix: VAE_PREFIX, out: Vec::new() };

    p.wb("encoder.conv_in", "encoder.conv_in");
    let mut ch = boc[0];
    for (i, &out) in boc.iter().enumerate() {
        for j in 0..lpb {
            p.vae_resnet(
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                &format!("encoder.down.{i}.block.{j}"),
                ch,
                out,
            );
            ch = out;
        }
        if i + 1 < n {
            p.wb(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), &format!("encoder.down.{i}.downsample.conv"));
        }
    }
    p.vae_mid("encoder.mid_block", "encoder.mid", boc[n - 1], cfg.mid_block_add_attention);
    p.wb("encoder.conv_norm_out", "encoder.norm_out");
    p.wb("encoder.conv_out", "encoder.conv_out");

    p.wb("decoder.conv_in", "decoder.conv_in");
    p.vae_mid("decoder.mid_block", "decoder.mid", boc[n - 1], cfg.mid_block_add_attention);
    // LDM numbers the decoder's levels from the full-resolution end.
    let mut ch = boc[n - 1];
    for i in 0..n {
        let (level, out) = (n - 1 - i, boc[n - 1 - i]);
        for j in 0..lpb + 1 {
            p.vae_resnet(
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                &format!("decoder.up.{level}.block.{j}"),
                ch,
                out,
            );
            ch = out;
        }
        if i + 1 < n {
            p.wb(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), &format!("decoder.up.{level}.upsample.conv"));
        }
    }
    p.wb("decoder.conv_norm_out", "decoder.norm_out");
    p.wb("decoder.conv_out", "decoder.conv_out");

    if cfg.use_quant_conv {
        p.wb("quant_conv", "quant_conv");
    }
    if cfg.use_post_quant_conv {
        p.wb("post_quant_conv", "post_quant_conv");
    }
    Ok(p.out)
}

fn clip_pairs(cfg: &ClipKeyConfig) -> Vec<KeyPair> {
    let mut p = Pairs { ldm_prefix: CLIP_PREFIX, out: Vec::new() };
    let mut same = |s: &str, bias: bool| {
        let s = format!("text_model.{s}");
        if bias {
            p.wb(&s, &s)
        } else {
            p.weight(&s, &s)
        }
    };
    same("embeddings.token_embedding", false);
    same("embeddings.position_embedding", false);
    for l in 0..cfg.num_hidden_layers {
        for s in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"] {
            same(&format!("encoder.layers.{l}.{s}"), true);
        }
        for s in ["layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"] {
            same(&format!("encoder.layers.{l}.{s}"), true);
        }
    }
    same("final_layer_norm", true);
    p.out
}

// ---------------------------------------------------------------------------------------------
// Loading and saving

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

/// Up to 10 lines of a list, and how many more there are.
fn listing(lines: &[String]) -> String {
    let mut s: String = lines.iter().take(10).map(|l| format!("\n  {l}")).collect();
    if lines.len() > 10 {
        s.push_str(&format!("\n  ... and {} more", lines.len() - 10));
    }
    s
}

/// Reads a single-file LDM checkpoint (safetensors; f32, f16 or bf16 -> f32) and returns the
/// (UNet, VAE, text encoder) stores under diffusers names, ready for each model's loader.
/// The file is read once, front to back, one tensor at a time. Unknown and missing keys are
/// reported, naming the file and the keys, before any tensor data is read.
pub fn load_single_file(
    path: impl AsRef<Path>,
    configs: &SingleFileConfigs,
    device: &Device,
) -> Result<(ParamStore, ParamStore, ParamStore)> {
    let path = path.as_ref();
    let tables = LdmKeyTables::new(configs)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let (header_len, meta) = read_header(path, &mut reader, file_len)?;

    // Classify every key first: a wrong file fails in milliseconds, not after gigabytes.
    let mut plan: Vec<Option<(Component, &KeyPair)>> = Vec::new();
    let mut unknown = Vec::new();
    let mut seen: BTreeMap<(Component, &str), &str> = BTreeMap::new();
    let names = meta.offset_keys();
    for name in &names {
        match tables.classify(name) {
            Ok(LdmKey::Skipped) => plan.push(None),
            Ok(LdmKey::Param(c, pair)) => {
                if let Some(other) = seen.insert((c, pair.diffusers.as_str()), name) {
                    return Err(file_err(
                        path,
                        format!("`{other}` and `{name}` both map to {c} parameter `{}`", pair.diffusers),
                    ));
                }
                plan.push(Some((c, pair)));
            }
            Err(why) => {
                unknown.push(format!("`{name}`: {why}"));
                plan.push(None);
            }
        }
    }
    if !unknown.is_empty() {
        return Err(file_err(
            path,
            format!(
                "{} unknown key(s) for an LDM Stable Diffusion checkpoint read with {}:{}",
                unknown.len(),
                configs.dir.as_ref().map_or("the embedded SD1.5 configs".to_string(), |d| d.display().to_string()),
                listing(&unknown)
            ),
        ));
    }
    let mut missing = Vec::new();
    for c in Component::ALL {
        for pair in tables.table(c).pairs() {
            if !seen.contains_key(&(c, pair.diffusers.as_str())) {
                missing.push(format!("`{}` ({c} `{}`)", pair.ldm, pair.diffusers));
            }
        }
    }
    if !missing.is_empty() {
        return Err(file_err(
            path,
            format!(
                "{} key(s) the configs call for are missing (a checkpoint of another model or size?):{}",
                missing.len(),
                listing(&missing)
            ),
        ));
    }

    let mut stores = [ParamStore::new(), ParamStore::new(), ParamStore::new()];
    let mut buf = Vec::new();
    let mut pos = 0usize; // bytes of tensor data consumed so far
    for (name, dest) in names.iter().zip(plan) {
        let info = meta.info(name).ok_or_else(|| file_err(path, format!("`{name}` vanished from the header")))?;
        let (start, end) = info.data_offsets;
        if start != pos {
            return Err(file_err(path, format!("`{name}`: data offsets are not contiguous")));
        }
        pos = end;
        let Some((c, pair)) = dest else {
            reader.seek_relative((end - start) as i64).map_err(|e| Error::io(path, e))?;
            continue;
        };
        buf.resize(end - start, 0);
        reader
            .read_exact(&mut buf)
            .map_err(|e| file_err(path, format!("reading `{name}` at byte {}: {e}", header_len + start as u64)))?;
        let view = TensorView::new(info.dtype, info.shape.clone(), &buf)
            .map_err(|e| file_err(path, format!("`{name}`: {e}")))?;
        let data = crate::params::to_f32(path, name, &view)?;
        let shape = if pair.conv1x1 { linear_shape(path, name, &info.shape)? } else { info.shape.clone() };
        let t = Tensor::from_vec(data, &shape, device)?;
        stores[c as usize].insert(pair.diffusers.clone(), t, true)?;
    }
    let [unet, vae, text] = stores;
    Ok((unet, vae, text))
}

/// (C, C, 1, 1) -> (C, C); an already (C, C) weight stays.
fn linear_shape(path: &Path, name: &str, shape: &[usize]) -> Result<Vec<usize>> {
    match shape {
        [o, i] | [o, i, 1, 1] => Ok(vec![*o, *i]),
        _ => Err(file_err(path, format!("`{name}` has shape {shape:?}, expected (C, C, 1, 1) or (C, C)"))),
    }
}

/// Parses the header through the safetensors crate's own validation, and checks that the file
/// holds all the data the header describes (a truncated download is the common failure).
fn read_header(path: &Path, r: &mut impl Read, file_len: u64) -> Result<(u64, Metadata)> {
    let bad = |msg: String| {
        file_err(path, format!("not a valid safetensors file ({msg}); is it truncated or another format?"))
    };
    let mut n = [0u8; 8];
    r.read_exact(&mut n).map_err(|e| bad(format!("no 8-byte header length: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!("header length {n} with a file of {file_len} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header).map_err(|e| bad(format!("reading the header: {e}")))?;
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let want = 8 + n + meta.data_len() as u64;
    if want != file_len {
        return Err(bad(format!("the header describes {want} bytes, the file has {file_len}")));
    }
    Ok((8 + n, meta))
}

/// Writes the three models' parameters (diffusers names) as one LDM checkpoint, the layout
/// other Stable Diffusion tools load; `dtype` F16 halves the file as the usual releases do.
/// A parameter outside the tables or one the tables call for but the stores lack is an error
/// naming it.
pub fn save_single_file(
    path: impl AsRef<Path>,
    unet: &ParamStore,
    vae: &ParamStore,
    text_encoder: &ParamStore,
    configs: &SingleFileConfigs,
    dtype: DType,
) -> Result<()> {
    let path = path.as_ref();
    let tables = LdmKeyTables::new(configs)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut problems = Vec::new();
    for (c, store) in [(Component::Unet, unet), (Component::Vae, vae), (Component::TextEncoder, text_encoder)] {
        let table = tables.table(c);
        let mut done = std::collections::HashSet::new();
        for (name, param) in store.iter() {
            let Some(pair) = table.by_diffusers(name) else {
                problems.push(format!("{c} `{name}`: not a parameter of these configs"));
                continue;
            };
            done.insert(pair.ldm.as_str());
            let v = param.stored_value();
            let v = match (pair.conv1x1, v.shape()) {
                (true, &[o, i]) => v.reshape_to(&[o, i, 1, 1])?,
                _ => v,
            };
            tensors.push((pair.ldm.clone(), v));
        }
        for pair in table.pairs() {
            if !done.contains(pair.ldm.as_str()) {
                problems.push(format!("{c} `{}`: missing from the store", pair.diffusers));
            }
        }
    }
    if !problems.is_empty() {
        return Err(file_err(path, format!("cannot write an LDM checkpoint:{}", listing(&problems))));
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::params::write_safetensors(path, tensors, dtype, meta)
}
