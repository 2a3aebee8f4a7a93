//! The latent cache: every usable pair's two images encoded once by the VAE (center crop, no
//! flip, the posterior mean scaled like `AutoencoderKL::latents_from_image(x, None)`), stored
//! in safetensors shards as `{index}.chosen` / `{index}.rejected` (C, h, w) f32 tensors keyed
//! by the pair's source index, with each shard's prompts in its `pairs` metadata, and a
//! `manifest.json` that records what made them. Opening with a different VAE, size or filter
//! is an error that says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::image::{stack_pairs, Crop, LoaderOptions, PairLoader, Resample};
use super::{DataSource, PairStream, SourceCounts};
use crate::error::{Error, Result};
use crate::models::autoencoder_kl::AutoencoderKL;

pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "vipo-latent-cache";
const VERSION: u32 = 1;

/// What the latents depend on; a cache is only reused when all of it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    /// A 64-bit hash of the VAE's `config.json` and weights file (see [`vae_fingerprint`]).
    pub vae_fingerprint: String,
    /// Pixels of the square crop the VAE encoded.
    pub size: usize,
    pub resample: Resample,
    pub crop: Crop,
}

impl CacheKey {
    /// The key of center crops at `size` encoded by the VAE in `vae_dir` (`variant` weights).
    pub fn for_vae(vae_dir: &Path, variant: Option<&str>, size: usize, resample: Resample) -> Result<CacheKey> {
        Ok(CacheKey { vae_fingerprint: vae_fingerprint(vae_dir, variant)?, size, resample, crop: Crop::Center })
    }
}

/// One shard file and the pair indices it holds (ascending).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub pairs: u64,
    pub first_index: u64,
    pub last_index: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheManifest {
    pub format: String,
    pub version: u32,
    pub key: CacheKey,
    /// Where things came from (for people; the key decides compatibility).
    pub vae_dir: String,
    pub source: String,
    pub keep_ties: bool,
    /// (C, h, w) of every latent.
    pub latent_shape: [usize; 3],
    pub scaling_factor: f32,
    pub shift_factor: f32,
    pub pairs: u64,
    pub source_counts: SourceCounts,
    pub undecodable_pairs: u64,
    pub undecodable_images: u64,
    pub shards: Vec<ShardInfo>,
}

/// A pair's text, kept beside its latents (each shard's `pairs` metadata, a JSON list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedPairInfo {
    pub index: u64,
    pub prompt: String,
    pub category: Option<String>,
    pub tie: bool,
}

/// A cached pair: latents (C, h, w) of both images, ready for the diffusion model.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPair {
    pub info: CachedPairInfo,
    /// (C, h, w)
    pub chosen: Vec<f32>,
    /// (C, h, w)
    pub rejected: Vec<f32>,
}

/// The weights file `AutoencoderKL::from_dir` loads for `variant`.
fn vae_weights(dir: &Path, variant: Option<&str>) -> Result<PathBuf> {
    let names: Vec<String> = ["diffusion_pytorch_model", "model"]
        .iter()
        .map(|stem| match variant {
            Some(v) => format!("{stem}.{v}.safetensors"),
            None => format!("{stem}.safetensors"),
        })
        .collect();
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| Error::File {
        path: dir.to_path_buf(),
        msg: format!("no VAE weights: neither {} exists", names.join(" nor ")),
    })
}

/// FNV-1a over 8-byte words (a byte-wise tail), fast enough for a 335 MB VAE in a fraction of a
/// second; an identity check, not a cryptographic one.
fn hash_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(PRIME);
    }
    h
}

