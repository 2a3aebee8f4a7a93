//! Named parameters and safetensors checkpoints.
//!
//! A `Param` is a named tensor whose value is replaced (never mutated) by the optimizer; its
//! gradient slot outlives every value, so graphs built from `value()` accumulate into the same
//! place across steps. A `ParamStore` keys params by their checkpoint names
//! (`down_blocks.0.resnets.0.conv1.weight`) in a `BTreeMap`: iteration, saving and the
//! optimizer's state all follow sorted key order, so every run writes the same bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::autograd::GradSlot;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{numel, DType, Tensor};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A named, shaped f32 parameter. A frozen one may be stored in f16 (`set_storage_dtype`),
/// half the memory; it still reads as f32.
pub struct Param {
    name: String,
    shape: Vec<usize>,
    trainable: AtomicBool,
    /// The current value, detached: `value()` attaches the slot on demand. f32, or f16 for a
    /// frozen param set to f16 storage (trainable params stay f32: updates need the precision).
    value: Mutex<Tensor>,
    slot: Arc<GradSlot>,
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = if self.is_trainable() { "trainable" } else { "frozen" };
        let d = self.storage_dtype();
        write!(f, "Param({} {:?} {t} {d} on {})", self.name, self.shape, self.device())
    }
}

impl Param {
    /// A parameter holding `value` (f32).
    pub fn new(name: impl Into<String>, value: Tensor, trainable: bool) -> Result<Param> {
        let name = name.into();
        if value.dtype() != DType::F32 {
            return Err(Error::Invalid(format!("param `{name}`: dtype {} (parameters are f32)", value.dtype())));
        }
        Ok(Param {
            shape: value.shape().to_vec(),
            name,
            trainable: AtomicBool::new(trainable),
            value: Mutex::new(value.detach()),
            slot: Arc::new(GradSlot::default()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn device(&self) -> Device {
        lock(&self.value).device()
    }

    pub fn is_trainable(&self) -> bool {
        self.trainable.load(Ordering::Relaxed)
    }

    /// Freezing also drops the gradient, so a frozen param holds no gradient memory. Making a
    /// param trainable brings an f16-stored value back to f32 (exactly); freezing it again keeps
    /// f32 until `set_storage_dtype` is called again.
    pub fn set_trainable(&self, trainable: bool) {
        self.trainable.store(trainable, Ordering::Relaxed);
        if !trainable {
            self.zero_grad();
            return;
        }
        let mut v = lock(&self.value);
        // Should the widening fail (out of memory), reads still widen and the next
        // `set_value` stores f32, since the param is trainable now.
        if v.dtype() != DType::F32 {
            if let Ok(w) = v.to_dtype(DType::F32) {
                *v = w.detach();
            }
        }
    }

    /// The dtype the value is kept in: f32, or f16 for a frozen param set to f16 storage.
    pub fn storage_dtype(&self) -> DType {
        lock(&self.value).dtype()
    }

    /// Keeps the value as `dtype`: F16 halves a frozen weight's memory (rounded to nearest even,
    /// as PyTorch's `.half()`); reads still return f32. Trainable params must stay f32.
    pub fn set_storage_dtype(&self, dtype: DType) -> Result<()> {
        if dtype != DType::F32 && self.is_trainable() {
            return Err(Error::Invalid(format!(
                "param `{}` is trainable: only frozen params can be stored as {dtype} (freeze it first)",
                self.name
            )));
        }
        let mut v = lock(&self.value);
        let cast = v.to_dtype(dtype)?.detach();
        *v = cast;
        Ok(())
    }

    /// The current value in f32; for a trainable param, an autograd leaf accumulating into this
    /// param's gradient slot. Frozen params return a detached tensor (no node, no gradient).
    pub fn value(&self) -> Tensor {
        let v = self.frozen_value();
        if self.is_trainable() {
            v.with_slot(self.slot.clone())
        } else {
            v
        }
    }

    /// The current value in f32 with no autograd history, whatever `trainable` says. An f16-stored
    /// value is widened into a new tensor on each call, freed when the caller drops it. (Should
    /// that fail, which takes a device out of memory, the f16 value comes back and the op that
    /// reads it reports the dtype.)
    pub fn frozen_value(&self) -> Tensor {
        let v = self.stored_value();
        match v.dtype() {
            DType::F32 => v,
            _ => v.to_dtype(DType::F32).unwrap_or(v),
        }
    }

    /// The value for the weight operand of a matmul or a convolution: a frozen f16-stored value
    /// as it is, where those kernels can read it (the CPU path; GPUs with SHADER_F16), so no
    /// f32 copy is made; otherwise [`Self::value`].
    pub fn weight_value(&self) -> Tensor {
        if !self.is_trainable() {
            let v = self.stored_value();
            let readable = v.device().gpu().is_none_or(|g| g.features.contains(wgpu::Features::SHADER_F16));
            if v.dtype() == DType::F16 && readable {
                return v;
            }
        }
        self.value()
    }

    /// The value as stored (f16 for a param set to f16 storage), without autograd history:
    /// for savers and host caches, which need no f32 copy on the device (`to_vec` widens).
    pub fn stored_value(&self) -> Tensor {
        lock(&self.value).clone()
    }

    /// The gradient accumulated since the last `zero_grad`.
    pub fn grad(&self) -> Option<Tensor> {
        self.slot.get()
    }

    /// Replaces the gradient (clipping, scaling); checks shape and device.
    pub fn set_grad(&self, grad: Option<Tensor>) -> Result<()> {
        if let Some(g) = &grad {
            self.check_like("set_grad", g)?;
        }
        self.slot.set(grad.map(|g| g.detach()));
        Ok(())
    }

    pub fn zero_grad(&self) {
        self.slot.set(None);
    }

    /// Replaces the value (f32, same shape and device); the gradient slot stays. A frozen
    /// f16-stored param rounds it to f16.
    pub fn set_value(&self, value: Tensor) -> Result<()> {
        self.check_like("set_value", &value)?;
        let mut v = lock(&self.value);
        let dtype = if self.is_trainable() { DType::F32 } else { v.dtype() };
        *v = value.to_dtype(dtype)?.detach();
        Ok(())
    }

    /// Moves the value (in its storage dtype) and any gradient to `device`.
    pub fn to(&self, device: &Device) -> Result<()> {
        let v = lock(&self.value).clone();
        // Reads widen an f16 value to f32 and cannot report errors: check the f32 copy fits now.
        if let (DType::F16, Device::Gpu(ctx)) = (v.dtype(), device) {
            let (bytes, limit) = ((self.numel() * 4) as u64, ctx.limits.max_storage_buffer_binding_size);
            if bytes > limit {
                return Err(Error::Invalid(format!(
                    "param `{}`: its f32 reads need {bytes} bytes, over {}'s max_storage_buffer_binding_size \
                     of {limit}",
                    self.name, ctx.info.name
                )));
            }
        }
        let moved = v.to(device)?.detach();
        if let Some(g) = self.slot.get() {
            self.slot.set(Some(g.to(device)?.detach()));
        }
        *lock(&self.value) = moved;
        Ok(())
    }

    fn check_like(&self, op: &'static str, t: &Tensor) -> Result<()> {
        if t.shape() != self.shape.as_slice() {
            return Err(Error::shape(
                op,
                format!("param `{}` has shape {:?}, got {:?}", self.name, self.shape, t.shape()),
            ));
        }
        if t.dtype() != DType::F32 {
            return Err(Error::DType { op, dtype: t.dtype().to_string(), supported: "f32" });
        }
        let dev = self.device();
        if t.device() != dev {
            return Err(Error::Device {
                op,
                msg: format!("param `{}` lives on {dev}, got a tensor on {}", self.name, t.device()),
            });
        }
        Ok(())
    }
}

/// Parameters by checkpoint key, in sorted key order.
#[derive(Default)]
pub struct ParamStore {
    params: BTreeMap<String, Arc<Param>>,
    /// The file the store was loaded from, for error messages.
    source: Option<PathBuf>,
    /// Keys a model has asked for, so keys that no layer uses can be reported.
    used: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Set while [`ParamStore::init_random`] builds a model: missing keys are created.
    init: Option<RandomInit>,
}

/// Params created on request while a model is built from an empty store.
struct RandomInit {
    seed: u64,
    device: Device,
    created: Mutex<BTreeMap<String, Arc<Param>>>,
}

impl RandomInit {
    fn get_or_create(&self, name: &str, shape: &[usize]) -> Result<Arc<Param>> {
        let mut created = lock(&self.created);
        if let Some(p) = created.get(name) {
            if p.shape() != shape {
                return Err(Error::shape(
                    "param init",
                    format!("`{name}` was created as {:?}, now asked for as {shape:?}", p.shape()),
                ));
            }
            return Ok(p.clone());
        }
        let values = init_values(name, shape, self.seed);
        let p = Arc::new(Param::new(name, Tensor::from_vec(values, shape, &self.device)?, true)?);
        created.insert(name.to_string(), p.clone());
        Ok(p)
    }
}

/// FNV-1a: a per-key seed, so a param's values do not depend on the order layers ask for them.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// PyTorch-like initial values chosen by rank and name: conv kernels (O, I, k, k) uniform in
/// +-1/sqrt(fan_in) (PyTorch's kaiming_uniform with a = sqrt(5)); matrices (linears,
/// embeddings) normal(0, 0.02); 1-D `*.weight` (norm scales) 1; biases 0.
fn init_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n = numel(shape);
    let mut rng = crate::rng::Rng::new(seed ^ name_hash(name));
    match shape.len() {
        4 => {
            let bound = 1.0 / ((shape[1] * shape[2] * shape[3]).max(1) as f32).sqrt();
            (0..n).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect()
        }
        1 if name.ends_with("weight") => vec![1.0; n],
        1 => vec![0.0; n],
        _ => rng.normal_vec(n).into_iter().map(|x| 0.02 * x).collect(),
    }
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParamStore({} params, {} elements", self.len(), self.num_params())?;
        if let Some(s) = &self.source {
            write!(f, ", from {}", s.display())?;
        }
        write!(f, ")")
    }
}

impl ParamStore {
    pub fn new() -> ParamStore {
        ParamStore::default()
    }

    /// A store of freshly initialised params for whatever model `build` constructs from it:
    /// each key a layer asks for (through [`ParamStore::get_shaped`]) is created with
    /// PyTorch-like random values on `device`, the same for the same `seed` and key whatever
    /// the order of the requests. Returns the store (all params trainable), which `build`'s
    /// model shares; models for pretraining from scratch start here.
    pub fn init_random(
        seed: u64,
        device: &Device,
        build: impl FnOnce(&ParamStore) -> Result<()>,
    ) -> Result<ParamStore> {
        let mut store = ParamStore {
            init: Some(RandomInit { seed, device: device.clone(), created: Mutex::new(BTreeMap::new()) }),
            ..ParamStore::default()
        };
        build(&store)?;
        if let Some(init) = store.init.take() {
            store.params = init.created.into_inner().unwrap_or_else(|e| e.into_inner());
        }
        lock(&store.used).clear();
        Ok(store)
    }

    /// Adds a param named `name`; a name already present is an error.
    pub fn insert(&mut self, name: impl Into<String>, value: Tensor, trainable: bool) -> Result<Arc<Param>> {
        let name = name.into();
        if self.params.contains_key(&name) {
            return Err(Error::Invalid(format!("param store: `{name}` is already present")));
        }
        let p = Arc::new(Param::new(name.clone(), value, trainable)?);
        self.params.insert(name, p.clone());
        Ok(p)
    }

    /// The param `name`; the error lists similar keys when there are any.
    pub fn get(&self, name: &str) -> Result<Arc<Param>> {
        if let Some(p) = self.params.get(name) {
            lock(&self.used).insert(name.to_string());
            return Ok(p.clone());
        }
        if let Some(p) = self.init.as_ref().and_then(|i| lock(&i.created).get(name).cloned()) {
            return Ok(p);
        }
        let mut msg = format!("no parameter `{name}` in {}", self.label());
        let near = similar_keys(name, self.params.keys().map(String::as_str));
        if !near.is_empty() {
            msg.push_str(&format!("; similar keys: {}", near.join(", ")));
        }
        Err(Error::Invalid(msg))
    }

    /// The param `name`, checking that it has `shape` (created, while
    /// [`ParamStore::init_random`] builds, when missing).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Arc<Param>> {
        if let (Some(init), false) = (&self.init, self.params.contains_key(name)) {
            return init.get_or_create(name, shape);
        }
        let p = self.get(name)?;
        if p.shape() != shape {
            return Err(Error::shape(
                "param store",
                format!("`{name}` in {} has shape {:?}, expected {shape:?}", self.label(), p.shape()),
            ));
        }
        Ok(p)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name) || self.init.as_ref().is_some_and(|i| lock(&i.created).contains_key(name))
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    /// The file this store was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// (key, param) in sorted key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Param>)> {
        self.params.iter().map(|(k, p)| (k.as_str(), p))
    }

    /// Every param, in key order.
    pub fn params(&self) -> Vec<Arc<Param>> {
        self.params.values().cloned().collect()
    }

    /// The trainable params, in key order (what the optimizer and clipping take).
    pub fn trainable(&self) -> Vec<Arc<Param>> {
        self.params.values().filter(|p| p.is_trainable()).cloned().collect()
    }

    /// Total elements over all params.
    pub fn num_params(&self) -> usize {
        self.params.values().map(|p| p.numel()).sum()
    }

    pub fn num_trainable_params(&self) -> usize {
        self.params.values().filter(|p| p.is_trainable()).map(|p| p.numel()).sum()
    }

    /// Sets each param's `trainable` to `f(key)`.
    pub fn set_trainable_where(&self, f: impl Fn(&str) -> bool) {
        for (k, p) in &self.params {
            p.set_trainable(f(k));
        }
    }

    pub fn freeze_all(&self) {
        self.set_trainable_where(|_| false);
    }

    /// Stores every frozen param as `dtype` (F16: half the memory, reads still f32); trainable
    /// params stay f32. `F32` brings them back.
    pub fn store_frozen_as(&self, dtype: DType) -> Result<()> {
        self.params.values().filter(|p| !p.is_trainable()).try_for_each(|p| p.set_storage_dtype(dtype))
    }

    /// Bytes the params' values take in their storage dtypes (excluding gradients).
    pub fn stored_bytes(&self) -> usize {
        self.params.values().map(|p| p.numel() * p.storage_dtype().size()).sum()
    }

    pub fn zero_grad(&self) {
        self.params.values().for_each(|p| p.zero_grad());
    }

    /// Moves every param (and gradient) to `device`, in place: modules holding the
    /// `Arc<Param>`s see the move.
    pub fn to(&self, device: &Device) -> Result<()> {
        self.params.values().try_for_each(|p| p.to(device))
    }

    /// Keys no `get` has asked for, in sorted order.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = lock(&self.used);
        self.params.keys().filter(|k| !used.contains(*k)).cloned().collect()
    }

