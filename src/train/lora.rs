//! LoRA adapters on a UNet's `Linear` layers, as PEFT builds them and diffusers saves them.
//!
//! An adapter adds `scale * B A x` to a frozen layer (`scale = alpha / rank`; A (rank, in),
//! B (out, rank)); only A and B train, in their own [`ParamStore`]. The DPO reference model is
//! the same base weights with the adapters off ([`lora_off`] on this thread, or
//! [`Lora::set_enabled`]), never a second copy.
//!
//! File format: diffusers' `pytorch_lora_weights.safetensors` as `save_lora_weights` writes it
//! for SD1.5 (and as `load_lora_weights` reads it):
//! `unet.<module>.lora.down.weight` = A, `unet.<module>.lora.up.weight` = B, metadata
//! `format = pt`, no alpha (diffusers then takes alpha = rank, scale 1). vipo folds its scale
//! into B on save, so a LoRA trained with alpha != rank loads in diffusers as the same function.
//! Loading also accepts PEFT's `lora_A` / `lora_B` names, a `base_model.model.` prefix, the
//! older attention-processor names (`attn1.processor.to_q_lora.down.weight`), `<module>.alpha`
//! scalars and diffusers' `lora_adapter_metadata` (`r`, `lora_alpha`, `use_rslora`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::nn::Linear;
use crate::params::{metadata, parse, read_file, to_f32, write_safetensors, Param, ParamStore};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// What every adapter of one LoRA shares: its on/off switch, train mode (dropout), a user
/// multiplier on the scale (`--lora-scale`), and the seeded generator dropout masks come from.
pub struct LoraState {
    enabled: AtomicBool,
    training: AtomicBool,
    multiplier: AtomicU32,
    seed: u64,
    /// (key, calls): masks are drawn statelessly from (seed, key, call number within the key),
    /// so a trainer that sets the key per (step, micro-batch) resumes with the same masks.
    stream: Mutex<(u64, u64)>,
}

impl LoraState {
    pub fn new(seed: u64) -> LoraState {
        LoraState {
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
            multiplier: AtomicU32::new(1f32.to_bits()),
            seed,
            stream: Mutex::new((0, 0)),
        }
    }
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
    /// Train mode turns dropout on (PEFT applies it only in `module.train()`).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed)
    }
    pub fn multiplier(&self) -> f32 {
        f32::from_bits(self.multiplier.load(Ordering::Relaxed))
    }
    pub fn set_multiplier(&self, m: f32) {
        self.multiplier.store(m.to_bits(), Ordering::Relaxed)
    }
    /// Restarts the dropout masks at the stream of `(step, micro)`: the n-th mask drawn after
    /// this depends only on (seed, step, micro, n), so resuming needs no saved RNG state.
    pub fn set_dropout_stream(&self, step: u64, micro: u64) {
        let key = mix(step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix(micro ^ 0xD80F));
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = (key, 0);
    }
    fn next_seed(&self) -> u64 {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let (key, n) = *s;
        s.1 += 1;
        mix(self.seed ^ mix(key ^ mix(n ^ 0x10_0A)))
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A low-rank adapter on a [`Linear`]: `y += multiplier * scale * (dropout(x) A^T) B^T`, as
/// PEFT's `lora.Linear` computes it (dropout on the input of A, train mode only).
#[derive(Clone)]
pub struct LoraAdapter {
    /// A, (rank, in): diffusers' `lora.down.weight`, PEFT's `lora_A.weight`.
    pub down: Arc<Param>,
    /// B, (out, rank): diffusers' `lora.up.weight`, PEFT's `lora_B.weight`.
    pub up: Arc<Param>,
    /// `alpha / rank`.
    pub scale: f32,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
    pub state: Arc<LoraState>,
}

impl LoraAdapter {
    /// The adapter's output `multiplier * scale * (dropout(x) A^T) B^T`: x (..., in) -> (..., out).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.dropout > 0.0 && self.state.is_training() {
            let p = self.dropout;
            // An inverted-dropout mask (0 or 1/(1-p)), drawn on the host from the LoRA's seed.
            let mut rng = Rng::new(self.state.next_seed());
            let keep = 1.0 / (1.0 - p);
            let m: Vec<f32> = (0..x.numel()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
            x.mul(&Tensor::from_vec(m, x.shape(), &x.device())?)?
        } else {
            x.clone()
        };
        let h = x.matmul_t(&self.down.value(), false, true)?; // (..., rank)
        let s = self.scale * self.state.multiplier();
        // Scaling the rank-wide activation is the cheapest place; 1.0 is skipped (exact anyway).
        let h = if s == 1.0 { h } else { h.mul_scalar(s)? };
        h.matmul_t(&self.up.value(), false, true) // (..., out)
    }
}