/// A hash of a diffusers VAE folder's `config.json` and the weights file `variant` selects.
pub fn vae_fingerprint(dir: &Path, variant: Option<&str>) -> Result<String> {
    let cfg = dir.join("config.json");
    let weights = vae_weights(dir, variant)?;
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    h = hash_bytes(h, &std::fs::read(&cfg).map_err(|e| Error::io(&cfg, e))?);
    // Streamed, so the weights are not held twice (the VAE itself is loaded too).
    use std::io::Read;
    let mut f = std::fs::File::open(&weights).map_err(|e| Error::io(&weights, e))?;
    let mut buf = vec![0u8; 1 << 22];
    let mut carry = Vec::new();
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(&weights, e))?;
        if n == 0 {
            break;
        }
        carry.extend_from_slice(&buf[..n]);
        let whole = carry.len() / 8 * 8;
        h = hash_bytes(h, &carry[..whole]);
        carry.drain(..whole);
    }
    h = hash_bytes(h, &carry);
    Ok(format!("{h:016x}"))
}

/// How `build` encodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    pub size: usize,
    pub resample: Resample,
    /// The VAE's weights variant (part of the fingerprint), e.g. `fp16`.
    pub variant: Option<String>,
    /// Pairs per VAE batch (2x images).
    pub batch: usize,
    /// Pairs per shard file.
    pub shard_pairs: usize,
    /// Replace an existing cache in the folder.
    pub overwrite: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            size: 512,
            resample: Resample::Bilinear,
            variant: None,
            batch: 8,
            shard_pairs: 256,
            overwrite: false,
        }
    }
}

fn shard_name(i: usize) -> String {
    format!("latents-{i:05}.safetensors")
}

/// Writes a shard through a temporary file, so a crash never leaves half a shard.
fn write_shard(path: &Path, tensors: &[(String, Vec<f32>)], shape: [usize; 3], infos: &[CachedPairInfo]) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, v)| {
            TensorView::new(Dtype::F32, shape.to_vec(), bytemuck::cast_slice(v))
                .map(|t| (k.clone(), t))
                .map_err(|e| Error::File { path: path.to_path_buf(), msg: e.to_string() })
        })
        .collect::<Result<_>>()?;
    let meta = serde_json::to_string(infos).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    let res = safetensors::serialize_to_file(views, Some(HashMap::from([("pairs".to_string(), meta)])), &tmp)
        .map_err(|e| Error::File { path: tmp.clone(), msg: e.to_string() })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Encodes every decodable pair of `stream` (read from `source`) with `vae`, loaded from