    /// After a model is built from this store: an error naming every key that no layer used
    /// (a checkpoint of another architecture or config, or a key-name mismatch).
    pub fn check_all_used(&self) -> Result<()> {
        let unused = self.unused_keys();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = unused.iter().take(20).map(|k| format!("  unexpected key `{k}`")).collect();
        let more = if unused.len() > 20 { format!("\n  ... and {} more", unused.len() - 20) } else { String::new() };
        let msg = format!("{} key(s) not used by the model:\n{}{more}", unused.len(), shown.join("\n"));
        Err(match &self.source {
            Some(path) => Error::File { path: path.clone(), msg },
            None => Error::Invalid(format!("param store: {msg}")),
        })
    }

    /// A view that prefixes names: `store.pp("down_blocks").pp(0).get("conv.weight")` gets
    /// `down_blocks.0.conv.weight`.
    pub fn pp(&self, part: impl Display) -> ParamPath<'_> {
        ParamPath { store: self, prefix: part.to_string() }
    }

    fn label(&self) -> String {
        match &self.source {
            Some(s) => format!("the param store loaded from {}", s.display()),
            None => "the param store".into(),
        }
    }

    /// Loads every tensor of a safetensors file (f32, f16 or bf16, converted to f32) as a
    /// trainable param on `device`; `freeze_all` / `set_trainable_where` change that.
    pub fn load_safetensors(path: impl AsRef<Path>, device: &Device) -> Result<ParamStore> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        let mut store = ParamStore { source: Some(path.to_path_buf()), ..ParamStore::default() };
        for name in names {
            let view = st.tensor(name).map_err(|e| file_err(path, e))?;
            let data = to_f32(path, name, &view)?;
            let t = Tensor::from_vec(data, view.shape(), device)?;
            store.params.insert(name.to_string(), Arc::new(Param::new(name, t, true)?));
        }
        Ok(store)
    }

    /// Replaces every param's value with the file's tensor of the same key. The file must hold
    /// exactly this store's keys and shapes; otherwise nothing is loaded and the error lists
    /// every missing, unexpected and wrongly shaped key.
    pub fn load_into(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let file: BTreeMap<String, Vec<usize>> =
            st.iter().map(|(name, view)| (name.to_string(), view.shape().to_vec())).collect();
        let want: BTreeMap<String, Vec<usize>> =
            self.params.iter().map(|(k, p)| (k.clone(), p.shape().to_vec())).collect();
        let mut problems = key_report(&file, &want, "the file", "the model");
        for (name, view) in st.iter() {
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                problems.push(format!("  unsupported dtype {:?} for `{name}` (F32, F16 and BF16 load)", view.dtype()));
            }
        }
        if !problems.is_empty() {
            let msg = format!("does not match the model's parameters:\n{}", problems.join("\n"));
            return Err(Error::File { path: path.to_path_buf(), msg });
        }
        for (name, p) in &self.params {
            let view = st.tensor(name).map_err(|e| file_err(path, e))?;
            let t = Tensor::from_vec(to_f32(path, name, &view)?, view.shape(), &p.device())?;
            p.set_value(t)?;
        }
        Ok(())
    }

    /// Checks the store against the keys and shapes a model expects, reporting every
    /// missing, unexpected and wrongly shaped key in one error.
    pub fn check(&self, expected: &[(&str, &[usize])]) -> Result<()> {
        let have: BTreeMap<String, Vec<usize>> =
            self.params.iter().map(|(k, p)| (k.clone(), p.shape().to_vec())).collect();
        let want: BTreeMap<String, Vec<usize>> = expected.iter().map(|(k, s)| (k.to_string(), s.to_vec())).collect();
        let problems = key_report(&have, &want, "the checkpoint", "the model");
        if problems.is_empty() {
            return Ok(());
        }
        let msg = format!("the checkpoint does not match the model's parameters:\n{}", problems.join("\n"));
        Err(match &self.source {
            Some(path) => Error::File { path: path.clone(), msg },
            None => Error::Invalid(format!("param store: {msg}")),
        })
    }

    /// Writes every param as `dtype` (F32, or F16 rounded to nearest even), in sorted key order,
    /// atomically: `path.tmp` is written and synced, then renamed over `path`. f16-stored params
    /// are read as stored (no f32 copy on the device), so they save exactly.
    pub fn save_safetensors(&self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let tensors = self.params.iter().map(|(k, p)| (k.clone(), p.stored_value())).collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(path.as_ref(), tensors, dtype, meta)
    }
}