thread_local! {
    static LORA_OFF_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// While alive, every `Linear` on this thread runs without its LoRA adapter: the reference
/// model of DPO is the same base weights with the adapters off, not a second copy.
pub struct LoraOffGuard(());

impl Drop for LoraOffGuard {
    fn drop(&mut self) {
        LORA_OFF_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Turns LoRA adapters off on this thread until the guard drops (nests like `no_grad`).
pub fn lora_off() -> LoraOffGuard {
    LORA_OFF_DEPTH.with(|d| d.set(d.get() + 1));
    LoraOffGuard(())
}

pub fn lora_is_off() -> bool {
    LORA_OFF_DEPTH.with(|d| d.get() > 0)
}

/// How A is drawn (B always starts at zero, so a new LoRA leaves the model unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default (`init_lora_weights=True`): `kaiming_uniform_(a=sqrt(5))`, i.e.
    /// U(-1/sqrt(in), 1/sqrt(in)).
    KaimingUniform,
    /// PEFT's `init_lora_weights="gaussian"` (diffusers' DPO example): N(0, (1/rank)^2).
    Gaussian,
}

/// What a new LoRA looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    /// `scale = alpha / rank`.
    pub alpha: f32,
    /// Dropout on the adapter's input, in train mode only ([`Lora::train`]).
    pub dropout: f32,
    /// Layers to adapt, by PEFT's rule for a list: a module whose name equals an entry or ends
    /// with `.` + entry (`to_q` matches `...attn1.to_q`).
    pub target_modules: Vec<String>,
    pub init: LoraInit,
    /// Seeds A's draw and the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// Rank 4, alpha 4, no dropout, on to_q, to_k, to_v and to_out.0 of every attention
    /// layer (diffusers' SD1.5 DPO and LoRA examples), PEFT's default init.
    fn default() -> Self {
        LoraConfig {
            rank: 4,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| s.to_string()).collect(),
            init: LoraInit::KaimingUniform,
            seed: 0,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(format!("lora config: {what}")));
        if self.rank == 0 {
            return bad("rank 0 (needs at least 1)".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha {} must be a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must lie in [0, 1)", self.dropout));
        }
        if self.target_modules.is_empty() {
            return bad("no target modules".into());
        }
        Ok(())
    }
}

/// PEFT's match of a module name against a list of targets.
pub fn matches_target(name: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| name == t || name.ends_with(&format!(".{t}")))
}

/// Every `Linear` of the UNet's transformer blocks by checkpoint name, in forward order:
/// `<attn>.to_q`, `.to_k`, `.to_v`, `.to_out.0` of every attention layer
/// ([`UNet2DConditionModel::attention_modules`]), then each block's `ff.net.0.proj` and
/// `ff.net.2`. The returned layers share their weights and adapter slots with the model.
pub fn unet_linears(unet: &UNet2DConditionModel) -> Vec<(String, Linear)> {
    let mut out = Vec::new();
    for (prefix, attn) in unet.attention_modules() {
        for (name, l) in [("to_q", &attn.to_q), ("to_k", &attn.to_k), ("to_v", &attn.to_v), ("to_out.0", &attn.to_out)]
        {
            out.push((format!("{prefix}.{name}"), l.clone()));
        }
    }
    let transformers = unet
        .down_blocks
        .iter()
        .flat_map(|b| b.attentions())
        .chain(unet.mid_block.iter().flat_map(|m| &m.attentions))
        .chain(unet.up_blocks.iter().flat_map(|b| b.attentions()));
    for t in transformers {
        for b in &t.transformer_blocks {
            out.push((format!("{}.ff.net.0.proj", b.prefix), b.ff.net_0_proj.clone()));
            out.push((format!("{}.ff.net.2", b.prefix), b.ff.net_2.clone()));
        }
    }
    out
}

/// The file key of a module's A (`down`) or B (`up`) matrix, diffusers' naming.
pub fn lora_key(module: &str, up: bool) -> String {
    format!("unet.{module}.lora.{}.weight", if up { "up" } else { "down" })
}

/// A layer's matrices and alpha as read from a file: (down, up, alpha).
type Found = (Option<Tensor>, Option<Tensor>, Option<f32>);

/// One adapted layer.
struct LoraModule {
    name: String,
    linear: Linear,
    adapter: LoraAdapter,
}