/// `vae_dir` with `opts.variant`, into shards under `out`, then writes the manifest.
/// `on_batch(pairs_done)` reports progress.
pub fn build(
    stream: PairStream,
    source: &DataSource,
    vae: &AutoencoderKL,
    vae_dir: &Path,
    out: &Path,
    opts: &BuildOptions,
    on_batch: &mut dyn FnMut(u64),
) -> Result<CacheManifest> {
    if opts.batch == 0 || opts.shard_pairs == 0 {
        return Err(Error::Invalid("cache-latents: --batch and --shard-pairs must be at least 1".into()));
    }
    if opts.size == 0 || !opts.size.is_multiple_of(8) {
        return Err(Error::Invalid(format!("cache-latents: --size {} is not a positive multiple of 8", opts.size)));
    }
    let key = CacheKey::for_vae(vae_dir, opts.variant.as_deref(), opts.size, opts.resample)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let manifest_path = out.join(MANIFEST);
    if manifest_path.exists() {
        if !opts.overwrite {
            return Err(Error::File {
                path: manifest_path,
                msg: "a latent cache is already here; pass --overwrite to replace it, or choose another --out".into(),
            });
        }
        if let Ok(old) = LatentCache::open(out) {
            for s in &old.manifest.shards {
                let _ = std::fs::remove_file(out.join(&s.file));
            }
        }
        std::fs::remove_file(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    }
    let lopts = LoaderOptions { size: key.size, resample: key.resample, crop: Crop::Center, flip: false, seed: 0 };
    let keep_ties = stream.options().keep_ties;
    let mut loader = PairLoader::new(stream, lopts)?;
    let device = vae.device();
    let mut shape: Option<[usize; 3]> = None;
    let mut shards = Vec::new();
    let mut tensors: Vec<(String, Vec<f32>)> = Vec::new();
    let mut infos: Vec<CachedPairInfo> = Vec::new();
    let mut total = 0u64;
    let mut flush = |tensors: &mut Vec<(String, Vec<f32>)>, infos: &mut Vec<CachedPairInfo>, shape: [usize; 3]| {
        if infos.is_empty() {
            return Ok(());
        }
        let file = shard_name(shards.len());
        write_shard(&out.join(&file), tensors, shape, infos)?;
        shards.push(ShardInfo {
            file,
            pairs: infos.len() as u64,
            first_index: infos[0].index,
            last_index: infos[infos.len() - 1].index,
        });
        tensors.clear();
        infos.clear();
        Ok::<(), Error>(())
    };
    loop {
        let batch = loader.next_batch(opts.batch)?;
        if batch.is_empty() {
            break;
        }
        let x = stack_pairs(&batch, &device)?; // (2B, 3, S, S)
        let z = {
            let _g = crate::autograd::no_grad();
            vae.latents_from_image(&x, None)? // (2B, C, h, w)
        };
        let zs = z.shape().to_vec();
        let s = [zs[1], zs[2], zs[3]];
        shape = Some(s);
        let n = s.iter().product::<usize>();
        let v = z.to_vec()?;
        let b = batch.len();
        for (i, p) in batch.into_iter().enumerate() {
            let idx = p.pair.index;
            tensors.push((format!("{idx}.chosen"), v[i * n..(i + 1) * n].to_vec()));
            tensors.push((format!("{idx}.rejected"), v[(b + i) * n..(b + i + 1) * n].to_vec()));
            infos.push(CachedPairInfo {
                index: idx,
                prompt: p.pair.prompt,
                category: p.pair.category,
                tie: p.pair.tie,
            });
            if infos.len() == opts.shard_pairs {
                flush(&mut tensors, &mut infos, s)?;
            }
        }
        total += b as u64;
        on_batch(total);
    }
    if let Some(s) = shape {
        flush(&mut tensors, &mut infos, s)?;
    }
    let lc = loader.counts().clone();
    let manifest = CacheManifest {
        format: FORMAT.into(),
        version: VERSION,
        key,
        vae_dir: vae_dir.display().to_string(),
        source: source.describe(),
        keep_ties,
        latent_shape: shape.unwrap_or([vae.config.latent_channels, 0, 0]),
        scaling_factor: vae.scaling_factor(),
        shift_factor: vae.shift_factor(),
        pairs: total,
        source_counts: loader.source().counts().clone(),
        undecodable_pairs: lc.undecodable_pairs,
        undecodable_images: lc.undecodable_images,
        shards,
    };
    write_json(&manifest_path, &manifest)?;
    Ok(manifest)
}

/// A decoded shard: its pairs in order.
struct Shard {
    pairs: Vec<CachedPair>,
}

/// A latent cache on disk; reads one shard at a time and keeps the last one read.
pub struct LatentCache {
    dir: PathBuf,
    manifest: CacheManifest,
    last: Mutex<Option<(usize, Arc<Shard>)>>,
}

impl LatentCache {
    /// Opens `dir` without checking what made it; see [`LatentCache::open_checked`].
    pub fn open(dir: &Path) -> Result<LatentCache> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::File {
            path: path.clone(),
            msg: format!("no latent cache here ({e}); make one with `vipo data cache-latents`"),
        })?;
        let manifest: CacheManifest = serde_json::from_str(&text)
            .map_err(|e| Error::File { path: path.clone(), msg: format!("not a vipo latent cache manifest: {e}") })?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(Error::File {
                path,
                msg: format!(
                    "format {} v{} is not {FORMAT} v{VERSION}; rebuild it with `vipo data cache-latents`",
                    manifest.format, manifest.version
                ),
            });
        }
        Ok(LatentCache { dir: dir.to_path_buf(), manifest, last: Mutex::new(None) })
    }

    /// Opens `dir` and checks it was made for `key`; a mismatch names each difference.
    pub fn open_checked(dir: &Path, key: &CacheKey) -> Result<LatentCache> {
        let c = LatentCache::open(dir)?;
        c.check(key)?;
        Ok(c)
    }

    pub fn check(&self, key: &CacheKey) -> Result<()> {
        let have = &self.manifest.key;
        let mut diffs = Vec::new();
        if have.vae_fingerprint != key.vae_fingerprint {
            diffs.push(format!(
                "VAE fingerprint {} (from {}) vs {} now",
                have.vae_fingerprint, self.manifest.vae_dir, key.vae_fingerprint
            ));
        }
        if have.size != key.size {
            diffs.push(format!("size {} px vs {} px now", have.size, key.size));
        }
        if have.resample != key.resample {
            diffs.push(format!("resample {:?} vs {:?} now", have.resample, key.resample));
        }
        if have.crop != key.crop {
            diffs.push(format!("crop {:?} vs {:?} now", have.crop, key.crop));
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(Error::File {
            path: self.dir.clone(),
            msg: format!(
                "latent cache does not match this run: {}; rebuild it with `vipo data cache-latents --vae <the VAE> \
                 --size <the size> --out <a new folder>` (or pass the VAE and size it was made with)",
                diffs.join("; ")
            ),
        })
    }

    pub fn manifest(&self) -> &CacheManifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cached pairs.
    pub fn len(&self) -> u64 {
        self.manifest.pairs
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.pairs == 0
    }

    /// (C, h, w) of each latent.
    pub fn latent_shape(&self) -> [usize; 3] {
        self.manifest.latent_shape
    }

    fn shard(&self, i: usize) -> Result<Arc<Shard>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((j, s)) = &*last {
            if *j == i {
                return Ok(s.clone());
            }
        }
        let info = self.manifest.shards.get(i).ok_or_else(|| Error::Invalid(format!("latent cache: no shard {i}")))?;
        let path = self.dir.join(&info.file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::File { path: path.clone(), msg };
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e}); is it truncated?")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let infos: Vec<CachedPairInfo> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("pairs"))
            .ok_or_else(|| bad("no `pairs` metadata".into()))
            .and_then(|t| serde_json::from_str(t).map_err(|e| bad(format!("`pairs` metadata: {e}"))))?;
        let shape = self.manifest.latent_shape;
        let get = |name: String| -> Result<Vec<f32>> {
            let t = st.tensor(&name).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(bad(format!(
                    "`{name}` is {:?} {:?}; the manifest says F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let mut pairs = Vec::with_capacity(infos.len());
        for info in infos {
            let chosen = get(format!("{}.chosen", info.index))?;
            let rejected = get(format!("{}.rejected", info.index))?;
            pairs.push(CachedPair { info, chosen, rejected });
        }
        let s = Arc::new(Shard { pairs });
        *last = Some((i, s.clone()));
        Ok(s)
    }

    /// The pair with source index `index`, if it was cached (reads its shard unless it is the
    /// last one read).
    pub fn get(&self, index: u64) -> Result<Option<CachedPair>> {
        let Some(i) = self.manifest.shards.iter().position(|s| s.first_index <= index && index <= s.last_index) else {
            return Ok(None);
        };
        let s = self.shard(i)?;
        Ok(s.pairs.iter().find(|p| p.info.index == index).cloned())
    }

    /// Every cached pair in source order, one shard in memory at a time.
    pub fn iter(&self) -> impl Iterator<Item = Result<CachedPair>> + '_ {
        (0..self.manifest.shards.len()).flat_map(move |i| {
            let items: Vec<Result<CachedPair>> = match self.shard(i) {
                Ok(s) => s.pairs.iter().cloned().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            items
        })
    }
}
