//! transformers' `CLIPTextModel`: the text encoder of SD1.x (OpenAI CLIP ViT-L/14) and, in the
//! same layout, of SD2.x (OpenCLIP ViT-H/14, `hidden_act = "gelu"`).
//!
//! Structs are named after the checkpoint keys (`text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.N.self_attn.q_proj.weight`, `text_model.final_layer_norm.bias`);
//! checkpoints with and without the `text_model.` prefix both load.
//!
//! The encoder is pre-LayerNorm with a causal mask and no padding mask (diffusers passes no
//! `attention_mask` for SD). The fused attention op takes no mask, so the self-attention is
//! composed: `softmax(q k^T * scale + causal) v`; with 77 tokens the score matrix is tiny.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::{LayerNorm, Linear};
use crate::params::{Param, ParamPath, ParamStore};
use crate::tensor::Tensor;

/// The prefix real checkpoints put before every key.
pub const TEXT_MODEL_PREFIX: &str = "text_model";

/// Added to the scores above the diagonal. Finite, so a fully masked score minus the row max
/// is never `inf - inf`; `exp` of it underflows to 0 as with transformers' `finfo.min`.
const CAUSAL_MASK_VALUE: f32 = -1e9;

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI's CLIP (SD1.x).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (SD2.x).
    Gelu,
}

impl ClipActivation {
    pub fn parse(value: &str) -> Result<ClipActivation> {
        match value {
            "quick_gelu" => Ok(ClipActivation::QuickGelu),
            "gelu" => Ok(ClipActivation::Gelu),
            other => Err(Error::Invalid(format!(
                "CLIPTextConfig: hidden_act = \"{other}\" is not supported (supported: \"quick_gelu\", \"gelu\")"
            ))),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            ClipActivation::QuickGelu => x.quick_gelu(),
            ClipActivation::Gelu => x.gelu(),
        }
    }
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_max_pos() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_pad() -> u32 {
    1
}
fn d_bos() -> u32 {
    49406
}
fn d_eos() -> u32 {
    49407
}

/// transformers' `CLIPTextConfig` as `config.json` holds it; defaults are transformers' own,
/// unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// `"quick_gelu"` or `"gelu"`; see [`ClipTextConfig::activation`].
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    /// 2 in configs written before transformers PR #24773: pooling then takes the argmax id.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    /// Width of `CLIPTextModelWithProjection`'s projection; unused by `CLIPTextModel`.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// transformers 4 writes `torch_dtype`, 5 writes `dtype`; weights load as f32 either way.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
}