/// Names under a prefix of a `ParamStore`.
#[derive(Clone)]
pub struct ParamPath<'a> {
    store: &'a ParamStore,
    prefix: String,
}

impl<'a> ParamPath<'a> {
    pub fn pp(&self, part: impl Display) -> ParamPath<'a> {
        ParamPath { store: self.store, prefix: self.key(part) }
    }
    pub fn key(&self, name: impl Display) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn get(&self, name: impl Display) -> Result<Arc<Param>> {
        self.store.get(&self.key(name))
    }
    pub fn get_shaped(&self, name: impl Display, shape: &[usize]) -> Result<Arc<Param>> {
        self.store.get_shaped(&self.key(name), shape)
    }
    pub fn contains(&self, name: impl Display) -> bool {
        self.store.contains(&self.key(name))
    }
}

/// Up to 5 keys within a small edit distance of `name`, nearest first.
fn similar_keys<'a>(name: &str, keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let limit = (name.len() / 4).max(3);
    let mut near: Vec<(usize, &str)> = keys.filter_map(|k| edit_distance(name, k, limit).map(|d| (d, k))).collect();
    near.sort();
    near.into_iter().take(5).map(|(_, k)| format!("`{k}`")).collect()
}

/// Levenshtein distance when it is at most `limit`.
fn edit_distance(a: &str, b: &str, limit: usize) -> Option<usize> {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    (prev[b.len()] <= limit).then_some(prev[b.len()])
}