/// A set of LoRA adapters attached to one UNet's layers. The adapters stay attached (and keep
/// their params alive) until [`Lora::detach`] or [`Lora::merge`]; dropping the `Lora` does not
/// remove them.
pub struct Lora {
    /// A and B by their file keys (`unet.<module>.lora.down.weight` / `.lora.up.weight`).
    pub store: ParamStore,
    pub state: Arc<LoraState>,
    modules: Vec<LoraModule>,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lora({} modules, {} params)", self.modules.len(), self.store.num_params())
    }
}

impl Lora {
    /// New adapters on every layer of `unet` that `cfg.target_modules` names, on the UNet's
    /// device: A drawn per `cfg.init`, B zero, both trainable. A layer that already has an
    /// adapter, or targets that match nothing, are errors.
    pub fn new(unet: &UNet2DConditionModel, cfg: &LoraConfig) -> Result<Lora> {
        cfg.validate()?;
        let device = unet.device();
        let state = Arc::new(LoraState::new(cfg.seed ^ 0xD1B5_4A32_D192_ED03));
        let mut rng = Rng::new(cfg.seed);
        let mut store = ParamStore::new();
        let mut modules = Vec::new();
        let scale = cfg.alpha / cfg.rank as f32;
        for (name, linear) in unet_linears(unet) {
            if !matches_target(&name, &cfg.target_modules) {
                continue;
            }
            let (out_dim, in_dim) = (linear.weight.shape()[0], linear.weight.shape()[1]);
            let r = cfg.rank;
            let a: Vec<f32> = match cfg.init {
                LoraInit::KaimingUniform => {
                    let bound = 1.0 / (in_dim as f32).sqrt();
                    (0..r * in_dim).map(|_| (2.0 * rng.uniform() - 1.0) * bound).collect()
                }
                LoraInit::Gaussian => (0..r * in_dim).map(|_| rng.normal() / r as f32).collect(),
            };
            let down = store.insert(lora_key(&name, false), Tensor::from_vec(a, &[r, in_dim], &device)?, true)?;
            let up = store.insert(lora_key(&name, true), Tensor::zeros(&[out_dim, r], &device)?, true)?;
            let adapter = LoraAdapter { down, up, scale, dropout: cfg.dropout, state: state.clone() };
            modules.push(LoraModule { name, linear, adapter });
        }
        if modules.is_empty() {
            let names: Vec<String> = unet_linears(unet).into_iter().map(|(n, _)| n).take(6).collect();
            return Err(Error::Invalid(format!(
                "lora: target modules {:?} match no layer of the UNet (layers are named like {})",
                cfg.target_modules,
                names.join(", ")
            )));
        }
        let lora = Lora { store, state, modules };
        lora.attach()?;
        Ok(lora)
    }