impl ClipTextConfig {
    /// Parses and validates a `config.json` text.
    pub fn from_json_str(text: &str) -> Result<ClipTextConfig> {
        let cfg: ClipTextConfig =
            serde_json::from_str(text).map_err(|e| Error::Invalid(format!("CLIPTextConfig: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipTextConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        ClipTextConfig::from_json_str(&text).map_err(|e| Error::File { path: path.to_path_buf(), msg: e.to_string() })
    }

    pub fn activation(&self) -> Result<ClipActivation> {
        ClipActivation::parse(&self.hidden_act)
    }

    /// The checkpoint's dtype as the config states it (`dtype`, else `torch_dtype`).
    pub fn checkpoint_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Rejects what the model cannot run, naming the key and its value.
    pub fn validate(&self) -> Result<()> {
        self.activation()?;
        let bad = |key: &str, v: usize, why: &str| Err(Error::Invalid(format!("CLIPTextConfig: {key} = {v} {why}")));
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(key, v, "must be positive");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                self.num_attention_heads,
                &format!("does not divide hidden_size = {}", self.hidden_size),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(Error::Invalid(format!(
                "CLIPTextConfig: layer_norm_eps = {} must be positive",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }
}

/// Rows of `table` (V, C) at `ids`, checking each id; -> N * C values.
fn gather_rows(table: &[f32], vocab: usize, dim: usize, ids: &[u32]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let i = id as usize;
        if i >= vocab {
            return Err(Error::Invalid(format!(
                "embedding: token id {id} is out of range for a vocabulary of {vocab}"
            )));
        }
        out.extend_from_slice(&table[i * dim..(i + 1) * dim]);
    }
    Ok(out)
}

/// `embedding` with the table's values already on the host (`host` = `weight`'s values).
/// Backward: the gradient rows scatter-added into a (V, C) zero table, on the host, then uploaded.
fn embedding_with_host(ids: &[u32], weight: &Tensor, host: &[f32]) -> Result<Tensor> {
    const OP: &str = "embedding";
    weight.ensure_f32(OP)?;
    let &[vocab, dim] = weight.shape() else {
        return Err(Error::shape(OP, format!("weight must be (vocab, dim), got {:?}", weight.shape())));
    };
    if host.len() != vocab * dim {
        return Err(Error::shape(OP, format!("host table of {} values for weight {:?}", host.len(), weight.shape())));
    }
    let device = weight.device();
    let out = Tensor::from_vec(gather_rows(host, vocab, dim, ids)?, &[ids.len(), dim], &device)?;
    if !crate::autograd::will_record(&[weight]) {
        return Ok(out);
    }
    let ids = ids.to_vec();
    Ok(crate::autograd::record(OP, out, &[weight], move |g, _| {
        // g (N, C) is small; the (V, C) result is what the weight's gradient needs anyway.
        let gv = g.to_vec()?;
        let mut dw = vec![0f32; vocab * dim];
        for (row, &id) in gv.chunks_exact(dim).zip(&ids) {
            let i = id as usize * dim;
            for (d, &v) in dw[i..i + dim].iter_mut().zip(row) {
                *d += v;
            }
        }
        Ok(vec![Some(Tensor::from_vec(dw, &[vocab, dim], &device)?)])
    }))
}

/// `F.embedding(ids, weight)`: rows of `weight` (V, C) at `ids` -> (N, C), differentiable in
/// `weight`. Gathered on the host: a CPU table is read in place, a GPU table is downloaded
/// first, so for large GPU tables use [`TokenEmbedding`], which keeps a host copy.
pub fn embedding(ids: &[u32], weight: &Tensor) -> Result<Tensor> {
    match weight.device() {
        Device::Cpu => {
            weight.ensure_f32("embedding")?;
            embedding_with_host(ids, weight, weight.cpu_f32("embedding")?)
        }
        Device::Gpu(_) => embedding_with_host(ids, weight, &weight.to_vec()?),
    }
}

/// The GPU value a host copy was read from, and the copy.
type HostCopy = Option<(Tensor, Arc<Vec<f32>>)>;

/// A token-embedding table (V, C). There is no gather kernel: rows are gathered on the host and
/// the (N, C) result uploaded. A CPU table is read in place; for a GPU table a host copy is
/// downloaded once and reused until the param's value is replaced (an optimizer step, `to`),
/// because downloading SD's 49408 x 768 table per prompt would cost more than the encoder.
#[derive(Clone)]
pub struct TokenEmbedding {
    pub weight: Arc<Param>,
    host: Arc<Mutex<HostCopy>>,
}

impl TokenEmbedding {
    pub fn load(vb: &ParamPath, vocab: usize, dim: usize) -> Result<TokenEmbedding> {
        Ok(TokenEmbedding { weight: vb.get_shaped("weight", &[vocab, dim])?, host: Arc::new(Mutex::new(None)) })
    }

    /// ids (N) -> (N, C).
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        if self.weight.is_trainable() || self.weight.device().is_cpu() {
            let w = self.weight.value();
            if w.device().is_cpu() {
                return embedding(ids, &w);
            }
            return embedding_with_host(ids, &w, &self.host_copy(&w)?);
        }
        // A frozen GPU table: keyed and read through its stored value, so f16 storage is not
        // widened on the device for every prompt (only the gathered rows are uploaded).
        let stored = self.weight.stored_value();
        let host = self.host_copy(&stored)?;
        let &[vocab, dim] = stored.shape() else {
            return Err(Error::shape("embedding", format!("weight must be (vocab, dim), got {:?}", stored.shape())));
        };
        Tensor::from_vec(gather_rows(&host, vocab, dim, ids)?, &[ids.len(), dim], &stored.device())
    }

    /// The host copy of `w`'s values, downloaded again only when the storage changed.
    fn host_copy(&self, w: &Tensor) -> Result<Arc<Vec<f32>>> {
        let mut slot = self.host.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((t, h)) if t.same_storage(w) => Ok(h.clone()),
            _ => {
                let h = Arc::new(w.to_vec()?);
                *slot = Some((w.detach(), h.clone()));
                Ok(h)
            }
        }
    }
}

/// `text_model.embeddings`: token embedding plus learned absolute positions.
#[derive(Clone)]
pub struct ClipTextEmbeddings {
    pub token_embedding: TokenEmbedding,
    /// (max_position_embeddings, hidden)
    pub position_embedding: Arc<Param>,
}

impl ClipTextEmbeddings {
    pub fn load(vb: &ParamPath, cfg: &ClipTextConfig) -> Result<ClipTextEmbeddings> {
        // Checkpoints of transformers < 4.31 store the `position_ids` buffer (0..77); it is
        // recomputed here, so it is only marked as read.
        if vb.contains("position_ids") {
            vb.get("position_ids")?;
        }
        Ok(ClipTextEmbeddings {
            token_embedding: TokenEmbedding::load(&vb.pp("token_embedding"), cfg.vocab_size, cfg.hidden_size)?,
            position_embedding: vb
                .pp("position_embedding")
                .get_shaped("weight", &[cfg.max_position_embeddings, cfg.hidden_size])?,
        })
    }

    /// ids: B rows of L ids -> (B, L, hidden).
    pub fn forward(&self, ids: &[u32], b: usize, l: usize) -> Result<Tensor> {
        let tok = self.token_embedding.forward(ids)?; // (B * L, C)
        let c = tok.shape()[1];
        let tok = tok.reshape_to(&[b, l, c])?;
        let pos = self.position_embedding.value().slice(0, 0, l)?; // (L, C)
        tok.add(&pos)
    }
}

/// `self_attn`: causal multi-head self-attention with q/k/v/out projections (all with bias).
#[derive(Clone)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl ClipAttention {
    pub fn load(vb: &ParamPath, cfg: &ClipTextConfig) -> Result<ClipAttention> {
        let c = cfg.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::load(&vb.pp("q_proj"), c, c, true)?,
            k_proj: Linear::load(&vb.pp("k_proj"), c, c, true)?,
            v_proj: Linear::load(&vb.pp("v_proj"), c, c, true)?,
            out_proj: Linear::load(&vb.pp("out_proj"), c, c, true)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// x (B, L, C), mask (L, L) of 0 / large negative -> (B, L, C).
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let d = c / self.heads;
        // (B, L, C) -> (B, heads, L, d)
        let split = |t: Tensor| t.reshape_to(&[b, l, self.heads, d])?.permute(&[0, 2, 1, 3]);
        let q = split(self.q_proj.forward(x)?.mul_scalar((d as f32).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let p = q.matmul_t(&k, false, true)?.add(mask)?.softmax_last()?; // (B, heads, L, L)
        let o = p.matmul(&v)?.permute(&[0, 2, 1, 3])?.reshape_to(&[b, l, c])?;
        self.out_proj.forward(&o)
    }
}

/// `mlp`: fc1, activation, fc2.
#[derive(Clone)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: ClipActivation,
}

impl ClipMlp {
    pub fn load(vb: &ParamPath, cfg: &ClipTextConfig) -> Result<ClipMlp> {
        Ok(ClipMlp {
            fc1: Linear::load(&vb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::load(&vb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
            act: cfg.activation()?,
        })
    }

    /// x (..., C) -> (..., C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(x)?)?)
    }
}

/// `encoder.layers.N`: pre-LN attention and MLP blocks, each with a residual.
#[derive(Clone)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

impl ClipEncoderLayer {
    pub fn load(vb: &ParamPath, cfg: &ClipTextConfig) -> Result<ClipEncoderLayer> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps as f32);
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), c, eps)?,
            self_attn: ClipAttention::load(&vb.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), c, eps)?,
            mlp: ClipMlp::load(&vb.pp("mlp"), cfg)?,
        })
    }

    /// x (B, L, C), mask (L, L) -> (B, L, C).
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = x.add(&self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        h.add(&self.mlp.forward(&self.layer_norm2.forward(&h)?)?)
    }
}