/// Every difference between two key -> shape maps, one line each under a heading per kind;
/// empty when they agree. `have` is what was found (a file, a store), `want` the reference.
pub(crate) fn key_report(
    have: &BTreeMap<String, Vec<usize>>,
    want: &BTreeMap<String, Vec<usize>>,
    have_label: &str,
    want_label: &str,
) -> Vec<String> {
    let missing: Vec<String> =
        want.iter().filter(|(k, _)| !have.contains_key(*k)).map(|(k, s)| format!("    {k} {s:?}")).collect();
    let unexpected: Vec<String> =
        have.iter().filter(|(k, _)| !want.contains_key(*k)).map(|(k, s)| format!("    {k} {s:?}")).collect();
    let shapes: Vec<String> = have
        .iter()
        .filter_map(|(k, s)| {
            let w = want.get(k)?;
            (w != s).then(|| format!("    {k}: {have_label} {s:?}, {want_label} {w:?}"))
        })
        .collect();
    let mut out = Vec::new();
    for (head, lines) in [
        (format!("missing from {have_label} ({})", missing.len()), missing),
        (format!("unexpected in {have_label} ({})", unexpected.len()), unexpected),
        (format!("wrong shape ({})", shapes.len()), shapes),
    ] {
        if !lines.is_empty() {
            out.push(format!("  {head}:"));
            out.extend(lines);
        }
    }
    out
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn file_err(path: &Path, e: impl Display) -> Error {
    Error::File { path: path.to_path_buf(), msg: e.to_string() }
}

/// Parses a whole safetensors file; a truncated or foreign file is an error naming it.
pub(crate) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::File {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file ({e}); is it truncated or another format?"),
    })
}