    /// Reads a LoRA file (see the module docs for the names accepted) and attaches it to
    /// `unet`'s layers, on the UNet's device, frozen (`store.set_trainable_where` to train on).
    /// Every key must name a layer of this UNet with matching shapes; errors name the key.
    pub fn load(unet: &UNet2DConditionModel, path: impl AsRef<Path>) -> Result<Lora> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let meta = metadata(path, &bytes)?;
        let ferr = |msg: String| Error::File { path: path.to_path_buf(), msg };
        let adapter_meta = AdapterMeta::from_metadata(&meta).map_err(ferr)?;
        let device = unet.device();
        let layers: BTreeMap<String, Linear> = unet_linears(unet).into_iter().collect();
        // module -> (down, up, alpha)
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        for key in names {
            let (module, part) = parse_lora_key(key).map_err(ferr)?;
            if !layers.contains_key(&module) {
                return Err(ferr(format!(
                    "key `{key}`: this UNet has no layer `{module}` (a LoRA for another model?)"
                )));
            }
            let view = st.tensor(key).map_err(|e| ferr(e.to_string()))?;
            let data = to_f32(path, key, &view)?;
            let entry = found.entry(module).or_default();
            match part {
                Part::Alpha => {
                    if data.len() != 1 {
                        return Err(ferr(format!("key `{key}`: alpha holds {} values, expected one", data.len())));
                    }
                    entry.2 = Some(data[0]);
                }
                Part::Down | Part::Up => {
                    let t = Tensor::from_vec(data, view.shape(), &device)?;
                    let slot = if part == Part::Down { &mut entry.0 } else { &mut entry.1 };
                    if slot.is_some() {
                        return Err(ferr(format!("key `{key}`: a second {part:?} matrix for the same layer")));
                    }
                    *slot = Some(t);
                }
            }
        }
        if found.is_empty() {
            return Err(ferr("holds no LoRA weights".into()));
        }
        let state = Arc::new(LoraState::new(0));
        let mut store = ParamStore::new();
        let mut modules = Vec::new();
        for (name, (down, up, alpha)) in found {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(ferr(format!("layer `{name}` has only one of its two LoRA matrices (down/A and up/B)")));
            };
            let linear = layers[&name].clone();
            let (out_dim, in_dim) = (linear.weight.shape()[0], linear.weight.shape()[1]);
            let r = down.shape().first().copied().unwrap_or(0);
            if r == 0 || down.shape() != [r, in_dim] || up.shape() != [out_dim, r] {
                return Err(ferr(format!(
                    "layer `{name}` (weight {:?}): LoRA down {:?} and up {:?} do not fit; expected ({r}, {in_dim}) and \
                     ({out_dim}, {r})",
                    linear.weight.shape(),
                    down.shape(),
                    up.shape()
                )));
            }
            let scale = match alpha {
                Some(a) => a / r as f32,
                None => adapter_meta.scale(r),
            };
            let down = store.insert(lora_key(&name, false), down, false)?;
            let up = store.insert(lora_key(&name, true), up, false)?;
            let adapter = LoraAdapter { down, up, scale, dropout: 0.0, state: state.clone() };
            modules.push(LoraModule { name, linear, adapter });
        }
        let lora = Lora { store, state, modules };
        lora.attach()?;
        Ok(lora)
    }

    fn attach(&self) -> Result<()> {
        for m in &self.modules {
            let slot = m.linear.lora.read().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return Err(Error::Invalid(format!(
                    "lora: layer `{}` already has an adapter (detach or merge the other LoRA first)",
                    m.name
                )));
            }
        }
        for m in &self.modules {
            *m.linear.lora.write().unwrap_or_else(|e| e.into_inner()) = Some(m.adapter.clone());
        }
        Ok(())
    }

    /// Removes these adapters from their layers (layers holding another LoRA's are left alone).
    pub fn detach(&self) {
        for m in &self.modules {
            let mut slot = m.linear.lora.write().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|a| Arc::ptr_eq(&a.state, &self.state)) {
                *slot = None;
            }
        }
    }

    /// Adds `multiplier * scale * B A` into each base weight and detaches the adapters: the
    /// model then computes what it computed with them, without the extra matmuls (sampling).
    /// f16-stored weights round the sum to f16.
    pub fn merge(self) -> Result<()> {
        let _g = no_grad();
        let m = self.state.multiplier();
        for lm in &self.modules {
            let a = &lm.adapter;
            let s = a.scale * m;
            let delta = a.up.frozen_value().matmul(&a.down.frozen_value())?; // (out, in)
            let delta = if s == 1.0 { delta } else { delta.mul_scalar(s)? };
            lm.linear.weight.set_value(lm.linear.weight.frozen_value().add(&delta)?)?;
        }
        self.detach();
        Ok(())
    }

    /// Writes `pytorch_lora_weights.safetensors`-style content to `path` (see the module docs):
    /// diffusers' names, f32, B scaled by `alpha / rank` so that diffusers (which assumes
    /// alpha = rank) computes the same function. The runtime multiplier is not saved.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let _g = no_grad();
        let mut tensors = Vec::with_capacity(2 * self.modules.len());
        for m in &self.modules {
            let a = &m.adapter;
            let up = a.up.frozen_value();
            let up = if a.scale == 1.0 { up } else { up.mul_scalar(a.scale)? };
            tensors.push((lora_key(&m.name, false), a.down.frozen_value()));
            tensors.push((lora_key(&m.name, true), up));
        }
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(path.as_ref(), tensors, DType::F32, meta)
    }

    /// Saves as `dir/pytorch_lora_weights.safetensors` (diffusers' file name), creating `dir`.
    pub fn save_dir(&self, dir: impl AsRef<Path>) -> Result<std::path::PathBuf> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("pytorch_lora_weights.safetensors");
        self.save(&path)?;
        Ok(path)
    }

    /// Turns every adapter of this LoRA on or off (for all threads; [`lora_off`] is per thread).
    pub fn set_enabled(&self, on: bool) {
        self.state.set_enabled(on)
    }
    pub fn is_enabled(&self) -> bool {
        self.state.is_enabled()
    }
    /// Train mode: dropout on. Off by default (and for loaded LoRAs, which have no dropout).
    pub fn train(&self, on: bool) {
        self.state.set_training(on)
    }
    /// Dropout masks from here on come from the stream of (step, micro) (see
    /// [`LoraState::set_dropout_stream`]).
    pub fn set_dropout_stream(&self, step: u64, micro: u64) {
        self.state.set_dropout_stream(step, micro)
    }
    /// Multiplies every adapter's output by `m` (diffusers' `lora_scale`); 1 by default.
    pub fn set_multiplier(&self, m: f32) {
        self.state.set_multiplier(m)
    }

    /// The trainable A and B params, in key order (what the optimizer takes).
    pub fn params(&self) -> Vec<Arc<Param>> {
        self.store.trainable()
    }
    /// The adapted layers' names, sorted.
    pub fn module_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.modules.iter().map(|m| m.name.clone()).collect();
        v.sort();
        v
    }
    pub fn len(&self) -> usize {
        self.modules.len()
    }
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
    /// `alpha / rank` of the adapter on `module`.
    pub fn scale_of(&self, module: &str) -> Option<f32> {
        self.modules.iter().find(|m| m.name == module).map(|m| m.adapter.scale)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// (module name in diffusers' UNet naming, which matrix) of one LoRA file key.
fn parse_lora_key(key: &str) -> std::result::Result<(String, Part), String> {
    if key.starts_with("text_encoder") || key.starts_with("lora_te") || key.starts_with("te_") {
        return Err(format!("key `{key}`: text-encoder LoRA weights are not supported (only the UNet's)"));
    }
    if key.starts_with("lora_unet_") {
        return Err(format!("key `{key}`: kohya-style LoRA names are not supported; convert to diffusers' names"));
    }
    let mut k = key;
    for prefix in ["unet.", "base_model.model."] {
        if let Some(rest) = k.strip_prefix(prefix) {
            k = rest;
        }
    }
    // diffusers' older attention-processor names: `attn1.processor.to_q_lora.down.weight`
    // is `attn1.to_q.lora.down.weight`.
    let mut k = k.to_string();
    for (old, new) in [("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")] {
        k = k.replace(&format!(".processor.{old}_lora."), &format!(".{new}.lora."));
    }
    if k.contains(".processor.") {
        return Err(format!("key `{key}`: unknown attention-processor LoRA (expected to_q/to_k/to_v/to_out_lora)"));
    }
    let (module, part) = if let Some(m) = k.strip_suffix(".alpha") {
        (m.to_string(), Part::Alpha)
    } else {
        let suffixes = [
            (".lora.down.weight", Part::Down),
            (".lora.up.weight", Part::Up),
            (".lora_A.weight", Part::Down),
            (".lora_B.weight", Part::Up),
            (".lora_A.default.weight", Part::Down),
            (".lora_B.default.weight", Part::Up),
            (".lora_down.weight", Part::Down),
            (".lora_up.weight", Part::Up),
        ];
        let Some((m, p)) = suffixes.iter().find_map(|(s, p)| k.strip_suffix(s).map(|m| (m, *p))) else {
            return Err(format!(
                "key `{key}` is not a LoRA matrix (expected `<layer>.lora.down.weight`, `.lora.up.weight`, \
                 `.lora_A.weight` or `.lora_B.weight`)"
            ));
        };
        (m.to_string(), p)
    };
    Ok((module, part))
}

/// What diffusers' `lora_adapter_metadata` says about the scale (absent: alpha = rank).
#[derive(Default)]
struct AdapterMeta {
    lora_alpha: Option<f64>,
    rslora: bool,
}

impl AdapterMeta {
    fn from_metadata(meta: &std::collections::HashMap<String, String>) -> std::result::Result<AdapterMeta, String> {
        let Some(text) = meta.get("lora_adapter_metadata") else { return Ok(AdapterMeta::default()) };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("metadata `lora_adapter_metadata` is not JSON: {e}"))?;
        // The pipeline saver packs the UNet's config as `unet.<field>`; a model saver writes `<field>`.
        let get = |f: &str| v.get(format!("unet.{f}")).or_else(|| v.get(f)).filter(|x| !x.is_null()).cloned();
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if let Some(p) = get(pattern) {
                if p.as_object().is_some_and(|o| !o.is_empty()) {
                    return Err(format!("metadata `lora_adapter_metadata`: a non-empty `{pattern}` is not supported"));
                }
            }
        }
        Ok(AdapterMeta {
            lora_alpha: get("lora_alpha").and_then(|x| x.as_f64()),
            rslora: get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
        })
    }

    /// PEFT's scaling for a layer of rank `r`.
    fn scale(&self, r: usize) -> f32 {
        let alpha = self.lora_alpha.unwrap_or(r as f64);
        let s = if self.rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        s as f32
    }
}