/// `text_model.encoder`.
#[derive(Clone)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

/// What [`ClipTextModel::forward`] returns (transformers' `BaseModelOutputWithPooling`).
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// (B, L, hidden), after `final_layer_norm`: SD's prompt embeddings.
    pub last_hidden_state: Tensor,
    /// (B, hidden): `last_hidden_state` at the EOS position (see [`eos_positions`]).
    pub pooled: Tensor,
    /// With `output_hidden_states`: num_hidden_layers + 1 tensors (B, L, hidden), the
    /// embeddings then each layer's output, before `final_layer_norm` (diffusers' `clip_skip`
    /// takes `hidden_states[-(k + 1)]` and applies `final_layer_norm` to it).
    pub hidden_states: Option<Vec<Tensor>>,
}

/// Where transformers pools each row: with `eos_token_id == 2` (configs older than PR #24773,
/// e.g. SD1.5's) the position of the largest id, else the first `eos_token_id`; the first
/// position wins ties and a row without EOS pools position 0 (torch's `argmax`).
pub fn eos_positions<S: AsRef<[u32]>>(ids: &[S], eos_token_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            let row = row.as_ref();
            if eos_token_id == 2 {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best
            } else {
                row.iter().position(|&v| v == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

/// transformers' `CLIPTextModel` (its `text_model`, a `CLIPTextTransformer`).
#[derive(Clone)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    /// `"text_model"` or `""`: the prefix the checkpoint's keys carried.
    pub prefix: String,
    params: Vec<Arc<Param>>,
}

impl ClipTextModel {
    /// Builds the model from a store with keys under `text_model.` or without a prefix
    /// (whichever holds `embeddings.token_embedding.weight`), then checks that every key of the
    /// store was used. Missing, misshapen and unexpected keys are errors naming the key.
    pub fn load(store: &ParamStore, config: &ClipTextConfig) -> Result<ClipTextModel> {
        config.validate()?;
        let probe = "embeddings.token_embedding.weight";
        let prefix = if !store.contains(&format!("{TEXT_MODEL_PREFIX}.{probe}")) && store.contains(probe) {
            ""
        } else {
            TEXT_MODEL_PREFIX // also when neither is there, so the error names the usual key
        };
        let vb = store.pp(prefix);
        let embeddings = ClipTextEmbeddings::load(&vb.pp("embeddings"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&vb.pp("encoder").pp("layers").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::load(&vb.pp("final_layer_norm"), config.hidden_size, config.layer_norm_eps as f32)?;
        store.check_all_used()?;
        let params =
            store.iter().filter(|(k, _)| !k.ends_with("embeddings.position_ids")).map(|(_, p)| p.clone()).collect();
        Ok(ClipTextModel {
            config: config.clone(),
            embeddings,
            encoder: ClipEncoder { layers },
            final_layer_norm,
            prefix: prefix.to_string(),
            params,
        })
    }

    /// A randomly initialised text encoder for `config` on `device`, and the store holding its
    /// params under the usual `text_model.` names (all trainable; saved as `model.safetensors`
    /// it loads with [`Self::from_dir`]). The same `seed` gives the same weights; see
    /// [`ParamStore::init_random`] for the values.
    pub fn init_params(config: &ClipTextConfig, seed: u64, device: &Device) -> Result<(ClipTextModel, ParamStore)> {
        let store = ParamStore::init_random(seed, device, |s| Self::load(s, config).map(|_| ()))?;
        let model = Self::load(&store, config)?;
        Ok((model, store))
    }

    /// Loads a transformers folder: `config.json` + `model.safetensors` (f32, f16 or bf16).
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<ClipTextModel> {
        ClipTextModel::from_dir_variant(dir, device, None)
    }

    /// As [`ClipTextModel::from_dir`], reading `model.<variant>.safetensors` (e.g. `fp16`).
    pub fn from_dir_variant(dir: impl AsRef<Path>, device: &Device, variant: Option<&str>) -> Result<ClipTextModel> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::from_file(dir.join("config.json"))?;
        let path = model_file(dir, variant);
        if !path.is_file() {
            let msg = "no such file (sharded text encoders are not supported yet)".to_string();
            return Err(Error::File { path, msg });
        }
        let store = load_store(&path, device)?;
        let named = store.source().is_some();
        ClipTextModel::load(&store, &config).map_err(|e| match e {
            // A store built here has no source: put the file in its messages.
            Error::Invalid(msg) | Error::Shape { msg, .. } if !named => Error::File { path: path.clone(), msg },
            other => other,
        })
    }

    /// Every parameter, in key order (for freezing, an optimizer, moving to a device).
    pub fn params(&self) -> &[Arc<Param>] {
        &self.params
    }

    /// Sets every parameter trainable or frozen (SD training freezes the text encoder).
    pub fn set_trainable(&self, trainable: bool) {
        self.params.iter().for_each(|p| p.set_trainable(trainable));
    }

    pub fn device(&self) -> Device {
        self.final_layer_norm.weight.device()
    }

    /// ids: B rows of L ids each (1 <= L <= max_position_embeddings); no hidden states kept.
    pub fn forward<S: AsRef<[u32]>>(&self, ids: &[S]) -> Result<ClipTextOutput> {
        self.forward_with(ids, false)
    }

    /// As [`ClipTextModel::forward`], keeping every layer's output when `output_hidden_states`.
    pub fn forward_with<S: AsRef<[u32]>>(&self, ids: &[S], output_hidden_states: bool) -> Result<ClipTextOutput> {
        const OP: &str = "CLIPTextModel";
        let b = ids.len();
        let l = ids.first().map_or(0, |r| r.as_ref().len());
        if b == 0 || l == 0 {
            return Err(Error::shape(OP, format!("needs at least one row of ids, got {b} rows of {l}")));
        }
        if let Some((i, r)) = ids.iter().enumerate().find(|(_, r)| r.as_ref().len() != l) {
            return Err(Error::shape(
                OP,
                format!("row {i} has {} ids, row 0 has {l}; pad every row to one length", r.as_ref().len()),
            ));
        }
        let max = self.config.max_position_embeddings;
        if l > max {
            return Err(Error::shape(OP, format!("{l} ids per row exceed max_position_embeddings = {max}")));
        }
        let flat: Vec<u32> = ids.iter().flat_map(|r| r.as_ref().iter().copied()).collect();
        let mut h = self.embeddings.forward(&flat, b, l)?; // (B, L, C)
        let mask = causal_mask(l, &self.device())?; // (L, L)
        let mut hidden_states = output_hidden_states.then(|| vec![h.clone()]);
        for layer in &self.encoder.layers {
            h = layer.forward(&h, &mask)?;
            if let Some(hs) = hidden_states.as_mut() {
                hs.push(h.clone());
            }
        }
        let last = self.final_layer_norm.forward(&h)?;
        let c = self.config.hidden_size;
        let rows = last.reshape_to(&[b * l, c])?;
        let picked = eos_positions(ids, self.config.eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(i, p)| rows.slice(0, i * l + p, 1))
            .collect::<Result<Vec<_>>>()?;
        let pooled =
            if picked.len() == 1 { picked[0].clone() } else { Tensor::concat(&picked.iter().collect::<Vec<_>>(), 0)? };
        Ok(ClipTextOutput { last_hidden_state: last, pooled, hidden_states })
    }
}

/// (L, L): 0 on and below the diagonal, a large negative above it.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let v = (0..l * l).map(|i| if i % l > i / l { CAUSAL_MASK_VALUE } else { 0.0 }).collect();
    Tensor::from_vec(v, &[l, l], device)
}

/// Loads a text-encoder checkpoint. Files written by transformers < 4.31 also hold the int64
/// `embeddings.position_ids` buffer, which `ParamStore::load_safetensors` (floats only) rejects:
/// such files are read here with that buffer left out.
fn load_store(path: &Path, device: &Device) -> Result<ParamStore> {
    let bytes = crate::params::read_file(path)?;
    let st = crate::params::parse(path, &bytes)?;
    let is_buffer = |name: &str| name == "embeddings.position_ids" || name.ends_with(".embeddings.position_ids");
    if !st.names().iter().any(|n| is_buffer(n)) {
        drop(st);
        drop(bytes);
        return ParamStore::load_safetensors(path, device);
    }
    let mut names: Vec<&str> = st.names().into_iter().filter(|n| !is_buffer(n)).collect();
    names.sort_unstable();
    let mut store = ParamStore::new();
    for name in names {
        let view = st.tensor(name).map_err(|e| Error::File { path: path.to_path_buf(), msg: e.to_string() })?;
        let t = Tensor::from_vec(crate::params::to_f32(path, name, &view)?, view.shape(), device)?;
        store.insert(name, t, true)?;
    }
    Ok(store)
}

/// The weights file of a text-encoder folder: `model.safetensors` or `model.<variant>.safetensors`.
pub fn model_file(dir: &Path, variant: Option<&str>) -> PathBuf {
    match variant {
        Some(v) => dir.join(format!("model.{v}.safetensors")),
        None => dir.join("model.safetensors"),
    }
}