/// The `__metadata__` of a parsed file.
pub(crate) fn metadata(path: &Path, bytes: &[u8]) -> Result<std::collections::HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| file_err(path, e))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// A tensor's values as f32 (f16 and bf16 widen exactly).
pub(crate) fn to_f32(path: &Path, name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.par_chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.par_chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.par_chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(Error::File {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 load as f32"),
            })
        }
    })
}

/// A tensor read back and encoded only when the writer reaches it, so a save holds one
/// tensor's host copy at a time. A failed readback is kept in `err` (the `View` trait cannot
/// fail) and the save is abandoned after writing.
struct LazyView<'a> {
    name: String,
    tensor: Tensor,
    dtype: DType,
    err: &'a Mutex<Option<Error>>,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
        }
    }
    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.data_len();
        match self.tensor.to_vec() {
            Ok(v) => Cow::Owned(match self.dtype {
                DType::F32 => bytemuck::cast_slice(&v).to_vec(),
                DType::F16 => {
                    // f16 tops out at 65504: a finite value that would turn into inf is an error.
                    if let Some(x) = v.iter().find(|x| x.is_finite() && half::f16::from_f32(**x).is_infinite()) {
                        let msg = format!("`{}` holds {x}, beyond the f16 range; save it as f32", self.name);
                        lock(self.err).get_or_insert(Error::Invalid(msg));
                    }
                    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
                }
            }),
            Err(e) => {
                lock(self.err).get_or_insert(e);
                Cow::Owned(vec![0; len])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.dtype.size()
    }
}

/// `path` with `.tmp` appended to its file name.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `tensors` (name -> tensor) as `dtype` with `meta` atomically. The safetensors crate
/// orders tensors by name and the metadata map is sorted here, so output bytes are deterministic
/// for one metadata entry (the crate stores it in a HashMap: callers pass one key).
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    dtype: DType,
    meta: BTreeMap<String, String>,
) -> Result<()> {
    let err = Mutex::new(None);
    let views: Vec<(String, LazyView<'_>)> =
        tensors.into_iter().map(|(k, t)| (k.clone(), LazyView { name: k, tensor: t, dtype, err: &err })).collect();
    let tmp = tmp_path(path);
    let written = safetensors::serialize_to_file(views, Some(meta.into_iter().collect()), &tmp)
        .map_err(|e| file_err(&tmp, e))
        .and_then(|()| match lock(&err).take() {
            Some(e) => Err(e),
            None => Ok(()),
        })
        // The crate does not sync; a rename of unsynced data can leave an empty file after a crash.
        .and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
